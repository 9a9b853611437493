/*-------------------------------------------------------------------------
 *
 * send.c
 *	  Sending a target's invoices as $batch requests through its app users
 *	  (app_user.c decides who may send when): a sliding window that claims,
 *	  sends and records batch by batch; with preflight 'always', a round that
 *	  claims, looks keys up and then sends what is left.  Also the preflight
 *	  itself and adaptive batch sizes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "postmaster/interrupt.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "d365inv.h"
#include "decide.h"
#include "lookup.h"
#include "send.h"

static BatchKind
write_kind(const Target *t)
{
	switch (t->write_mode)
	{
		case WRITE_CREATE:
			return BATCH_CREATE;
		case WRITE_UPSERT:
			return BATCH_UPSERT;
		case WRITE_UPSERT_CREATE_ONLY:
			return BATCH_UPSERT_CREATE_ONLY;
	}
	elog(ERROR, "d365inv: unknown write mode %d", (int) t->write_mode);
	return BATCH_CREATE;		/* keep compiler quiet */
}

/* The lookups just sent (logs from index `from` on) went out as u: count them */
void
charge_lookups(const Target *t, AppUser *u, List *logs, int from)
{
	for (int k = from; k < list_length(logs); k++)
	{
		RequestLog *log = list_nth(logs, k);

		app_user_sent(u);
		app_user_done(u, t, log->duration_ms, -1, log->http_status > 0 && log->http_status < 500);
		if (log->throttled)
			app_user_throttled(u, t, log->retry_after, log->error);
	}
}

/*
 * Before anything is sent: keys the cache (d365inv.remote_key) knows are
 * duplicates outright; with preflight 'always', keys the filter cannot
 * rule out are looked up (as app user u), and those D365 has become
 * duplicates too.
 */
static void
preflight(Target *t, TargetState *ts, AppUser *u, const HttpSettings *http,
		  WorkSet *ws, List **logs)
{
	WorkSet		sub;
	int		   *map;
	LookupState *state;
	LookupAnswer *answers;
	char	  **d365_ids;
	char	  **errors;
	int		   *log_index;
	int			nlogs;

	if (t->preflight == PREFLIGHT_OFF)
		return;
	for (int i = 0; i < ws->n; i++)
	{
		if (ws->known[i])
		{
			settle_found(t, &ws->results[i], &ws->rows[i], ws->known_ids[i], false, "cache");
			if (ws->results[i].status == INVOICE_DUPLICATE && t->entity_id_mode != ENTITY_ID_CLIENT)
				ws->results[i].error = "already in D365 (a known key in d365inv.remote_key)";
		}
	}
	if (t->preflight != PREFLIGHT_ALWAYS)
		return;

	/*
	 * The rows that may be in D365.  The filter knows the keys of
	 * remote_key: "not there" means "not in D365" only while a refresh has
	 * read all of D365's keys (within the retention); before that every key
	 * is looked up.
	 */
	memset(&sub, 0, sizeof(sub));
	map = palloc(sizeof(int) * ws->n);
	sub.rows = palloc(sizeof(InvoiceRow) * ws->n);
	sub.vendor_keys = palloc(sizeof(char *) * ws->n);
	sub.invoice_keys = palloc(sizeof(char *) * ws->n);
	for (int i = 0; i < ws->n; i++)
	{
		if (ws->results[i].status != INVOICE_UNDECIDED ||
			(t->keys_complete &&
			 !key_filter_maybe(t->name, ws->vendor_keys[i], ws->invoice_keys[i])))
			continue;
		map[sub.n] = i;
		sub.rows[sub.n] = ws->rows[i];
		sub.vendor_keys[sub.n] = ws->vendor_keys[i];
		sub.invoice_keys[sub.n] = ws->invoice_keys[i];
		sub.n++;
	}
	if (sub.n == 0)
		return;

	nlogs = list_length(*logs);
	state = lookup_send(t, u->header, http, &sub, logs);
	charge_lookups(t, u, *logs, nlogs);
	answers = palloc0(sizeof(LookupAnswer) * sub.n);
	d365_ids = palloc0(sizeof(char *) * sub.n);
	errors = palloc0(sizeof(char *) * sub.n);
	log_index = palloc0(sizeof(int) * sub.n);

	/* matching compares keys with the database's rules: needs a transaction */
	begin_tx("d365inv: preflight lookups");
	lookup_match(state, answers, d365_ids, errors, log_index);
	commit_tx();
	if (lookup_auth_rejected(state))
		app_user_auth_refused(u);
	new_batch_jitter();
	for (int k = 0; k < sub.n; k++)
	{
		int			i = map[k];
		RowResult  *r = &ws->results[i];
		RequestLog *log = list_nth(*logs, log_index[k]);

		if (answers[k] == LOOKUP_FOUND)
		{
			settle_found(t, r, &ws->rows[i], d365_ids[k], false, "preflight");
			r->log_index = log_index[k];
			if (r->status == INVOICE_CREATED)
				log->created++;
			else
				log->duplicates++;
		}
		else if (answers[k] == LOOKUP_FAILED)
		{
			/* do not send what could not be checked; try again later */
			if (log->throttled)
				throttled(r, log->retry_after, psprintf("preflight lookup: %s", errors[k]));
			else
				retry_or_review(r, ws->attempts[i], -1, 0, psprintf("preflight lookup failed: %s", errors[k]));
			r->log_index = log_index[k];
			log->retries++;
		}
		else
			log->not_found++;
	}
}

/* The rows of ws not decided yet, contiguous for the request builder */
static WorkSet *
undecided_rows(WorkSet *ws, int **send_index)
{
	WorkSet    *sub = palloc0(sizeof(WorkSet));

	*send_index = palloc(sizeof(int) * Max(ws->n, 1));
	sub->rows = palloc(sizeof(InvoiceRow) * Max(ws->n, 1));
	sub->attempts = palloc(sizeof(int) * Max(ws->n, 1));
	sub->results = palloc0(sizeof(RowResult) * Max(ws->n, 1));
	for (int i = 0; i < ws->n; i++)
	{
		if (ws->results[i].status != INVOICE_UNDECIDED)
			continue;
		(*send_index)[sub->n] = i;
		sub->rows[sub->n] = ws->rows[i];
		sub->attempts[sub->n] = ws->attempts[i];
		sub->n++;
	}
	return sub;
}

/*
 * Classify the answer to the $batch of rows [first, first + count) of
 * sendset, sent as app user u; returns its log entry (whose index in the
 * round's list is log_index).  A 429 makes u wait (the caller has told u
 * the request is done, as soon as it was).
 */
static RequestLog *
settle_batch(Target *t, TargetState *ts, AppUser *u, WorkSet *sendset, int first, int count,
			 HttpRequest *req, TimestampTz sent_at, int log_index)
{
	RequestLog *log = request_log_new(request_kind_for(t->write_mode), sent_at, req, count, count);

	log->batch_size = t->batch_size;
	decide_batch(t, ts, u, sendset, first, count, req, log);
	for (int i = first; i < first + count; i++)
	{
		sendset->results[i].log_index = log_index;
		count_outcome(log, &sendset->results[i]);
	}
	if (log->throttled)
		app_user_throttled(u, t, log->retry_after, log->error);
	return log;
}

/*
 * batch_size_mode 'auto': halve the size after a batch whose trouble grows
 * with its size, grow it by a quarter after a clean one (bigger batches make
 * fewer calls); always within [batch_size_min, batch_size_max].
 *
 * Trouble is what a smaller batch would have suffered less from: a
 * whole-request failure or an answer that leaves invoices in_doubt, a
 * transient failure, and operations D365 left unanswered because it
 * stopped at a failure.  Duplicates and single rejected operations are not:
 * with continue-on-error each costs one operation whatever the batch size,
 * and shrinking for them only adds requests (measured: bench/batchsize).
 * When D365 ignores continue-on-error, they show up as unanswered
 * operations and count.  Neither is throttling: service protection counts
 * requests too, and smaller batches would only make more of them; the app
 * user backs off instead (app_user.c).
 */
static void
adapt_batch_size(const Target *t, TargetState *ts, List *logs)
{
	bool		trouble = false;
	bool		sent = false;
	ListCell   *lc;

	foreach(lc, logs)
	{
		RequestLog *log = lfirst(lc);

		if (log->kind == REQUEST_LOOKUP || log->throttled)
			continue;
		sent = true;
		if (log->http_status == 0 || log->in_doubt > 0 || log->retries > 0 || log->unanswered > 0)
			trouble = true;
	}
	if (!sent)
		return;
	if (trouble)
		ts->auto_batch_size = Max(t->batch_size_min, ts->auto_batch_size / 2);
	else
		ts->auto_batch_size = Min(t->batch_size_max,
								  ts->auto_batch_size + Max(1, ts->auto_batch_size / 4));
}

/* ---------------------------------------------------------------------
 * Streaming: a sliding window of $batch requests
 *
 * Without preflight lookups a batch needs nothing from its neighbours, so
 * instead of claim-all / send-all / record-all rounds the worker keeps
 * requests under way, max_in_flight per app user, as its budget allows.
 * The database work overlaps the requests: while they are under way the
 * next batches are claimed ahead (their rows in_flight, committed), as many
 * as the window has places, so places that come free, even all at once,
 * are filled at once with no statement in between; an answer is classified
 * as it comes in, and the outcomes of all the answers in are written, with
 * the claims that refill the pool, in one short transaction once the next
 * requests are out.  Nothing changes in the order
 * of events for any one invoice: claimed and committed before it is sent,
 * its outcome written only while it is still in_flight.  A batch claimed
 * ahead that no app user could send before the round ended goes back to
 * pending, not counted.  (With batch_size_mode 'auto' nothing is claimed
 * ahead: each batch's size depends on the answers before it.)  Each batch lives in a memory context of its own,
 * freed once it is recorded.
 * ---------------------------------------------------------------------
 */

/*
 * Claim batches for at most this long per deliver_round(), then drain (and
 * the worker does its round: the inbox, other targets, alerts).  Each drain
 * leaves the window's places empty for up to a request's time: the longer
 * the window, the less that costs.  A change to the target's row or a
 * configuration reload ends the window early, so neither waits for it.
 */
#define STREAM_WINDOW_MS 5000
/* a wait for an app user longer than this ends the window */
#define STREAM_MAX_WAIT_MS 1000
/* how often the window looks for a change to its target's row */
#define STREAM_CHECK_MS 500
/* claim ahead only while an app user may send within this long */
#define STREAM_AHEAD_WAIT_MS 100

typedef struct StreamBatch
{
	MemoryContext cxt;
	WorkSet    *ws;				/* the claimed rows */
	WorkSet    *sendset;		/* those on the wire */
	int		   *send_index;
	AppUser    *u;				/* sent as */
	TimestampTz sent_at;
	int			batch_size;
	RequestLog *log;			/* its answer, once in */
} StreamBatch;

typedef struct Stream
{
	Target	   *t;
	TargetState *ts;
	const HttpSettings *http;
	BatchKind	kind;
	MemoryContext round;
	TimestampTz stop_at;
	int64		cursor;			/* claim_rows(): new rows from here on */
	bool		drained;		/* a claim came back short: nothing more due */
	bool		stopped;		/* stream_next() said "no more": the window drains */
	bool		busy;
	TimestampTz checked_at;		/* when the target's row was last looked at */
	char	   *target_version; /* its xmin then */
	bool		in_sync;		/* inside stream_sync(): stream_next() only
								 * hands out what is claimed ahead */
	bool		changed;		/* it changed, or the configuration is to be
								 * reloaded: what is claimed ahead stays unsent */
	int			places;			/* requests the window keeps under way */
	List	   *ahead;			/* StreamBatches claimed (committed in_flight),
								 * not sent yet, oldest first */
	List	   *answered;		/* StreamBatches answered, not yet recorded */
} Stream;

/* how many batches to claim now so that every place can be filled at once */
static int
ahead_wanted(Stream *st)
{
	if (st->ts->auto_batch_size > 0)
		return st->ahead == NIL ? 1 : 0;
	return Max(st->places - list_length(st->ahead), 0);
}

/*
 * Claim the next batch: its rows become in_flight (the caller commits
 * before it is sent).  Rows whose keys the cache knows are settled, and a
 * batch of nothing else recorded, at once.  NULL when nothing more is due.
 * Caller has a transaction.
 */
static StreamBatch *
claim_batch(Stream *st)
{
	Target	   *t = st->t;

	while (!st->drained)
	{
		MemoryContext cxt = AllocSetContextCreate(st->round, "d365inv batch", ALLOCSET_SMALL_SIZES);
		MemoryContext old;
		StreamBatch *b = MemoryContextAllocZero(cxt, sizeof(StreamBatch));

		b->cxt = cxt;
		b->batch_size = t->batch_size;
		b->ws = claim_rows(t, t->batch_size, &st->cursor, cxt);
		if (b->ws->n < t->batch_size)
			st->drained = true;
		if (b->ws->n == 0)
		{
			MemoryContextDelete(cxt);
			break;
		}
		st->busy = true;
		old = MemoryContextSwitchTo(cxt);
		preflight(t, st->ts, NULL, st->http, b->ws, NULL);
		b->sendset = undecided_rows(b->ws, &b->send_index);
		MemoryContextSwitchTo(old);
		if (b->sendset->n > 0)
			return b;
		/* all known to D365 already: nothing to send */
		record_results(t, b->ws, INVOICE_IN_FLIGHT, NIL, &st->ts->progress_at);
		MemoryContextDelete(cxt);
	}
	return NULL;
}

/*
 * End the window early when the target's row changed (disabled, a new
 * service_root, another batch size, ...) or the configuration is to be
 * reloaded: the next round starts with the new settings.  Caller has a
 * transaction.
 */
static void
stream_check_target(Stream *st)
{
	TimestampTz now = GetCurrentTimestamp();
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(st->t->name)};
	char	   *version = NULL;

	if (ConfigReloadPending)
		st->changed = true;
	if (!TimestampDifferenceExceeds(st->checked_at, now, STREAM_CHECK_MS))
		return;
	st->checked_at = now;
	if (SPI_execute_with_args("SELECT xmin::text FROM d365inv.target WHERE name = $1",
							  1, argtypes, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading target \"%s\" failed", st->t->name);
	if (SPI_processed == 1)
		version = MemoryContextStrdup(st->round, SPI_getvalue(SPI_tuptable->vals[0],
															   SPI_tuptable->tupdesc, 1));
	if (st->target_version == NULL)
		st->target_version = version ? version : MemoryContextStrdup(st->round, "");
	else if (version == NULL || strcmp(version, st->target_version) != 0)
		st->changed = true;
}

/*
 * One short transaction: write the outcomes of the answered batches; then
 * either claim up to `claim` batches ahead or put those claimed ahead back
 * (release: the round is over and they were never sent).  Called from
 * stream_idle(), it pumps the requests between its statements
 * (http_stream_pump()): answers that come in meanwhile are classified and
 * their places filled from the batches claimed ahead by earlier, committed
 * transactions.  What this one claims joins them only once it is committed:
 * nothing is sent before its claim is durable.
 */
static void
stream_sync(Stream *st, int claim, bool release)
{
	List	   *answered = st->answered;
	List	   *claimed = NIL;
	ListCell   *lc;

	if (answered == NIL && claim <= 0 && !(release && st->ahead != NIL))
		return;
	/* answers that come in during this transaction are for the next one */
	st->answered = NIL;
	begin_tx("d365inv: recording outcomes");
	st->in_sync = true;
	if (answered != NIL)
	{
		int			n = list_length(answered);
		WorkSet   **ws = palloc(sizeof(WorkSet *) * n);
		RequestLog **logs = palloc(sizeof(RequestLog *) * n);
		int			k = 0;

		foreach(lc, answered)
		{
			StreamBatch *b = lfirst(lc);

			ws[k] = b->ws;
			logs[k++] = b->log;
		}
		/* the answers in, in one statement */
		record_answers(st->t, ws, logs, n, INVOICE_IN_FLIGHT, &st->ts->progress_at);
		http_stream_pump();
	}
	stream_check_target(st);
	if (st->changed)
		claim = 0;
	if (claim > 0)
		pgstat_report_activity(STATE_RUNNING, "d365inv: claiming invoices");
	for (int k = 0; k < claim; k++)
	{
		StreamBatch *b = claim_batch(st);
		MemoryContext old;

		if (b == NULL)
			break;
		old = MemoryContextSwitchTo(st->round);
		claimed = lappend(claimed, b);
		MemoryContextSwitchTo(old);
		http_stream_pump();
	}
	st->in_sync = false;
	if (release)
	{
		Assert(claimed == NIL);
		foreach(lc, st->ahead)
		{
			StreamBatch *b = lfirst(lc);

			for (int k = 0; k < b->sendset->n; k++)
				unanswered(&b->ws->results[b->send_index[k]], 0,
						   st->changed ?
						   "not sent: the target's settings changed; sent in the next round" :
						   "not sent: every app user is throttled or blocked; sent in a later round");
			record_results(st->t, b->ws, INVOICE_IN_FLIGHT, NIL, &st->ts->progress_at);
		}
	}
	commit_tx();
	if (release)
	{
		foreach(lc, st->ahead)
			MemoryContextDelete(((StreamBatch *) lfirst(lc))->cxt);
		list_free(st->ahead);
		st->ahead = NIL;
	}
	if (claimed != NIL)
	{
		MemoryContext old = MemoryContextSwitchTo(st->round);

		st->ahead = list_concat(st->ahead, claimed);
		MemoryContextSwitchTo(old);
		list_free(claimed);
	}
	foreach(lc, answered)
		MemoryContextDelete(((StreamBatch *) lfirst(lc))->cxt);
	list_free(answered);
}

/* The request for the oldest batch claimed ahead, sent as u */
static HttpRequest *
stream_send(Stream *st, AppUser *u)
{
	StreamBatch *b = linitial(st->ahead);
	MemoryContext old = MemoryContextSwitchTo(b->cxt);
	HttpRequest *req;

	st->ahead = list_delete_first(st->ahead);
	req = batch_http_request(st->t, st->kind, b->sendset->rows, b->sendset->n, u->header, NULL);
	req->user = b;
	req->mcxt = b->cxt;
	b->u = u;
	b->sent_at = GetCurrentTimestamp();
	app_user_sent(u);
	MemoryContextSwitchTo(old);
	return req;
}

static HttpRequest *
stream_next(void *arg, long *wait_ms)
{
	Stream	   *st = arg;
	Target	   *t = st->t;
	AppUser    *u;
	HttpRequest *req;

	*wait_ms = 0;
	if (st->in_sync)
	{
		/* a pump inside stream_sync(): no statement, no decision to stop */
		if (st->changed || st->ahead == NIL ||
			(u = app_user_pick(&st->ts->users, t, wait_ms)) == NULL)
		{
			*wait_ms = 0;
			return NULL;
		}
		return stream_send(st, u);
	}
	if (ConfigReloadPending)
		st->changed = true;
	/* batches claimed ahead go out even after stop_at, unless the target changed */
	if (st->changed || (st->ahead == NIL && (st->drained || GetCurrentTimestamp() >= st->stop_at)))
	{
		st->stopped = true;
		return NULL;
	}
	u = app_user_pick(&st->ts->users, t, wait_ms);
	if (u == NULL)
	{
		/*
		 * Paced: record what came back meanwhile and wait.  Throttled (a
		 * wait of seconds) or past the round: the round ends, and what is
		 * claimed ahead goes back to pending instead of waiting in_flight.
		 */
		stream_sync(st, 0, false);
		if (*wait_ms > STREAM_MAX_WAIT_MS ||
			TimestampTzPlusMilliseconds(GetCurrentTimestamp(), *wait_ms) >= st->stop_at)
			*wait_ms = 0;
		st->stopped = *wait_ms == 0;
		return NULL;
	}
	if (st->ahead == NIL)
	{
		/* nothing claimed ahead (the first requests, or answers came fast) */
		stream_sync(st, ahead_wanted(st), false);
		if (st->ahead == NIL)
		{
			st->stopped = true;
			return NULL;
		}
	}
	req = stream_send(st, u);
	pgstat_report_activity(STATE_RUNNING, "d365inv: sending $batch requests");
	return req;
}

/* An answer is in: classify it now, record it with the next transaction */
static void
stream_done(HttpRequest *req, void *arg)
{
	Stream	   *st = arg;
	StreamBatch *b = req->user;
	MemoryContext old = MemoryContextSwitchTo(b->cxt);
	int			saved_size = st->t->batch_size;

	app_user_done(b->u, st->t, req->elapsed_ms, req->seconds_left,
				  !req->transport_error && req->status < 500);
	st->t->batch_size = b->batch_size;
	b->log = settle_batch(st->t, st->ts, b->u, b->sendset, 0, b->sendset->n, req, b->sent_at, 0);
	st->t->batch_size = saved_size;
	for (int k = 0; k < b->sendset->n; k++)
		b->ws->results[b->send_index[k]] = b->sendset->results[k];
	if (st->ts->auto_batch_size > 0)
	{
		adapt_batch_size(st->t, st->ts, list_make1(b->log));
		st->t->batch_size = st->ts->auto_batch_size;
	}
	MemoryContextSwitchTo(st->round);
	st->answered = lappend(st->answered, b);
	MemoryContextSwitchTo(old);
}

/*
 * While the requests are under way: record what came back, and claim
 * batches ahead while an app user may send them soon (not for one that is
 * throttled or paced for longer: those rows would only wait in_flight).
 * With batch_size_mode 'auto' the size of the next batch depends on the
 * answers still under way: it is claimed when a place comes free.
 */
static bool
stream_idle(void *arg)
{
	Stream	   *st = arg;
	int			claim = 0;

	if (!st->drained && !st->stopped && st->ts->auto_batch_size == 0 &&
		ahead_wanted(st) > 0 && GetCurrentTimestamp() < st->stop_at)
	{
		long		wait_ms;

		if (app_user_pick(&st->ts->users, st->t, &wait_ms) != NULL ||
			(wait_ms > 0 && wait_ms <= STREAM_AHEAD_WAIT_MS))
			claim = ahead_wanted(st);
	}
	if (st->answered == NIL && claim == 0)
		return false;
	stream_sync(st, claim, false);
	pgstat_report_activity(STATE_RUNNING, "d365inv: sending $batch requests");
	return true;
}

/* Claim, send and record through a sliding window; true if anything was claimed */
bool
stream_round(Target *t, TargetState *ts, const HttpSettings *http, MemoryContext round)
{
	Stream		st;

	memset(&st, 0, sizeof(st));
	st.t = t;
	st.ts = ts;
	st.http = http;
	st.kind = write_kind(t);
	st.round = round;
	st.stop_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STREAM_WINDOW_MS);
	st.places = t->max_in_flight * Max(ts->users.n, 1);
	http_stream_idle(st.places, http, stream_next, stream_done, stream_idle, &st);
	/* the last answers, and batches claimed ahead that were never sent */
	stream_sync(&st, 0, true);
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(round);
	return st.busy;
}

/* ---------------------------------------------------------------------
 * With preflight lookups: claim, look up, then send the batches left
 * ---------------------------------------------------------------------
 */

/* the batches of a sendset, each sent as whichever app user may send */
typedef struct RequestFeed
{
	Target	   *t;
	TargetState *ts;
	WorkSet    *sendset;
	BatchKind	kind;
	int			nbatches;
	int			next;
	HttpRequest **reqs;			/* NULL: not sent */
	AppUser   **users;
	TimestampTz *sent_at;
} RequestFeed;

/* a feed waits this long at most for an app user, then leaves the rest */
#define FEED_MAX_WAIT_MS 2000

static HttpRequest *
feed_next(void *arg, long *wait_ms)
{
	RequestFeed *feed = arg;
	int			b = feed->next;
	int			first = b * feed->t->batch_size;
	AppUser    *u;

	if (b == feed->nbatches)
		return NULL;
	u = app_user_pick(&feed->ts->users, feed->t, wait_ms);
	if (u == NULL)
	{
		if (*wait_ms > FEED_MAX_WAIT_MS)
			*wait_ms = 0;
		return NULL;
	}
	feed->reqs[b] = batch_http_request(feed->t, feed->kind, feed->sendset->rows + first,
									   Min(feed->t->batch_size, feed->sendset->n - first),
									   u->header, NULL);
	feed->users[b] = u;
	feed->sent_at[b] = GetCurrentTimestamp();
	app_user_sent(u);
	feed->next++;
	return feed->reqs[b];
}

static void
feed_done(HttpRequest *req, void *arg)
{
	RequestFeed *feed = arg;

	/* its user may send again at once; answers are read once all are in */
	for (int b = 0; b < feed->next; b++)
		if (feed->reqs[b] == req)
			app_user_done(feed->users[b], feed->t, req->elapsed_ms, req->seconds_left,
						  !req->transport_error && req->status < 500);
}

/* Claim, look up, send and record one set of rows; true if any were claimed */
bool
lookup_round(Target *t, TargetState *ts, AppUser *lookup_user, const HttpSettings *http,
			 MemoryContext round)
{
	WorkSet    *ws;
	WorkSet    *sendset;
	List	   *logs = NIL;
	int			nsend;
	int		   *send_index;
	RequestFeed feed;

	begin_tx("d365inv: claiming invoices");
	{
		int64		cursor = 0;

		/*
		 * Enough for one full lookup $batch at least: with the key filter,
		 * the few candidates of a larger claim share GETs instead of costing
		 * one each.
		 */
		ws = claim_rows(t, Max(t->max_in_flight * Max(ts->users.n, 1) * t->batch_size,
							   LOOKUP_ROWS_PER_REQUEST),
						&cursor, round);
	}
	commit_tx();
	MemoryContextSwitchTo(round);
	if (ws->n == 0)
		return false;

	preflight(t, ts, lookup_user, http, ws, &logs);
	sendset = undecided_rows(ws, &send_index);
	nsend = sendset->n;

	memset(&feed, 0, sizeof(feed));
	feed.t = t;
	feed.ts = ts;
	feed.sendset = sendset;
	feed.kind = write_kind(t);
	feed.nbatches = (nsend + t->batch_size - 1) / t->batch_size;
	feed.reqs = palloc0(sizeof(HttpRequest *) * Max(feed.nbatches, 1));
	feed.users = palloc0(sizeof(AppUser *) * Max(feed.nbatches, 1));
	feed.sent_at = palloc0(sizeof(TimestampTz) * Max(feed.nbatches, 1));
	pgstat_report_activity(STATE_RUNNING, "d365inv: sending $batch requests");
	http_stream(t->max_in_flight * Max(ts->users.n, 1), http, feed_next, feed_done, &feed);
	pgstat_report_activity(STATE_IDLE, NULL);

	for (int b = 0; b < feed.nbatches; b++)
	{
		int			first = b * t->batch_size;
		int			count = Min(t->batch_size, nsend - first);

		if (feed.reqs[b] == NULL)
		{
			/* no app user could send it this round */
			for (int i = first; i < first + count; i++)
				unanswered(&sendset->results[i], 0,
						   "not sent: every app user is throttled or blocked; sent in a later round");
			continue;
		}
		logs = lappend(logs, settle_batch(t, ts, feed.users[b], sendset, first, count,
										  feed.reqs[b], feed.sent_at[b], list_length(logs)));
	}
	for (int k = 0; k < nsend; k++)
		ws->results[send_index[k]] = sendset->results[k];
	if (ts->auto_batch_size > 0)
		adapt_batch_size(t, ts, logs);

	begin_tx("d365inv: recording outcomes");
	record_results(t, ws, INVOICE_IN_FLIGHT, logs, &ts->progress_at);
	commit_tx();
	MemoryContextSwitchTo(round);
	return true;
}
