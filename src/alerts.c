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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <stddef.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"

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

static void
check_kind(const AlertKind *kind)
{
	SPITupleTable *tt;
	uint64		n;

	if (SPI_execute(kind->sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading the %s alert figures failed", kind->name);
	tt = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = tt->vals[i];
		TupleDesc	desc = tt->tupdesc;
		char	   *target = SPI_getvalue(tup, desc, 1);
		bool		healthy_null;
		Datum		healthy = SPI_getbinval(tup, desc, 2, &healthy_null);
		char	   *figures = SPI_getvalue(tup, desc, 3);
		bool	   *raised = (bool *) ((char *) target_state(target) + kind->raised);
		bool		bad;

		if (SPI_gettypeid(desc, 2) != BOOLOID)
			elog(ERROR, "d365inv worker: the %s alert's health is not a boolean", kind->name);
		bad = !healthy_null && !DatumGetBool(healthy);

		if (bad && !*raised)
		{
			ereport(WARNING,
					(errmsg_internal("%s", SPI_getvalue(tup, desc, 4)),
					 errdetail_internal("%s", SPI_getvalue(tup, desc, 5)),
					 errhint("%s", kind->hint)));
			notify(target, kind->name, "raised", figures);
			*raised = true;
		}
		else if (!bad && *raised)
		{
			ereport(LOG,
					(errmsg("d365inv target \"%s\": %s", target, kind->cleared)));
			notify(target, kind->name, "cleared", figures);
			*raised = false;
		}
	}
}

void
check_alerts(void)
{
	for (int k = 0; k < lengthof(alert_kinds); k++)
		check_kind(&alert_kinds[k]);
}
