/*-------------------------------------------------------------------------
 *
 * queue.h
 *	  The rows a delivery works on, the invoice status as a C enum, and all
 *	  its SQL on the queue (d365inv.invoice, batch_log, remote_key): queue.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_QUEUE_H
#define D365INV_QUEUE_H

#include "nodes/pg_list.h"
#include "utils/timestamp.h"

#include "request.h"

/* d365inv.invoice_status, in the SQL enum's order (queue.c maps the labels) */
typedef enum InvoiceStatus
{
	INVOICE_UNDECIDED = 0,		/* RowResult: nothing to write back */
	INVOICE_PENDING,
	INVOICE_IN_FLIGHT,
	INVOICE_IN_DOUBT,
	INVOICE_RETRY,
	INVOICE_CREATED,
	INVOICE_DUPLICATE,
	INVOICE_REVIEW
} InvoiceStatus;

/* the SQL label of a status */
extern const char *invoice_status_name(InvoiceStatus status);

/* What to write back to one invoice row */
typedef struct RowResult
{
	InvoiceStatus status;		/* INVOICE_UNDECIDED: row not decided */
	bool		counted;		/* attempts + 1 */
	int			delay_ms;		/* next_attempt_at = now + delay; -1: NULL */
	int			http_status;	/* 0: none */
	const char *error;
	const char *d365_id;
	const char *settled_by;
	int			log_index;		/* the request (RequestLog) it was part of; -1 none */
} RowResult;

/* Invoices a round works on: rows for the wire plus what the worker needs */
typedef struct WorkSet
{
	int			n;
	InvoiceRow *rows;
	int		   *attempts;
	char	  **vendor_keys;	/* normalised, as in d365inv.invoice */
	char	  **invoice_keys;
	bool	   *known;			/* claimed rows: key is in d365inv.remote_key */
	char	  **known_ids;		/* ... with this D365 id (may be NULL) */
	TimestampTz *fences;		/* resend_fence; 0 when none */
	RowResult  *results;
} WorkSet;

/*
 * The worker's short transactions: begin_tx() starts one with a snapshot
 * and SPI; commit_tx() ends it and returns to the memory context begin_tx()
 * was called in.
 */
extern void begin_tx(const char *activity);
extern void commit_tx(void);

/*
 * Claim up to limit due rows of t (they become in_flight), new rows from
 * *cursor on; result in `into`.
 */
extern WorkSet *claim_rows(const Target *t, int limit, int64 *cursor, MemoryContext into);
/* in_doubt rows of t that are due, at most limit; result in `into` */
extern WorkSet *select_in_doubt(const Target *t, int limit, MemoryContext into);
extern int64 insert_request_log(const Target *t, const RequestLog *log);
/*
 * Write every decided row of ws back, if still in status `from`; log the
 * requests; remember the keys D365 now has.  *progress_at = now when an
 * invoice was settled.
 */
extern void record_results(const Target *t, WorkSet *ws, InvoiceStatus from, List *logs,
						   TimestampTz *progress_at);
extern void record_answers(const Target *t, WorkSet **ws, RequestLog **logs, int n,
						   InvoiceStatus from, TimestampTz *progress_at);
/* earliest time t has work again (retry or in_doubt rows) */
extern TimestampTz next_due_time(const Target *t);
/* text[] datum of n C strings (NULL entries are NULLs) */
extern Datum sql_text_array(const char *const *v, int n);

#endif							/* D365INV_QUEUE_H */
