/*-------------------------------------------------------------------------
 *
 * alerts.c
 *	  The worker's alerts: when the last hour's duplicate rate of a target
 *	  crosses d365inv.duplicate_alert_threshold, or its genuine errors
 *	  exceed d365inv.error_alert_threshold, raise one WARNING with the
 *	  figures and NOTIFY d365inv_alert with a JSON payload; say nothing more
 *	  until the condition clears (a NOTIFY with "state": "cleared") and
 *	  comes back.
 *
 * The figures come from the views d365inv.duplicate_rate and
 * d365inv.batch_health, so what the worker says and what a DBA reads agree.
 * Caller has a transaction and SPI; notifications go out at its commit.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "utils/builtins.h"

#include "d365inv.h"
#include "deliver.h"

static void
notify(const char *target, const char *kind, const char *state, const char *figures_sql)
{
	char	   *sql = psprintf("SELECT pg_notify('d365inv_alert', (json_build_object("
							   "'target', %s, 'alert', %s, 'state', %s, 'at', now())::jsonb"
							   " || (%s)::jsonb)::text)",
							   quote_literal_cstr(target), quote_literal_cstr(kind),
							   quote_literal_cstr(state), figures_sql);

	if (SPI_execute(sql, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: NOTIFY failed");
}

static void
check_duplicate_rates(void)
{
	int			ret = SPI_execute("SELECT target, healthy, duplicate_rate, duplicates, received, threshold"
								  "  FROM d365inv.duplicate_rate WHERE period = '1h' AND target IS NOT NULL",
								  true, 0);
	SPITupleTable *tt;
	uint64		n;

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading d365inv.duplicate_rate failed");
	tt = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = tt->vals[i];
		TupleDesc	desc = tt->tupdesc;
		char	   *target = SPI_getvalue(tup, desc, 1);
		char	   *healthy = SPI_getvalue(tup, desc, 2);
		char	   *rate = SPI_getvalue(tup, desc, 3);
		char	   *dups = SPI_getvalue(tup, desc, 4);
		char	   *received = SPI_getvalue(tup, desc, 5);
		char	   *threshold = SPI_getvalue(tup, desc, 6);
		TargetState *ts = target_state(target);
		bool		bad = healthy != NULL && strcmp(healthy, "f") == 0;
		char	   *figures = psprintf("json_build_object('duplicate_rate', %s, 'duplicates', %s, 'received', %s, 'threshold', %s)",
									   rate ? rate : "NULL", dups ? dups : "0",
									   received ? received : "0", threshold ? threshold : "NULL");

		if (bad && !ts->duplicate_alert)
		{
			ereport(WARNING,
					(errmsg("d365inv target \"%s\": duplicate rate %.1f%% in the last hour is above the threshold of %.1f%%",
							target, 100.0 * strtod(rate, NULL), 100.0 * strtod(threshold, NULL)),
					 errdetail("%s of %s invoices received in the last hour were duplicates.", dups, received),
					 errhint("An upstream system is probably resending; see d365inv.duplicate_rate.")));
			notify(target, "duplicate_rate", "raised", figures);
			ts->duplicate_alert = true;
		}
		else if (!bad && ts->duplicate_alert)
		{
			ereport(LOG,
					(errmsg("d365inv target \"%s\": duplicate rate back under the threshold", target)));
			notify(target, "duplicate_rate", "cleared", figures);
			ts->duplicate_alert = false;
		}
	}
}

static void
check_errors(void)
{
	int			ret = SPI_execute("SELECT target, healthy, errors, batches"
								  "  FROM d365inv.batch_health WHERE period = '1h' AND target IS NOT NULL",
								  true, 0);
	SPITupleTable *tt;
	uint64		n;

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading d365inv.batch_health failed");
	tt = SPI_tuptable;
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = tt->vals[i];
		TupleDesc	desc = tt->tupdesc;
		char	   *target = SPI_getvalue(tup, desc, 1);
		char	   *healthy = SPI_getvalue(tup, desc, 2);
		char	   *errors = SPI_getvalue(tup, desc, 3);
		char	   *batches = SPI_getvalue(tup, desc, 4);
		TargetState *ts = target_state(target);
		bool		bad = healthy != NULL && strcmp(healthy, "f") == 0;
		char	   *figures = psprintf("json_build_object('errors', %s, 'batches', %s, 'threshold', %d)",
									   errors ? errors : "0", batches ? batches : "0",
									   d365inv_error_alert_threshold);

		if (bad && !ts->error_alert)
		{
			ereport(WARNING,
					(errmsg("d365inv target \"%s\": %s genuine errors in the last hour, above the threshold of %d",
							target, errors, d365inv_error_alert_threshold),
					 errdetail("Invoices rejected by D365 or out of retries are in d365inv.review_queue."),
					 errhint("See d365inv.batch_health and d365inv.review_queue.")));
			notify(target, "errors", "raised", figures);
			ts->error_alert = true;
		}
		else if (!bad && ts->error_alert)
		{
			ereport(LOG,
					(errmsg("d365inv target \"%s\": genuine errors back under the threshold", target)));
			notify(target, "errors", "cleared", figures);
			ts->error_alert = false;
		}
	}
}

void
check_alerts(void)
{
	check_duplicate_rates();
	check_errors();
}
