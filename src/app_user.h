/*-------------------------------------------------------------------------
 *
 * app_user.h
 *	  The app users (credentials) a target is delivered with, and the
 *	  pacing of each to D365's service protection budget (app_user.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_APP_USER_H
#define D365INV_APP_USER_H

#include "utils/timestamp.h"

#include "http.h"
#include "target.h"

/* longest client id (d365inv.app_user's check) */
#define APP_USER_ID_MAX 200

/* One finished request in a user's window, as D365 counts it */
typedef struct BudgetEntry
{
	TimestampTz done_at;
	double		cost_ms;		/* its time, as measured here */
} BudgetEntry;

/*
 * What the worker remembers about one app user of a target between rounds.
 * D365 enforces its limits per user, so each has its own window, token and
 * throttle.
 */
typedef struct AppUser
{
	char		client_id[APP_USER_ID_MAX + 1]; /* "" for a target without one */
	bool		seen;			/* still configured (app_user_sync) */

	/* authentication */
	char	   *secret;			/* this round's client secret (round context) */
	uint32		secret_hash;	/* a new secret lifts an authentication block */
	char	   *header;			/* this round's Authorization or identity
								 * header; NULL: none needed */
	bool		usable;			/* this round: has what it needs to send */
	bool		force_refresh;	/* the last token was refused */
	bool		sent;			/* this round: a request went out as this user */
	int			auth_rejections;	/* consecutive rounds with a refused token */
	TimestampTz auth_blocked_until; /* the token endpoint failed: wait */
	char		auth_problem[512];	/* why, while blocked */

	/* throttling: D365 said 429; the user waits as a whole */
	TimestampTz throttled_until;
	char		throttle_reason[256];

	/* pacing */
	int			in_flight;
	double		window;			/* requests allowed in flight (AIMD) */
	BudgetEntry *entries;		/* ring: finished requests within the limit
								 * window, oldest first */
	int			nentries;
	int			first;
	int			capacity;
	double		cost_done_ms;	/* their cost_ms, summed */
	double		est_cost_ms;	/* a request's cost, moving average */
	double		cost_scale;		/* D365's execution time per ms measured
								 * here, from its remaining-budget header */
} AppUser;

typedef struct AppUsers
{
	AppUser    *users;
	int			n;
	int			capacity;
} AppUsers;

/*
 * Bring users in line with the target's app users (its own client id
 * first, then d365inv.app_user), keeping each known user's state, with
 * this round's secrets (palloc'd in round).  Caller has a transaction and
 * SPI.
 */
extern void app_users_load(AppUsers *users, const Target *t, MemoryContext round);
/* each user's header for this round, fetching tokens as needed (no transaction) */
extern void app_users_authenticate(AppUsers *users, const Target *t, const HttpSettings *http);

/*
 * The user the next request goes out as, or NULL: then *wait_ms says when
 * to ask again (0: none can send this round: all blocked or throttled).
 */
extern AppUser *app_user_pick(AppUsers *users, const Target *t, long *wait_ms);
/* a request went out as u */
extern void app_user_sent(AppUser *u);
/* ...and came back after elapsed_ms; seconds_left: D365's header or -1 */
extern void app_user_done(AppUser *u, const Target *t, double elapsed_ms, double seconds_left,
						  bool answered);
/* D365 answered 429: u waits as a whole, with fewer requests in flight */
extern void app_user_throttled(AppUser *u, const Target *t, int retry_after_s, const char *why);
/* a refused token: refresh before the next request */
extern void app_user_auth_refused(AppUser *u);
/* the end of a round's sending: count refused tokens */
extern void app_users_round_done(AppUsers *users);

/* every usable user is throttled: until when (else 0), and why */
extern TimestampTz app_users_throttled_until(const AppUsers *users, const char **why, int *nthrottled);
/* no user can authenticate: why (else NULL) and until when */
extern const char *app_users_auth_problem(const AppUsers *users, TimestampTz *until);

#endif							/* D365INV_APP_USER_H */
