/*-------------------------------------------------------------------------
 *
 * lifecycle.c
 *	  What DROP EXTENSION d365inv does to a production database: it refuses
 *	  while invoices are still on their way (they would be deleted with the
 *	  queue), unless the DBA says so, and it leaves no empty schema behind.
 *
 * The refusal is an event trigger (d365inv.guard_drop(), ddl_command_start
 * on DROP EXTENSION), so it holds with or without the preload; removing
 * the emptied schema needs the ProcessUtility hook (d365inv.c), so it happens only when
 * the library is preloaded (as it is wherever the worker runs).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "commands/event_trigger.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "catalog/pg_type.h"
#include "utils/builtins.h"

#include "d365inv.h"

PG_FUNCTION_INFO_V1(d365inv_guard_drop);

/* The statement drops the d365inv extension */
bool
lifecycle_drops_d365inv(Node *stmt)
{
	DropStmt   *drop;
	ListCell   *lc;

	if (stmt == NULL || !IsA(stmt, DropStmt))
		return false;
	drop = (DropStmt *) stmt;
	if (drop->removeType != OBJECT_EXTENSION)
		return false;
	foreach(lc, drop->objects)
	{
		if (strcmp(strVal(lfirst(lc)), "d365inv") == 0)
			return true;
	}
	return false;
}

/*
 * One query returning one bigint, SPI connected by the caller.  Not read
 * only: that would use the statement's snapshot, which does not see what
 * the DROP itself deleted.
 */
static int64
spi_count(const char *sql, Oid argtype, Datum arg)
{
	bool		isnull;
	int			ret = SPI_execute_with_args(sql, argtype == InvalidOid ? 0 : 1, &argtype, &arg,
											NULL, false, 1);

	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "d365inv: \"%s\" failed: %s", sql, SPI_result_code_string(ret));
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * guard_drop() -> event_trigger: ERROR on DROP EXTENSION d365inv while
 * invoices are open, unless d365inv.drop_open_invoices is on.
 */
Datum
d365inv_guard_drop(PG_FUNCTION_ARGS)
{
	EventTriggerData *trigdata;
	int64		open;

	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("d365inv.guard_drop() is called by an event trigger only")));
	trigdata = (EventTriggerData *) fcinfo->context;
	if (!lifecycle_drops_d365inv(trigdata->parsetree) || d365inv_drop_open_invoices)
		PG_RETURN_VOID();

	SPI_connect();
	open = spi_count("SELECT count(*) FROM d365inv.invoice WHERE status < 'created'",
					 InvalidOid, (Datum) 0);
	SPI_finish();
	if (open > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("d365inv has %lld open invoices in this database", (long long) open),
				 errdetail("DROP EXTENSION would delete them (pending, retry, in_flight or in_doubt) with the queue, the duplicates, the rejects and the audit trail; in_flight and in_doubt ones may already be in D365."),
				 errhint("Let them be delivered (d365inv_submit(wait => ...)) or settle them, or SET d365inv.drop_open_invoices = on to drop them all the same.")));
	PG_RETURN_VOID();
}

/* After DROP EXTENSION d365inv: the schema CREATE EXTENSION made, if now empty */
static void
drop_empty_schema(void)
{
	Oid			nsp = get_namespace_oid("d365inv", true);

	if (!OidIsValid(nsp))
		return;
	SPI_connect();
	if (spi_count("SELECT count(*) FROM pg_catalog.pg_depend"
				  " WHERE refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND refobjid = $1",
				  OIDOID, ObjectIdGetDatum(nsp)) == 0 &&
		SPI_execute("DROP SCHEMA d365inv", false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "d365inv: dropping the empty schema d365inv failed");
	SPI_finish();
}

/*
 * Around a utility statement (d365inv.c's ProcessUtility hook): whether it
 * drops this extension, whose emptied schema goes after it.  Only a schema
 * the extension was in: not some empty schema of that name.
 */
bool
lifecycle_before_utility(Node *stmt)
{
	return lifecycle_drops_d365inv(stmt) && OidIsValid(get_extension_oid("d365inv", true));
}

void
lifecycle_after_utility(void)
{
	drop_empty_schema();
}
