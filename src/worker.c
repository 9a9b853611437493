/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background processes: a launcher and the worker it starts.
 *
 * The launcher is registered at server start and connects to no database,
 * so it never stands in the way of DROP DATABASE.  It starts the worker
 * (a dynamic background worker) once the database named by
 * d365inv.database exists, and again after it exits (with a pause).
 *
 * The worker connects to that database and loops: ingest the inbox, then
 * for every enabled target one delivery round (deliver.c), then sleep on
 * its latch until the earliest due retry, a wake-up from
 * d365inv_submit()/ingest() or d365inv.naptime.  It does nothing while
 * the extension is not installed.  An ERROR in a round is logged, its
 * transaction aborted, and the rows it left in_flight become in_doubt:
 * they are never resent without a lookup.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <setjmp.h>

#include "access/heapam.h"
#include "access/xlog.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "auth.h"
#include "d365inv.h"
#include "deliver.h"
#include "http.h"

#define LAUNCHER_RESTART_DELAY_MS	5000
#define HOUSEKEEPING_INTERVAL_MS	60000
#define MAX_ERROR_BACKOFF_MS		60000
/*
 * Rows the retention deletes per table and statement, so that one statement
 * never holds for long: a backlog (a shortened retention, a worker stopped
 * for days) is worked off a chunk per round, between rounds of delivery.
 */
#define RETENTION_CHUNK				10000

/* the last retention pass deleted a full chunk somewhere: run it next round */
static bool retention_backlog = false;

void
worker_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = LAUNCHER_RESTART_DELAY_MS / 1000;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "d365inv");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "d365inv_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "d365inv launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "d365inv launcher");
	RegisterBackgroundWorker(&worker);
}

/*
 * The database's oid, InvalidOid when it does not exist (yet).  Connected
 * to no database, the launcher can only scan the shared catalog's heap.
 */
static Oid
lookup_database(void)
{
	Oid			dboid = InvalidOid;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), d365inv_database) == 0 && db->datallowconn)
		{
			dboid = db->oid;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	PopActiveSnapshot();
	CommitTransactionCommand();
	return dboid;
}

static BackgroundWorkerHandle *
start_worker(Oid dboid)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "d365inv");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "d365inv_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "d365inv worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "d365inv worker");
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		ereport(WARNING,
				(errmsg("d365inv: could not start the worker"),
				 errhint("Raise max_worker_processes.")));
		return NULL;
	}
	return handle;
}

/*
 * The launcher and the worker run as the bootstrap superuser: every
 * function and operator they use must come from pg_catalog or be named with
 * its schema, never from a schema an ordinary role can create objects in.
 * The override also beats ALTER DATABASE/ROLE ... SET search_path.
 */
static void
pin_search_path(void)
{
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_OVERRIDE);
}

void
d365inv_launcher_main(Datum main_arg)
{
	BackgroundWorkerHandle *handle = NULL;
	TimestampTz last_start = 0;
	bool		said_missing = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pin_search_path();
	worker_ctl_register_launcher();

	for (;;)
	{
		long		wait_ms = d365inv_naptime_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (handle != NULL)
		{
			pid_t		pid;

			if (GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED)
			{
				pfree(handle);
				handle = NULL;
			}
		}

		if (handle == NULL && !worker_ctl_paused() && worker_ctl_worker_pid() == 0)
		{
			long		since = TimestampDifferenceMilliseconds(last_start, GetCurrentTimestamp());

			if (last_start != 0 && since < LAUNCHER_RESTART_DELAY_MS)
				wait_ms = LAUNCHER_RESTART_DELAY_MS - since;
			else
			{
				Oid			dboid = lookup_database();

				if (OidIsValid(dboid))
				{
					said_missing = false;
					last_start = GetCurrentTimestamp();
					handle = start_worker(dboid);
				}
				else if (!said_missing)
				{
					ereport(LOG,
							(errmsg("d365inv: database \"%s\" does not exist; the worker starts once it does",
									d365inv_database),
							 errhint("Set d365inv.database to the database where CREATE EXTENSION d365inv was run.")));
					said_missing = true;
				}
			}
		}

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(wait_ms, 10), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* ---------------------------------------------------------------------
 * The worker
 * ---------------------------------------------------------------------
 */

/*
 * The extension is installed at the version this library speaks.  An older
 * one (a new library installed, ALTER EXTENSION ... UPDATE not run yet) is
 * left alone, with one LOG line, until it is updated.
 */
static bool
extension_installed(void)
{
	static char said_version[NAMEDATALEN] = "";
	char	   *version = d365inv_installed_version();

	if (version == NULL)
		return false;
	if (strcmp(version, D365INV_SQL_VERSION) == 0)
	{
		said_version[0] = '\0';
		return true;
	}
	if (strcmp(said_version, version) != 0)
	{
		ereport(LOG,
				(errmsg("d365inv: the library is version %s but database \"%s\" has the extension at version %s: nothing is delivered until it is updated",
						D365INV_SQL_VERSION, get_database_name(MyDatabaseId), version),
				 errhint("Run ALTER EXTENSION d365inv UPDATE; in that database.")));
		strlcpy(said_version, version, sizeof(said_version));
	}
	return false;
}

static void
worker_exit(int code, Datum arg)
{
	http_cleanup();
}

/*
 * Run fn(arg) in a subtransaction of the current transaction: a failure is
 * a WARNING and rolls back only what fn did.  For the side tasks (ingest,
 * housekeeping, alerts), which must never stop delivery.
 */
static void
run_guarded(void (*fn) (void *), void *arg, const char *what)
{
	MemoryContext outer = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(outer);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("d365inv: %s failed: %s", what, edata->message),
				 edata->detail ? errdetail("%s", edata->detail) : 0,
				 edata->hint ? errhint("%s", edata->hint) : 0));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(outer);
	CurrentResourceOwner = owner;
}

/* run_guarded() callback: one statement, SPI already connected */
static void
run_statement(void *sql)
{
	int			ret = SPI_execute((const char *) sql, false, 0);

	if (ret < 0)
		elog(ERROR, "%s", SPI_result_code_string(ret));
}

/* a statement run_guarded() runs, and how many rows it processed */
typedef struct CountedStatement
{
	const char *sql;
	uint64		processed;
} CountedStatement;

/* run_guarded() callback: one statement, SPI already connected; counts rows */
static void
run_counted(void *arg)
{
	CountedStatement *stmt = (CountedStatement *) arg;
	int			ret = SPI_execute(stmt->sql, false, 0);

	if (ret < 0)
		elog(ERROR, "%s", SPI_result_code_string(ret));
	stmt->processed = SPI_processed;
}

/*
 * The retention: delete the oldest expired rows of batch_log, remote_key
 * and status_change, at most RETENTION_CHUNK of each, found through the
 * index on their time column.  Returns true when a chunk was full: there
 * may be more.
 */
static bool
expire_rows(void)
{
	static const struct
	{
		const char *table;
		const char *column;
		const int  *retention_s;
	}			tables[] = {
		{"batch_log", "started_at", &d365inv_batch_log_retention_s},
		{"remote_key", "seen_at", &d365inv_remote_key_retention_s},
		{"status_change", "changed_at", &d365inv_audit_retention_s},
	};
	bool		more = false;

	for (int i = 0; i < lengthof(tables); i++)
	{
		CountedStatement stmt;

		stmt.sql = psprintf("DELETE FROM d365inv.%s WHERE ctid = ANY (ARRAY("
							"SELECT ctid FROM d365inv.%s WHERE %s < now() - interval '%d seconds'"
							" ORDER BY %s LIMIT %d))",
							tables[i].table, tables[i].table, tables[i].column,
							*tables[i].retention_s, tables[i].column, RETENTION_CHUNK);
		stmt.processed = 0;
		run_guarded(run_counted, &stmt, "housekeeping (retention)");
		if (stmt.processed >= RETENTION_CHUNK)
			more = true;
	}
	return more;
}

/* Run one SQL statement in the current transaction; returns SPI_processed. */
static uint64
run_sql(const char *sql, int expected)
{
	int			ret = SPI_execute(sql, false, 0);

	if (ret != expected)
		elog(ERROR, "d365inv worker: \"%s\" failed: %s", sql, SPI_result_code_string(ret));
	return SPI_processed;
}

/*
 * Fill the key filter from d365inv.remote_key.  A bloom filter cannot
 * forget, so this is how keys dropped by the retention leave it.
 */
static void
rebuild_key_filter(void)
{
	Portal		portal;
	uint64		n = 0;
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "d365inv key filter rebuild",
											  ALLOCSET_DEFAULT_SIZES);

	key_filter_clear();
	/*
	 * A snapshot from after the clear's wait, whatever the transaction's
	 * isolation: it sees every key whose bits the clear may have wiped
	 * (key_filter.c).
	 */
	PushActiveSnapshot(GetLatestSnapshot());
	portal = SPI_cursor_open_with_args(NULL, "SELECT target, vendor_key, invoice_key FROM d365inv.remote_key",
									   0, NULL, NULL, NULL, true, 0);
	for (;;)
	{
		MemoryContext old;

		SPI_cursor_fetch(portal, true, 10000);
		if (SPI_processed == 0)
			break;
		old = MemoryContextSwitchTo(tmp);

		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;

			key_filter_add(SPI_getvalue(tup, desc, 1), SPI_getvalue(tup, desc, 2),
						   SPI_getvalue(tup, desc, 3));
		}
		MemoryContextSwitchTo(old);
		MemoryContextReset(tmp);
		n += SPI_processed;
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
	PopActiveSnapshot();
	MemoryContextDelete(tmp);
	key_filter_ready();
	if (n > 0)
		ereport(LOG, (errmsg("d365inv: key filter rebuilt from %llu known keys", (unsigned long long) n)));
}

/*
 * This copy of the data took over from another server: a standby promoted
 * (a new WAL timeline), a point-in-time recovery, or a dump restored into
 * another database or cluster.  d365inv.worker_state has a row for every
 * server a worker ran on; one of another server, not handled yet, means the
 * takeover.  What was open there may have been claimed and sent after this
 * copy was taken (asynchronous replication, the time since the dump): every
 * open row is in doubt, looked up before anything is sent, and in
 * entity_id_mode 'server' not sent again before its fence.  Runs when the
 * worker starts and with the housekeeping, so a restore that ends after the
 * worker started is caught too.
 */
static void
after_takeover(void)
{
	TimeLineID	tli = GetWALInsertionTimeLine();
	Oid			argtypes[3] = {INT8OID, OIDOID, INT8OID};
	Datum		args[3] = {Int64GetDatum((int64) GetSystemIdentifier()),
		ObjectIdGetDatum(MyDatabaseId), Int64GetDatum((int64) tli)};
	bool		isnull;
	uint64		others;
	char	   *sql;

	if (SPI_execute_with_args("SELECT count(*) FROM d365inv.worker_state"
							  " WHERE handled_at IS NULL"
							  "   AND (system_identifier, database_oid, timeline) <> ($1, $2, $3)",
							  3, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading worker_state failed");
	others = (uint64) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

	if (others > 0)
	{
		uint64		n;

		sql = psprintf("UPDATE d365inv.invoice SET status = 'in_doubt', updated_at = now(),"
					   "       next_attempt_at = now() + interval '%d milliseconds',"
					   "       resend_fence = greatest(resend_fence, now() + interval '%d milliseconds'),"
					   "       last_error = 'open when this server took over from another (promotion, recovery or restore): it may have been sent there; looked up before anything is sent'"
					   " WHERE status < 'created'",
					   d365inv_in_doubt_delay_ms, d365inv_server_request_lifetime_ms);
		n = run_sql(sql, SPI_OK_UPDATE);
		if (SPI_execute_with_args("UPDATE d365inv.worker_state SET handled_at = now()"
								  " WHERE handled_at IS NULL"
								  "   AND (system_identifier, database_oid, timeline) <> ($1, $2, $3)",
								  3, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "d365inv worker: writing worker_state failed");
		ereport(LOG,
				(errmsg("d365inv: this server (timeline %u) took over from another server the data was delivered from: %llu open invoices are in doubt and will be looked up before anything is sent",
						tli, (unsigned long long) n)));
	}
	if (SPI_execute_with_args(others > 0 ?
							  "INSERT INTO d365inv.worker_state AS w (system_identifier, database_oid, timeline, promoted_at)"
							  " VALUES ($1, $2, $3, now())"
							  " ON CONFLICT (system_identifier, database_oid, timeline)"
							  " DO UPDATE SET promoted_at = now(), handled_at = NULL" :
							  "INSERT INTO d365inv.worker_state (system_identifier, database_oid, timeline)"
							  " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
							  3, argtypes, args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "d365inv worker: writing worker_state failed");
	if (SPI_execute_with_args("SELECT promoted_at FROM d365inv.worker_state"
							  " WHERE (system_identifier, database_oid, timeline) = ($1, $2, $3)",
							  3, argtypes, args, NULL, false, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		deliver_promoted_at = isnull ? 0 : DatumGetTimestampTz(d);
	}
}

/*
 * The round's bookkeeping transaction: recover in_flight rows, ingest,
 * housekeeping, and the list of targets to serve.  Returns false when the
 * extension is not installed.
 */
static bool
prepare_round(bool recover, bool housekeeping, List **targets)
{
	bool		installed;
	MemoryContext outer = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	installed = extension_installed();
	if (installed)
	{
		SPI_connect();
		pgstat_report_activity(STATE_RUNNING, "d365inv: preparing a round");
		if (recover)
		{
			/* the interrupted send counts as an attempt, so a batch that kills
			 * the worker every time ends in review instead of looping */
			char	   *sql = psprintf("UPDATE d365inv.invoice SET status = 'in_doubt', updated_at = now(),"
										   "       attempts = attempts + 1,"
										   "       next_attempt_at = now() + interval '%d milliseconds',"
										   "       resend_fence = now() + interval '%d milliseconds',"
										   "       last_error = 'in flight when the worker stopped'"
										   " WHERE status < 'created' AND status = 'in_flight'",
										   d365inv_in_doubt_delay_ms, d365inv_server_request_lifetime_ms);
			uint64		n = run_sql(sql, SPI_OK_UPDATE);

			if (n > 0)
				ereport(LOG,
						(errmsg("d365inv: %llu invoices were in flight when the worker stopped; they are in_doubt and will be looked up before anything is resent",
								(unsigned long long) n)));
		}
		if (recover || housekeeping)
			after_takeover();
		if (recover)
			rebuild_key_filter();
		/* the inbox is empty most of the time: then not even a lock is taken */
		if (run_sql("SELECT FROM d365inv.inbox LIMIT 1", SPI_OK_SELECT) > 0)
		{
			run_guarded(run_statement, "SELECT d365inv.ingest(nowait => true)", "ingesting the inbox");

			/*
			 * ingest() locks the inbox until commit: commit now, so that no
			 * COPY waits for the rest of the round's preparation.
			 */
			SPI_finish();
			PopActiveSnapshot();
			CommitTransactionCommand();
			MemoryContextSwitchTo(outer);
			SetCurrentStatementStartTimestamp();
			StartTransactionCommand();
			PushActiveSnapshot(GetTransactionSnapshot());
			SPI_connect();
		}
		if (housekeeping)
		{
			/* rows of an unknown target: nobody would ever send them */
			run_guarded(run_statement,
						"UPDATE d365inv.invoice i SET status = 'review', updated_at = now(),"
					"       settled_at = now(), last_error = 'target \"' || i.target || '\" does not exist in d365inv.target'"
					" WHERE i.status < 'created' AND i.status <> 'in_flight'"
					"   AND i.target IN (WITH RECURSIVE t(name) AS ("
					"         (SELECT target FROM d365inv.invoice WHERE status < 'created' ORDER BY target LIMIT 1)"
					"         UNION ALL"
					"         SELECT (SELECT target FROM d365inv.invoice"
					"                  WHERE status < 'created' AND target > t.name ORDER BY target LIMIT 1)"
					"           FROM t WHERE t.name IS NOT NULL)"
					"       SELECT name FROM t WHERE name IS NOT NULL"
					"          AND name NOT IN (SELECT name FROM d365inv.target))",
					"housekeeping (unknown targets)");
		}
		if (housekeeping || retention_backlog)
			retention_backlog = expire_rows();
		/*
		 * The counters of duplicate_rate 'all' and metrics(): one row per
		 * key again, so that reading them costs what a minute adds.
		 */
		if (housekeeping)
			run_guarded(run_statement, "SELECT d365inv.compact_tally()",
						"housekeeping (counters)");
		/*
		 * The targets to serve; those that cannot be served say why when
		 * invoices wait for them.
		 */
		/*
		 * Whether invoices wait: the first in invoice_open's order.  An
		 * EXISTS may be hashed over every open invoice, or (its LIMIT and
		 * ORDER BY dropped) be a sequential scan that expects an open row
		 * among the first few and reads the whole settled history when the
		 * statistics are older than the last delivery.
		 */
		run_sql("SELECT name, enabled AND service_root IS NOT NULL, enabled,"
				"       (SELECT i.id FROM d365inv.invoice i WHERE i.target = t.name AND i.status < 'created'"
				"         ORDER BY i.next_attempt_at NULLS FIRST, i.id LIMIT 1) IS NOT NULL"
				"  FROM d365inv.target t ORDER BY name", SPI_OK_SELECT);
		{
			SPITupleTable *tt = SPI_tuptable;
			uint64		n = SPI_processed;
			MemoryContext spi = MemoryContextSwitchTo(outer);

			*targets = NIL;
			for (uint64 i = 0; i < n; i++)
			{
				char	   *name = SPI_getvalue(tt->vals[i], tt->tupdesc, 1);
				bool		isnull;

				if (DatumGetBool(SPI_getbinval(tt->vals[i], tt->tupdesc, 2, &isnull)))
					*targets = lappend(*targets, name);
				else if (DatumGetBool(SPI_getbinval(tt->vals[i], tt->tupdesc, 4, &isnull)))
				{
					MemoryContextSwitchTo(spi);
					deliver_not_served(name,
									   DatumGetBool(SPI_getbinval(tt->vals[i], tt->tupdesc, 3, &isnull)));
					MemoryContextSwitchTo(outer);
				}
			}
			MemoryContextSwitchTo(spi);
		}
		SPI_finish();
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return installed;
}

/* run_guarded() callback: the alert check, with its own snapshot and SPI */
static void
check_alerts_connected(void *arg)
{
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_connect();
	check_alerts();
	SPI_finish();
	PopActiveSnapshot();
}

/* Alerts: a transaction of their own, guarded like the other side tasks */
static void
run_alert_check(void)
{
	MemoryContext outer = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	run_guarded(check_alerts_connected, NULL, "checking the alert conditions");
	CommitTransactionCommand();
	pgstat_report_stat(false);
	MemoryContextSwitchTo(outer);
}

void
d365inv_worker_main(Datum main_arg)
{
	Oid			dboid = DatumGetObjectId(main_arg);
	sigjmp_buf	local_sigjmp_buf;
	MemoryContext round_context;
	volatile bool recover = true;
	volatile int error_backoff_ms = 0;
	volatile TimestampTz last_housekeeping = 0;
	volatile TimestampTz last_alert_check = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	/* die() only sets a flag; CHECK_FOR_INTERRUPTS() acts on it outside libcurl */
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);

	if (!worker_ctl_register_worker())
	{
		ereport(LOG, (errmsg("d365inv: another worker is running; this one exits")));
		proc_exit(0);
	}
	before_shmem_exit(worker_exit, (Datum) 0);
	pgstat_report_appname("d365inv worker");
	/*
	 * Short, index-driven statements: JIT compilation would only add latency
	 * (and LLVM's memory) once the queue is large enough to look costly.
	 */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);
	pin_search_path();
	ereport(LOG, (errmsg("d365inv worker started for database \"%s\"", d365inv_database)));

	round_context = AllocSetContextCreate(TopMemoryContext, "d365inv round",
										  ALLOCSET_DEFAULT_SIZES);

	/*
	 * An ERROR anywhere in a round comes back here: report it, abort the
	 * transaction, and go on after a pause.  Rows claimed by the failed
	 * round are made in_doubt by the next one (recover).
	 */
	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		error_context_stack = NULL;
		HOLD_INTERRUPTS();
		EmitErrorReport();
		AbortOutOfAnyTransaction();
		SPI_finish();
		FlushErrorState();
		MemoryContextSwitchTo(TopMemoryContext);
		MemoryContextReset(round_context);
		RESUME_INTERRUPTS();

		recover = true;
		error_backoff_ms = error_backoff_ms == 0 ? 1000 : Min(error_backoff_ms * 2, MAX_ERROR_BACKOFF_MS);
		/* the latch too: SIGTERM (die() sets it) must not wait out the pause */
		{
			TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), error_backoff_ms);
			long		left;

			while ((left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), until)) > 0)
			{
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 left, PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				CHECK_FOR_INTERRUPTS();
			}
		}
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		List	   *targets = NIL;
		ListCell   *lc;
		bool		busy = false;
		bool		housekeeping;
		bool		alerts;
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz next_due = TimestampTzPlusMilliseconds(now, d365inv_naptime_ms);
		long		wait_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			/* the token endpoint or credentials may have changed */
			auth_forget_all();
		}

		MemoryContextReset(round_context);
		MemoryContextSwitchTo(round_context);

		housekeeping = TimestampDifferenceExceeds(last_housekeeping, now, HOUSEKEEPING_INTERVAL_MS);
		alerts = TimestampDifferenceExceeds(last_alert_check, now, d365inv_alert_interval_ms);
		if (prepare_round(recover, housekeeping, &targets))
		{
			recover = false;
			if (housekeeping)
				last_housekeeping = now;
			if (alerts)
				last_alert_check = now;
			foreach(lc, targets)
			{
				TimestampTz target_due = next_due;

				if (deliver_round((const char *) lfirst(lc), round_context, &target_due))
					busy = true;
				if (target_due < next_due)
					next_due = target_due;
			}
			if (alerts)
				run_alert_check();
		}
		error_backoff_ms = 0;
		MemoryContextSwitchTo(TopMemoryContext);

		/* a retention backlog is worked off without waiting in between */
		if (busy || retention_backlog)
			continue;

		next_due = Min(next_due, TimestampTzPlusMilliseconds(last_alert_check, d365inv_alert_interval_ms));
		/* what is still pending (rate-limited above) goes out before a sleep */
		pgstat_report_stat(true);
		wait_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next_due);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(wait_ms, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
