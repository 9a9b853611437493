/*-------------------------------------------------------------------------
 *
 * refresh.c
 *	  Reading every key of a target's entity set into d365inv.remote_key:
 *	  the procedure d365inv.refresh_remote_keys_by_page(target), which
 *	  commits after every page and resumes an interrupted pass, and the
 *	  function d365inv.refresh_remote_keys(target), the same pass in the
 *	  caller's one transaction.  Pages hold keys and id only; odata_page.c
 *	  reads each page, as it does for the lookups.  Invoices created in D365
 *	  by other paths so count as known keys (and enter the key filter
 *	  through remote_key's trigger).
 *
 * A pass is the pages from the entity set's first to its last.  Its
 * progress is a row of d365inv.remote_key_refresh: the first page's URL,
 * the page to read next, when the pass began.  Only when the last page is
 * stored does target.keys_refreshed_at move, to when the pass began (a key
 * created in D365 after that may be on a page already read), and the row
 * goes.  So an interrupted pass (cancel, crash, restart, a failed page)
 * never claims "every key": the next call resumes at the page it did not
 * store, or starts over when the pass is older than the key retention (its
 * first pages' keys may be gone) or the target's URL has changed.
 *
 * The function holds one transaction across every page: its uncommitted
 * remote_key rows make the worker's inserts of the same keys wait.  The
 * procedure holds a transaction for one page at a time.
 *
 * A NOTICE reports progress every REFRESH_PROGRESS_MS (not per page:
 * 50,000 keys are 10 pages of 5,000).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "auth.h"
#include "batch_request.h"
#include "d365inv.h"
#include "odata_page.h"
#include "queue.h"
#include "request.h"
#include "target.h"

#define REFRESH_PAGE_SIZE 5000
#define REFRESH_MAX_PAGES 100000

/* how often a long refresh says how far it got */
#define REFRESH_PROGRESS_MS 10000

PG_FUNCTION_INFO_V1(d365inv_refresh_remote_keys);
PG_FUNCTION_INFO_V1(d365inv_refresh_remote_keys_by_page);

/* A pass over the entity set, as d365inv.remote_key_refresh keeps it */
typedef struct RefreshPass
{
	const char *target;
	char	   *first_url;		/* the entity set's first page */
	char	   *next;			/* the page to read next; NULL: all read */
	TimestampTz started_at;
	int			pages;			/* pages stored so far */
	int64		keys;			/* entities stored so far */
} RefreshPass;

static Datum
cstring_array(List *values)
{
	const char **v = palloc(sizeof(char *) * Max(list_length(values), 1));
	int			i = 0;
	ListCell   *lc;

	foreach(lc, values)
		v[i++] = lfirst(lc);
	return sql_text_array(v, i);
}

static void
store_page(const char *target, List *vendors, List *invoices, List *ids)
{
	Oid			argtypes[4] = {TEXTOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
	Datum		args[4];
	int			ret;

	args[0] = CStringGetTextDatum(target);
	args[1] = cstring_array(vendors);
	args[2] = cstring_array(invoices);
	args[3] = cstring_array(ids);
	ret = SPI_execute_with_args(
		"INSERT INTO d365inv.remote_key AS k (target, vendor_key, invoice_key, d365_id, source)"
		" SELECT DISTINCT ON (vk, ik) $1, vk, ik, id, 'refresh'"
		"   FROM (SELECT d365inv.invoice_key(v) AS vk, d365inv.invoice_key(n) AS ik, id"
		"           FROM unnest($2::text[], $3::text[], $4::text[]) AS u(v, n, id)) u"
		"  WHERE vk <> '' AND ik <> ''"
		" ON CONFLICT (target, vendor_key, invoice_key)"
		" DO UPDATE SET seen_at = now(), d365_id = coalesce(excluded.d365_id, k.d365_id)",
		4, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "d365inv: storing remote keys failed: %s", SPI_result_code_string(ret));
}

/*
 * Where the pass goes on: the stored one, unless restart, or it read
 * another URL, or began longer than the key retention ago; else a new pass
 * from the first page.
 */
static void
pass_begin(RefreshPass *pass, bool restart)
{
	Oid			argtypes[3] = {TEXTOID, TEXTOID, INT4OID};
	Datum		args[3];
	int			ret;

	pass->next = pass->first_url;
	pass->started_at = GetCurrentTimestamp();
	pass->pages = 0;
	pass->keys = 0;
	if (restart)
		return;
	args[0] = CStringGetTextDatum(pass->target);
	args[1] = CStringGetTextDatum(pass->first_url);
	args[2] = Int32GetDatum(d365inv_remote_key_retention_s);
	ret = SPI_execute_with_args(
		"SELECT next_link, started_at, pages, keys FROM d365inv.remote_key_refresh"
		" WHERE target = $1 AND first_link = $2"
		"   AND started_at > now() - $3 * interval '1 second'",
		3, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv: reading the refresh's progress failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		pass->next = spi_text_column(tup, desc, 1);
		pass->started_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
		pass->pages = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
		pass->keys = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		ereport(NOTICE,
				(errmsg("refresh_remote_keys(%s): resuming the pass begun at %s after page %d, %lld keys so far",
						pass->target, timestamptz_to_str(pass->started_at), pass->pages,
						(long long) pass->keys)));
	}
}

/*
 * One more page stored: remember where the pass goes on, or, after its
 * last page, that every key was read.
 */
static void
pass_save(const RefreshPass *pass)
{
	Oid			argtypes[6] = {TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, INT4OID, INT8OID};
	Datum		args[6];
	char		nulls[6] = "      ";
	int			ret;

	args[0] = CStringGetTextDatum(pass->target);
	args[1] = CStringGetTextDatum(pass->first_url);
	args[2] = pass->next ? CStringGetTextDatum(pass->next) : (Datum) 0;
	args[3] = TimestampTzGetDatum(pass->started_at);
	args[4] = Int32GetDatum(pass->pages);
	args[5] = Int64GetDatum(pass->keys);
	if (pass->next != NULL)
		ret = SPI_execute_with_args(
			"INSERT INTO d365inv.remote_key_refresh AS r"
			"       (target, first_link, next_link, started_at, pages, keys, updated_at)"
			" VALUES ($1, $2, $3, $4, $5, $6, now())"
			" ON CONFLICT (target) DO UPDATE"
			"   SET first_link = excluded.first_link, next_link = excluded.next_link,"
			"       started_at = excluded.started_at, pages = excluded.pages,"
			"       keys = excluded.keys, updated_at = now()",
			6, argtypes, args, nulls, false, 0);
	else
	{
		/* from now on the key filter may rule keys out for this target */
		nulls[2] = 'n';
		ret = SPI_execute_with_args(
			"WITH done AS (DELETE FROM d365inv.remote_key_refresh WHERE target = $1)"
			" UPDATE d365inv.target SET keys_refreshed_at = greatest(keys_refreshed_at, $4)"
			"  WHERE name = $1",
			6, argtypes, args, nulls, false, 0);
	}
	if (ret != SPI_OK_INSERT && ret != SPI_OK_UPDATE)
		elog(ERROR, "d365inv: recording the refresh's progress failed: %s", SPI_result_code_string(ret));
}

/*
 * Nothing from the caller's search_path, for the rest of this transaction.
 * The function pins it with SET in its definition; a procedure with SET
 * could not commit, so the procedure pins it in every transaction.
 */
static void
pin_search_path(void)
{
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/* "Authorization: Bearer ..." for t, or NULL when it uses none.  Caller has SPI. */
static char *
refresh_auth(const Target *t, const HttpSettings *http)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(t->name)};
	char	   *secret = NULL;
	AuthConfig	cfg;
	char		err[512];
	char	   *auth;

	if (t->auth != AUTH_OAUTH2)
		return NULL;
	if (SPI_execute_with_args("SELECT client_secret FROM d365inv.target_secret WHERE target = $1",
							  1, argtypes, args, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
		secret = spi_text_column(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (secret == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("d365inv target \"%s\" uses oauth2 but has no client secret", t->name)));
	cfg.target = t->name;
	cfg.token_url = t->token_url;
	cfg.client_id = t->client_id;
	cfg.client_secret = secret;
	cfg.scope = t->scope;
	auth = auth_header(&cfg, false, http, err, sizeof(err));
	if (auth == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("d365inv target \"%s\": no access token: %s", t->name, err)));
	return auth;
}

/* The entity set's first page: keys and id only, of the target's company */
static char *
first_page_url(const Target *t)
{
	StringInfoData url;

	initStringInfo(&url);
	appendStringInfo(&url, "%s%s?$select=%s,%s,%s", t->service_root, t->entity_set,
					 t->vendor_property, t->invoice_property, t->id_property);
	if (t->company)
	{
		appendStringInfo(&url, ",%s&$filter=%s%%20eq%%20", t->company_property, t->company_property);
		append_odata_literal_encoded(&url, t->company);
		appendStringInfoString(&url, "&cross-company=true");
	}
	return url.data;
}

/*
 * Read page pass->next of t, store its keys and move pass on (also in the
 * database).  ERROR when the page cannot be read; nothing of it is stored
 * then.
 */
static void
refresh_page(const Target *t, const HttpSettings *http, const char *const *headers,
			 RefreshPass *pass)
{
	HttpRequest req;
	HttpRequest *reqs[1] = {&req};
	ODataPage	page;
	ODataPageStatus status;
	ListCell   *lc;
	List	   *vendors = NIL,
			   *invoices = NIL,
			   *ids = NIL;
	int			page_no = pass->pages + 1;

	if (page_no > REFRESH_MAX_PAGES)
		ereport(ERROR, (errmsg("d365inv: more than %d pages; stopped", REFRESH_MAX_PAGES)));
	memset(&req, 0, sizeof(req));
	req.method = "GET";
	req.url = pass->next;
	req.headers = headers;
	http_perform(reqs, 1, http);
	if (req.transport_error)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("d365inv: reading %s of target \"%s\" failed on page %d: %s",
						t->entity_set, t->name, page_no, req.error)));
	if (req.status != 200)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("d365inv: reading %s of target \"%s\" failed on page %d: %s",
						t->entity_set, t->name, page_no,
						describe_body(req.response.data, req.response.len, req.status))));
	status = odata_read_page(req.response.data, req.response.len, t->vendor_property,
							 t->invoice_property, t->id_property, t->service_root, &page);
	if (status == ODATA_PAGE_NOT_JSON || status == ODATA_PAGE_NO_VALUE)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("d365inv: page %d of %s is not an OData collection", page_no, t->entity_set)));
	if (status == ODATA_PAGE_FOREIGN_LINK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("d365inv: page %d of %s links to another host; not followed", page_no,
						t->entity_set),
				 errdetail("@odata.nextLink: %s", page.next_link)));
	foreach(lc, page.entities)
	{
		ODataEntity *e = lfirst(lc);

		vendors = lappend(vendors, e->vendor);
		invoices = lappend(invoices, e->invoice);
		ids = lappend(ids, e->id);
	}
	if (vendors != NIL)
		store_page(t->name, vendors, invoices, ids);
	pass->pages = page_no;
	pass->keys += list_length(vendors);
	pass->next = page.next_link;
	pass_save(pass);
}

/*
 * One pass (or the rest of one) over target `name`'s entity set; with
 * commit_pages, a transaction per page (the caller's SPI is non-atomic).
 * Returns the entities the pass read.  Caller has SPI connected.
 */
static int64
refresh(const char *name, bool restart, bool commit_pages)
{
	HttpSettings http = http_settings_from_gucs();
	MemoryContext outer = CurrentMemoryContext;
	MemoryContext page_cxt;
	Target	   *t;
	RefreshPass pass;
	const char *headers[6];
	int			nh = 0;
	char	   *auth;
	TimestampTz last_progress = GetCurrentTimestamp();

	pin_search_path();
	t = target_load(name);
	if (t->service_root == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("d365inv target \"%s\" has no service_root", name)));
	auth = refresh_auth(t, &http);
	headers[nh++] = "Accept: application/json";
	headers[nh++] = "OData-Version: 4.0";
	headers[nh++] = "OData-MaxVersion: 4.0";
	headers[nh++] = psprintf("Prefer: odata.maxpagesize=%d", REFRESH_PAGE_SIZE);
	if (auth)
		headers[nh++] = auth;
	headers[nh] = NULL;

	memset(&pass, 0, sizeof(pass));
	pass.target = t->name;
	pass.first_url = first_page_url(t);
	pass_begin(&pass, restart);

	/* what outlives a page (the target, the pass) is in outer, the SPI procedure context */
	page_cxt = AllocSetContextCreate(outer, "d365inv refresh page", ALLOCSET_DEFAULT_SIZES);
	while (pass.next != NULL)
	{
		MemoryContextSwitchTo(page_cxt);
		refresh_page(t, &http, headers, &pass);
		/* the next URL must survive the page's memory */
		MemoryContextSwitchTo(outer);
		if (pass.next != NULL)
			pass.next = pstrdup(pass.next);
		MemoryContextReset(page_cxt);
		if (commit_pages)
		{
			SPI_commit();
			pin_search_path();
		}
		if (TimestampDifferenceExceeds(last_progress, GetCurrentTimestamp(), REFRESH_PROGRESS_MS))
		{
			ereport(NOTICE,
					(errmsg("refresh_remote_keys(%s): page %d, %lld keys so far", name, pass.pages,
							(long long) pass.keys)));
			last_progress = GetCurrentTimestamp();
		}
		CHECK_FOR_INTERRUPTS();
	}
	MemoryContextDelete(page_cxt);
	return pass.keys;
}

static void
require_superuser(const char *what)
{
	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may run %s", what),
				 errdetail("It reads the target's client secret and sends requests to D365.")));
}

/* refresh_remote_keys(target text) -> bigint: entities read, in one transaction */
Datum
d365inv_refresh_remote_keys(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int64		keys;

	require_superuser("refresh_remote_keys()");
	SPI_connect();
	keys = refresh(name, false, false);
	SPI_finish();
	PG_RETURN_INT64(keys);
}

/*
 * PROCEDURE refresh_remote_keys_by_page(target text, restart boolean):
 * a transaction per page; CALLed inside a transaction block it cannot
 * commit, and says so.
 */
Datum
d365inv_refresh_remote_keys_by_page(PG_FUNCTION_ARGS)
{
	bool		atomic = !(fcinfo->context && IsA(fcinfo->context, CallContext) &&
						   !castNode(CallContext, fcinfo->context)->atomic);
	char	   *name;
	bool		restart;
	int64		keys;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("target must not be NULL")));
	require_superuser("refresh_remote_keys_by_page()");
	if (atomic)
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("refresh_remote_keys_by_page() cannot run inside a transaction block"),
				 errdetail("It commits after every page."),
				 errhint("CALL it on its own, or run SELECT d365inv.refresh_remote_keys(target) to read every page in one transaction.")));
	if (SPI_connect_ext(SPI_OPT_NONATOMIC) != SPI_OK_CONNECT)
		elog(ERROR, "d365inv: SPI_connect failed");
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	restart = !PG_ARGISNULL(1) && PG_GETARG_BOOL(1);
	keys = refresh(name, restart, true);
	ereport(NOTICE,
			(errmsg("refresh_remote_keys_by_page(%s): every key read, %lld in this pass", name,
					(long long) keys)));
	SPI_finish();
	PG_RETURN_VOID();
}
