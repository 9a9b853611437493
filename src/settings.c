/*-------------------------------------------------------------------------
 *
 * settings.c
 *	  The d365inv.* configuration parameters (GUCs).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/guc.h"

#include "d365inv.h"

void
d365inv_define_settings(void)
{
	MarkGUCPrefixReserved("d365inv");
}
