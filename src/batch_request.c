/*-------------------------------------------------------------------------
 *
 * batch_request.c
 *	  Building OData 4.0 $batch requests (multipart/mixed, RFC 2046).
 *
 * Every operation is an independent application/http part (no changeset),
 * so one failing invoice does not roll back the others.  One builder makes
 * all three kinds of operation: POST to create, GET with a $filter of up to
 * LOOKUP_KEYS_PER_GET keys to look invoices up, PATCH by alternate key to
 * upsert.  Key values only ever reach a URL as OData string literals
 * (quotes doubled) that are then percent-encoded, so no invoice number can
 * change the meaning of a filter or a key predicate.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <cjson/cJSON.h>

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "port/pg_bswap.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "batch_request.h"

BatchKind
batch_kind_from_name(const char *name)
{
	if (strcmp(name, "create") == 0)
		return BATCH_CREATE;
	if (strcmp(name, "lookup") == 0)
		return BATCH_LOOKUP;
	if (strcmp(name, "upsert") == 0)
		return BATCH_UPSERT;
	if (strcmp(name, "upsert_create_only") == 0)
		return BATCH_UPSERT_CREATE_ONLY;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown batch operation \"%s\"", name),
			 errhint("Use create, lookup, upsert or upsert_create_only.")));
	return BATCH_CREATE;		/* keep compiler quiet */
}

/* RFC 3986 unreserved characters pass; every other byte becomes %XX */
static void
append_percent_encoded(StringInfo buf, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";

	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
	{
		if ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
			(*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_' || *p == '~')
			appendStringInfoChar(buf, (char) *p);
		else
		{
			appendStringInfoChar(buf, '%');
			appendStringInfoChar(buf, hex[*p >> 4]);
			appendStringInfoChar(buf, hex[*p & 15]);
		}
	}
}

/* 'value' as an OData string literal: single quotes doubled */
static void
append_odata_literal(StringInfo buf, const char *value)
{
	appendStringInfoChar(buf, '\'');
	for (const char *p = value; *p; p++)
	{
		if (*p == '\'')
			appendStringInfoChar(buf, '\'');
		appendStringInfoChar(buf, *p);
	}
	appendStringInfoChar(buf, '\'');
}

void
append_odata_literal_encoded(StringInfo buf, const char *value)
{
	StringInfoData literal;

	initStringInfo(&literal);
	append_odata_literal(&literal, value);
	append_percent_encoded(buf, literal.data);
	pfree(literal.data);
}

/* The resource path of the entity set, in the target's url_form */
static void
append_entity_set_url(StringInfo buf, const Target *t)
{
	if (t->url_form == URL_ABSOLUTE_URL)
		appendStringInfoString(buf, t->service_root);
	else if (t->url_form == URL_ABSOLUTE_PATH)
	{
		/* skip scheme://authority of the service root */
		const char *path = strstr(t->service_root, "://");

		path = path ? strchr(path + 3, '/') : NULL;
		appendStringInfoString(buf, path ? path : "/");
	}
	appendStringInfoString(buf, t->entity_set);
}

/* VendorInvoices(dataAreaId='usmf',VendorAccount='V001',InvoiceNumber='INV-1') */
static void
append_key_predicate_url(StringInfo buf, const Target *t, const InvoiceRow *row)
{
	append_entity_set_url(buf, t);
	appendStringInfoChar(buf, '(');
	if (t->company)
	{
		appendStringInfo(buf, "%s=", t->company_property);
		append_odata_literal_encoded(buf, t->company);
		appendStringInfoChar(buf, ',');
	}
	appendStringInfo(buf, "%s=", t->vendor_property);
	append_odata_literal_encoded(buf, row->vendor_account);
	appendStringInfo(buf, ",%s=", t->invoice_property);
	append_odata_literal_encoded(buf, row->invoice_number);
	appendStringInfoChar(buf, ')');
}

/*
 * VendorInvoices?$filter=(VendorAccount eq 'V1' and InvoiceNumber eq 'I1')
 * or (...)&$select=...   The filter is built as text, then percent-encoded
 * whole; literals have their quotes doubled first.
 */
static void
append_lookup_url(StringInfo buf, const Target *t, InvoiceRow *rows, int nrows)
{
	StringInfoData filter;

	initStringInfo(&filter);
	if (t->company)
	{
		appendStringInfo(&filter, "%s eq ", t->company_property);
		append_odata_literal(&filter, t->company);
		appendStringInfoString(&filter, " and (");
	}
	for (int i = 0; i < nrows; i++)
	{
		const char *values[2] = {rows[i].vendor_account, rows[i].invoice_number};
		const char *props[2] = {t->vendor_property, t->invoice_property};

		if (i > 0)
			appendStringInfoString(&filter, " or ");
		appendStringInfoChar(&filter, '(');
		for (int k = 0; k < 2; k++)
		{
			if (k > 0)
				appendStringInfoString(&filter, " and ");
			appendStringInfo(&filter, "%s eq ", props[k]);
			append_odata_literal(&filter, values[k]);
		}
		appendStringInfoChar(&filter, ')');
	}
	if (t->company)
		appendStringInfoChar(&filter, ')');

	append_entity_set_url(buf, t);
	appendStringInfoString(buf, "?$filter=");
	append_percent_encoded(buf, filter.data);
	appendStringInfo(buf, "&$select=%s,%s,%s", t->vendor_property, t->invoice_property,
					 t->id_property);
	if (t->company)
		appendStringInfo(buf, ",%s&cross-company=true", t->company_property);
	pfree(filter.data);
}

static const char *
row_column(const InvoiceRow *row, const PropertyMapping *m)
{
	switch (m->staging)
	{
		case COLUMN_INVOICE_DATE:
			return row->invoice_date;
		case COLUMN_DUE_DATE:
			return row->due_date;
		case COLUMN_AMOUNT:
			return row->amount;
		case COLUMN_CURRENCY:
			return row->currency;
		case COLUMN_DESCRIPTION:
			return row->description;
		case COLUMN_SOURCE:
			return row->source;
		case COLUMN_UNKNOWN:
			break;
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("d365inv target property_map names unknown column \"%s\"", m->column),
			 errhint("Map invoice_date, due_date, amount, currency, description or source.")));
	return NULL;
}

/* One jsonb value as JSON text: numbers with the exact digits numeric holds */
static char *
jsonb_value_text(JsonbValue *v)
{
	StringInfoData buf;

	switch (v->type)
	{
		case jbvBinary:
			return JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
		case jbvString:
			initStringInfo(&buf);
			escape_json(&buf, pnstrdup(v->val.string.val, v->val.string.len));
			return buf.data;
		case jbvBool:
			return v->val.boolean ? "true" : "false";
		case jbvNull:
			return "null";
		default:
			elog(ERROR, "d365inv: unexpected jsonb value type %d", (int) v->type);
	}
	return NULL;
}

/*
 * The payload's properties, added to obj as raw JSON text where no key,
 * company or mapped column has the name.  The payload is read as jsonb, never
 * through cJSON: cJSON keeps numbers as doubles (this is money) and limits
 * nesting, while ingest() promised that whatever it stored can be sent.
 */
static void
cjson_out_of_memory(void)
{
	ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory building invoice JSON")));
}

/*
 * cJSON_Add*ToObject, where a failure (malloc returned NULL) is an ERROR:
 * never an entity sent without one of its properties.
 */
static void
add_string(cJSON *obj, const char *name, const char *value)
{
	if (cJSON_AddStringToObject(obj, name, value) == NULL)
		cjson_out_of_memory();
}

static void
add_raw(cJSON *obj, const char *name, const char *value)
{
	if (cJSON_AddRawToObject(obj, name, value) == NULL)
		cjson_out_of_memory();
}

static void
add_payload_members(cJSON *obj, const Target *t, const InvoiceRow *row)
{
	Jsonb	   *payload = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(row->payload)));
	JsonbIterator *it;
	JsonbIteratorToken tok;
	JsonbValue	v;
	char	   *name = NULL;

	if (!JB_ROOT_IS_OBJECT(payload))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invoice %lld has a payload that is not a JSON object", (long long) row->id)));
	it = JsonbIteratorInit(&payload->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			name = pnstrdup(v.val.string.val, v.val.string.len);
		else if (tok == WJB_VALUE)
		{
			/* keys, company and mapped columns win over the payload */
			if (cJSON_HasObjectItem(obj, name) ||
				strcmp(name, t->vendor_property) == 0 ||
				strcmp(name, t->invoice_property) == 0 ||
				strcmp(name, t->company_property) == 0 ||
				(row->entity_id && strcmp(name, t->id_property) == 0))
				continue;
			add_raw(obj, name, jsonb_value_text(&v));
		}
	}
}

/*
 * The entity JSON: keys and company first (never overridden), then the
 * mapped columns, then the payload's extra properties where they do not
 * collide.  Amounts are written as raw JSON numbers from their exact
 * decimal text, never through a double.
 */
static char *
entity_json(const Target *t, const InvoiceRow *row, bool with_keys)
{
	/* cJSON mallocs (see d365inv.c): the tree is freed on every way out */
	cJSON	   *volatile obj = cJSON_CreateObject();
	char	   *volatile printed = NULL;
	char	   *volatile json = NULL;

	if (obj == NULL)
		cjson_out_of_memory();
	PG_TRY();
	{
		if (with_keys)
		{
			add_string(obj, t->vendor_property, row->vendor_account);
			add_string(obj, t->invoice_property, row->invoice_number);
			if (row->entity_id)
				add_string(obj, t->id_property, row->entity_id);
			if (t->company)
				add_string(obj, t->company_property, t->company);
		}
		for (int i = 0; i < t->nmappings; i++)
		{
			const char *value = row_column(row, &t->mappings[i]);

			if (value == NULL || cJSON_HasObjectItem(obj, t->mappings[i].property))
				continue;
			if (t->mappings[i].staging == COLUMN_AMOUNT)
				add_raw(obj, t->mappings[i].property, value);
			else
				add_string(obj, t->mappings[i].property, value);
		}
		if (row->payload)
			add_payload_members(obj, t, row);
		printed = cJSON_PrintUnformatted(obj);
		if (printed == NULL)
			cjson_out_of_memory();
		json = pstrdup(printed);
	}
	PG_FINALLY();
	{
		if (printed != NULL)
			cJSON_free(printed);
		cJSON_Delete(obj);
	}
	PG_END_TRY();
	return json;
}

static void
begin_part(StringInfo b, const char *boundary, const char *content_id)
{
	appendStringInfo(b, "--%s\r\n"
					 "Content-Type: application/http\r\n"
					 "Content-Transfer-Encoding: binary\r\n"
					 "Content-ID: %s\r\n"
					 "\r\n", boundary, content_id);
}

void
build_batch_request(const Target *t, BatchKind kind, InvoiceRow *rows, int nrows, BatchRequest *out)
{
	uint8		random_bytes[16];
	char		boundary[6 + 32 + 1];
	StringInfo	b = &out->body;

	if (t->service_root == NULL && t->url_form != URL_RELATIVE)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("d365inv target \"%s\" has no service_root", t->name),
				 errhint("A superuser sets it: UPDATE d365inv.target SET service_root = 'https://...' WHERE name = '%s'.", t->name)));

	/* a fresh, unguessable boundary: 128 random bits in hex */
	if (!pg_strong_random(random_bytes, sizeof(random_bytes)))
		elog(ERROR, "could not generate a random $batch boundary");
	strcpy(boundary, "batch_");
	for (int i = 0; i < 16; i++)
		sprintf(boundary + 6 + 2 * i, "%02x", random_bytes[i]);

	out->content_type = psprintf("multipart/mixed; boundary=%s", boundary);
	initStringInfo(b);
	out->noperations = 0;

	if (kind == BATCH_LOOKUP)
	{
		for (int first = 0; first < nrows; first += LOOKUP_KEYS_PER_GET)
		{
			int			n = Min(LOOKUP_KEYS_PER_GET, nrows - first);

			begin_part(b, boundary, psprintf("lookup-%d", out->noperations + 1));
			appendStringInfoString(b, "GET ");
			append_lookup_url(b, t, rows + first, n);
			appendStringInfoString(b, " HTTP/1.1\r\n"
								   "Accept: application/json\r\n"
								   "\r\n\r\n");
			out->noperations++;
		}
	}
	else
	{
		for (int i = 0; i < nrows; i++)
		{
			char	   *json;
			char		content_id[32];

			snprintf(content_id, sizeof(content_id), INT64_FORMAT, rows[i].id);
			begin_part(b, boundary, content_id);
			if (kind == BATCH_CREATE)
			{
				appendStringInfoString(b, "POST ");
				append_entity_set_url(b, t);
			}
			else
			{
				appendStringInfoString(b, "PATCH ");
				append_key_predicate_url(b, t, &rows[i]);
			}
			appendStringInfoString(b, " HTTP/1.1\r\n"
								   "Content-Type: application/json; charset=utf-8\r\n"
								   "Accept: application/json\r\n");
			if (kind == BATCH_UPSERT_CREATE_ONLY)
				appendStringInfoString(b, "If-None-Match: *\r\n");
			json = entity_json(t, &rows[i], kind == BATCH_CREATE);
			appendStringInfo(b, "\r\n%s\r\n", json);
			pfree(json);
			out->noperations++;
		}
	}
	appendStringInfo(b, "--%s--\r\n", boundary);
}

InvoiceRow *
load_invoice_rows(const int64 *ids, int nids)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum	   *elems = palloc(sizeof(Datum) * Max(nids, 1));
	Oid			argtypes[1] = {INT8ARRAYOID};
	Datum		args[1];
	InvoiceRow *rows;
	int			ret;

	for (int i = 0; i < nids; i++)
		elems[i] = Int64GetDatum(ids[i]);
	args[0] = PointerGetDatum(construct_array(elems, nids, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));

	ret = SPI_execute_with_args(
		"SELECT id, vendor_account, invoice_number, to_char(invoice_date, 'YYYY-MM-DD'),"
		"       to_char(due_date, 'YYYY-MM-DD'), amount::text, currency, description, source,"
		"       payload::text, entity_id"
		"  FROM d365inv.invoice i JOIN unnest($1) WITH ORDINALITY AS u(id, n) USING (id)"
		" ORDER BY u.n",
		1, argtypes, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv: reading invoices failed: %s", SPI_result_code_string(ret));
	if (SPI_processed != (uint64) nids)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("%d of %d invoice ids do not exist in d365inv.invoice",
						nids - (int) SPI_processed, nids)));

	MemoryContextSwitchTo(caller);
	rows = palloc0(sizeof(InvoiceRow) * Max(nids, 1));
	for (int i = 0; i < nids; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		rows[i].id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		rows[i].vendor_account = spi_text_column(tup, desc, 2);
		rows[i].invoice_number = spi_text_column(tup, desc, 3);
		rows[i].invoice_date = spi_text_column(tup, desc, 4);
		rows[i].due_date = spi_text_column(tup, desc, 5);
		rows[i].amount = spi_text_column(tup, desc, 6);
		rows[i].currency = spi_text_column(tup, desc, 7);
		rows[i].description = spi_text_column(tup, desc, 8);
		rows[i].source = spi_text_column(tup, desc, 9);
		rows[i].payload = spi_text_column(tup, desc, 10);
		rows[i].entity_id = spi_text_column(tup, desc, 11);
	}
	return rows;
}
