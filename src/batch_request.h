/*-------------------------------------------------------------------------
 *
 * batch_request.h
 *	  Building OData $batch requests: create (POST), lookup (GET with
 *	  $filter) and upsert (PATCH by alternate key) operations.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_BATCH_REQUEST_H
#define D365INV_BATCH_REQUEST_H

#include "lib/stringinfo.h"
#include "target.h"

/* One staged invoice, as text, ready to be put on the wire */
typedef struct InvoiceRow
{
	int64		id;
	char	   *vendor_account;
	char	   *invoice_number;
	char	   *invoice_date;	/* YYYY-MM-DD */
	char	   *due_date;		/* NULL when none */
	char	   *amount;			/* exact decimal text */
	char	   *currency;
	char	   *description;
	char	   *source;
	char	   *payload;		/* JSON object text, NULL when none */
	char	   *entity_id;		/* entity_id_mode 'client': the id to create it with */
} InvoiceRow;

typedef enum BatchKind
{
	BATCH_CREATE,				/* POST entity set */
	BATCH_LOOKUP,				/* GET entity set with $filter on the keys */
	BATCH_UPSERT,				/* PATCH entity(key=..,key=..) */
	BATCH_UPSERT_CREATE_ONLY	/* same, with If-None-Match: * */
} BatchKind;

/* At most this many keys are OR'ed into one lookup GET */
#define LOOKUP_KEYS_PER_GET 20

typedef struct BatchRequest
{
	char	   *content_type;	/* multipart/mixed; boundary=... */
	StringInfoData body;
	int			noperations;
} BatchRequest;

extern BatchKind batch_kind_from_name(const char *name);
extern void build_batch_request(const Target *target, BatchKind kind,
								InvoiceRow *rows, int nrows, BatchRequest *out);
/* Loads the invoices with these ids (caller has SPI connected); ERROR on a missing id */
extern InvoiceRow *load_invoice_rows(const int64 *ids, int nids);
/* OData string literal, quotes doubled, then percent-encoded for a URL */
extern void append_odata_literal_encoded(StringInfo buf, const char *value);

#endif							/* D365INV_BATCH_REQUEST_H */
