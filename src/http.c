/*-------------------------------------------------------------------------
 *
 * http.c
 *	  Concurrent HTTP requests for d365inv over libcurl's multi interface.
 *
 * This file owns all of the process's libcurl state: curl_global_init(), one
 * multi handle (which holds the connection cache, so keep-alive connections
 * survive from one http_perform() call to the next) and a pool of easy
 * handles, one per concurrent request.  All of that lives in static storage
 * and TopMemoryContext for the life of the process; everything handed back
 * to the caller is palloc'd in the caller's CurrentMemoryContext, so a
 * caller that resets its context per batch leaks nothing.
 *
 * libcurl callbacks run inside curl_multi_perform(), so they must never
 * ereport(): a longjmp out of libcurl would leave the multi handle in an
 * undefined state.  They allocate with MCXT_ALLOC_NO_OOM and abort the
 * transfer instead.  ereport() is only used outside libcurl calls, and a
 * PG_FINALLY block detaches every in-flight transfer if an error (e.g. a
 * query cancel from CHECK_FOR_INTERRUPTS) escapes.
 *
 * Request headers carry the bearer token: they are never logged, and libcurl
 * is never put in verbose mode.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <pthread.h>
#include <signal.h>

#include <curl/curl.h>

#include "miscadmin.h"
#include "storage/pmsignal.h"
#include "utils/memutils.h"

#include "http.h"

/* How long one curl_multi_poll() may sleep before we look at interrupts */
#define HTTP_POLL_MS		100

/* CURLOPT_PROTOCOLS_STR and friends appeared in libcurl 7.85.0 */
#define HTTP_MIN_CURL_VERSION	0x075500

/* One easy handle of the pool and the transfer currently running on it */
typedef struct HttpSlot
{
	CURL	   *easy;
	HttpRequest *req;			/* request in flight here, NULL when idle */
	MemoryContext mcxt;			/* caller's context: outputs go there */
	struct curl_slist *headers; /* libcurl-malloc'd copy of req->headers */
	size_t		cap;			/* response body cap, bytes */
	const char *body;			/* req->body, or "" */
	size_t		body_len;
	size_t		sent;			/* body bytes handed to libcurl so far */
	bool		presized;		/* response buffer sized from Content-Length */
	bool		too_large;		/* write callback hit the cap */
	bool		oom;			/* a callback could not allocate */
	char		errbuf[CURL_ERROR_SIZE];
} HttpSlot;

static bool curl_initialized = false;
static CURLM *multi = NULL;
static HttpSlot **slots = NULL; /* in TopMemoryContext; never moved, since
								 * libcurl holds pointers into each slot */
static int	nslots = 0;

static void http_init(void);
static void ensure_slots(int n);
static bool start_request(HttpSlot *slot, HttpRequest *req,
						  const HttpSettings *settings, size_t cap);
static void finish_request(HttpSlot *slot, CURLcode rc);
static int	abandon_all_into(const char *why, HttpRequest **finished);
static void reset_outputs(HttpRequest *req);
typedef struct StreamRun StreamRun;
static bool run_idle(StreamRun *r);
static void stream_run(int n, const HttpSettings *settings, HttpNextFn next,
					   HttpDoneFn done, HttpIdleFn idle, void *arg,
					   MemoryContext outputs_mcxt);
static void stream_transfers(int n, const HttpSettings *settings, HttpNextFn next,
							 HttpDoneFn done, HttpIdleFn idle, void *arg,
							 MemoryContext outputs_mcxt);
static int	collect_done_into(HttpRequest **finished);
static void detach(HttpSlot *slot);
static void detach_all(void);
static bool request_maybe_sent(CURL *easy, CURLcode rc);
static CURLMcode multi_perform_masked(int *running);
static bool reserve(HttpSlot *slot, StringInfo buf, size_t need, bool exact);
static char *header_value(HttpSlot *slot, const char *line, size_t len,
						  const char *name);
static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *userdata);
static size_t header_cb(char *buffer, size_t size, size_t nitems, void *userdata);
static size_t read_cb(char *buffer, size_t size, size_t nitems, void *userdata);
static int	seek_cb(void *userdata, curl_off_t offset, int origin);

/* The feed of http_perform(): the caller's array, one request after another */
typedef struct ArrayFeed
{
	HttpRequest **reqs;
	int			n;
	int			next;
} ArrayFeed;

static HttpRequest *
array_next(void *arg, long *wait_ms)
{
	ArrayFeed  *feed = (ArrayFeed *) arg;

	/* *wait_ms stays 0: a NULL means "no more", never "paced, ask again" */
	return feed->next < feed->n ? feed->reqs[feed->next++] : NULL;
}

static void
array_done(HttpRequest *req, void *arg)
{
	/* the outputs stay where they are; http_perform() returns them all */
}

/*
 * Run reqs[0..n-1] concurrently; return when all have finished.
 *
 * Every output field of every request is reset first; settings may be NULL
 * for the defaults (timeouts <= 0 and a cap of 0 also mean the defaults).
 * Transport failures are reported per request (transport_error, error);
 * only errors outside any single request (out of memory, a libcurl too
 * old, an interrupt) are thrown.  If the postmaster dies, returns early with the unfinished
 * requests marked transport_error and maybe_sent.
 *
 * A thin wrapper over http_stream()'s loop: a window of n over a feed of
 * the array, so every request starts at once.  Unlike http_stream(), the
 * outputs always go to the caller's CurrentMemoryContext (req->mcxt is not
 * looked at).
 */
void
http_perform(HttpRequest **reqs, int n, const HttpSettings *settings)
{
	ArrayFeed	feed = {reqs, n, 0};

	if (n <= 0)
		return;
	stream_run(n, settings, array_next, array_done, NULL, &feed, CurrentMemoryContext);
	Assert(feed.next == n);
}

/* Every output field, reset; the response buffer in CurrentMemoryContext */
static void
reset_outputs(HttpRequest *req)
{
	req->status = 0;
	req->content_type = NULL;
	req->retry_after = NULL;
	req->requests_left = -1;
	req->seconds_left = -1;
	initStringInfo(&req->response);
	req->transport_error = false;
	req->maybe_sent = false;
	req->too_large = false;
	req->error[0] = '\0';
	req->elapsed_ms = 0;
}

/*
 * Keep up to n requests in flight: while fewer run, start what next(arg)
 * returns; hand each finished request to done(req, arg) as soon as it
 * finishes, while the others go on.  Returns once next() has returned NULL
 * (with *wait_ms left at 0) and every started request is done.  Each
 * request's outputs are allocated in req->mcxt (when set), so done() may
 * free the request with that context.  next() and done() may run
 * transactions: transfers in flight merely wait meanwhile.  On an ERROR
 * (from a callback or an interrupt) every unfinished transfer is abandoned
 * and never touched again.
 */
void
http_stream(int n, const HttpSettings *settings, HttpNextFn next, HttpDoneFn done, void *arg)
{
	stream_run(n, settings, next, done, NULL, arg, NULL);
}

/*
 * http_stream() with work of the caller's own that overlaps the requests:
 * whenever every started request is under way and none has finished (and
 * whenever nothing may start yet), idle(arg) is called before waiting; it
 * returns true when it did something, and then the transfers are looked
 * at again (answers that came in meanwhile, places that came free) before
 * any wait.  It may run transactions, like next() and done().
 */
void
http_stream_idle(int n, const HttpSettings *settings, HttpNextFn next, HttpDoneFn done,
				 HttpIdleFn idle, void *arg)
{
	stream_run(n, settings, next, done, idle, arg, NULL);
}

/*
 * The stream under way: stream_run() is never re-entered, and
 * http_stream_pump() works on it from inside its idle() callback.
 */
struct StreamRun
{
	int			n;				/* places */
	const HttpSettings *settings;
	size_t		cap;			/* max_response_bytes */
	HttpNextFn	next;
	HttpDoneFn	done;
	HttpIdleFn	idle;
	void	   *arg;
	MemoryContext outputs_mcxt;
	HttpRequest **finished;		/* room for every slot */
	int			active;			/* requests started, not yet done() */
	bool		more;			/* next() may still give requests */
	long		pause_ms;		/* next() asked to wait this long */
	bool		in_idle;		/* inside idle(): a pump may run */
	bool		pumping;
};

static StreamRun *stream_under_way = NULL;

static void fill_places(StreamRun *r, bool pump);
static int	collect_answers(StreamRun *r);

/*
 * http_stream() and http_perform(): the defaults, the pool and the cleanup
 * after an error.  outputs_mcxt, when not NULL, is where every request's
 * outputs go, whatever its req->mcxt says.
 */
static void
stream_run(int n, const HttpSettings *settings, HttpNextFn next, HttpDoneFn done,
		   HttpIdleFn idle, void *arg, MemoryContext outputs_mcxt)
{
	static const HttpSettings defaults = {
		HTTP_DEFAULT_CONNECT_TIMEOUT_MS,
		HTTP_DEFAULT_TIMEOUT_MS,
		HTTP_DEFAULT_MAX_RESPONSE_BYTES,
		NULL
	};

	StreamRun  *outer = stream_under_way;	/* a stream inside a callback */

	http_init();
	ensure_slots(n);

	PG_TRY();
	{
		stream_transfers(n, settings ? settings : &defaults, next, done, idle, arg,
						 outputs_mcxt);
	}
	PG_FINALLY();
	{
		/*
		 * After an error the caller's memory (requests, response buffers) is
		 * about to go away: take every unfinished transfer off the multi
		 * handle so that libcurl never touches it again.  A no-op when all
		 * requests finished normally.
		 */
		stream_under_way = outer;
		detach_all();
	}
	PG_END_TRY();
}

/*
 * Start what next() gives while places are free.  In a pump (from inside
 * idle()) a NULL from next() only means "nothing now": the stream goes on.
 */
static void
fill_places(StreamRun *r, bool pump)
{
	while (r->more && r->active < r->n)
	{
		HttpRequest *req = r->next(r->arg, &r->pause_ms);
		MemoryContext old;
		MemoryContext cxt;
		HttpSlot   *slot = NULL;
		bool		started;

		if (req == NULL)
		{
			if (!pump)
				r->more = r->pause_ms > 0;
			break;
		}
		for (int i = 0; i < nslots && slot == NULL; i++)
			if (slots[i]->req == NULL)
				slot = slots[i];
		Assert(slot != NULL);
		cxt = r->outputs_mcxt ? r->outputs_mcxt :
			req->mcxt ? req->mcxt : CurrentMemoryContext;
		old = MemoryContextSwitchTo(cxt);
		reset_outputs(req);
		started = start_request(slot, req, r->settings, r->cap);
		MemoryContextSwitchTo(old);
		if (started)
		{
			int			running;

			r->active++;

			/*
			 * On the wire now: the next next() may run a statement (a claim,
			 * or the caller's statements around a pump), and libcurl sends
			 * only when driven.  What finishes meanwhile is collected later.
			 */
			(void) multi_perform_masked(&running);
		}
		else
			r->done(req, r->arg);	/* marked failed, not sent */
	}
}

/* Move the transfers on; hand every finished one to done(); how many */
static int
collect_answers(StreamRun *r)
{
	int			running;
	int			nfinished;
	CURLMcode	mc;

	mc = multi_perform_masked(&running);
	nfinished = collect_done_into(r->finished);
	if (mc != CURLM_OK)
	{
		/* the multi handle itself failed: nothing more will finish */
		nfinished += abandon_all_into(curl_multi_strerror(mc), r->finished + nfinished);
	}
	r->active -= nfinished;
	for (int i = 0; i < nfinished; i++)
		r->done(r->finished[i], r->arg);
	return nfinished;
}

/*
 * For idle(), between the statements of its transactions: take in the
 * answers that came in meanwhile (done()) and fill the places they left
 * with what next() has ready, so the requests go on while the caller works.
 * next() and done() must not run transactions when called from here.  A
 * no-op outside idle().
 */
void
http_stream_pump(void)
{
	StreamRun  *r = stream_under_way;

	if (r == NULL || !r->in_idle || r->pumping)
		return;
	r->pumping = true;
	if (r->active > 0)
		(void) collect_answers(r);
	fill_places(r, true);
	r->pumping = false;
}

/* idle(), with pumps allowed inside it */
static bool
run_idle(StreamRun *r)
{
	bool		did;

	r->in_idle = true;
	did = r->idle(r->arg);
	r->in_idle = false;
	return did;
}

/* The loop of stream_run() */
static void
stream_transfers(int n, const HttpSettings *settings, HttpNextFn next, HttpDoneFn done,
				 HttpIdleFn idle, void *arg, MemoryContext outputs_mcxt)
{
	StreamRun	r;

	memset(&r, 0, sizeof(r));
	r.n = n;
	r.settings = settings;
	r.next = next;
	r.done = done;
	r.idle = idle;
	r.arg = arg;
	r.outputs_mcxt = outputs_mcxt;
	r.finished = palloc(sizeof(HttpRequest *) * nslots);
	r.more = true;
	/* the body lives in one StringInfo, which cannot exceed MaxAllocSize */
	r.cap = settings->max_response_bytes;
	if (r.cap == 0)
		r.cap = HTTP_DEFAULT_MAX_RESPONSE_BYTES;
	if (r.cap > MaxAllocSize - 1)
		r.cap = MaxAllocSize - 1;
	stream_under_way = &r;

	for (;;)
	{
		CURLMcode	mc;
		int			nfinished;

		r.pause_ms = 0;
		fill_places(&r, false);
		if (r.active == 0 && !r.more)
			break;
		if (r.active == 0)
		{
			/* paced: nothing may start yet and nothing runs; this waits too */
			if (idle != NULL && run_idle(&r))
				continue;
			(void) curl_multi_poll(multi, NULL, 0, Min(r.pause_ms, HTTP_POLL_MS), NULL);
			CHECK_FOR_INTERRUPTS();
			if (!PostmasterIsAlive())
				r.more = false;
			continue;
		}

		if (collect_answers(&r) > 0)
			continue;		/* start more at once */
		/* every request started is under way: the caller's own work now */
		if (idle != NULL && run_idle(&r))
			continue;

		mc = curl_multi_poll(multi, NULL, 0,
							 r.pause_ms > 0 ? Min(r.pause_ms, HTTP_POLL_MS) : HTTP_POLL_MS, NULL);
		if (mc != CURLM_OK)
		{
			nfinished = abandon_all_into(curl_multi_strerror(mc), r.finished);
			r.active -= nfinished;
			for (int i = 0; i < nfinished; i++)
				done(r.finished[i], arg);
		}
		CHECK_FOR_INTERRUPTS();
		if (!PostmasterIsAlive())
		{
			nfinished = abandon_all_into("postmaster died", r.finished);
			r.active -= nfinished;
			for (int i = 0; i < nfinished; i++)
				done(r.finished[i], arg);
			r.more = false;
		}
	}
	pfree(r.finished);
}

/*
 * Release all libcurl state.  For process exit; safe to call more than
 * once, and http_perform() starts over afterwards.
 */
void
http_cleanup(void)
{
	int			i;

	for (i = 0; i < nslots; i++)
	{
		if (slots[i]->req != NULL)
			detach(slots[i]);
		if (slots[i]->easy != NULL)
			curl_easy_cleanup(slots[i]->easy);
		pfree(slots[i]);
	}
	if (slots != NULL)
		pfree(slots);
	slots = NULL;
	nslots = 0;

	if (multi != NULL)
		curl_multi_cleanup(multi);
	multi = NULL;

	if (curl_initialized)
		curl_global_cleanup();
	curl_initialized = false;
}

static void
http_init(void)
{
	if (!curl_initialized)
	{
		const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);

		/* checked at run time too: the library may differ from the headers */
		if (v->version_num < HTTP_MIN_CURL_VERSION)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("libcurl %s is too old, d365inv needs 7.85.0 or later",
							v->version)));
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not initialize libcurl")));
		curl_initialized = true;
	}

	if (multi == NULL)
	{
		multi = curl_multi_init();
		if (multi == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Could not create a libcurl multi handle.")));
	}
}

/* Grow the pool to at least n easy handles; they are never shrunk. */
static void
ensure_slots(int n)
{
	if (n <= nslots)
		return;

	if (slots == NULL)
		slots = MemoryContextAllocZero(TopMemoryContext, n * sizeof(HttpSlot *));
	else
		slots = repalloc(slots, n * sizeof(HttpSlot *));

	while (nslots < n)
	{
		HttpSlot   *slot = MemoryContextAllocZero(TopMemoryContext, sizeof(HttpSlot));

		slot->easy = curl_easy_init();
		if (slot->easy == NULL)
		{
			pfree(slot);
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Could not create a libcurl easy handle.")));
		}
		slots[nslots++] = slot;
	}

	/*
	 * Keep an idle connection for every slot, plus a few for other hosts
	 * (the token endpoint).  libcurl's default, 4 per easy handle still
	 * attached, shrinks as the last transfers of a call finish and would
	 * close connections we are about to reuse.
	 */
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) nslots + 4);
}

/*
 * Configure slot's handle for req and add it to the multi handle.  Returns
 * false, with req marked as failed (not sent), if that is impossible.
 */
static bool
start_request(HttpSlot *slot, HttpRequest *req, const HttpSettings *settings,
			  size_t cap)
{
	CURL	   *h = slot->easy;
	const char *method = req->method ? req->method : "GET";
	long		connect_timeout = settings->connect_timeout_ms;
	long		timeout = settings->timeout_ms;
	bool		has_body;
	CURLcode	rc = CURLE_OK;
	CURLMcode	mc;

	/*
	 * Start from a clean handle so nothing of the previous request carries
	 * over.  The reset keeps the TLS session cache; the connection and DNS
	 * caches belong to the multi handle.
	 */
	curl_easy_reset(h);
	slot->req = req;
	slot->mcxt = CurrentMemoryContext;
	slot->headers = NULL;
	slot->cap = cap;
	slot->body = req->body ? req->body : "";
	slot->body_len = req->body ? req->body_len : 0;
	slot->sent = 0;
	slot->presized = false;
	slot->too_large = false;
	slot->oom = false;
	slot->errbuf[0] = '\0';

	if (connect_timeout <= 0)
		connect_timeout = HTTP_DEFAULT_CONNECT_TIMEOUT_MS;
	if (timeout <= 0)
		timeout = HTTP_DEFAULT_TIMEOUT_MS;

	/* request headers, plus "Expect:" so a body goes out without waiting */
	has_body = (strcmp(method, "POST") == 0 || req->body != NULL);
	if (req->headers != NULL)
	{
		const char *const *hp;

		for (hp = req->headers; *hp != NULL; hp++)
		{
			struct curl_slist *l;

			/* a line break would smuggle in a header of its own */
			if (strpbrk(*hp, "\r\n") != NULL)
			{
				rc = CURLE_BAD_FUNCTION_ARGUMENT;
				snprintf(slot->errbuf, sizeof(slot->errbuf),
						 "request header %d contains a line break",
						 (int) (hp - req->headers) + 1);
				break;
			}
			l = curl_slist_append(slot->headers, *hp);
			if (l == NULL)
			{
				rc = CURLE_OUT_OF_MEMORY;
				break;
			}
			slot->headers = l;
		}
	}
	if (rc == CURLE_OK && has_body)
	{
		struct curl_slist *l = curl_slist_append(slot->headers, "Expect:");

		if (l == NULL)
			rc = CURLE_OUT_OF_MEMORY;
		else
			slot->headers = l;
	}

#define SETOPT(opt, val) \
	do { \
		if (rc == CURLE_OK) \
			rc = curl_easy_setopt(h, opt, val); \
	} while (0)

	SETOPT(CURLOPT_PRIVATE, slot);
	SETOPT(CURLOPT_ERRORBUFFER, slot->errbuf);
	SETOPT(CURLOPT_URL, req->url);
	SETOPT(CURLOPT_NOSIGNAL, 1L);
	SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
	SETOPT(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
	if (settings->ca_file != NULL && settings->ca_file[0] != '\0')
		SETOPT(CURLOPT_CAINFO, settings->ca_file);
	SETOPT(CURLOPT_CONNECTTIMEOUT_MS, connect_timeout);
	SETOPT(CURLOPT_TIMEOUT_MS, timeout);

	/*
	 * HTTP/1.1 on purpose: concurrency comes from the pool of keep-alive
	 * connections, and libcurl 7.88's HTTP/2 upload path had bugs we would
	 * rather not find in production.
	 */
	SETOPT(CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_1_1);
	/* requests may sit for minutes waiting on the server; keep NATs awake */
	SETOPT(CURLOPT_TCP_KEEPALIVE, 1L);
	SETOPT(CURLOPT_USERAGENT, "d365inv");
	/* refuse early when Content-Length already says it is too big */
	SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) cap);
	SETOPT(CURLOPT_WRITEFUNCTION, write_cb);
	SETOPT(CURLOPT_WRITEDATA, slot);
	SETOPT(CURLOPT_HEADERFUNCTION, header_cb);
	SETOPT(CURLOPT_HEADERDATA, slot);

	if (pg_strcasecmp(method, "GET") == 0 && req->body == NULL)
		SETOPT(CURLOPT_HTTPGET, 1L);
	else
	{
		if (strcmp(method, "POST") != 0)
			SETOPT(CURLOPT_CUSTOMREQUEST, method);
		if (has_body)
		{
			/*
			 * The body goes through a read callback rather than
			 * CURLOPT_POSTFIELDS, with a seek callback that refuses to
			 * rewind.  When a reused keep-alive connection dies before any
			 * response byte arrives, libcurl silently resends the request on
			 * a fresh connection; for POSTFIELDS it can always do that, even
			 * though the server may have received and executed the first
			 * copy.  Refusing the rewind turns that silent duplicate into
			 * CURLE_SEND_FAIL_REWIND, i.e. a transport error with
			 * maybe_sent, which the caller can reconcile.  (If no body byte
			 * had been written yet, libcurl needs no rewind and its retry
			 * stays harmless.)  The body is still not copied up front.
			 */
			SETOPT(CURLOPT_POST, 1L);
			SETOPT(CURLOPT_READFUNCTION, read_cb);
			SETOPT(CURLOPT_READDATA, slot);
			SETOPT(CURLOPT_SEEKFUNCTION, seek_cb);
			SETOPT(CURLOPT_SEEKDATA, slot);
			SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) slot->body_len);
		}
		else if (pg_strcasecmp(method, "HEAD") == 0)
			SETOPT(CURLOPT_NOBODY, 1L);
	}
	SETOPT(CURLOPT_HTTPHEADER, slot->headers);
#undef SETOPT

	if (rc == CURLE_OK)
	{
		mc = curl_multi_add_handle(multi, h);
		if (mc == CURLM_OK)
			return true;
		snprintf(req->error, sizeof(req->error),
				 "could not start request: %s", curl_multi_strerror(mc));
	}
	else
		snprintf(req->error, sizeof(req->error),
				 "could not set up request: %s",
				 slot->errbuf[0] ? slot->errbuf : curl_easy_strerror(rc));

	req->transport_error = true;
	req->maybe_sent = false;
	curl_slist_free_all(slot->headers);
	slot->headers = NULL;
	slot->req = NULL;
	return false;
}

/*
 * Handle every transfer libcurl reports as done; returns how many, and
 * when finished is not NULL, stores the finished requests there (it has
 * room for every slot).
 */
static int
collect_done_into(HttpRequest **finished)
{
	CURLMsg    *msg;
	int			left;
	int			done = 0;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		CURL	   *easy = msg->easy_handle;
		CURLcode	rc = msg->data.result;
		char	   *priv = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		/* msg is invalid once the handle is removed: copied out above */
		curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
		if (priv == NULL || ((HttpSlot *) priv)->req == NULL)
			continue;			/* cannot happen */
		if (finished)
			finished[done] = ((HttpSlot *) priv)->req;
		finish_request((HttpSlot *) priv, rc);
		done++;
	}
	return done;
}

/* Fill in the outputs of a finished transfer and free its handle. */
static void
finish_request(HttpSlot *slot, CURLcode rc)
{
	HttpRequest *req = slot->req;
	CURL	   *easy = slot->easy;
	long		code = 0;
	curl_off_t	total_us = 0;

	curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code);
	if (curl_easy_getinfo(easy, CURLINFO_TOTAL_TIME_T, &total_us) == CURLE_OK)
		req->elapsed_ms = total_us / 1000.0;

	/*
	 * A CURLE_OK without a status line has been seen when libcurl gave up
	 * on a connection retry: that is no response either.
	 */
	if (rc == CURLE_OK && code >= 100 && !slot->oom && !slot->too_large)
		req->status = code;
	else
	{
		req->transport_error = true;
		req->status = 0;
		if (slot->too_large || rc == CURLE_FILESIZE_EXCEEDED)
		{
			req->too_large = true;
			snprintf(req->error, sizeof(req->error),
					 "response body exceeds %zu bytes", slot->cap);
		}
		else if (slot->oom)
			snprintf(req->error, sizeof(req->error),
					 "out of memory while receiving the response");
		else if (rc == CURLE_OK)
			snprintf(req->error, sizeof(req->error),
					 "no HTTP response received");
		else if (rc == CURLE_SEND_FAIL_REWIND)
			snprintf(req->error, sizeof(req->error),
					 "connection closed before a response, request not resent (curl error %d)",
					 (int) rc);
		else
			snprintf(req->error, sizeof(req->error), "%s (curl error %d)",
					 slot->errbuf[0] ? slot->errbuf : curl_easy_strerror(rc),
					 (int) rc);
		req->maybe_sent = request_maybe_sent(easy, rc);
	}

	detach(slot);
}

/*
 * Could any of the request have reached the server?  Err towards yes: a
 * wrong "no" lets the caller resend a batch the server may have executed.
 */
static bool
request_maybe_sent(CURL *easy, CURLcode rc)
{
	long		request_size = 0;
	curl_off_t	connect_us = 0;

	/*
	 * Bytes of request written to the connection, summed over libcurl's
	 * internal retries: any at all and the server may have it.
	 */
	if (curl_easy_getinfo(easy, CURLINFO_REQUEST_SIZE, &request_size) != CURLE_OK ||
		request_size > 0)
		return true;

	switch (rc)
	{
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
		case CURLE_COULDNT_CONNECT:
		case CURLE_UNSUPPORTED_PROTOCOL:
		case CURLE_URL_MALFORMAT:
			return false;
		case CURLE_OPERATION_TIMEDOUT:
			/* the connect timeout: never connected, so nothing was sent */
			if (curl_easy_getinfo(easy, CURLINFO_CONNECT_TIME_T, &connect_us) == CURLE_OK &&
				connect_us == 0)
				return false;
			return true;
		default:
			return true;
	}
}

/*
 * Give up on every transfer still running: they count as failed after
 * possibly reaching the server.  Stores the abandoned requests in finished
 * (room for every slot); returns how many.
 */
static int
abandon_all_into(const char *why, HttpRequest **finished)
{
	int			i;
	int			n = 0;

	for (i = 0; i < nslots; i++)
	{
		HttpSlot   *slot = slots[i];
		HttpRequest *req = slot->req;
		curl_off_t	total_us = 0;

		if (req == NULL)
			continue;
		if (finished)
			finished[n] = req;
		n++;
		if (curl_easy_getinfo(slot->easy, CURLINFO_TOTAL_TIME_T, &total_us) == CURLE_OK)
			req->elapsed_ms = total_us / 1000.0;
		req->status = 0;
		req->transport_error = true;
		req->maybe_sent = true;
		snprintf(req->error, sizeof(req->error), "request abandoned: %s", why);
		detach(slot);
	}
	return n;
}

/*
 * Take slot's handle off the multi handle.  Removing an unfinished transfer
 * aborts it and closes its connection, so no half-read response can be
 * mistaken for the next one.
 */
static void
detach(HttpSlot *slot)
{
	curl_multi_remove_handle(multi, slot->easy);
	curl_slist_free_all(slot->headers);
	slot->headers = NULL;
	slot->req = NULL;
}

static void
detach_all(void)
{
	int			i;

	for (i = 0; i < nslots; i++)
	{
		if (slots[i]->req != NULL)
			detach(slots[i]);
	}
}

/*
 * curl_multi_perform() with every signal blocked.  libcurl's threaded
 * resolver starts its getaddrinfo() threads from here, and threads inherit
 * the creator's signal mask: this way PostgreSQL's signal handlers (SIGTERM,
 * SIGHUP, latch wakeups) only ever run on the backend's own thread.
 * Signals arriving meanwhile are merely delayed; the call does not block.
 */
static CURLMcode
multi_perform_masked(int *running)
{
	sigset_t	all;
	sigset_t	saved;
	CURLMcode	mc;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &saved);
	mc = curl_multi_perform(multi, running);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);
	return mc;
}

/*
 * Make buf hold at least need bytes (need <= slot->cap + 1 <= MaxAllocSize),
 * by doubling unless exact.  Runs inside libcurl: never throws.
 */
static bool
reserve(HttpSlot *slot, StringInfo buf, size_t need, bool exact)
{
	size_t		newlen;
	char	   *p;

	if (need <= (size_t) buf->maxlen)
		return true;
	if (exact)
		newlen = need;
	else
	{
		newlen = Max((size_t) buf->maxlen, 1024);
		while (newlen < need)
			newlen *= 2;
		newlen = Min(newlen, slot->cap + 1);
	}

	p = MemoryContextAllocExtended(slot->mcxt, newlen, MCXT_ALLOC_NO_OOM);
	if (p == NULL)
		return false;
	memcpy(p, buf->data, buf->len + 1);
	pfree(buf->data);
	buf->data = p;
	buf->maxlen = (int) newlen;
	return true;
}

/* Response body: append to req->response, within the cap. */
static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	HttpSlot   *slot = (HttpSlot *) userdata;
	StringInfo	buf = &slot->req->response;
	size_t		n = size * nmemb;

	if (n > slot->cap - (size_t) buf->len)
	{
		slot->too_large = true;
		return 0;				/* aborts the transfer */
	}

	if (!slot->presized)
	{
		curl_off_t	cl = -1;

		/* one allocation for the common case of a known length */
		slot->presized = true;
		if (curl_easy_getinfo(slot->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl) == CURLE_OK &&
			cl > 0 && (uint64) cl <= slot->cap)
			(void) reserve(slot, buf, (size_t) cl + 1, true);
	}

	if (!reserve(slot, buf, buf->len + n + 1, false))
	{
		slot->oom = true;
		return 0;
	}
	memcpy(buf->data + buf->len, ptr, n);
	buf->len += n;
	buf->data[buf->len] = '\0';
	return n;
}

/*
 * A copy of the value of header line (line, len) if it is header name,
 * else NULL.  Sets slot->oom on allocation failure.
 */
static char *
header_value(HttpSlot *slot, const char *line, size_t len, const char *name)
{
	size_t		namelen = strlen(name);
	const char *v;
	const char *end = line + len;
	char	   *copy;

	if (len <= namelen || line[namelen] != ':' ||
		pg_strncasecmp(line, name, namelen) != 0)
		return NULL;

	v = line + namelen + 1;
	while (v < end && (*v == ' ' || *v == '\t'))
		v++;
	while (end > v && (end[-1] == '\r' || end[-1] == '\n' ||
					   end[-1] == ' ' || end[-1] == '\t'))
		end--;

	copy = MemoryContextAllocExtended(slot->mcxt, end - v + 1, MCXT_ALLOC_NO_OOM);
	if (copy == NULL)
	{
		slot->oom = true;
		return NULL;
	}
	memcpy(copy, v, end - v);
	copy[end - v] = '\0';
	return copy;
}

/*
 * A remaining-budget header's number: "5,987" or "1,199.87" (thousands
 * separators as Dataverse writes them) or plain; -1 when it is not one.
 */
static double
budget_number(const char *v)
{
	char		digits[64];
	int			n = 0;
	char	   *end;
	double		d;

	for (const char *p = v; *p; p++)
	{
		if (*p == ',')
			continue;
		if (n == sizeof(digits) - 1 || !(isdigit((unsigned char) *p) || *p == '.'))
			return -1;
		digits[n++] = *p;
	}
	digits[n] = '\0';
	if (n == 0)
		return -1;
	d = strtod(digits, &end);
	return (*end == '\0' && d >= 0 && d < 1e12) ? d : -1;
}

/*
 * Response headers: keep Content-Type, Retry-After and the service
 * protection budget left, of the final response.
 */
static size_t
header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	HttpSlot   *slot = (HttpSlot *) userdata;
	HttpRequest *req = slot->req;
	size_t		n = size * nitems;
	char	   *v;

	/*
	 * A status line starts a new response (after a 1xx, or a proxy's
	 * CONNECT reply): forget what the previous one said.
	 */
	if (n >= 5 && memcmp(buffer, "HTTP/", 5) == 0)
	{
		if (req->content_type)
			pfree(req->content_type);
		if (req->retry_after)
			pfree(req->retry_after);
		req->content_type = NULL;
		req->retry_after = NULL;
		req->requests_left = -1;
		req->seconds_left = -1;
		return n;
	}

	if ((v = header_value(slot, buffer, n, "Content-Type")) != NULL)
	{
		if (req->content_type)
			pfree(req->content_type);
		req->content_type = v;
	}
	else if ((v = header_value(slot, buffer, n, "Retry-After")) != NULL)
	{
		if (req->retry_after)
			pfree(req->retry_after);
		req->retry_after = v;
	}
	else if ((v = header_value(slot, buffer, n, "x-ms-ratelimit-burst-remaining-xrm-requests")) != NULL)
	{
		req->requests_left = budget_number(v);
		pfree(v);
	}
	else if ((v = header_value(slot, buffer, n, "x-ms-ratelimit-time-remaining-xrm-requests")) != NULL)
	{
		req->seconds_left = budget_number(v);
		pfree(v);
	}
	return slot->oom ? 0 : n;
}

/* Request body: hand libcurl the next piece of req->body. */
static size_t
read_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	HttpSlot   *slot = (HttpSlot *) userdata;
	size_t		room = size * nitems;
	size_t		left = slot->body_len - slot->sent;
	size_t		n = Min(room, left);

	if (n > 0)
	{
		memcpy(buffer, slot->body + slot->sent, n);
		slot->sent += n;
	}
	return n;
}

/* Never rewind the body: see start_request(). */
static int
seek_cb(void *userdata, curl_off_t offset, int origin)
{
	return CURL_SEEKFUNC_FAIL;
}
