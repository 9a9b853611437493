/*-------------------------------------------------------------------------
 *
 * request.h
 *	  The HTTP requests a delivery sends, and their batch_log entries
 *	  (request.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_REQUEST_H
#define D365INV_REQUEST_H

#include "utils/timestamp.h"

#include "batch_request.h"
#include "http.h"
#include "target.h"

/* One request sent, for d365inv.batch_log */
typedef struct RequestLog
{
	const char *kind;
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
extern RequestLog *request_log_new(const char *kind, TimestampTz sent_at, const HttpRequest *req,
								   int operations, int invoices);
/* "HTTP 503: <OData message or the start of the body>" */
extern char *describe_body(const char *body, size_t len, long status);
extern HttpSettings http_settings_from_gucs(void);

#endif							/* D365INV_REQUEST_H */
