/*-------------------------------------------------------------------------
 *
 * deliver.c
 *	  One delivery round for one target: load it and its app users, resolve
 *	  in_doubt rows by lookup, send what is due (send.c), and say in
 *	  d365inv.target_state what it did or why it could not.
 *
 * The order of events is what makes "never twice, never lost" hold:
 *
 *	 1. claim: due rows become in_flight; COMMIT.
 *	 2. send: no transaction open during network I/O.
 *	 3. record: outcomes, batch_log and the key cache in one short
 *		transaction, guarded by "still in_flight".
 *
 * A crash between 1 and 3 leaves rows in_flight; the worker turns them
 * into in_doubt when it starts, and an in_doubt row is only ever sent again
 * after a lookup has shown that D365 does not have it.  Whenever an answer
 * does not prove what happened (timeout after sending, a cut or unreadable
 * response, a 5xx for the whole batch) the rows go in_doubt too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "d365inv.h"
#include "decide.h"
#include "deliver.h"
#include "lookup.h"
#include "send.h"

/* how long batches stay small after D365 refused one as too large (413) */
#define SIZE_CAP_MS (10 * 60 * 1000)

TimestampTz deliver_promoted_at = 0;

static TargetState *target_states = NULL;
static int	ntarget_states = 0;

TargetState *
target_state(const char *name)
{
	for (int i = 0; i < ntarget_states; i++)
		if (strcmp(target_states[i].name, name) == 0)
			return &target_states[i];
	if (target_states == NULL)
		target_states = MemoryContextAllocZero(TopMemoryContext, sizeof(TargetState) * 64);
	else if (ntarget_states % 64 == 0)
		target_states = repalloc(target_states, sizeof(TargetState) * (ntarget_states + 64));
	memset(&target_states[ntarget_states], 0, sizeof(TargetState));
	strlcpy(target_states[ntarget_states].name, name, sizeof(target_states[0].name));
	return &target_states[ntarget_states++];
}

/*
 * The target cannot be used as configured: nothing is claimed or sent (no
 * attempt counted), target_state says blocked and the waiting invoices say
 * why in last_error, and the problem is logged and written to batch_log
 * once (batch_health counts it as a failed request) until it changes.
 * Caller has a transaction.
 */
static void
report_config_problem(const Target *t, TargetState *ts, const char *problem)
{
	char	   *why = psprintf("configuration error: %s", problem);

	target_status_report(t->name, ts, TARGET_BLOCKED, BLOCKED_CONFIG, why, 0, true);
	if (strcmp(ts->config_problem, problem) == 0)
		return;
	strlcpy(ts->config_problem, problem, sizeof(ts->config_problem));
	ereport(WARNING,
			(errmsg("d365inv target \"%s\": %s; nothing is sent to it until it is fixed", t->name, why)));
	{
		RequestLog *log = palloc0(sizeof(RequestLog));

		log->kind = REQUEST_CONFIG;
		log->started_at = GetCurrentTimestamp();
		log->retry_after = -1;
		log->error = why;
		insert_request_log(t, log);
	}
}

/* in_doubt rows: a lookup decides; found = created, absent = send again */
static bool
resolve_in_doubt(Target *t, TargetState *ts, AppUser *u, const HttpSettings *http,
				 WorkSet *ws, MemoryContext round)
{
	List	   *logs = NIL;
	LookupState *state;
	LookupAnswer *answers;
	char	  **d365_ids;
	char	  **errors;
	int		   *log_index;
	TimestampTz looked_at;
	TimestampTz now;

	if (ws->n == 0)
		return false;

	/* every lookup request is made after this moment */
	looked_at = GetCurrentTimestamp();
	state = lookup_send(t, u->header, http, ws, &logs);
	charge_lookups(t, u, logs, 0);
	answers = palloc0(sizeof(LookupAnswer) * ws->n);
	d365_ids = palloc0(sizeof(char *) * ws->n);
	errors = palloc0(sizeof(char *) * ws->n);
	log_index = palloc0(sizeof(int) * ws->n);

	new_batch_jitter();
	begin_tx("d365inv: recording lookups");
	now = GetCurrentTimestamp();
	lookup_match(state, answers, d365_ids, errors, log_index);
	if (lookup_auth_rejected(state))
		app_user_auth_refused(u);
	for (int i = 0; i < ws->n; i++)
	{
		RowResult  *r = &ws->results[i];
		RequestLog *log = log_index[i] >= 0 ? list_nth(logs, log_index[i]) : NULL;

		r->log_index = log_index[i];
		if (answers[i] == LOOKUP_FOUND)
		{
			settle_found(t, r, &ws->rows[i], d365_ids[i], true, "lookup");
			if (log && r->status == INVOICE_CREATED)
				log->created++;
			else if (log)
				log->duplicates++;
		}
		else if (answers[i] == LOOKUP_ABSENT && t->entity_id_mode != ENTITY_ID_CLIENT && looked_at < ws->fences[i])
		{
			/*
			 * Not there yet, but the request we gave up on may still commit
			 * until the fence: look again after it, never resend before.
			 * (Client ids need no fence: a late original and a resend
			 * collide on the id.)
			 */
			set_result(r, INVOICE_IN_DOUBT, false,
					   (int) Min(TimestampDifferenceMilliseconds(now, ws->fences[i]) + 1000, INT_MAX / 2),
					   0, psprintf("not in D365 yet; the request may still commit until %s (d365inv.server_request_lifetime): looking again then",
								   timestamptz_to_str(ws->fences[i])));
			if (log)
				log->in_doubt++;
		}
		else if (answers[i] == LOOKUP_ABSENT)
		{
			if (ws->attempts[i] > d365inv_max_retries)
				set_result(r, INVOICE_REVIEW, false, -1, 0,
						   psprintf("sent %d times, never confirmed, and not in D365", ws->attempts[i]));
			else
				set_result(r, INVOICE_PENDING, false, -1, 0, "not in D365 after an unknown outcome: sending again");
			if (log)
				log->not_found++;
		}
		else if (log && log->throttled)
		{
			/* throttled: still unknown, looked up again after the wait, not counted */
			set_result(r, INVOICE_IN_DOUBT, false,
					   log->retry_after >= 0 ? Min(log->retry_after * 1000, d365inv_retry_max_ms) : 1000,
					   429, psprintf("lookup throttled by D365, looked up again after the wait: %s", errors[i]));
			log->in_doubt++;
		}
		else
		{
			/* the lookup failed: still unknown; never resend blindly */
			if (ws->attempts[i] + 1 > d365inv_max_retries)
				set_result(r, INVOICE_REVIEW, true, -1, 0,
						   psprintf("fate unknown and the lookup failed: %s", errors[i]));
			else
				set_result(r, INVOICE_IN_DOUBT, true, retry_delay_ms(ws->attempts[i] + 1, -1), 0,
						   psprintf("lookup failed: %s", errors[i]));
			if (log)
				log->in_doubt++;
		}
	}
	record_results(t, ws, INVOICE_IN_DOUBT, logs, &ts->progress_at);
	commit_tx();
	MemoryContextSwitchTo(round);
	return true;
}

/* ---------------------------------------------------------------------
 * The round
 * ---------------------------------------------------------------------
 */

/* What target_state says after a round.  Caller has a transaction. */
static void
report_round(const Target *t, TargetState *ts, bool busy)
{
	TimestampTz until;
	const char *why;
	int			nthrottled;
	const char *auth_problem = app_users_auth_problem(&ts->users, &until);

	if (auth_problem != NULL)
		target_status_report(t->name, ts, TARGET_BLOCKED, BLOCKED_AUTH, auth_problem, until, true);
	else if ((until = app_users_throttled_until(&ts->users, &why, &nthrottled)) != 0)
		target_status_report(t->name, ts, TARGET_THROTTLED, BLOCKED_NONE, psprintf("throttled by D365: %s", why),
							 until, false);
	else
		target_status_report(t->name, ts, busy ? TARGET_DELIVERING : TARGET_IDLE, BLOCKED_NONE,
							 nthrottled > 0
							 ? psprintf("%d of %d app users throttled by D365: %s",
										nthrottled, ts->users.n, why)
							 : NULL, 0, false);
}

void
deliver_not_served(const char *target_name, bool enabled)
{
	TargetState *ts = target_state(target_name);

	if (enabled)
		target_status_report(target_name, ts, TARGET_BLOCKED, BLOCKED_CONFIG,
							 psprintf("configuration error: target \"%s\" has no service_root (UPDATE d365inv.target SET service_root = 'https://.../api/data/v9.2/')",
									  target_name), 0, true);
	else
		target_status_report(target_name, ts, TARGET_BLOCKED, BLOCKED_DISABLED,
							 psprintf("target \"%s\" is disabled (d365inv.target.enabled = false)", target_name),
							 0, true);
}

bool
deliver_round(const char *target_name, MemoryContext round, TimestampTz *next_due)
{
	Target	   *t;
	TargetState *ts = target_state(target_name);
	HttpSettings http = http_settings_from_gucs();
	bool		busy = false;
	WorkSet    *doubtful;
	char	   *problem;
	AppUser    *lookup_user;
	long		wait_ms;

	MemoryContextSwitchTo(round);
	begin_tx("d365inv: loading target");
	{
		MemoryContext spi = MemoryContextSwitchTo(round);

		t = target_load(target_name);
		MemoryContextSwitchTo(spi);
	}
	if ((problem = target_config_problem(t)) != NULL)
	{
		report_config_problem(t, ts, problem);
		commit_tx();
		MemoryContextSwitchTo(round);
		return false;
	}
	ts->config_problem[0] = '\0';
	/* served again (enabled, configured): no longer blocked for that */
	if (ts->state == TARGET_BLOCKED &&
		(ts->blocked_by == BLOCKED_DISABLED || ts->blocked_by == BLOCKED_CONFIG))
		target_status_report(t->name, ts, TARGET_DELIVERING, BLOCKED_NONE, NULL, 0, false);
	app_users_load(&ts->users, t, round);
	/* rows whose fate is unknown, looked up before anything else */
	doubtful = select_in_doubt(t, t->max_in_flight * LOOKUP_ROWS_PER_REQUEST, round);
	commit_tx();
	MemoryContextSwitchTo(round);

	/* from here on t->batch_size is the size this round uses */
	if (t->batch_size_mode == BATCH_SIZE_AUTO)
	{
		if (ts->auto_batch_size == 0)
			ts->auto_batch_size = t->batch_size;
		ts->auto_batch_size = Max(t->batch_size_min, Min(t->batch_size_max, ts->auto_batch_size));
		t->batch_size = ts->auto_batch_size;
	}
	else
		ts->auto_batch_size = 0;
	/*
	 * Soon after this server took over from another, an invoice loaded
	 * again after asynchronous replication lost it may exist in D365,
	 * created by the old primary: look every key up (server ids cannot
	 * tell; client ids collide instead).
	 */
	if (t->entity_id_mode != ENTITY_ID_CLIENT && deliver_promoted_at != 0 &&
		GetCurrentTimestamp() - deliver_promoted_at < (int64) d365inv_failover_lookup_window_s * USECS_PER_SEC)
	{
		t->preflight = PREFLIGHT_ALWAYS;
		t->keys_complete = false;
	}
	/* after a 413: smaller batches for SIZE_CAP_MS, then the usual size is tried again */
	if (ts->size_cap > 0 &&
		TimestampDifferenceExceeds(ts->size_capped_at, GetCurrentTimestamp(), SIZE_CAP_MS))
		ts->size_cap = 0;
	if (ts->size_cap > 0)
		t->batch_size = Min(t->batch_size, ts->size_cap);

	/* tokens, outside any transaction: the token endpoint may be slow */
	app_users_authenticate(&ts->users, t, &http);
	lookup_user = app_user_pick(&ts->users, t, &wait_ms);
	if (lookup_user != NULL)
	{
		/* 1. rows whose fate is unknown are looked up before anything else */
		if (resolve_in_doubt(t, ts, lookup_user, &http, doubtful, round))
			busy = true;

		/* 2. without preflight lookups: a sliding window of requests; with: claim, look up, send */
		if (t->preflight != PREFLIGHT_ALWAYS ? stream_round(t, ts, &http, round)
			: lookup_round(t, ts, lookup_user, &http, round))
			busy = true;
		app_users_round_done(&ts->users);
	}

	begin_tx("d365inv: scheduling");
	*next_due = Min(*next_due, next_due_time(t));
	report_round(t, ts, busy);
	if (lookup_user == NULL)
	{
		/* nobody may send: come back when the first may */
		TimestampTz until = 0;
		int			nthrottled;
		const char *why;

		if (app_users_auth_problem(&ts->users, &until) == NULL)
			until = app_users_throttled_until(&ts->users, &why, &nthrottled);
		if (until == 0 && wait_ms > 0)
			until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
		if (until != 0)
			*next_due = Min(*next_due, until);
	}
	commit_tx();
	MemoryContextSwitchTo(round);
	return busy;
}
