/*-------------------------------------------------------------------------
 *
 * d365inv.h
 *	  Declarations shared between the backend-side files of d365inv.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_H
#define D365INV_H

extern void _PG_init(void);

/* settings.c */
extern void d365inv_define_settings(void);

#endif							/* D365INV_H */
