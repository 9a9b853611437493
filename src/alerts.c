/*-------------------------------------------------------------------------
 *
 * alerts.c
 *	  The worker's alerts: when the last hour's duplicate rate of a target
 *	  crosses d365inv.duplicate_alert_threshold, its genuine errors exceed
 *	  d365inv.error_alert_threshold, it cannot authenticate (auth), its open
 *	  invoices made no progress for d365inv.stall_alert_after (blocked), or
 *	  its oldest open invoice is older than d365inv.queue_age_alert_after
 *	  (queue_age), raise one WARNING with the figures and NOTIFY
 *	  d365inv_alert with a JSON payload; say nothing more until the
 *	  condition clears (a NOTIFY with "state": "cleared") and comes back.
 *
 * The figures come from the views d365inv.duplicate_rate,
 * d365inv.batch_health and d365inv.target_alerts, so what the worker says,
 * what metrics() exports (d365inv_alert) and what a DBA reads agree.
 * Caller has a transaction and SPI; notifications go out at its commit.
 *
 * An alert counts as raised (or cleared) only once its NOTIFY commits: the
 * check reads every condition first and says nothing when one of them
 * fails, and the remembered state (TargetState) changes in a commit
 * callback.  When the check, or the (sub)transaction it is part of, rolls
 * back, the next check sees the same change and sends it then.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stddef.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "d365inv.h"
#include "deliver.h"

/*
 * One alert condition: a query over a view giving, per target, whether it
 * is healthy, the figures (JSON, for the notification) and the WARNING's
 * message and detail.  raised points into TargetState.
 */
typedef struct AlertKind
{
	const char *name;			/* "alert" in the payload */
	const char *cleared;		/* the LOG line when it clears, after the target */
	const char *sql;
	const char *hint;
	size_t		raised;			/* offsetof(TargetState, ...) */
} AlertKind;

static const AlertKind alert_kinds[] = {
	{
		"duplicate_rate", "duplicate rate back under the threshold",
		"SELECT target, healthy,"
		"       json_build_object('duplicate_rate', duplicate_rate, 'duplicates', duplicates,"
		"                         'received', received, 'threshold', threshold)::text,"
		"       format('d365inv target \"%s\": duplicate rate %s%% in the last hour is above the threshold of %s%%',"
		"              target, round(100 * duplicate_rate::numeric, 1), round(100 * threshold::numeric, 1)),"
		"       format('%s of %s invoices received in the last hour were duplicates.', duplicates, received)"
		"  FROM d365inv.duplicate_rate WHERE period = '1h' AND target IS NOT NULL",
		"An upstream system is probably resending; see d365inv.duplicate_rate.",
		offsetof(TargetState, duplicate_alert)
	},
	{
		"errors", "genuine errors back under the threshold",
		/* not healthy: that is also false while the target is blocked */
		"SELECT target, errors <= current_setting('d365inv.error_alert_threshold')::int,"
		"       json_build_object('errors', errors, 'batches', batches,"
		"                         'threshold', current_setting('d365inv.error_alert_threshold')::int)::text,"
		"       format('d365inv target \"%s\": %s genuine errors in the last hour, above the threshold of %s',"
		"              target, errors, current_setting('d365inv.error_alert_threshold')),"
		"       'Invoices rejected by D365 or out of retries are in d365inv.review_queue.'"
		"  FROM d365inv.batch_health WHERE period = '1h' AND target IS NOT NULL",
		"See d365inv.batch_health and d365inv.review_queue.",
		offsetof(TargetState, error_alert)
	},
	{
		"auth", "authenticates again",
		"SELECT target, NOT firing, figures::text, message, detail"
		"  FROM d365inv.target_alerts WHERE alert = 'auth'",
		"Check the client secret (d365inv.target_secret, d365inv.app_user_secret), client_id, token_url and scope; see d365inv.target_status.",
		offsetof(TargetState, auth_alert)
	},
	{
		"blocked", "invoices moving again, or none open",
		"SELECT target, NOT firing, figures::text, message, detail"
		"  FROM d365inv.target_alerts WHERE alert = 'blocked'",
		"See d365inv.target_status and d365inv.progress.",
		offsetof(TargetState, blocked_alert)
	},
	{
		"queue_age", "oldest open invoice back under d365inv.queue_age_alert_after",
		"SELECT target, NOT firing, figures::text, message, detail"
		"  FROM d365inv.target_alerts WHERE alert = 'queue_age'",
		"See d365inv.target_status, d365inv.progress and d365inv.queue.",
		offsetof(TargetState, queue_age_alert)
	},
};

/* A change the check found: an alert to raise or to clear */
typedef struct AlertChange
{
	const AlertKind *kind;
	char	   *target;
	bool		raise;
	char	   *figures;
	char	   *message;		/* the WARNING's, when raised */
	char	   *detail;
} AlertChange;

/*
 * A flag of TargetState to set once the transaction commits, recorded by
 * the subtransaction that sent its NOTIFY.  By name: target_state() may
 * move the states.
 */
typedef struct PendingFlag
{
	char		target[sizeof(((TargetState *) NULL)->name)];
	size_t		raised;			/* offsetof(TargetState, ...) */
	bool		value;
	SubTransactionId subid;
} PendingFlag;

static List *pending_flags = NIL;	/* PendingFlag *, in TopMemoryContext */
static bool callbacks_registered = false;

static bool *
raised_flag(const char *target, size_t raised)
{
	return (bool *) ((char *) target_state(target) + raised);
}

/* the NOTIFY committed: remember what it said; rolled back: forget it */
static void
alerts_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
			foreach(lc, pending_flags)
			{
				PendingFlag *p = (PendingFlag *) lfirst(lc);

				*raised_flag(p->target, p->raised) = p->value;
			}
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
			list_free_deep(pending_flags);
			pending_flags = NIL;
			break;
		default:
			break;
	}
}

/* a subtransaction's flags go to its parent, or away with it */
static void
alerts_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		foreach(lc, pending_flags)
		{
			PendingFlag *p = (PendingFlag *) lfirst(lc);

			if (p->subid == mySubid)
				p->subid = parentSubid;
		}
	}
	else if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		foreach(lc, pending_flags)
		{
			PendingFlag *p = (PendingFlag *) lfirst(lc);

			if (p->subid == mySubid)
			{
				pending_flags = foreach_delete_current(pending_flags, lc);
				pfree(p);
			}
		}
	}
}

/* set the flag when the current transaction commits */
static void
set_at_commit(const char *target, size_t raised, bool value)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	PendingFlag *p = palloc(sizeof(PendingFlag));

	strlcpy(p->target, target, sizeof(p->target));
	p->raised = raised;
	p->value = value;
	p->subid = GetCurrentSubTransactionId();
	pending_flags = lappend(pending_flags, p);
	MemoryContextSwitchTo(old);
}

static void
notify(const char *target, const char *kind, const char *state, const char *figures)
{
	Oid			argtypes[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		args[4] = {CStringGetTextDatum(target), CStringGetTextDatum(kind),
		CStringGetTextDatum(state), CStringGetTextDatum(figures)};

	if (SPI_execute_with_args("SELECT pg_notify('d365inv_alert', (json_build_object("
							  "'target', $1, 'alert', $2, 'state', $3, 'at', now())::jsonb"
							  " || $4::jsonb)::text)",
							  4, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: NOTIFY failed");
}

/* the targets whose alert of this kind is to be raised or cleared, appended */
static List *
check_kind(const AlertKind *kind, List *changes)
{
	SPITupleTable *tt;
	uint64		n;

	if (SPI_execute(kind->sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading the %s alert figures failed", kind->name);
	tt = SPI_tuptable;
	n = SPI_processed;
	if (SPI_gettypeid(tt->tupdesc, 2) != BOOLOID)
		elog(ERROR, "d365inv worker: the %s alert's health is not a boolean", kind->name);
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = tt->vals[i];
		TupleDesc	desc = tt->tupdesc;
		char	   *target = SPI_getvalue(tup, desc, 1);
		bool		healthy_null;
		Datum		healthy = SPI_getbinval(tup, desc, 2, &healthy_null);
		bool		raised = *raised_flag(target, kind->raised);
		bool		bad = !healthy_null && !DatumGetBool(healthy);
		AlertChange *c;

		if (bad == raised)
			continue;
		c = palloc0(sizeof(AlertChange));
		c->kind = kind;
		c->target = target;
		c->raise = bad;
		c->figures = SPI_getvalue(tup, desc, 3);
		if (bad)
		{
			c->message = SPI_getvalue(tup, desc, 4);
			c->detail = SPI_getvalue(tup, desc, 5);
		}
		changes = lappend(changes, c);
	}
	return changes;
}

void
check_alerts(void)
{
	List	   *changes = NIL;
	ListCell   *lc;

	if (!callbacks_registered)
	{
		RegisterXactCallback(alerts_xact_callback, NULL);
		RegisterSubXactCallback(alerts_subxact_callback, NULL);
		callbacks_registered = true;
	}

	/* every condition first: a failing one rolls back what the others said */
	for (int k = 0; k < lengthof(alert_kinds); k++)
		changes = check_kind(&alert_kinds[k], changes);

	foreach(lc, changes)
	{
		AlertChange *c = (AlertChange *) lfirst(lc);

		if (c->raise)
			ereport(WARNING,
					(errmsg_internal("%s", c->message),
					 errdetail_internal("%s", c->detail),
					 errhint("%s", c->kind->hint)));
		else
			ereport(LOG,
					(errmsg("d365inv target \"%s\": %s", c->target, c->kind->cleared)));
		notify(c->target, c->kind->name, c->raise ? "raised" : "cleared", c->figures);
		set_at_commit(c->target, c->kind->raised, c->raise);
	}
}
