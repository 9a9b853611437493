/*-------------------------------------------------------------------------
 *
 * decide.c
 *	  What an answer means for each invoice row: created, duplicate, retry
 *	  (with backoff), review, in_doubt (fate unknown: looked up before any
 *	  resend), back to pending without an attempt (not processed, or
 *	  throttled).  Reads a whole $batch answer part by part; writes only
 *	  RowResults, never the database.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <time.h>

#include "common/pg_prng.h"
#include "utils/builtins.h"

#include "batch_response.h"
#include "classify.h"
#include "d365inv.h"
#include "decide.h"

/* consecutive 401s after a fresh token before we stop resending for free */
#define MAX_AUTH_RETRIES 2

void
set_result(RowResult *r, InvoiceStatus status, bool counted, int delay_ms,
		   int http_status, const char *error)
{
	r->status = status;
	r->counted = counted;
	r->delay_ms = delay_ms;
	r->http_status = http_status;
	r->error = error;
}

/*
 * One jitter factor per request, not per row: the rows of a batch that
 * failed together come due together and go out again as one batch.
 */
static double batch_jitter = 1.0;

void
new_batch_jitter(void)
{
	batch_jitter = 0.8 + 0.4 * pg_prng_double(&pg_global_prng_state);
}

/*
 * Exponential backoff with jitter; a longer Retry-After wins, up to
 * d365inv.retry_max_delay (the parser already cut it to a day).
 */
int
retry_delay_ms(int attempts, int retry_after_s)
{
	double		delay = (double) d365inv_retry_base_ms * pow(2.0, Max(attempts - 1, 0));

	delay *= batch_jitter;
	delay = Min(delay, (double) d365inv_retry_max_ms);
	if (retry_after_s >= 0 && (double) retry_after_s * 1000.0 > delay)
		delay = Min((double) retry_after_s * 1000.0, (double) d365inv_retry_max_ms);
	return (int) delay;
}

/* A Retry-After the worker will not honour in full: say so once per answer */
static void
log_long_retry_after(const Target *t, int retry_after_s, bool capped)
{
	if (capped || (double) retry_after_s * 1000.0 > (double) d365inv_retry_max_ms)
		ereport(LOG,
				(errmsg("d365inv target \"%s\": D365 asked to wait %s%d s (Retry-After); waiting at most d365inv.retry_max_delay = %d s",
						t->name, capped ? "more than " : "", retry_after_s, d365inv_retry_max_ms / 1000)));
}

/* A transient failure of a send: retry later, or review when out of retries. */
void
retry_or_review(RowResult *r, int attempts, int retry_after_s, int http_status, const char *error)
{
	int			now_attempts = attempts + 1;

	if (now_attempts > d365inv_max_retries)
		set_result(r, INVOICE_REVIEW, true, -1, http_status,
				   psprintf("gave up after %d attempts: %s", now_attempts, error));
	else
		set_result(r, INVOICE_RETRY, true, retry_delay_ms(now_attempts, retry_after_s),
				   http_status, error);
}

void
in_doubt(RowResult *r, int http_status, const char *error)
{
	set_result(r, INVOICE_IN_DOUBT, true, d365inv_in_doubt_delay_ms, http_status, error);
}

/* Not processed by D365: send again without counting an attempt. */
void
unanswered(RowResult *r, int http_status, const char *error)
{
	set_result(r, INVOICE_PENDING, false, -1, http_status, error);
}

/*
 * Throttled (429): D365's service protection, not a failure of the
 * invoice.  Sent again once the wait D365 asked for is over, without
 * counting an attempt; the app user waits as a whole (app_user.c).
 */
void
throttled(RowResult *r, int retry_after_s, const char *error)
{
	int			delay = retry_after_s >= 0 ? Min(retry_after_s * 1000, d365inv_retry_max_ms) : 1000;

	set_result(r, INVOICE_PENDING, false, delay, 429,
			   psprintf("throttled by D365, sent again after the wait it asked for (not counted as an attempt): %s",
						error));
}

/*
 * D365 has an invoice with this row's keys and id found_id (may be NULL):
 * settle the row.  With client ids we can tell whose it is: our id means
 * we made it (a late or repeated create of ours), another id means someone
 * else did.  Without, a row whose fate was unknown counts as ours
 * (created) and a row never sent as someone else's (duplicate).
 */
void
settle_found(const Target *t, RowResult *r, const InvoiceRow *row, const char *found_id,
			 bool sent_before, const char *settled_by)
{
	bool		ours;

	if (t->entity_id_mode == ENTITY_ID_CLIENT && row->entity_id != NULL && found_id != NULL)
		ours = pg_strcasecmp(found_id, row->entity_id) == 0;
	else
		ours = sent_before;
	if (ours)
		set_result(r, INVOICE_CREATED, false, -1, 0, NULL);
	else if (t->entity_id_mode == ENTITY_ID_CLIENT && found_id != NULL)
		set_result(r, INVOICE_DUPLICATE, false, -1, 0,
				   psprintf("already in D365 with another id (%s): created by someone else", found_id));
	else
		set_result(r, INVOICE_DUPLICATE, false, -1, 0, psprintf("already in D365 (found by %s)", settled_by));
	r->d365_id = found_id;
	r->settled_by = settled_by;
}

void
count_outcome(RequestLog *log, const RowResult *r)
{
	if (r->status == INVOICE_CREATED)
		log->created++;
	else if (r->status == INVOICE_DUPLICATE)
		log->duplicates++;
	else if (r->status == INVOICE_RETRY)
		log->retries++;
	else if (r->status == INVOICE_REVIEW)
		log->reviews++;
	else if (r->status == INVOICE_IN_DOUBT)
		log->in_doubt++;
	else if (r->status == INVOICE_PENDING)
		log->unanswered++;
	if (r->error && log->error == NULL && r->status != INVOICE_DUPLICATE)
		log->error = r->error;
}

/* ---------------------------------------------------------------------
 * Reading one $batch answer
 * ---------------------------------------------------------------------
 */

static int
find_row(const WorkSet *ws, int first, int count, BrSlice content_id)
{
	char		buf[32];
	int64		id;
	char	   *end;

	if (content_id.len == 0 || content_id.len >= sizeof(buf))
		return -1;
	memcpy(buf, content_id.ptr, content_id.len);
	buf[content_id.len] = '\0';
	errno = 0;
	id = strtoi64(buf, &end, 10);
	if (errno != 0 || *end != '\0')
		return -1;
	for (int i = first; i < first + count; i++)
		if (ws->rows[i].id == id)
			return i;
	return -1;
}

/*
 * D365 answered 401: the next round fetches a fresh token.  Once one was
 * refused as well, say so (the app user's auth_problem, which
 * target_status shows) and return true: the attempt counts.  With auth
 * 'none' the request had no token at all (a gateway in front of D365 is
 * to add the credentials), and the text says that.
 */
static bool
auth_refused(const Target *t, AppUser *u, const char *why)
{
	app_user_auth_refused(u);
	if (u->auth_rejections < MAX_AUTH_RETRIES)
		return false;
	if (t->auth == AUTH_OAUTH2)
		snprintf(u->auth_problem, sizeof(u->auth_problem), "D365 refused a fresh token: %s", why);
	else
		snprintf(u->auth_problem, sizeof(u->auth_problem),
				 "D365 answered 401 to a request without a token (auth 'none'): %s", why);
	return true;
}

/* an invoice's last_error after a 401 that is not counted (yet) */
static const char *
auth_resend_text(const Target *t)
{
	if (t->auth == AUTH_OAUTH2)
		return "token refused; sending again with a new one";
	return "401 to a request without a token (auth 'none'); sending again";
}

/* The classifier's error text, with D365's error code when it has one */
static char *
error_with_code(const Classification *c)
{
	if (c->error_code[0] == '\0' || strstr(c->error_text, c->error_code) != NULL)
		return pstrdup(c->error_text);
	return psprintf("%s (%s)", c->error_text, c->error_code);
}

/* Outcome of one operation response for row i */
static void
decide_part(const Target *t, AppUser *u, WorkSet *ws, int i, const BatchPart *part,
			RequestLog *log)
{
	RowResult  *r = &ws->results[i];
	Classification c;

	if (part->truncated || part->http_status == 0)
	{
		in_doubt(r, part->http_status, "the answer for this invoice was cut off or unreadable");
		return;
	}
	classify_response(&t->classify, part->http_status, part->headers, part->body, time(NULL), &c);
	if (part->http_status == 429)
		log->throttled = true;
	if (c.retry_after >= 0)
	{
		if (c.retry_after > log->retry_after)
			log_long_retry_after(t, c.retry_after, c.retry_after_capped);
		log->retry_after = Max(log->retry_after, c.retry_after);
	}

	switch (c.outcome)
	{
		case OUTCOME_CREATED:
			set_result(r, INVOICE_CREATED, true, -1, part->http_status, NULL);
			r->d365_id = c.d365_id[0] ? pstrdup(c.d365_id) : NULL;
			r->settled_by = "response";
			break;
		case OUTCOME_DUPLICATE:
			if (t->entity_id_mode == ENTITY_ID_CLIENT && ws->rows[i].entity_id != NULL)
			{
				/* ours (a late original, a resend) or someone else's: a lookup tells */
				set_result(r, INVOICE_IN_DOUBT, true, 0, part->http_status,
						   psprintf("D365 has it already (%s): looking up whose it is", error_with_code(&c)));
				break;
			}
			set_result(r, INVOICE_DUPLICATE, true, -1, part->http_status, error_with_code(&c));
			r->settled_by = "response";
			break;
		case OUTCOME_RETRY:
			if (part->http_status == 429)
				throttled(r, c.retry_after, error_with_code(&c));
			else
				retry_or_review(r, ws->attempts[i], c.retry_after, part->http_status, error_with_code(&c));
			break;
		case OUTCOME_REVIEW:
			set_result(r, INVOICE_REVIEW, true, -1, part->http_status, error_with_code(&c));
			break;
		case OUTCOME_AUTH:
			if (auth_refused(t, u, c.error_text))
				retry_or_review(r, ws->attempts[i], -1, part->http_status, pstrdup(c.error_text));
			else
				unanswered(r, part->http_status, auth_resend_text(t));
			break;
	}
}

/* Outcomes for rows [first, first + count) from their $batch request */
void
decide_batch(const Target *t, TargetState *ts, AppUser *u, WorkSet *ws, int first, int count,
			 HttpRequest *req, RequestLog *log)
{
	int			status = (int) req->status;
	const char *ct = req->content_type;
	BatchPart  *parts;
	BatchParse	parse;
	int		   *part_of;
	bool		stray = false;
	bool		positional;

	new_batch_jitter();
	if (req->transport_error)
	{
		for (int i = first; i < first + count; i++)
		{
			if (req->maybe_sent)
				in_doubt(&ws->results[i], 0, psprintf("no complete answer: %s", req->error));
			else
				retry_or_review(&ws->results[i], ws->attempts[i], -1, 0,
								psprintf("not sent: %s", req->error));
		}
		return;
	}

	if (status == 429)
		log->throttled = true;
	if (req->retry_after)
	{
		bool		capped = false;

		log->retry_after = parse_retry_after_capped(req->retry_after, strlen(req->retry_after),
													time(NULL), &capped);
		if (log->retry_after >= 0)
			log_long_retry_after(t, log->retry_after, capped);
	}

	if (status == 401)
	{
		char	   *why = describe_body(req->response.data, req->response.len, status);

		bool		counted = auth_refused(t, u, why);

		for (int i = first; i < first + count; i++)
		{
			if (counted)
				retry_or_review(&ws->results[i], ws->attempts[i], -1, status, why);
			else
				unanswered(&ws->results[i], status, auth_resend_text(t));
		}
		log->error = why;
		return;
	}

	if (status == 413)
	{
		/*
		 * Too large: D365 processed none of it.  Send the rows again, not
		 * counted, in batches half this size; one invoice too large on its
		 * own needs a person.
		 */
		char	   *why = describe_body(req->response.data, req->response.len, status);

		log->error = why;
		ts->size_cap = ts->size_cap > 0 ? Min(ts->size_cap, Max(count / 2, 1)) : Max(count / 2, 1);
		ts->size_capped_at = GetCurrentTimestamp();
		for (int i = first; i < first + count; i++)
		{
			if (count > 1)
				unanswered(&ws->results[i], status,
						   psprintf("the $batch of %d was too large for D365 (%s): sent again in batches of %d",
									count, why, ts->size_cap));
			else
				set_result(&ws->results[i], INVOICE_REVIEW, true, -1, status,
						   psprintf("too large for D365 even on its own: %s", why));
		}
		return;
	}

	if (ct == NULL || pg_strncasecmp(ct, "multipart/", 10) != 0)
	{
		/* an answer for the whole request, not per operation */
		char	   *why = describe_body(req->response.data, req->response.len, status);

		log->error = why;
		for (int i = first; i < first + count; i++)
		{
			RowResult  *r = &ws->results[i];

			if (status == 429)
				throttled(r, log->retry_after, why);
			else if (status == 503)
				retry_or_review(r, ws->attempts[i], log->retry_after, status, why);
			else if (status >= 500 || (status >= 200 && status < 300))
				/* a gateway may have passed part of it on: unknown */
				in_doubt(r, status, why);
			else
				set_result(r, INVOICE_REVIEW, true, -1, status, why);
		}
		return;
	}

	parts = palloc0(sizeof(BatchPart) * count);
	br_parse(ct, strlen(ct), req->response.data, req->response.len, parts, count, &parse);
	if (parse.status != BR_OK && parse.status != BR_TRUNCATED)
	{
		char	   *why = psprintf("HTTP %d, unreadable $batch answer: %s (at byte %zu)",
								   status, parse.error ? parse.error : br_status_name(parse.status),
								   parse.error_offset);

		log->error = why;
		for (int i = first; i < first + count; i++)
			in_doubt(&ws->results[i], status, why);
		return;
	}

	/* Parts name their invoice by Content-ID; without any, by position. */
	part_of = palloc(sizeof(int) * count);
	for (int k = 0; k < count; k++)
		part_of[k] = -1;
	positional = parse.status == BR_OK && parse.nparts == count;
	for (int p = 0; p < parse.nparts && positional; p++)
		if (parts[p].content_id.len > 0)
			positional = false;
	for (int p = 0; p < parse.nparts; p++)
	{
		int			row = positional ? first + p : find_row(ws, first, count, parts[p].content_id);

		if (row < 0)
			stray = true;
		else if (part_of[row - first] >= 0)
			part_of[row - first] = -2;	/* two answers for one invoice */
		else
			part_of[row - first] = p;
	}

	for (int i = first; i < first + count; i++)
	{
		int			p = part_of[i - first];

		if (p >= 0)
			decide_part(t, u, ws, i, &parts[p], log);
		else if (p == -2)
			in_doubt(&ws->results[i], status, "two answers for one invoice");
		else if (parse.status == BR_OK && !stray)
			/* a complete answer without it: D365 stopped before it */
			unanswered(&ws->results[i], status, "not processed: D365 stopped at an earlier failure in the $batch");
		else
			in_doubt(&ws->results[i], status,
					 parse.status == BR_TRUNCATED ? "the $batch answer was cut off before this invoice"
					 : "an answer without Content-ID could be this invoice's");
	}
	if (parse.status == BR_TRUNCATED && log->error == NULL)
		log->error = psprintf("HTTP %d, $batch answer cut off: %s", status,
							  parse.error ? parse.error : "truncated");
}
