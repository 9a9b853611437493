/*-------------------------------------------------------------------------
 *
 * deliver.h
 *	  One delivery round for one target (deliver.c) and the existence
 *	  lookups it relies on (lookup.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_DELIVER_H
#define D365INV_DELIVER_H

#include "nodes/pg_list.h"
#include "utils/timestamp.h"

#include "app_user.h"
#include "batch_request.h"
#include "http.h"
#include "target.h"

/* rows per lookup $batch: 10 GETs of LOOKUP_KEYS_PER_GET keys */
#define LOOKUP_ROWS_PER_REQUEST (10 * LOOKUP_KEYS_PER_GET)

/* What to write back to one invoice row */
typedef struct RowResult
{
	const char *status;			/* invoice_status; NULL: row not decided */
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

/* What the worker remembers about a target between rounds */
typedef struct TargetState
{
	char		name[64];
	AppUsers	users;			/* its app users: tokens, throttling, pacing */
	int			auto_batch_size;	/* batch_size_mode 'auto': current size; 0 = not yet set */
	int			size_cap;		/* after HTTP 413: at most this many per $batch; 0 = none */
	TimestampTz size_capped_at; /* ... since the last 413 */
	char		config_problem[256];	/* the last configuration error reported */
	/* what d365inv.target_state says (target_status.c) */
	char		state[16];
	char		blocked_by[16];
	char		reason[512];
	TimestampTz until;
	TimestampTz state_written_at;
	TimestampTz told_waiting_at;	/* the waiting invoices were told why */
	TimestampTz progress_at;	/* an invoice was settled */
	bool		duplicate_alert;	/* alert raised, not yet cleared */
	bool		error_alert;
	bool		auth_alert;
	bool		blocked_alert;
	bool		queue_age_alert;
} TargetState;

extern TargetState *target_state(const char *name);

/*
 * target_status.c: write what the worker does with the target to
 * d365inv.target_state when it changed (state: delivering, idle,
 * throttled, blocked; blocked_by, reason and until as there); with
 * block_waiting, the waiting invoices' last_error says why they wait.
 * Caller has a transaction and SPI.
 */
extern void target_status_report(const char *target, TargetState *ts, const char *state,
								  const char *blocked_by, const char *reason, TimestampTz until,
								  bool block_waiting);

/* when this server took over from another (worker.c); 0: never */
extern TimestampTz deliver_promoted_at;

/* alerts.c */
extern void check_alerts(void);

/* lookup.c: the answer for one row */
typedef enum LookupAnswer
{
	LOOKUP_FAILED = 0,			/* no usable answer: fate still unknown */
	LOOKUP_FOUND,
	LOOKUP_ABSENT
} LookupAnswer;

typedef struct LookupState LookupState;

/*
 * Send lookups for every row of ws (no transaction needed), then, inside a
 * transaction, match what came back: answers[i], d365_ids[i], errors[i].
 * Each request sent is appended to *logs (RequestLog *); rows' results
 * log_index point into it.
 */
extern LookupState *lookup_send(const Target *t, const char *auth, const HttpSettings *http,
								WorkSet *ws, List **logs);
extern void lookup_match(LookupState *state, LookupAnswer *answers, char **d365_ids,
						 char **errors, int *log_index);
extern bool lookup_auth_rejected(LookupState *state);

/* deliver.c */
extern bool deliver_round(const char *target_name, MemoryContext round, TimestampTz *next_due);
/* a target the worker does not serve (disabled, no service_root): say why.  Caller has SPI. */
extern void deliver_not_served(const char *target_name, bool enabled);
extern const char *const *wire_headers(const char *content_type, const char *auth);
extern HttpRequest *batch_http_request(const Target *t, BatchKind kind, InvoiceRow *rows,
									   int nrows, const char *auth, int *noperations);
/* text[] datum of n C strings (NULL entries are NULLs) */
extern Datum sql_text_array(const char *const *v, int n);
extern RequestLog *request_log_new(const char *kind, TimestampTz sent_at, const HttpRequest *req,
								   int operations, int invoices);
extern char *describe_body(const char *body, size_t len, long status);
extern HttpSettings http_settings_from_gucs(void);

/* lookup.c: does url point to the service root's scheme://host[:port]? */
extern bool same_origin(const char *url, const char *service_root);
extern char *resolve_link(const char *link, const char *service_root);

#endif							/* D365INV_DELIVER_H */
