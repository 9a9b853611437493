/*-------------------------------------------------------------------------
 *
 * d365inv.c
 *	  Module entry point: library magic, _PG_init and the settings (GUCs).
 *
 * Everything that runs per request lives in its own file; this one only
 * wires the extension into the server.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"

#include "d365inv.h"

PG_MODULE_MAGIC;

void
_PG_init(void)
{
	d365inv_define_settings();
}
