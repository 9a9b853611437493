/*-------------------------------------------------------------------------
 *
 * lookup.h
 *	  Existence lookups: does D365 already have these invoices?  (lookup.c)
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_LOOKUP_H
#define D365INV_LOOKUP_H

#include "nodes/pg_list.h"

#include "queue.h"
#include "request.h"

/* rows per lookup $batch: 10 GETs of LOOKUP_KEYS_PER_GET keys */
#define LOOKUP_ROWS_PER_REQUEST (10 * LOOKUP_KEYS_PER_GET)

/* the answer for one row */
typedef enum LookupAnswer
{
	LOOKUP_FAILED = 0,			/* no usable answer: fate still unknown */
	LOOKUP_FOUND,
	LOOKUP_ABSENT
} LookupAnswer;

typedef struct LookupState LookupState;

/*
 * Send lookups for every row of ws (no transaction needed), then, inside a
 * transaction, match what came back: answers[i], d365_ids[i], errors[i].
 * Each request sent is appended to *logs (RequestLog *); rows' results
 * log_index point into it.
 */
extern LookupState *lookup_send(const Target *t, const char *auth, const HttpSettings *http,
								WorkSet *ws, List **logs);
extern void lookup_match(LookupState *state, LookupAnswer *answers, char **d365_ids,
						 char **errors, int *log_index);
extern bool lookup_auth_rejected(LookupState *state);

#endif							/* D365INV_LOOKUP_H */
