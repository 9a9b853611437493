/*-------------------------------------------------------------------------
 *
 * request.h
 *	  The HTTP requests a delivery sends, and their batch_log entries and
 *	  kinds (request.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_REQUEST_H
#define D365INV_REQUEST_H

#include "utils/timestamp.h"

#include "batch_request.h"
#include "http.h"
#include "target.h"

/* What a d365inv.batch_log row records (its kind column) */
typedef enum RequestKind
{
	REQUEST_CREATE,				/* a $batch in the target's write_mode */
	REQUEST_UPSERT,
	REQUEST_UPSERT_CREATE_ONLY,
	REQUEST_LOOKUP,				/* a $batch of existence lookups */
	REQUEST_CONFIG				/* nothing sent: the target's configuration is wrong */
} RequestKind;

/* One request sent, for d365inv.batch_log */
typedef struct RequestLog
{
	RequestKind kind;
	TimestampTz started_at;
	double		duration_ms;
	long		http_status;	/* 0: no response */
	int			operations;
	int			invoices;
	int			created;
	int			duplicates;
	int			retries;
	int			reviews;
	int			in_doubt;
	int			unanswered;
	int			not_found;
	bool		throttled;
	int			retry_after;	/* -1: none */
	int			batch_size;		/* the target's batch size when sent; 0: unknown */
	const char *error;
} RequestLog;

/* the OData headers of every request, plus auth (a whole header line) when not NULL */
extern const char *const *wire_headers(const char *content_type, const char *auth);
/* the POST carrying one $batch of these rows; *noperations if wanted */
extern HttpRequest *batch_http_request(const Target *t, BatchKind kind, InvoiceRow *rows,
									   int nrows, const char *auth, int *noperations);
/* batch_log.kind of a request */
extern const char *request_kind_name(RequestKind kind);
/* the kind of the $batch requests that write in this mode */
extern RequestKind request_kind_for(WriteMode mode);
extern RequestLog *request_log_new(RequestKind kind, TimestampTz sent_at, const HttpRequest *req,
								   int operations, int invoices);
/* "HTTP 503: <OData message or the start of the body>" */
extern char *describe_body(const char *body, size_t len, long status);
extern HttpSettings http_settings_from_gucs(void);

#endif							/* D365INV_REQUEST_H */
