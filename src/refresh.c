/*-------------------------------------------------------------------------
 *
 * refresh.c
 *	  d365inv.refresh_remote_keys(target): page through the target's entity
 *	  set (keys and id only; odata_page.c reads each page, as it does for
 *	  the lookups) and remember every key in d365inv.remote_key,
 *	  so that invoices created in D365 by other paths count as known keys
 *	  (and enter the key filter through remote_key's trigger).
 *
 * Runs in the calling backend, inside its transaction, so it is for a
 * superuser at a quiet moment; a NOTICE reports progress every
 * REFRESH_PROGRESS_MS (not per page: 50,000 keys are 500 pages).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "auth.h"
#include "batch_request.h"
#include "d365inv.h"
#include "deliver.h"
#include "odata_page.h"
#include "target.h"

#define REFRESH_PAGE_SIZE 5000
#define REFRESH_MAX_PAGES 100000

/* how often a long refresh says how far it got */
#define REFRESH_PROGRESS_MS 10000

PG_FUNCTION_INFO_V1(d365inv_refresh_remote_keys);

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

/* refresh_remote_keys(target text) -> bigint: keys seen */
Datum
d365inv_refresh_remote_keys(PG_FUNCTION_ARGS)
{
	char	   *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Target	   *t;
	char	   *secret = NULL;
	char	   *auth = NULL;
	HttpSettings http;
	StringInfoData url;
	const char *headers[7];
	int			nh = 0;
	int64		total = 0;
	int			page_no = 0;
	TimestampTz last_progress = GetCurrentTimestamp();
	MemoryContext page_cxt;
	MemoryContext outer;

	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may run refresh_remote_keys()"),
				 errdetail("It reads the target's client secret and sends requests to D365.")));

	http = http_settings_from_gucs();
	SPI_connect();
	outer = CurrentMemoryContext;
	t = target_load(name);
	if (t->service_root == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("d365inv target \"%s\" has no service_root", name)));
	if (t->auth == AUTH_OAUTH2)
	{
		Oid			argtypes[1] = {TEXTOID};
		Datum		args[1] = {CStringGetTextDatum(name)};
		AuthConfig	cfg;
		char		err[512];

		if (SPI_execute_with_args("SELECT client_secret FROM d365inv.target_secret WHERE target = $1",
								  1, argtypes, args, NULL, true, 1) == SPI_OK_SELECT &&
			SPI_processed == 1)
			secret = spi_text_column(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		if (secret == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("d365inv target \"%s\" uses oauth2 but has no client secret", name)));
		cfg.target = t->name;
		cfg.token_url = t->token_url;
		cfg.client_id = t->client_id;
		cfg.client_secret = secret;
		cfg.scope = t->scope;
		auth = auth_header(&cfg, false, &http, err, sizeof(err));
		if (auth == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("d365inv target \"%s\": no access token: %s", name, err)));
	}
	initStringInfo(&url);
	appendStringInfo(&url, "%s%s?$select=%s,%s,%s", t->service_root, t->entity_set,
					 t->vendor_property, t->invoice_property, t->id_property);
	if (t->company)
	{
		appendStringInfo(&url, ",%s&$filter=%s%%20eq%%20", t->company_property, t->company_property);
		append_odata_literal_encoded(&url, t->company);
		appendStringInfoString(&url, "&cross-company=true");
	}
	headers[nh++] = "Accept: application/json";
	headers[nh++] = "OData-Version: 4.0";
	headers[nh++] = "OData-MaxVersion: 4.0";
	headers[nh++] = psprintf("Prefer: odata.maxpagesize=%d", REFRESH_PAGE_SIZE);
	if (auth)
		headers[nh++] = auth;
	headers[nh] = NULL;

	page_cxt = AllocSetContextCreate(CurrentMemoryContext, "d365inv refresh page", ALLOCSET_DEFAULT_SIZES);
	for (char *next = url.data; next != NULL;)
	{
		HttpRequest req;
		HttpRequest *reqs[1] = {&req};
		ODataPage	page;
		ODataPageStatus status;
		ListCell   *lc;
		List	   *vendors = NIL,
				   *invoices = NIL,
				   *ids = NIL;
		char	   *following = NULL;
		MemoryContext old;

		if (++page_no > REFRESH_MAX_PAGES)
			ereport(ERROR, (errmsg("d365inv: more than %d pages; stopped", REFRESH_MAX_PAGES)));
		old = MemoryContextSwitchTo(page_cxt);
		memset(&req, 0, sizeof(req));
		req.method = "GET";
		req.url = next;
		req.headers = headers;
		http_perform(reqs, 1, &http);
		if (req.transport_error)
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("d365inv: reading %s of target \"%s\" failed on page %d: %s",
							t->entity_set, name, page_no, req.error)));
		if (req.status != 200)
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("d365inv: reading %s of target \"%s\" failed on page %d: %s",
							t->entity_set, name, page_no,
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
		following = page.next_link;
		if (vendors != NIL)
			store_page(name, vendors, invoices, ids);
		total += list_length(vendors);
		if (TimestampDifferenceExceeds(last_progress, GetCurrentTimestamp(), REFRESH_PROGRESS_MS))
		{
			ereport(NOTICE,
					(errmsg("refresh_remote_keys(%s): page %d, %lld keys so far", name, page_no, (long long) total)));
			last_progress = GetCurrentTimestamp();
		}

		/* the next URL must survive the page's memory */
		MemoryContextSwitchTo(outer);
		next = following ? pstrdup(following) : NULL;
		MemoryContextSwitchTo(old);
		MemoryContextReset(page_cxt);
		CHECK_FOR_INTERRUPTS();
	}
	/* from now on the key filter may rule keys out for this target */
	{
		Oid			argtypes[1] = {TEXTOID};
		Datum		args[1] = {CStringGetTextDatum(name)};

		if (SPI_execute_with_args("UPDATE d365inv.target SET keys_refreshed_at = now() WHERE name = $1",
								  1, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "d365inv: recording the refresh failed");
	}
	SPI_finish();
	PG_RETURN_INT64(total);
}
