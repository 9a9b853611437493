/*-------------------------------------------------------------------------
 *
 * send.h
 *	  Sending a target's invoices as $batch requests through its app
 *	  users: send.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_SEND_H
#define D365INV_SEND_H

#include "deliver.h"

/* claim, send and record through a sliding window; true if anything was claimed */
extern bool stream_round(Target *t, TargetState *ts, const HttpSettings *http, MemoryContext round);
/* preflight 'always': claim, look up (as lookup_user), send, record; true if anything was claimed */
extern bool lookup_round(Target *t, TargetState *ts, AppUser *lookup_user, const HttpSettings *http,
						 MemoryContext round);
/* the lookups of logs from index `from` on went out as u: count them in its budget */
extern void charge_lookups(const Target *t, AppUser *u, List *logs, int from);

#endif							/* D365INV_SEND_H */
