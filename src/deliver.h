/*-------------------------------------------------------------------------
 *
 * deliver.h
 *	  One delivery round for one target (deliver.c), what the worker
 *	  remembers about each target, and the existence lookups a round
 *	  relies on (lookup.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_DELIVER_H
#define D365INV_DELIVER_H

#include "nodes/pg_list.h"
#include "utils/timestamp.h"

#include "app_user.h"
#include "queue.h"
#include "request.h"

/* rows per lookup $batch: 10 GETs of LOOKUP_KEYS_PER_GET keys */
#define LOOKUP_ROWS_PER_REQUEST (10 * LOOKUP_KEYS_PER_GET)

/* d365inv.target_state.state (target_status.c maps the labels) */
typedef enum TargetRunState
{
	TARGET_UNREPORTED = 0,		/* nothing written yet */
	TARGET_DELIVERING,
	TARGET_IDLE,
	TARGET_THROTTLED,
	TARGET_BLOCKED
} TargetRunState;

/* d365inv.target_state.blocked_by */
typedef enum BlockedBy
{
	BLOCKED_NONE = 0,			/* NULL */
	BLOCKED_AUTH,
	BLOCKED_CONFIG,
	BLOCKED_DISABLED
} BlockedBy;

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
	TargetRunState state;
	BlockedBy	blocked_by;
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
extern void target_status_report(const char *target, TargetState *ts, TargetRunState state,
								  BlockedBy blocked_by, const char *reason, TimestampTz until,
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

#endif							/* D365INV_DELIVER_H */
