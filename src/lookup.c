/*-------------------------------------------------------------------------
 *
 * lookup.c
 *	  Existence lookups: does D365 already have these invoices?
 *
 * Keys go out as $batch requests of GET parts, each GET OR-ing up to
 * LOOKUP_KEYS_PER_GET keys in its $filter and selecting only the key and id
 * properties (batch_request.c builds them).  Pages beyond the first are
 * followed through @odata.nextLink, on the service root's origin only, so
 * the token never goes anywhere else; odata_page.c reads every page (the
 * same reader as refresh_remote_keys()).
 *
 * Sending needs no transaction; matching the entities that came back
 * against our rows compares keys the way the unique index does
 * (invoice_key()), which may consult the database's collation, so it runs
 * inside one.  Any doubt (no answer, a cut answer, a page that failed)
 * leaves the row LOOKUP_FAILED unless its key was positively found.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_collation.h"
#include "fmgr.h"
#include "utils/builtins.h"

#include "batch_response.h"
#include "lookup.h"
#include "odata_page.h"

/* pages followed per GET; a 20-key filter needs one unless keys repeat a lot */
#define MAX_PAGES_PER_GET 50

extern Datum d365inv_invoice_key(PG_FUNCTION_ARGS);

/* One GET: rows [first, first + count) of the work set */
typedef struct LookupGet
{
	int			first;
	int			count;
	int			log_index;
	bool		failed;
	char	   *error;
	List	   *entities;		/* ODataEntity * */
	char	   *next_link;		/* page still to fetch, NULL when done */
	int			pages;
} LookupGet;

struct LookupState
{
	const Target *t;
	WorkSet    *ws;
	int			ngets;
	LookupGet  *gets;
	bool		auth_rejected;
};

static void
get_failed(LookupGet *g, const char *error)
{
	if (!g->failed)
	{
		g->failed = true;
		g->error = pstrdup(error);
	}
	g->next_link = NULL;
}

/* Read one page of an entity set answer into g (odata_page.c reads it). */
static void
read_page(LookupState *s, LookupGet *g, const char *body, size_t len)
{
	const Target *t = s->t;
	ODataPage	page;

	g->next_link = NULL;
	switch (odata_read_page(body, len, t->vendor_property, t->invoice_property,
							t->id_property, t->service_root, &page))
	{
		case ODATA_PAGE_NOT_JSON:
			get_failed(g, "lookup answer is not JSON");
			return;
		case ODATA_PAGE_NO_VALUE:
			get_failed(g, "lookup answer has no \"value\" array");
			return;
		case ODATA_PAGE_FOREIGN_LINK:
		case ODATA_PAGE_OK:
			break;
	}
	g->entities = list_concat(g->entities, page.entities);
	if (page.next_link != NULL)
	{
		if (!same_origin(page.next_link, t->service_root))
			get_failed(g, "lookup answer's next link points to another host");
		else if (++g->pages >= MAX_PAGES_PER_GET)
			get_failed(g, "lookup answer has too many pages");
		else
			g->next_link = page.next_link;
	}
}

static int
get_of_part(BrSlice content_id, int nget)
{
	char		buf[32];
	int			k;

	if (content_id.len < 8 || content_id.len >= sizeof(buf))
		return -1;
	memcpy(buf, content_id.ptr, content_id.len);
	buf[content_id.len] = '\0';
	if (strncmp(buf, "lookup-", 7) != 0)
		return -1;
	k = atoi(buf + 7);
	return (k >= 1 && k <= nget) ? k - 1 : -1;
}

/* The answer to one lookup $batch covering gets[g0 .. g0 + nget) */
static void
read_batch(LookupState *s, HttpRequest *req, int g0, int nget, RequestLog *log)
{
	LookupGet  *gets = s->gets + g0;
	BatchPart  *parts;
	BatchParse	parse;
	bool	   *answered;
	bool		positional;

	if (req->transport_error || req->status != 200 || req->content_type == NULL ||
		pg_strncasecmp(req->content_type, "multipart/", 10) != 0)
	{
		char	   *why = req->transport_error ? psprintf("no answer: %s", req->error)
			: describe_body(req->response.data, req->response.len, req->status);

		if (req->status == 401)
			s->auth_rejected = true;
		if (req->status == 429)
			log->throttled = true;
		log->error = why;
		for (int k = 0; k < nget; k++)
			get_failed(&gets[k], why);
		return;
	}

	parts = palloc0(sizeof(BatchPart) * nget);
	answered = palloc0(sizeof(bool) * nget);
	br_parse(req->content_type, strlen(req->content_type), req->response.data,
			 req->response.len, parts, nget, &parse);
	positional = parse.status == BR_OK && parse.nparts == nget;
	for (int p = 0; p < parse.nparts && positional; p++)
		if (parts[p].content_id.len > 0)
			positional = false;
	if (parse.status == BR_OK || parse.status == BR_TRUNCATED)
	{
		for (int p = 0; p < parse.nparts; p++)
		{
			BatchPart  *part = &parts[p];
			int			k = positional ? p : get_of_part(part->content_id, nget);

			if (k < 0 || answered[k])
				continue;
			answered[k] = true;
			if (part->truncated)
				get_failed(&gets[k], "lookup answer cut off");
			else if (part->http_status != 200)
			{
				if (part->http_status == 401)
					s->auth_rejected = true;
				if (part->http_status == 429)
					log->throttled = true;
				get_failed(&gets[k], describe_body(part->body.ptr, part->body.len, part->http_status));
			}
			else
				read_page(s, &gets[k], part->body.ptr, part->body.len);
		}
	}
	for (int k = 0; k < nget; k++)
		if (!answered[k])
			get_failed(&gets[k], parse.status == BR_OK ? "no answer for this lookup"
					   : "unreadable lookup answer");
	for (int k = 0; k < nget; k++)
		if (gets[k].failed && log->error == NULL)
			log->error = gets[k].error;
}

/* Fetch @odata.nextLink pages, all pending GETs at once, until none is left. */
static void
follow_next_links(LookupState *s, const char *auth, const HttpSettings *http, List **logs)
{
	const char *headers[3] = {"Accept: application/json", auth, NULL};

	for (;;)
	{
		HttpRequest **reqs = palloc0(sizeof(HttpRequest *) * s->ngets);
		int		   *which = palloc0(sizeof(int) * s->ngets);
		int			n = 0;
		TimestampTz sent_at;

		for (int g = 0; g < s->ngets; g++)
		{
			if (s->gets[g].next_link == NULL)
				continue;
			reqs[n] = palloc0(sizeof(HttpRequest));
			reqs[n]->method = "GET";
			reqs[n]->url = s->gets[g].next_link;
			reqs[n]->headers = headers;
			which[n++] = g;
		}
		if (n == 0)
			return;
		sent_at = GetCurrentTimestamp();
		http_perform(reqs, n, http);
		for (int i = 0; i < n; i++)
		{
			LookupGet  *g = &s->gets[which[i]];
			HttpRequest *req = reqs[i];
			RequestLog *log = request_log_new(REQUEST_LOOKUP, sent_at, req, 1, g->count);

			if (req->transport_error)
				get_failed(g, psprintf("no answer for a next page: %s", req->error));
			else if (req->status != 200)
			{
				if (req->status == 401)
					s->auth_rejected = true;
				log->throttled = req->status == 429;
				get_failed(g, describe_body(req->response.data, req->response.len, req->status));
			}
			else
				read_page(s, g, req->response.data, req->response.len);
			if (g->failed)
				log->error = g->error;
			*logs = lappend(*logs, log);
			pfree(req->response.data);
		}
	}
}

LookupState *
lookup_send(const Target *t, const char *auth, const HttpSettings *http, WorkSet *ws, List **logs)
{
	LookupState *s = palloc0(sizeof(LookupState));
	int			nreq = (ws->n + LOOKUP_ROWS_PER_REQUEST - 1) / LOOKUP_ROWS_PER_REQUEST;
	HttpRequest **reqs = palloc0(sizeof(HttpRequest *) * Max(nreq, 1));
	int		   *req_g0 = palloc0(sizeof(int) * Max(nreq, 1));
	int		   *req_nget = palloc0(sizeof(int) * Max(nreq, 1));
	TimestampTz sent_at;

	s->t = t;
	s->ws = ws;
	s->ngets = (ws->n + LOOKUP_KEYS_PER_GET - 1) / LOOKUP_KEYS_PER_GET;
	s->gets = palloc0(sizeof(LookupGet) * Max(s->ngets, 1));
	for (int g = 0; g < s->ngets; g++)
	{
		s->gets[g].first = g * LOOKUP_KEYS_PER_GET;
		s->gets[g].count = Min(LOOKUP_KEYS_PER_GET, ws->n - s->gets[g].first);
	}

	for (int r = 0; r < nreq; r++)
	{
		int			first = r * LOOKUP_ROWS_PER_REQUEST;
		int			count = Min(LOOKUP_ROWS_PER_REQUEST, ws->n - first);
		reqs[r] = batch_http_request(t, BATCH_LOOKUP, ws->rows + first, count, auth, &req_nget[r]);
		req_g0[r] = first / LOOKUP_KEYS_PER_GET;
	}
	sent_at = GetCurrentTimestamp();
	http_perform(reqs, nreq, http);
	for (int r = 0; r < nreq; r++)
	{
		RequestLog *log = request_log_new(REQUEST_LOOKUP, sent_at, reqs[r], req_nget[r],
										  Min(LOOKUP_ROWS_PER_REQUEST, ws->n - r * LOOKUP_ROWS_PER_REQUEST));

		for (int k = 0; k < req_nget[r]; k++)
			s->gets[req_g0[r] + k].log_index = list_length(*logs);
		read_batch(s, reqs[r], req_g0[r], req_nget[r], log);
		*logs = lappend(*logs, log);
		pfree(reqs[r]->response.data);
	}
	follow_next_links(s, auth, http, logs);
	return s;
}

static char *
key_of(const char *value)
{
	Datum		d = DirectFunctionCall1Coll(d365inv_invoice_key, DEFAULT_COLLATION_OID,
											CStringGetTextDatum(value));

	return TextDatumGetCString(d);
}

void
lookup_match(LookupState *s, LookupAnswer *answers, char **d365_ids, char **errors, int *log_index)
{
	WorkSet    *ws = s->ws;

	for (int g = 0; g < s->ngets; g++)
	{
		LookupGet  *get = &s->gets[g];
		ListCell   *lc;

		for (int i = get->first; i < get->first + get->count; i++)
		{
			answers[i] = get->failed ? LOOKUP_FAILED : LOOKUP_ABSENT;
			errors[i] = get->error;
			d365_ids[i] = NULL;
			log_index[i] = get->log_index;
		}
		foreach(lc, get->entities)
		{
			ODataEntity *e = lfirst(lc);
			char	   *vk = key_of(e->vendor);
			char	   *ik = key_of(e->invoice);

			for (int i = get->first; i < get->first + get->count; i++)
			{
				if (strcmp(vk, ws->vendor_keys[i]) == 0 && strcmp(ik, ws->invoice_keys[i]) == 0)
				{
					/* found is proof, whatever else went wrong with this GET */
					answers[i] = LOOKUP_FOUND;
					if (d365_ids[i] == NULL && e->id != NULL)
						d365_ids[i] = e->id;
				}
			}
		}
	}
}

bool
lookup_auth_rejected(LookupState *s)
{
	return s->auth_rejected;
}
