/*-------------------------------------------------------------------------
 *
 * odata_page.c
 *	  One page of an OData collection of invoices (see odata_page.h), for
 *	  lookup.c and refresh.c alike.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "classify.h"
#include "odata_page.h"

/* url is on service_root's scheme://host[:port]: the token may go there */
bool
same_origin(const char *url, const char *service_root)
{
	const char *p = strstr(service_root, "://");
	const char *end = p ? strchr(p + 3, '/') : NULL;
	size_t		olen = end ? (size_t) (end - service_root) : strlen(service_root);

	return p != NULL && strncmp(url, service_root, olen) == 0 &&
		(url[olen] == '/' || url[olen] == '\0');
}

/*
 * An @odata.nextLink as an absolute URL.  OData 4 allows it relative to the
 * request (a real server sends "VendorInvoices?$skiptoken=1000"); every
 * page is read from the service root, so that is what it is resolved
 * against.  Whether the result may be followed is same_origin()'s call.
 */
char *
resolve_link(const char *link, const char *service_root)
{
	const char *scheme_end = strstr(service_root, "://");
	const char *path;

	if (pg_strncasecmp(link, "http://", 7) == 0 || pg_strncasecmp(link, "https://", 8) == 0 ||
		scheme_end == NULL)
		return pstrdup(link);
	if (link[0] == '/' && link[1] == '/')
		return psprintf("%.*s%s", (int) (scheme_end - service_root + 1), service_root, link);
	if (link[0] == '/')
	{
		path = strchr(scheme_end + 3, '/');
		return psprintf("%.*s%s", (int) (path ? path - service_root : strlen(service_root)),
						service_root, link);
	}
	return psprintf("%s%s", service_root, link);	/* service_root ends in '/' */
}

char *
odata_id_text(const cJSON *item)
{
	if (cJSON_IsString(item) && item->valuestring != NULL)
		return pstrdup(item->valuestring);
	if (cJSON_IsNumber(item))
	{
		char		num[64];

		classify_json_number(item->valuedouble, num, sizeof(num));
		return pstrdup(num);
	}
	return NULL;
}

ODataPageStatus
odata_read_page(const char *body, size_t len, const char *vendor_property,
				const char *invoice_property, const char *id_property,
				const char *service_root, ODataPage *page)
{
	cJSON	   *volatile root = cJSON_ParseWithLength(body, len);
	volatile ODataPageStatus status = ODATA_PAGE_OK;

	page->entities = NIL;
	page->next_link = NULL;
	if (root == NULL)
		return ODATA_PAGE_NOT_JSON;

	/* cJSON mallocs (see d365inv.c): free the tree even after an ERROR */
	PG_TRY();
	{
		cJSON	   *value = cJSON_GetObjectItemCaseSensitive(root, "value");
		cJSON	   *item;
		cJSON	   *next;

		if (!cJSON_IsArray(value))
			status = ODATA_PAGE_NO_VALUE;
		else
		{
			cJSON_ArrayForEach(item, value)
			{
				cJSON	   *v = cJSON_GetObjectItemCaseSensitive(item, vendor_property);
				cJSON	   *n = cJSON_GetObjectItemCaseSensitive(item, invoice_property);
				ODataEntity *e;

				if (!cJSON_IsString(v) || !cJSON_IsString(n))
					continue;
				e = palloc(sizeof(ODataEntity));
				e->vendor = pstrdup(v->valuestring);
				e->invoice = pstrdup(n->valuestring);
				e->id = odata_id_text(cJSON_GetObjectItemCaseSensitive(item, id_property));
				page->entities = lappend(page->entities, e);
			}
			next = cJSON_GetObjectItemCaseSensitive(root, "@odata.nextLink");
			if (cJSON_IsString(next))
			{
				page->next_link = resolve_link(next->valuestring, service_root);
				if (!same_origin(page->next_link, service_root))
					status = ODATA_PAGE_FOREIGN_LINK;
			}
		}
	}
	PG_FINALLY();
	{
		cJSON_Delete(root);
	}
	PG_END_TRY();
	return status;
}
