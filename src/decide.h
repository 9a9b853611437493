/*-------------------------------------------------------------------------
 *
 * decide.h
 *	  What each invoice's answer means for its row: decide.c.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_DECIDE_H
#define D365INV_DECIDE_H

#include "deliver.h"

extern void set_result(RowResult *r, InvoiceStatus status, bool counted, int delay_ms,
					   int http_status, const char *error);
/* a new jitter factor, for the rows of the next request */
extern void new_batch_jitter(void);
/* backoff before attempt `attempts` + 1; a longer Retry-After (s) wins */
extern int	retry_delay_ms(int attempts, int retry_after_s);
/* a transient failure: retry later, or review when out of retries */
extern void retry_or_review(RowResult *r, int attempts, int retry_after_s, int http_status,
							const char *error);
/* fate unknown: looked up before anything is resent */
extern void in_doubt(RowResult *r, int http_status, const char *error);
/* not processed by D365: sent again, no attempt counted */
extern void unanswered(RowResult *r, int http_status, const char *error);
/* throttled (429): sent again after the wait, no attempt counted */
extern void throttled(RowResult *r, int retry_after_s, const char *error);
/* D365 has this row's keys, with id found_id (may be NULL) */
extern void settle_found(const Target *t, RowResult *r, const InvoiceRow *row, const char *found_id,
						 bool sent_before, const char *settled_by);
extern void count_outcome(RequestLog *log, const RowResult *r);
/* outcomes for rows [first, first + count) of ws from their $batch request, sent as u */
extern void decide_batch(const Target *t, TargetState *ts, AppUser *u, WorkSet *ws, int first,
						 int count, HttpRequest *req, RequestLog *log);

#endif							/* D365INV_DECIDE_H */
