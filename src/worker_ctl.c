/*-------------------------------------------------------------------------
 *
 * worker_ctl.c
 *	  The worker's shared state and everything other backends do to it:
 *	  wake it (at commit, or now), ask its pid, check that a session can
 *	  wait for it, and get it out of the way of DROP DATABASE.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/condition_variable.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "d365inv.h"

typedef struct WorkerShared
{
	slock_t		mutex;			/* guards the fields below; held for a few
								 * loads and stores only (no system calls) */
	int			worker_pgprocno;	/* -1 when no worker runs */
	pid_t		worker_pid;
	Oid			worker_dboid;
	int			launcher_pgprocno;	/* -1 when no launcher runs */
	bool		paused;			/* DROP/RENAME DATABASE of our database under way */
	ConditionVariable worker_gone;	/* broadcast when the worker deregisters */
} WorkerShared;

/*
 * A process's number, the index of its PGPROC in ProcGlobal->allProcs.
 * PostgreSQL 17 dropped PGPROC.pgprocno for GetNumberFromPGProc().
 */
#if PG_VERSION_NUM >= 170000
#define MY_PGPROCNO()	((int) GetNumberFromPGProc(MyProc))
#else
#define MY_PGPROCNO()	(MyProc->pgprocno)
#endif

/* how long DROP/RENAME DATABASE and DROP EXTENSION wait for the worker to go */
#define STOP_WORKER_WAIT_MS 10000

static WorkerShared *shared = NULL;
static bool wake_at_commit = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(d365inv_wake_worker);
PG_FUNCTION_INFO_V1(d365inv_worker_pid);
PG_FUNCTION_INFO_V1(d365inv_check_can_wait);

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(WorkerShared)));
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared = ShmemInitStruct("d365inv worker", sizeof(WorkerShared), &found);
	if (!found)
	{
		SpinLockInit(&shared->mutex);
		shared->worker_pgprocno = -1;
		shared->worker_pid = 0;
		shared->worker_dboid = InvalidOid;
		shared->launcher_pgprocno = -1;
		shared->paused = false;
		ConditionVariableInit(&shared->worker_gone);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* set the latch of the launcher, or of the worker, if it is running */
static void
set_latch_of(bool launcher)
{
	int			pgprocno;

	if (shared == NULL)
		return;
	SpinLockAcquire(&shared->mutex);
	pgprocno = launcher ? shared->launcher_pgprocno : shared->worker_pgprocno;
	SpinLockRelease(&shared->mutex);
	if (pgprocno >= 0)
		SetLatch(&ProcGlobal->allProcs[pgprocno].procLatch);
}

static void
wake_worker_now(void)
{
	set_latch_of(false);
}

void
worker_ctl_wake_launcher(void)
{
	set_latch_of(true);
}

/* New rows are only visible to the worker once committed: wake it then. */
static void
xact_callback(XactEvent event, void *arg)
{
	if (!wake_at_commit)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
		wake_worker_now();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		wake_at_commit = false;
}

static void
clear_registration(int code, Datum arg)
{
	bool		launcher = DatumGetBool(arg);

	SpinLockAcquire(&shared->mutex);
	if (launcher)
		shared->launcher_pgprocno = -1;
	else if (shared->worker_pid == MyProcPid)
	{
		shared->worker_pgprocno = -1;
		shared->worker_pid = 0;
		shared->worker_dboid = InvalidOid;
	}
	SpinLockRelease(&shared->mutex);
	if (!launcher)
	{
		/* whoever waits in stop_worker_for(), then the launcher */
		ConditionVariableBroadcast(&shared->worker_gone);
		worker_ctl_wake_launcher();
	}
}

/*
 * The calling worker becomes the one worker; false when another live one
 * holds the place (a launcher restarted while its worker kept running).
 */
bool
worker_ctl_register_worker(void)
{
	pid_t		other;

	/*
	 * Is the registered one alive?  Asked outside the spinlock (the proc
	 * array has its own lock), then the place is taken only if it still
	 * holds the pid we asked about.  A live worker is in the proc array
	 * until after clear_registration() ran, so a pid found there is one.
	 */
	for (;;)
	{
		bool		alive;

		SpinLockAcquire(&shared->mutex);
		other = shared->worker_pid;
		SpinLockRelease(&shared->mutex);
		alive = other != 0 && other != MyProcPid && BackendPidGetProc(other) != NULL;
		if (alive)
			return false;
		SpinLockAcquire(&shared->mutex);
		if (shared->worker_pid == other)
			break;				/* still held: keep the lock, take the place */
		SpinLockRelease(&shared->mutex);
	}
	shared->worker_pgprocno = MY_PGPROCNO();
	shared->worker_pid = MyProcPid;
	shared->worker_dboid = MyDatabaseId;
	SpinLockRelease(&shared->mutex);
	on_shmem_exit(clear_registration, BoolGetDatum(false));
	return true;
}

void
worker_ctl_register_launcher(void)
{
	SpinLockAcquire(&shared->mutex);
	shared->launcher_pgprocno = MY_PGPROCNO();
	SpinLockRelease(&shared->mutex);
	on_shmem_exit(clear_registration, BoolGetDatum(true));
}

bool
worker_ctl_paused(void)
{
	bool		paused;

	SpinLockAcquire(&shared->mutex);
	paused = shared->paused;
	SpinLockRelease(&shared->mutex);
	return paused;
}

int
worker_ctl_worker_pid(void)
{
	pid_t		pid;

	if (shared == NULL)
		return 0;
	SpinLockAcquire(&shared->mutex);
	pid = shared->worker_pid;
	SpinLockRelease(&shared->mutex);
	return pid;
}

/*
 * DROP DATABASE and ALTER DATABASE RENAME refuse to run while anyone is
 * connected: stop the worker first, and keep the launcher from starting a
 * new one until the command is over.
 */
static void
stop_worker_for(const char *what)
{
	pid_t		pid;
	TimestampTz deadline;

	SpinLockAcquire(&shared->mutex);
	shared->paused = true;
	pid = shared->worker_pid;
	SpinLockRelease(&shared->mutex);
	if (pid == 0)
		return;

	ereport(LOG,
			(errmsg("d365inv: stopping the worker (pid %d) for %s", (int) pid, what)));

	/*
	 * SIGTERM, as pg_terminate_backend() sends it, and only to a pid that is
	 * a backend of this server: die() makes the worker leave even from the
	 * middle of an HTTP transfer.
	 */
	if (BackendPidGetProc(pid) != NULL)
		kill(pid, SIGTERM);

	/*
	 * Sleep on the condition variable (our latch) until clear_registration()
	 * broadcasts, at most STOP_WORKER_WAIT_MS as before; the wait is
	 * interruptible and ends with the postmaster.
	 */
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STOP_WORKER_WAIT_MS);
	ConditionVariablePrepareToSleep(&shared->worker_gone);
	while (worker_ctl_worker_pid() == pid)
	{
		long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);

		if (left <= 0 ||
			ConditionVariableTimedSleep(&shared->worker_gone, left, PG_WAIT_EXTENSION))
			break;
	}
	ConditionVariableCancelSleep();
}

static bool
names_our_database(Node *stmt)
{
	const char *dbname = NULL;

	if (IsA(stmt, DropdbStmt))
		dbname = ((DropdbStmt *) stmt)->dbname;
	else if (IsA(stmt, RenameStmt) && ((RenameStmt *) stmt)->renameType == OBJECT_DATABASE)
		dbname = ((RenameStmt *) stmt)->subname;
	return dbname != NULL && d365inv_database != NULL && strcmp(dbname, d365inv_database) == 0;
}

/*
 * DROP EXTENSION d365inv where the worker runs: its transactions lock the
 * queue's tables in another order than the DROP does (a deadlock), so it
 * stops for the statement too.
 */
static const char *
stops_our_worker(Node *stmt)
{
	Oid			dboid;

	if (names_our_database(stmt))
		return IsA(stmt, DropdbStmt) ? "DROP DATABASE" : "ALTER DATABASE RENAME";
	if (!lifecycle_drops_d365inv(stmt))
		return NULL;
	SpinLockAcquire(&shared->mutex);
	dboid = shared->worker_dboid;
	SpinLockRelease(&shared->mutex);
	return dboid == MyDatabaseId ? "DROP EXTENSION" : NULL;
}

/*
 * Around a utility statement (d365inv.c's ProcessUtility hook): before one
 * that must not run into the worker, stop it (returns true); after it,
 * let it start again.
 */
bool
worker_ctl_before_utility(Node *stmt)
{
	const char *why = shared != NULL ? stops_our_worker(stmt) : NULL;

	if (why == NULL)
		return false;
	stop_worker_for(why);
	return true;
}

void
worker_ctl_after_utility(Node *stmt, bool stopped)
{
	/* a new database of that name: the launcher need not wait for naptime */
	if (shared != NULL && IsA(stmt, CreatedbStmt) &&
		strcmp(((CreatedbStmt *) stmt)->dbname, d365inv_database) == 0)
		worker_ctl_wake_launcher();
	if (stopped)
	{
		SpinLockAcquire(&shared->mutex);
		shared->paused = false;
		SpinLockRelease(&shared->mutex);
		worker_ctl_wake_launcher();
	}
}

void
worker_ctl_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
	RegisterXactCallback(xact_callback, NULL);
}

static void
require_preloaded(void)
{
	if (shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("d365inv is not loaded through shared_preload_libraries, so no worker delivers invoices"),
				 errhint("Add d365inv to shared_preload_libraries in postgresql.conf, set d365inv.database = '%s', and restart the server.",
						 get_database_name(MyDatabaseId))));
}

/* wake_worker(now boolean DEFAULT false): at commit, or at once */
Datum
d365inv_wake_worker(PG_FUNCTION_ARGS)
{
	bool		now = PG_NARGS() > 0 && !PG_ARGISNULL(0) && PG_GETARG_BOOL(0);

	if (now)
		wake_worker_now();
	else
		wake_at_commit = true;
	PG_RETURN_VOID();
}

Datum
d365inv_worker_pid(PG_FUNCTION_ARGS)
{
	pid_t		pid = 0;
	Oid			dboid = InvalidOid;

	if (shared != NULL)
	{
		SpinLockAcquire(&shared->mutex);
		pid = shared->worker_pid;
		dboid = shared->worker_dboid;
		SpinLockRelease(&shared->mutex);
	}
	if (pid == 0 || dboid != MyDatabaseId)
		PG_RETURN_NULL();
	PG_RETURN_INT32((int32) pid);
}

/* The version of the d365inv extension installed in this database, or NULL */
char *
d365inv_installed_version(void)
{
	Relation	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	char	   *version = NULL;

	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("d365inv"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, Anum_pg_extension_extversion, RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = text_to_cstring(DatumGetTextPP(d));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/* check_worker(for_wait boolean): ERROR when submitting here cannot work */
Datum
d365inv_check_can_wait(PG_FUNCTION_ARGS)
{
	bool		for_wait = PG_GETARG_BOOL(0);
	char	   *here = get_database_name(MyDatabaseId);

	{
		char	   *version = d365inv_installed_version();

		if (version != NULL && strcmp(version, D365INV_SQL_VERSION) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("the d365inv library is version %s but this database has the extension at version %s",
							D365INV_SQL_VERSION, version),
					 errdetail("The worker delivers nothing here until the extension is updated."),
					 errhint("Run ALTER EXTENSION d365inv UPDATE;")));
	}
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("this server is in recovery (a standby): invoices are loaded and delivered on the primary"),
				 errdetail("The worker starts here only when this server is promoted."),
				 errhint("Connect to the primary to load and submit invoices.")));
	if (for_wait)
	{
		if (IsTransactionBlock())
			ereport(ERROR,
					(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
					 errmsg("d365inv_submit(wait) cannot run inside a transaction block"),
					 errdetail("It waits for the worker's commits, which a transaction block would not see, and the worker cannot see what this transaction has not committed."),
					 errhint("Call it on its own (autocommit), or call d365inv_submit() without wait.")));
		if (IsolationUsesXactSnapshot())
			ereport(ERROR,
					(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
					 errmsg("d365inv_submit(wait) needs READ COMMITTED isolation"),
					 errdetail("Under REPEATABLE READ or SERIALIZABLE the wait would never see the worker's progress.")));
	}
	require_preloaded();
	if (d365inv_database == NULL || strcmp(here, d365inv_database) != 0)
		ereport(for_wait ? ERROR : WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the d365inv worker serves database \"%s\", not \"%s\"",
						d365inv_database ? d365inv_database : "", here),
				 errdetail("Invoices queued here wait until a worker serves this database."),
				 errhint("Set d365inv.database = '%s' in postgresql.conf and restart the server.", here)));
	PG_RETURN_VOID();
}
