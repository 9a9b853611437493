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

#include <cjson/cJSON.h>

#include "fmgr.h"
#include "miscadmin.h"

#include "d365inv.h"

PG_MODULE_MAGIC;

/*
 * cJSON allocates through palloc, so whatever it builds belongs to the
 * current memory context and is released with it, even when an ERROR
 * interrupts the code that was using it.
 */
static void *
cjson_palloc(size_t size)
{
	return palloc(size);
}

static void
cjson_pfree(void *pointer)
{
	if (pointer != NULL)
		pfree(pointer);
}

void
_PG_init(void)
{
	cJSON_Hooks hooks = {cjson_palloc, cjson_pfree};

	cJSON_InitHooks(&hooks);
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
