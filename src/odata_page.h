/*-------------------------------------------------------------------------
 *
 * odata_page.h
 *	  One page of an OData collection of invoices, read the one way.
 *
 * This module owns reading a page of the target's entity set (an object
 * with a "value" array and maybe an @odata.nextLink) into (vendor,
 * invoice, id) triples, the text an id sent as a JSON number becomes, and
 * the rule for following @odata.nextLink: resolved against the service
 * root, followed only on its scheme://host[:port] so the token never goes
 * anywhere else.  Both readers use it: the existence lookups (lookup.c,
 * many GETs at once, a bad page fails its GET) and
 * d365inv.refresh_remote_keys() (refresh.c, one page after another, a bad
 * page is an ERROR).  Fetching the pages stays with them.
 *
 * Everything returned is palloc'd in CurrentMemoryContext; the cJSON tree
 * (malloc'd, see d365inv.c) is freed before returning, also after an ERROR.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_ODATA_PAGE_H
#define D365INV_ODATA_PAGE_H

#include <cjson/cJSON.h>

#include "nodes/pg_list.h"

typedef struct ODataEntity
{
	char	   *vendor;
	char	   *invoice;
	char	   *id;				/* NULL when absent or neither string nor
								 * number */
} ODataEntity;

typedef enum ODataPageStatus
{
	ODATA_PAGE_OK,
	ODATA_PAGE_NOT_JSON,		/* body is not JSON */
	ODATA_PAGE_NO_VALUE,		/* JSON, but no "value" array */
	ODATA_PAGE_FOREIGN_LINK		/* entities read, but next_link is on another
								 * origin: not to be followed */
} ODataPageStatus;

typedef struct ODataPage
{
	List	   *entities;		/* ODataEntity *; items without string keys
								 * are skipped */
	char	   *next_link;		/* absolute, NULL on the last page */
} ODataPage;

/*
 * Read one page (body, len).  The properties are the target's
 * vendor_property, invoice_property and id_property.
 */
extern ODataPageStatus odata_read_page(const char *body, size_t len,
									   const char *vendor_property,
									   const char *invoice_property,
									   const char *id_property,
									   const char *service_root,
									   ODataPage *page);

/*
 * An id property's text: a string as is, a number the way the create path
 * writes it (classify.c: integers below 2^53 in digits, others as %.17g),
 * else NULL.
 */
extern char *odata_id_text(const cJSON *item);

/* url is on service_root's scheme://host[:port]: the token may go there */
extern bool same_origin(const char *url, const char *service_root);

/* an @odata.nextLink as an absolute URL, relative ones against service_root */
extern char *resolve_link(const char *link, const char *service_root);

#endif							/* D365INV_ODATA_PAGE_H */
