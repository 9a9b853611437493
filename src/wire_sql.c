/*-------------------------------------------------------------------------
 *
 * wire_sql.c
 *	  SQL entry points to the $batch wire format: build_batch(),
 *	  parse_batch_response() and classify().  They are what the worker uses,
 *	  exposed so that DBAs can debug an exchange and the regression suite
 *	  can replay recorded ones.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <time.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "batch_request.h"
#include "batch_response.h"
#include "classify.h"
#include "target.h"

/* More operations than this in one response is not a $batch we sent */
#define MAX_RESPONSE_PARTS 5000

/* build_batch() takes at most this many invoices: the largest batch_size */
#define MAX_BATCH_INVOICES 1000

/*
 * SPI_connect() switches to a context that SPI_finish() frees; whatever
 * these functions build for their result must live in the caller's context.
 */
static void
spi_connect_keep_context(void)
{
	MemoryContext caller = CurrentMemoryContext;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "d365inv: SPI_connect failed");
	MemoryContextSwitchTo(caller);
}

/* ERROR unless argument n is non-NULL; for the CALLED ON NULL INPUT functions */
static void
require_arg(FunctionCallInfo fcinfo, int n, const char *name)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", name)));
}

PG_FUNCTION_INFO_V1(d365inv_build_batch);
PG_FUNCTION_INFO_V1(d365inv_parse_batch_response);
PG_FUNCTION_INFO_V1(d365inv_classify);

/* build_batch(target text, invoice_ids bigint[], operation text) -> (content_type, body) */
Datum
d365inv_build_batch(PG_FUNCTION_ARGS)
{
	char	   *target_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ArrayType  *ids_array = PG_GETARG_ARRAYTYPE_P(1);
	BatchKind	kind = batch_kind_from_name(text_to_cstring(PG_GETARG_TEXT_PP(2)));
	Datum	   *elems;
	bool	   *nulls;
	int			nids;
	int64	   *ids;
	Target	   *target;
	InvoiceRow *rows;
	BatchRequest req;
	TupleDesc	desc;
	Datum		values[2];
	bool		isnull[2] = {false, false};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "build_batch must return a record");
	if (ARR_NDIM(ids_array) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("invoice_ids must be a one-dimensional array")));
	nids = ArrayGetNItems(ARR_NDIM(ids_array), ARR_DIMS(ids_array));
	if (nids == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a $batch needs at least one invoice id")));
	if (nids > MAX_BATCH_INVOICES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("a $batch holds at most %d invoices, not %d", MAX_BATCH_INVOICES, nids)));
	deconstruct_array(ids_array, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &elems, &nulls, &nids);
	ids = palloc(sizeof(int64) * nids);
	for (int i = 0; i < nids; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("invoice id %d of the array is NULL", i + 1)));
		ids[i] = DatumGetInt64(elems[i]);
	}

	spi_connect_keep_context();
	target = target_load(target_name);
	rows = load_invoice_rows(ids, nids);
	build_batch_request(target, kind, rows, nids, &req);
	SPI_finish();

	values[0] = CStringGetTextDatum(req.content_type);
	values[1] = PointerGetDatum(cstring_to_text_with_len(req.body.data, req.body.len));	/* bytea = varlena */
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, isnull)));
}

static text *
slice_text(BrSlice s)
{
	return cstring_to_text_with_len(s.ptr, (int) s.len);
}

/* A header block as a jsonb object {name: value}; a repeated name keeps its last value */
static Datum
headers_jsonb(BrSlice headers)
{
	JsonbParseState *state = NULL;
	BrHeaderIter it;
	BrSlice		name,
				value;
	JsonbValue *result;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	br_header_iter_init(&it, headers);
	while (br_header_next(&it, &name, &value))
	{
		JsonbValue	k,
					v;

		pg_verifymbstr(name.ptr, name.len, false);
		pg_verifymbstr(value.ptr, value.len, false);
		k.type = jbvString;
		k.val.string.val = (char *) name.ptr;
		k.val.string.len = name.len;
		v.type = jbvString;
		v.val.string.val = (char *) value.ptr;
		v.val.string.len = value.len;
		pushJsonbValue(&state, WJB_KEY, &k);
		pushJsonbValue(&state, WJB_VALUE, &v);
	}
	result = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return JsonbPGetDatum(JsonbValueToJsonb(result));
}

/*
 * parse_batch_response(content_type text, body bytea) -> one row per
 * operation response.  An incomplete or malformed response returns the
 * parts that were complete and raises a WARNING saying what is wrong; a
 * response with no usable boundary or over the size limit is an ERROR.
 */
Datum
d365inv_parse_batch_response(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	text	   *ct = PG_GETARG_TEXT_PP(0);
	bytea	   *body = PG_GETARG_BYTEA_PP(1);
	BatchPart  *parts = palloc(sizeof(BatchPart) * MAX_RESPONSE_PARTS);
	BatchParse	result;

	InitMaterializedSRF(fcinfo, 0);
	br_parse(VARDATA_ANY(ct), VARSIZE_ANY_EXHDR(ct), VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
			 parts, MAX_RESPONSE_PARTS, &result);

	if (result.status == BR_NO_BOUNDARY || result.status == BR_TOO_LARGE)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("not a $batch response: %s", result.error),
				 errdetail("Content-Type: %s", text_to_cstring(ct))));
	if (result.status != BR_OK)
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("$batch response is incomplete: %s", result.error),
				 errdetail("At byte %zu of %u; %d complete operation responses were read.",
						   result.error_offset, (unsigned) VARSIZE_ANY_EXHDR(body), result.nparts)));

	for (int i = 0; i < result.nparts; i++)
	{
		BatchPart  *p = &parts[i];
		Datum		values[7];
		bool		nulls[7] = {0};

		pg_verifymbstr(p->body.ptr, p->body.len, false);
		if (p->content_id.len > 0)
		{
			pg_verifymbstr(p->content_id.ptr, p->content_id.len, false);
			values[0] = PointerGetDatum(slice_text(p->content_id));
		}
		else
			nulls[0] = true;
		values[1] = Int32GetDatum(p->http_status);
		values[2] = headers_jsonb(p->headers);
		values[3] = PointerGetDatum(slice_text(p->body));
		values[4] = BoolGetDatum(p->in_changeset);
		values[5] = Int32GetDatum(p->position);
		values[6] = BoolGetDatum(p->truncated);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_NULL();
}

/* jsonb object {name: value} -> "name: value\r\n" block for the classifier */
static BrSlice
headers_from_jsonb(Jsonb *jb)
{
	StringInfoData buf;
	JsonbIterator *it = JsonbIteratorInit(&jb->root);
	JsonbValue	v;
	JsonbIteratorToken tok;
	BrSlice		s;

	initStringInfo(&buf);
	if (!JB_ROOT_IS_OBJECT(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("headers must be a JSON object of name: value")));
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			appendBinaryStringInfo(&buf, v.val.string.val, v.val.string.len);
		else if (tok == WJB_VALUE)
		{
			appendStringInfoString(&buf, ": ");
			if (v.type == jbvString)
				appendBinaryStringInfo(&buf, v.val.string.val, v.val.string.len);
			appendStringInfoString(&buf, "\r\n");
		}
	}
	s.ptr = buf.data;
	s.len = buf.len;
	return s;
}

static Datum
cstring_or_null(const char *s, bool *isnull)
{
	*isnull = (s[0] == '\0');
	return *isnull ? (Datum) 0 : CStringGetTextDatum(s);
}

/*
 * classify(target text, http_status int, body text, headers jsonb) ->
 * (outcome, d365_id, error_code, error_text, retry_after)
 */
Datum
d365inv_classify(PG_FUNCTION_ARGS)
{
	char	   *target_name;
	int			status;
	text	   *body;
	BrSlice		headers = {"", 0};
	BrSlice		body_slice;
	Target	   *target;
	Classification c;
	TupleDesc	desc;
	Datum		values[5];
	bool		nulls[5] = {0};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "classify must return a record");
	require_arg(fcinfo, 0, "target");
	require_arg(fcinfo, 1, "http_status");
	target_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	status = PG_GETARG_INT32(1);
	body = PG_ARGISNULL(2) ? cstring_to_text("") : PG_GETARG_TEXT_PP(2);
	if (!PG_ARGISNULL(3))
		headers = headers_from_jsonb(PG_GETARG_JSONB_P(3));
	body_slice.ptr = VARDATA_ANY(body);
	body_slice.len = VARSIZE_ANY_EXHDR(body);

	spi_connect_keep_context();
	target = target_load(target_name);
	SPI_finish();

	classify_response(&target->classify, status, headers, body_slice, time(NULL), &c);
	values[0] = CStringGetTextDatum(outcome_name(c.outcome));
	values[1] = cstring_or_null(c.d365_id, &nulls[1]);
	values[2] = cstring_or_null(c.error_code, &nulls[2]);
	values[3] = cstring_or_null(c.error_text, &nulls[3]);
	values[4] = Int32GetDatum(c.retry_after);
	nulls[4] = c.retry_after < 0;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
