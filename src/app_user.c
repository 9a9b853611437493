/*-------------------------------------------------------------------------
 *
 * app_user.c
 *	  The app users a target is delivered with, their tokens, and the
 *	  pacing of each to D365's service protection limits.
 *
 * D365 counts per app user, over a sliding window (5 minutes), requests,
 * their combined execution time on its servers and requests at once;
 * beyond any of them it answers 429 with Retry-After.  Each user here
 * keeps a ledger of its own finished requests within the window, as D365
 * counts them, and with pacing 'budget' a request goes out only when it
 * still fits, with a margin.  A request's execution time is what it took
 * here (more than D365's share of it), scaled to D365's own figure when it
 * says what is left (x-ms-ratelimit-time-remaining-xrm-requests).  A 429
 * all the same makes the user wait as a whole for Retry-After and halves
 * the requests it may have in flight; each clean answer grows that back
 * (AIMD).  Several users multiply the budget: requests go to the one with
 * the fewest in flight.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "app_user.h"
#include "auth.h"
#include "d365inv.h"

/* the share of each limit the pacing spends; the rest is the margin */
#define BUDGET_SHARE 0.95
/* wait after the token endpoint failed */
#define AUTH_FAILURE_DELAY_MS 30000
/* a 429 without Retry-After: wait this long */
#define DEFAULT_THROTTLE_MS 1000

static AppUser *
find_or_add(AppUsers *users, const char *client_id)
{
	AppUser    *u;

	for (int i = 0; i < users->n; i++)
		if (strcmp(users->users[i].client_id, client_id) == 0)
			return &users->users[i];
	if (users->n == users->capacity)
	{
		users->capacity = Max(4, users->capacity * 2);
		users->users = users->users == NULL
			? MemoryContextAllocZero(TopMemoryContext, sizeof(AppUser) * users->capacity)
			: repalloc(users->users, sizeof(AppUser) * users->capacity);
	}
	u = &users->users[users->n++];
	memset(u, 0, sizeof(AppUser));
	strlcpy(u->client_id, client_id, sizeof(u->client_id));
	u->cost_scale = 1.0;
	return u;
}

void
app_users_load(AppUsers *users, const Target *t, MemoryContext round)
{
	MemoryContext spi = CurrentMemoryContext;
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(t->name)};
	int			kept = 0;

	if (SPI_execute_with_args(
							  "SELECT NULL::text, (SELECT client_secret FROM d365inv.target_secret WHERE target = $1), 0"
							  " UNION ALL"
							  " SELECT u.client_id, s.client_secret, 1"
							  "   FROM d365inv.app_user u LEFT JOIN d365inv.app_user_secret s"
							  "     ON s.target = u.target AND s.client_id = u.client_id"
							  "  WHERE u.target = $1"
							  "  ORDER BY 3, 1",
							  1, argtypes, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading the app users failed");

	/*
	 * Nothing is in flight between rounds, also when an ERROR ended the
	 * last one halfway (its transfers were abandoned, never answered).
	 */
	for (int i = 0; i < users->n; i++)
	{
		users->users[i].seen = false;
		users->users[i].in_flight = 0;
	}
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *client_id;
		AppUser    *u;

		MemoryContextSwitchTo(round);
		client_id = r == 0 ? (t->client_id ? t->client_id : "") : spi_text_column(tup, desc, 1);
		if (r > 0 && strcmp(client_id, t->client_id ? t->client_id : "") == 0)
		{
			MemoryContextSwitchTo(spi);
			continue;			/* the target's own, listed again */
		}
		u = find_or_add(users, client_id);
		u->seen = true;
		u->secret = spi_text_column(tup, desc, 2);
		{
			uint32		h = u->secret ? hash_bytes((const unsigned char *) u->secret,
												   strlen(u->secret)) : 0;

			/* the DBA fixed the secret: try it now, not after the wait */
			if (h != u->secret_hash)
			{
				u->auth_blocked_until = 0;
				u->auth_rejections = 0;
				u->secret_hash = h;
			}
		}
		MemoryContextSwitchTo(spi);
	}

	/* users no longer configured go, with their ledgers */
	for (int i = 0; i < users->n; i++)
	{
		AppUser    *u = &users->users[i];

		if (!u->seen)
		{
			if (u->entries)
				pfree(u->entries);
			continue;
		}
		if (kept != i)
			users->users[kept] = *u;
		kept++;
	}
	users->n = kept;
}

void
app_users_authenticate(AppUsers *users, const Target *t, const HttpSettings *http)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		oauth2 = t->auth == AUTH_OAUTH2;

	for (int i = 0; i < users->n; i++)
	{
		AppUser    *u = &users->users[i];
		AuthConfig	cfg;
		char		err[512];

		u->header = NULL;
		u->usable = true;
		u->sent = false;
		if (!oauth2)
		{
			/* a local endpoint: name the user, so that it can tell them apart */
			if (u->client_id[0] != '\0')
				u->header = psprintf("X-D365inv-Client-Id: %s", u->client_id);

			/*
			 * A 401 (force_refresh) has no token to refresh here: send again
			 * as before.  Left set, app_user_pick() would pass this user
			 * over for good.  Why it was refused stays said until a request
			 * gets through (app_users_round_done()), as with a token.
			 */
			u->force_refresh = false;
			if (u->auth_rejections == 0)
				u->auth_problem[0] = '\0';
			continue;
		}
		if (u->auth_blocked_until > now)
		{
			u->usable = false;
			continue;
		}
		if (u->secret == NULL)
		{
			snprintf(u->auth_problem, sizeof(u->auth_problem),
					 "app user \"%s\" has no client secret", u->client_id);
			ereport(WARNING,
					(errmsg("d365inv target \"%s\": %s", t->name, u->auth_problem),
					 errhint("A superuser inserts it into %s.",
							 i == 0 ? "d365inv.target_secret" : "d365inv.app_user_secret")));
			u->auth_blocked_until = TimestampTzPlusMilliseconds(now, AUTH_FAILURE_DELAY_MS);
			u->usable = false;
			continue;
		}
		cfg.target = t->name;
		cfg.token_url = t->token_url;
		cfg.client_id = u->client_id;
		cfg.client_secret = u->secret;
		cfg.scope = t->scope;
		u->header = auth_header(&cfg, u->force_refresh, http, err, sizeof(err));
		u->force_refresh = false;
		if (u->header == NULL)
		{
			snprintf(u->auth_problem, sizeof(u->auth_problem), "authentication failed: %s", err);
			ereport(WARNING,
					(errmsg("d365inv target \"%s\": no access token: %s", t->name, err),
					 errdetail("Nothing is sent as app user \"%s\" for %d seconds.",
							   u->client_id, AUTH_FAILURE_DELAY_MS / 1000)));
			u->auth_blocked_until = TimestampTzPlusMilliseconds(now, AUTH_FAILURE_DELAY_MS);
			u->usable = false;
		}
		else if (u->auth_rejections == 0)
			u->auth_problem[0] = '\0';
	}
}

/* Forget finished requests that have left the window. */
static void
prune(AppUser *u, const Target *t, TimestampTz now)
{
	TimestampTz horizon = now - (int64) t->limit_window_s * USECS_PER_SEC;

	while (u->nentries > 0 && u->entries[u->first].done_at < horizon)
	{
		u->cost_done_ms -= u->entries[u->first].cost_ms;
		u->first = (u->first + 1) % u->capacity;
		u->nentries--;
	}
	if (u->nentries == 0)
		u->cost_done_ms = 0;	/* no drift from the subtractions */
}

/*
 * With pacing 'budget': 0 when one more request fits u's window, else
 * milliseconds until the oldest finished one leaves it.
 */
static long
budget_wait(AppUser *u, const Target *t, TimestampTz now)
{
	double		requests;
	double		cost;

	if (t->pacing != PACING_BUDGET)
		return 0;
	prune(u, t, now);
	requests = u->nentries + u->in_flight + 1;
	cost = (u->cost_done_ms + (u->in_flight + 1) * u->est_cost_ms) * u->cost_scale;
	if (requests <= t->limit_requests * BUDGET_SHARE &&
		cost <= t->limit_execution_s * 1000.0 * BUDGET_SHARE)
		return 0;
	if (u->nentries == 0)
		return 50;				/* all of it in flight: wait for answers */
	return Max(1, TimestampDifferenceMilliseconds(now, u->entries[u->first].done_at +
												  (int64) t->limit_window_s * USECS_PER_SEC));
}

AppUser *
app_user_pick(AppUsers *users, const Target *t, long *wait_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	AppUser    *best = NULL;
	long		soonest = -1;

	*wait_ms = 0;
	for (int i = 0; i < users->n; i++)
	{
		AppUser    *u = &users->users[i];
		long		w;

		if (!u->usable || u->force_refresh)
			continue;			/* till the next round */
		if (u->throttled_until > now)
			w = Max(1, TimestampDifferenceMilliseconds(now, u->throttled_until));
		else
		{
			if (u->window < 1)
				u->window = t->max_in_flight;
			if (u->in_flight >= (int) u->window)
				w = 10;			/* an answer frees a place */
			else
				w = budget_wait(u, t, now);
		}
		if (w > 0)
		{
			if (soonest < 0 || w < soonest)
				soonest = w;
			continue;
		}
		if (best == NULL || u->in_flight < best->in_flight)
			best = u;
	}
	if (best == NULL && soonest > 0)
		*wait_ms = soonest;
	return best;
}

void
app_user_sent(AppUser *u)
{
	u->in_flight++;
	u->sent = true;
}

/* Record a finished request in the ledger. */
static void
remember(AppUser *u, TimestampTz now, double cost_ms)
{
	if (u->nentries == u->capacity)
	{
		int			capacity = Max(64, u->capacity * 2);
		BudgetEntry *entries = MemoryContextAlloc(TopMemoryContext, sizeof(BudgetEntry) * capacity);

		for (int k = 0; k < u->nentries; k++)
			entries[k] = u->entries[(u->first + k) % u->capacity];
		if (u->entries)
			pfree(u->entries);
		u->entries = entries;
		u->capacity = capacity;
		u->first = 0;
	}
	u->entries[(u->first + u->nentries) % u->capacity].done_at = now;
	u->entries[(u->first + u->nentries) % u->capacity].cost_ms = cost_ms;
	u->nentries++;
	u->cost_done_ms += cost_ms;
}

void
app_user_done(AppUser *u, const Target *t, double elapsed_ms, double seconds_left, bool answered)
{
	TimestampTz now = GetCurrentTimestamp();
	double		cost = Max(elapsed_ms, 0.0);

	u->in_flight = Max(u->in_flight - 1, 0);
	u->est_cost_ms = u->est_cost_ms == 0 ? cost : 0.8 * u->est_cost_ms + 0.2 * cost;
	if (t->pacing == PACING_BUDGET)
	{
		prune(u, t, now);
		remember(u, now, cost);

		/*
		 * D365's own count of the execution time in the window, against
		 * ours: how much of what we measure is its.
		 */
		if (seconds_left >= 0 && u->cost_done_ms >= 1000.0)
		{
			double		used = (t->limit_execution_s - seconds_left) * 1000.0;
			double		k = Max(0.05, Min(4.0, used / u->cost_done_ms));

			u->cost_scale = 0.7 * u->cost_scale + 0.3 * k;
		}
	}
	if (answered)
		u->window = Min((double) t->max_in_flight, u->window + 1.0 / Max(u->window, 1.0));
}

void
app_user_throttled(AppUser *u, const Target *t, int retry_after_s, const char *why)
{
	TimestampTz now = GetCurrentTimestamp();
	long		ms = retry_after_s >= 0 ? (long) retry_after_s * 1000 : DEFAULT_THROTTLE_MS;

	ms = Min(Max(ms, 1), (long) d365inv_retry_max_ms);
	u->window = Max(1.0, u->window / 2);
	if (u->throttled_until <= now)
		ereport(LOG,
				(errmsg("d365inv target \"%s\": D365 throttles app user \"%s\"; it waits %ld ms",
						t->name, u->client_id, ms),
				 why ? errdetail_internal("%s", why) : 0));
	u->throttled_until = Max(u->throttled_until, TimestampTzPlusMilliseconds(now, ms));
	strlcpy(u->throttle_reason, why ? why : "HTTP 429", sizeof(u->throttle_reason));
}

void
app_user_auth_refused(AppUser *u)
{
	u->force_refresh = true;
}

void
app_users_round_done(AppUsers *users)
{
	for (int i = 0; i < users->n; i++)
	{
		AppUser    *u = &users->users[i];

		/* a fresh token was accepted, or refused again */
		if (u->force_refresh)
			u->auth_rejections++;
		else if (u->sent)
		{
			u->auth_rejections = 0;
			u->auth_problem[0] = '\0';
		}
	}
}

TimestampTz
app_users_throttled_until(const AppUsers *users, const char **why, int *nthrottled)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz until = 0;
	bool		all = true;

	*nthrottled = 0;
	*why = NULL;
	for (int i = 0; i < users->n; i++)
	{
		const AppUser *u = &users->users[i];

		if (u->throttled_until > now)
		{
			(*nthrottled)++;
			if (until == 0 || u->throttled_until < until)
			{
				until = u->throttled_until;
				*why = u->throttle_reason;
			}
		}
		else if (u->usable)
			all = false;
	}
	return all ? until : 0;
}

const char *
app_users_auth_problem(const AppUsers *users, TimestampTz *until)
{
	const char *why = NULL;

	*until = 0;
	for (int i = 0; i < users->n; i++)
	{
		const AppUser *u = &users->users[i];

		if (u->auth_problem[0] == '\0')
			return NULL;		/* this one can authenticate */
		if (why == NULL)
		{
			why = u->auth_problem;
			*until = u->auth_blocked_until;
		}
	}
	return why;
}
