/*-------------------------------------------------------------------------
 *
 * deliver.h
 *	  One delivery round for one target (deliver.c), what the worker
 *	  remembers about each target, what it says about it
 *	  (target_status.c) and its alerts (alerts.c).
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

/* deliver.c */
extern bool deliver_round(const char *target_name, MemoryContext round, TimestampTz *next_due);
/* a target the worker does not serve (disabled, no service_root): say why.  Caller has SPI. */
extern void deliver_not_served(const char *target_name, bool enabled);

#endif							/* D365INV_DELIVER_H */
