/*-------------------------------------------------------------------------
 *
 * d365inv.c
 *	  Module entry point: library magic and _PG_init.
 *
 * Everything that runs per request lives in its own file; this one only
 * wires the extension into the server.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"

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

void
_PG_init(void)
{
	d365inv_define_settings();

	/* the worker, its shared state and hooks exist only when preloaded */
	if (process_shared_preload_libraries_in_progress)
	{
		worker_ctl_init();
		lifecycle_init();
		key_filter_init();
		worker_register_launcher();
	}
}
