/*-------------------------------------------------------------------------
 *
 * target_status.c
 *	  What the worker is doing with each target, and why it is not
 *	  delivering, written where a DBA looks: d365inv.target_state (read
 *	  through the view d365inv.target_status) and the waiting invoices'
 *	  last_error.
 *
 * Written only when something changed, or at most every few seconds while
 * invoices are being settled (progress_at), so a busy worker does not
 * rewrite the row every batch.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"

#include "deliver.h"

/* while only progress changes, write at most this often */
#define PROGRESS_WRITE_MS 2000
/* while blocked, tell invoices that arrived meanwhile this often */
#define TELL_WAITING_MS 5000
/* how many invoices, first in line, are told */
#define TELL_WAITING_ROWS 1000

static bool
same(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") == 0;
}

/*
 * The first invoices in line say why they wait (once per reason).  Only the
 * first TELL_WAITING_ROWS: telling a queue of a million would rewrite a
 * million rows at every change of reason; target_status tells the rest.
 */
static void
tell_waiting(const char *target, const char *why)
{
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		args[2] = {CStringGetTextDatum(target), CStringGetTextDatum(why)};

	/*
	 * ARRAY(): the first in line are found once.  As "id IN (SELECT ...
	 * LIMIT)", planned on the statistics of a queue that was empty when last
	 * analysed, it became a nested loop that ran the LIMIT subquery again for
	 * every waiting invoice: 8 s for 20,000.  The status is compared as
	 * text so that the outer rows cannot be read through invoice_open: on
	 * statistics that call the queue empty (a load that arrived since the
	 * last analyse) that index looks cheapest, and every open invoice was
	 * tested against the 1,000 ids one by one (450 ms a tell for 100,000
	 * waiting).  Now they are found by the primary key.
	 */
	if (SPI_execute_with_args("UPDATE d365inv.invoice SET last_error = $2"
							  " WHERE id = ANY (ARRAY(SELECT id FROM d365inv.invoice"
							  "               WHERE target = $1 AND status < 'created'"
							  "               ORDER BY next_attempt_at NULLS FIRST, id"
							  "               LIMIT " CppAsString2(TELL_WAITING_ROWS) "))"
							  "   AND status::text IN ('pending', 'retry')"
							  "   AND last_error IS DISTINCT FROM $2",
							  2, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "d365inv worker: recording why invoices wait failed");
}

/* the SQL labels of target_state.state and .blocked_by (NULL: none) */
static const char *const state_labels[] = {NULL, "delivering", "idle", "throttled", "blocked"};
static const char *const blocked_by_labels[] = {NULL, "auth", "config", "disabled"};

StaticAssertDecl(lengthof(state_labels) == TARGET_BLOCKED + 1, "one label per state");
StaticAssertDecl(lengthof(blocked_by_labels) == BLOCKED_DISABLED + 1, "one label per blocked_by");

void
target_status_report(const char *target, TargetState *ts, TargetRunState state,
					 BlockedBy blocked_by, const char *reason, TimestampTz until,
					 bool block_waiting)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		changed = ts->state != state || ts->blocked_by != blocked_by ||
		!same(ts->reason, reason);
	Oid			argtypes[9] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, INT4OID,
	INT4OID, TIMESTAMPTZOID, BOOLOID};
	Datum		args[9];
	char		nulls[9];
	int			nthrottled;
	const char *ignored;

	/* invoices keep coming in while it is blocked: they are told too */
	if (block_waiting && reason != NULL &&
		(changed || TimestampDifferenceExceeds(ts->told_waiting_at, now, TELL_WAITING_MS)))
	{
		tell_waiting(target, reason);
		ts->told_waiting_at = now;
	}
	if (!changed && until == ts->until && ts->state_written_at != 0 &&
		(ts->progress_at <= ts->state_written_at ||
		 !TimestampDifferenceExceeds(ts->state_written_at, now, PROGRESS_WRITE_MS)))
		return;

	(void) app_users_throttled_until(&ts->users, &ignored, &nthrottled);
	memset(nulls, ' ', sizeof(nulls));
	args[0] = CStringGetTextDatum(target);
	Assert(state != TARGET_UNREPORTED);
	args[1] = CStringGetTextDatum(state_labels[state]);
	args[2] = blocked_by != BLOCKED_NONE ? CStringGetTextDatum(blocked_by_labels[blocked_by]) : (Datum) 0;
	nulls[2] = blocked_by != BLOCKED_NONE ? ' ' : 'n';
	args[3] = reason ? CStringGetTextDatum(reason) : (Datum) 0;
	nulls[3] = reason ? ' ' : 'n';
	args[4] = TimestampTzGetDatum(until);
	nulls[4] = until != 0 ? ' ' : 'n';
	args[5] = Int32GetDatum(Max(ts->users.n, 1));
	args[6] = Int32GetDatum(nthrottled);
	args[7] = TimestampTzGetDatum(ts->progress_at);
	nulls[7] = ts->progress_at != 0 ? ' ' : 'n';
	args[8] = BoolGetDatum(changed);

	/* the target may be gone meanwhile: then there is nothing to say */
	if (SPI_execute_with_args(
							  "INSERT INTO d365inv.target_state AS s (target, state, blocked_by, reason, until,"
							  "       app_users, app_users_throttled, progress_at)"
							  " SELECT $1, $2, $3, $4, $5, $6, $7, $8"
							  "  WHERE EXISTS (SELECT FROM d365inv.target WHERE name = $1)"
							  " ON CONFLICT (target) DO UPDATE"
							  "   SET state = excluded.state, blocked_by = excluded.blocked_by,"
							  "       reason = excluded.reason, until = excluded.until,"
							  "       app_users = excluded.app_users,"
							  "       app_users_throttled = excluded.app_users_throttled,"
							  "       progress_at = greatest(s.progress_at, excluded.progress_at),"
							  "       since = CASE WHEN $9 THEN now() ELSE s.since END,"
							  "       updated_at = now()",
							  9, argtypes, args, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "d365inv worker: writing the target's state failed");

	if (ts->state == TARGET_BLOCKED && state != TARGET_BLOCKED)
		ereport(LOG, (errmsg("d365inv target \"%s\": no longer blocked", target)));
	ts->state = state;
	ts->blocked_by = blocked_by;
	strlcpy(ts->reason, reason ? reason : "", sizeof(ts->reason));
	ts->until = until;
	ts->state_written_at = now;
}
