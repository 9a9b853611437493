/*-------------------------------------------------------------------------
 *
 * d365inv.c
 *	  Module entry point: library magic and _PG_init.
 *
 * Everything that runs per request lives in its own file; this one only
 * wires the extension into the server, with its one ProcessUtility hook.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "tcop/utility.h"

#include "d365inv.h"

PG_MODULE_MAGIC;

/*
 * cJSON keeps its own allocator: malloc and free, libcjson's default.  Its
 * hooks (cJSON_InitHooks) are global to the shared libcjson, so installing
 * palloc there would move every other user of libcjson in this backend
 * (another extension, a PL's library) into whatever memory context is
 * current, to be freed under it at the next reset, and would pfree memory
 * it had malloc'd before.  Our own trees are freed explicitly instead:
 * classify.c and auth.c never throw while one is live, batch_request.c and
 * odata_page.c free theirs in PG_FINALLY.
 */

static ProcessUtility_hook_type prev_process_utility_hook = NULL;

/*
 * The library's one ProcessUtility hook.  worker_ctl stops the worker for
 * a statement it must not run into (DROP DATABASE, ALTER DATABASE RENAME,
 * DROP EXTENSION where it runs) and lets it start again however the
 * statement ends; lifecycle removes the schema DROP EXTENSION emptied.
 */
static void
process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				ProcessUtilityContext context, ParamListInfo params,
				QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;
	bool		drops_extension = lifecycle_before_utility(stmt);
	volatile bool stopped = worker_ctl_before_utility(stmt);

	PG_TRY();
	{
		if (prev_process_utility_hook)
			prev_process_utility_hook(pstmt, queryString, readOnlyTree, context,
									  params, queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
									params, queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		worker_ctl_after_utility(stmt, stopped);
	}
	PG_END_TRY();
	if (drops_extension)
		lifecycle_after_utility();
}

void
_PG_init(void)
{
	d365inv_define_settings();

	/* the worker, its shared state and hooks exist only when preloaded */
	if (process_shared_preload_libraries_in_progress)
	{
		worker_ctl_init();
		prev_process_utility_hook = ProcessUtility_hook;
		ProcessUtility_hook = process_utility;
		key_filter_init();
		worker_register_launcher();
	}
}
