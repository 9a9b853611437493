/*-------------------------------------------------------------------------
 *
 * http.h
 *	  Concurrent HTTP requests over one long-lived libcurl multi handle.
 *
 * http_perform() runs a set of requests at once and returns when every one
 * has finished (or the postmaster died); it is http_stream() over a feed of
 * the array.  Connections are kept alive across
 * calls.  Outputs are allocated in the caller's CurrentMemoryContext; all
 * libcurl state is process-lifetime static storage.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_HTTP_H
#define D365INV_HTTP_H

#include "lib/stringinfo.h"
#include "utils/palloc.h"

typedef struct HttpRequest
{
	/* input */
	const char *method;			/* "POST", "GET" (others as a custom method) */
	const char *url;
	const char *const *headers; /* NULL-terminated array of "Name: value" */
	const char *body;			/* not copied; must stay valid during the call */
	size_t		body_len;

	/* output (every field is (re)set by http_perform) */
	long		status;			/* HTTP status of a complete response, else 0 */
	char	   *content_type;	/* palloc'd, NULL if none */
	char	   *retry_after;	/* palloc'd value of Retry-After, NULL if none */
	double		requests_left;	/* x-ms-ratelimit-burst-remaining-xrm-requests:
								 * the service protection budget's requests
								 * left; -1 if absent */
	double		seconds_left;	/* x-ms-ratelimit-time-remaining-xrm-requests:
								 * its execution time left (s); -1 if absent */
	StringInfoData response;	/* body (initStringInfo'd by http_perform);
								 * partial when transport_error */
	bool		transport_error;	/* no complete response */
	bool		maybe_sent;		/* transport error after (part of) the request
								 * may have reached the server: anything but a
								 * failure to resolve or connect before a byte
								 * of the request was written */
	bool		too_large;		/* response exceeded the cap (implies
								 * transport_error) */
	char		error[256];		/* human-readable transport error; never holds
								 * request headers or body */
	double		elapsed_ms;
	void	   *user;			/* caller's pointer, untouched */
	MemoryContext mcxt;			/* http_stream(): context for the outputs;
								 * NULL = the current one at start */
} HttpRequest;

typedef struct HttpSettings
{
	int			connect_timeout_ms; /* d365inv.http_connect_timeout, default
									 * 10000 */
	int			timeout_ms;		/* d365inv.http_timeout, default 120000 (total
								 * per request) */
	size_t		max_response_bytes; /* default 64 MiB; 0 means the default */
	const char *ca_file;		/* NULL = system default; superuser-only GUC
								 * d365inv.ca_file */
} HttpSettings;

#define HTTP_DEFAULT_CONNECT_TIMEOUT_MS	10000
#define HTTP_DEFAULT_TIMEOUT_MS			120000
#define HTTP_DEFAULT_MAX_RESPONSE_BYTES	((size_t) 64 * 1024 * 1024)

extern void http_perform(HttpRequest **reqs, int n, const HttpSettings *settings);

/*
 * http_stream(): a sliding window of up to n requests (see http.c).  next()
 * returns the next request to start, or NULL: with *wait_ms left at 0 there
 * is nothing more; set to more than 0, nothing may start now, ask again in
 * that many milliseconds (pacing).
 */
typedef HttpRequest *(*HttpNextFn) (void *arg, long *wait_ms);
typedef void (*HttpDoneFn) (HttpRequest *req, void *arg);
extern void http_stream(int n, const HttpSettings *settings, HttpNextFn next,
						HttpDoneFn done, void *arg);

/*
 * http_stream_idle(): http_stream() that calls idle(arg) while every
 * started request is under way, before it waits: work that overlaps the
 * requests.  idle() returns true when it did something.
 */
typedef bool (*HttpIdleFn) (void *arg);
extern void http_stream_idle(int n, const HttpSettings *settings, HttpNextFn next,
							 HttpDoneFn done, HttpIdleFn idle, void *arg);

/*
 * http_stream_pump(): from inside idle(), between statements: answers that
 * came in go to done(), free places get what next() has ready (neither may
 * run a transaction then).  Does nothing elsewhere.
 */
extern void http_stream_pump(void);
extern void http_cleanup(void);

#endif							/* D365INV_HTTP_H */
