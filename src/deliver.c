/*-------------------------------------------------------------------------
 *
 * deliver.c
 *	  One delivery round for one target: resolve in_doubt rows by lookup,
 *	  claim due rows, send them as concurrent $batch requests, classify
 *	  every answer and record it.
 *
 * The order of events is what makes "never twice, never lost" hold:
 *
 *	 1. claim: due rows become in_flight; COMMIT.
 *	 2. send: no transaction open during network I/O.
 *	 3. record: outcomes, batch_log and the key cache in one short
 *		transaction, guarded by "still in_flight".
 *
 * A crash between 1 and 3 leaves rows in_flight; the worker turns them
 * into in_doubt when it starts, and an in_doubt row is only ever sent again
 * after a lookup has shown that D365 does not have it.  Whenever an answer
 * does not prove what happened (timeout after sending, a cut or unreadable
 * response, a 5xx for the whole batch) the rows go in_doubt too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <time.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "batch_response.h"
#include "classify.h"
#include "d365inv.h"
#include "deliver.h"

/* consecutive 401s after a fresh token before we stop resending for free */
#define MAX_AUTH_RETRIES 2
/* how long batches stay small after D365 refused one as too large (413) */
#define SIZE_CAP_MS (10 * 60 * 1000)

TimestampTz deliver_promoted_at = 0;

static TargetState *target_states = NULL;
static int	ntarget_states = 0;

TargetState *
target_state(const char *name)
{
	for (int i = 0; i < ntarget_states; i++)
		if (strcmp(target_states[i].name, name) == 0)
			return &target_states[i];
	if (target_states == NULL)
		target_states = MemoryContextAllocZero(TopMemoryContext, sizeof(TargetState) * 64);
	else if (ntarget_states % 64 == 0)
		target_states = repalloc(target_states, sizeof(TargetState) * (ntarget_states + 64));
	memset(&target_states[ntarget_states], 0, sizeof(TargetState));
	strlcpy(target_states[ntarget_states].name, name, sizeof(target_states[0].name));
	return &target_states[ntarget_states++];
}

/* ---------------------------------------------------------------------
 * Small helpers shared with lookup.c
 * ---------------------------------------------------------------------
 */

const char *const *
wire_headers(const char *content_type, const char *auth)
{
	const char **h = palloc0(sizeof(char *) * 8);
	int			n = 0;

	if (content_type)
		h[n++] = psprintf("Content-Type: %s", content_type);
	h[n++] = "Accept: multipart/mixed, application/json";
	h[n++] = "OData-Version: 4.0";
	h[n++] = "OData-MaxVersion: 4.0";
	/* independent operations: one failure must not stop the others */
	h[n++] = "Prefer: odata.continue-on-error";
	if (auth)
		h[n++] = auth;
	h[n] = NULL;
	return h;
}

/* The HTTP request carrying one $batch of these rows; *noperations if wanted */
HttpRequest *
batch_http_request(const Target *t, BatchKind kind, InvoiceRow *rows, int nrows,
				   const char *auth, int *noperations)
{
	BatchRequest br;
	HttpRequest *req = palloc0(sizeof(HttpRequest));

	build_batch_request(t, kind, rows, nrows, &br);
	req->method = "POST";
	req->url = psprintf("%s$batch", t->service_root);
	req->headers = wire_headers(br.content_type, auth);
	req->body = br.body.data;
	req->body_len = br.body.len;
	if (noperations)
		*noperations = br.noperations;
	return req;
}

RequestLog *
request_log_new(const char *kind, TimestampTz sent_at, const HttpRequest *req, int operations,
				int invoices)
{
	RequestLog *log = palloc0(sizeof(RequestLog));

	log->kind = kind;
	log->duration_ms = req->elapsed_ms;
	log->started_at = sent_at;
	log->http_status = req->status;
	log->operations = operations;
	log->invoices = invoices;
	log->retry_after = -1;
	if (req->transport_error)
		log->error = pstrdup(req->error);
	return log;
}

/* "HTTP 503: <OData message or the start of the body>" */
char *
describe_body(const char *body, size_t len, long status)
{
	char		code[128];
	char		message[512];

	if (odata_error_extract(body, len, code, sizeof(code), message, sizeof(message)))
		return psprintf("HTTP %ld: %s%s%s%s", status, message,
						code[0] ? " (" : "", code, code[0] ? ")" : "");
	else
	{
		StringInfoData s;
		size_t		n = Min(len, 200);

		initStringInfo(&s);
		appendStringInfo(&s, "HTTP %ld", status);
		if (n > 0)
		{
			appendStringInfoString(&s, ": ");
			for (size_t i = 0; i < n; i++)
			{
				unsigned char c = (unsigned char) body[i];

				appendStringInfoChar(&s, (c < 0x20 || c == 0x7f || c >= 0x80) ? ' ' : (char) c);
			}
		}
		return s.data;
	}
}

/* ---------------------------------------------------------------------
 * Decisions for one row
 * ---------------------------------------------------------------------
 */

static void
set_result(RowResult *r, const char *status, bool counted, int delay_ms,
		   int http_status, const char *error)
{
	r->status = status;
	r->counted = counted;
	r->delay_ms = delay_ms;
	r->http_status = http_status;
	r->error = error;
}

/*
 * One jitter factor per request, not per row: the rows of a batch that
 * failed together come due together and go out again as one batch.
 */
static double batch_jitter = 1.0;

static void
new_batch_jitter(void)
{
	batch_jitter = 0.8 + 0.4 * pg_prng_double(&pg_global_prng_state);
}

/*
 * Exponential backoff with jitter; a longer Retry-After wins, up to
 * d365inv.retry_max_delay (the parser already cut it to a day).
 */
static int
retry_delay_ms(int attempts, int retry_after_s)
{
	double		delay = (double) d365inv_retry_base_ms * pow(2.0, Max(attempts - 1, 0));

	delay *= batch_jitter;
	delay = Min(delay, (double) d365inv_retry_max_ms);
	if (retry_after_s >= 0 && (double) retry_after_s * 1000.0 > delay)
		delay = Min((double) retry_after_s * 1000.0, (double) d365inv_retry_max_ms);
	return (int) delay;
}

/* A Retry-After the worker will not honour in full: say so once per answer */
static void
log_long_retry_after(const Target *t, int retry_after_s, bool capped)
{
	if (capped || (double) retry_after_s * 1000.0 > (double) d365inv_retry_max_ms)
		ereport(LOG,
				(errmsg("d365inv target \"%s\": D365 asked to wait %s%d s (Retry-After); waiting at most d365inv.retry_max_delay = %d s",
						t->name, capped ? "more than " : "", retry_after_s, d365inv_retry_max_ms / 1000)));
}

/* A transient failure of a send: retry later, or review when out of retries. */
static void
retry_or_review(RowResult *r, int attempts, int retry_after_s, int http_status, const char *error)
{
	int			now_attempts = attempts + 1;

	if (now_attempts > d365inv_max_retries)
		set_result(r, "review", true, -1, http_status,
				   psprintf("gave up after %d attempts: %s", now_attempts, error));
	else
		set_result(r, "retry", true, retry_delay_ms(now_attempts, retry_after_s),
				   http_status, error);
}

static void
in_doubt(RowResult *r, int http_status, const char *error)
{
	set_result(r, "in_doubt", true, d365inv_in_doubt_delay_ms, http_status, error);
}

/* Not processed by D365: send again without counting an attempt. */
static void
unanswered(RowResult *r, int http_status, const char *error)
{
	set_result(r, "pending", false, -1, http_status, error);
}

/*
 * Throttled (429): D365's service protection, not a failure of the
 * invoice.  Sent again once the wait D365 asked for is over, without
 * counting an attempt; the app user waits as a whole (app_user.c).
 */
static void
throttled(RowResult *r, int retry_after_s, const char *error)
{
	int			delay = retry_after_s >= 0 ? Min(retry_after_s * 1000, d365inv_retry_max_ms) : 1000;

	set_result(r, "pending", false, delay, 429,
			   psprintf("throttled by D365, sent again after the wait it asked for (not counted as an attempt): %s",
						error));
}

/*
 * D365 has an invoice with this row's keys and id found_id (may be NULL):
 * settle the row.  With client ids we can tell whose it is: our id means
 * we made it (a late or repeated create of ours), another id means someone
 * else did.  Without, a row whose fate was unknown counts as ours
 * (created) and a row never sent as someone else's (duplicate).
 */
static void
settle_found(const Target *t, RowResult *r, const InvoiceRow *row, const char *found_id,
			 bool sent_before, const char *settled_by)
{
	bool		ours;

	if (t->client_ids && row->entity_id != NULL && found_id != NULL)
		ours = pg_strcasecmp(found_id, row->entity_id) == 0;
	else
		ours = sent_before;
	if (ours)
		set_result(r, "created", false, -1, 0, NULL);
	else if (t->client_ids && found_id != NULL)
		set_result(r, "duplicate", false, -1, 0,
				   psprintf("already in D365 with another id (%s): created by someone else", found_id));
	else
		set_result(r, "duplicate", false, -1, 0, psprintf("already in D365 (found by %s)", settled_by));
	r->d365_id = found_id;
	r->settled_by = settled_by;
}

static void
count_outcome(RequestLog *log, const RowResult *r)
{
	if (strcmp(r->status, "created") == 0)
		log->created++;
	else if (strcmp(r->status, "duplicate") == 0)
		log->duplicates++;
	else if (strcmp(r->status, "retry") == 0)
		log->retries++;
	else if (strcmp(r->status, "review") == 0)
		log->reviews++;
	else if (strcmp(r->status, "in_doubt") == 0)
		log->in_doubt++;
	else if (strcmp(r->status, "pending") == 0)
		log->unanswered++;
	if (r->error && log->error == NULL && strcmp(r->status, "duplicate") != 0)
		log->error = r->error;
}

/* ---------------------------------------------------------------------
 * SQL: read and write the queue
 * ---------------------------------------------------------------------
 */

static Datum
int8_array(const int64 *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(v[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

static Datum
int4_array(const int *v, const bool *nulls, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
		d[i] = Int32GetDatum(v[i]);
	return PointerGetDatum(construct_md_array(d, (bool *) nulls, 1, dims, lbs,
											  INT4OID, 4, true, TYPALIGN_INT));
}

Datum
sql_text_array(const char *const *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
	{
		nulls[i] = v[i] == NULL;
		d[i] = nulls[i] ? (Datum) 0 : CStringGetTextDatum(v[i]);
	}
	return PointerGetDatum(construct_md_array(d, nulls, 1, dims, lbs,
											  TEXTOID, -1, false, TYPALIGN_INT));
}

/* Append the rows of the last SPI result (columns as in CLAIM_SQL) to ws */
static void
append_rows(WorkSet *ws, int capacity)
{
	if (ws->rows == NULL)
	{
		ws->rows = palloc0(sizeof(InvoiceRow) * Max(capacity, 1));
		ws->attempts = palloc0(sizeof(int) * Max(capacity, 1));
		ws->vendor_keys = palloc0(sizeof(char *) * Max(capacity, 1));
		ws->invoice_keys = palloc0(sizeof(char *) * Max(capacity, 1));
		ws->results = palloc0(sizeof(RowResult) * Max(capacity, 1));
		ws->known = palloc0(sizeof(bool) * Max(capacity, 1));
		ws->known_ids = palloc0(sizeof(char *) * Max(capacity, 1));
		ws->fences = palloc0(sizeof(TimestampTz) * Max(capacity, 1));
	}
	for (uint64 k = 0; k < SPI_processed && ws->n < capacity; k++)
	{
		HeapTuple	tup = SPI_tuptable->vals[k];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		Datum		d;
		int			i = ws->n++;
		InvoiceRow *row = &ws->rows[i];

		row->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		ws->attempts[i] = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		row->vendor_account = spi_text_column(tup, desc, 3);
		row->invoice_number = spi_text_column(tup, desc, 4);
		row->invoice_date = spi_text_column(tup, desc, 5);
		row->due_date = spi_text_column(tup, desc, 6);
		row->amount = spi_text_column(tup, desc, 7);
		row->currency = spi_text_column(tup, desc, 8);
		row->description = spi_text_column(tup, desc, 9);
		row->source = spi_text_column(tup, desc, 10);
		row->payload = spi_text_column(tup, desc, 11);
		ws->vendor_keys[i] = spi_text_column(tup, desc, 12);
		ws->invoice_keys[i] = spi_text_column(tup, desc, 13);
		ws->known[i] = DatumGetBool(SPI_getbinval(tup, desc, 14, &isnull));
		ws->known_ids[i] = spi_text_column(tup, desc, 15);
		row->entity_id = spi_text_column(tup, desc, 16);
		d = SPI_getbinval(tup, desc, 17, &isnull);
		ws->fences[i] = isnull ? 0 : DatumGetTimestampTz(d);
		ws->results[i].log_index = -1;
		ws->results[i].delay_ms = -1;
	}
}

/* $4..$6: entity_id_mode = 'client', entity_id_form, entity_id_length */
#define CLAIM_SQL(which) \
	"UPDATE d365inv.invoice i SET status = 'in_flight', next_attempt_at = NULL, updated_at = now()," \
	"       entity_id = CASE WHEN $4 THEN coalesce(i.entity_id," \
	"                   d365inv.entity_id(i.target, i.vendor_key, i.invoice_key, $5, $6)) ELSE i.entity_id END" \
	"  FROM (SELECT due.id, k.target IS NOT NULL AS known, k.d365_id AS known_id" \
	"          FROM (SELECT id, target, vendor_key, invoice_key FROM d365inv.invoice" \
	"                 WHERE target = $1 AND status < 'created' AND " which \
	"                 LIMIT $2 FOR UPDATE SKIP LOCKED) due" \
	"          LEFT JOIN d365inv.remote_key k" \
	"            ON k.target = due.target AND k.vendor_key = due.vendor_key" \
	"           AND k.invoice_key = due.invoice_key) c" \
	" WHERE i.id = c.id" \
	" RETURNING i.id, i.attempts, i.vendor_account, i.invoice_number," \
	"           to_char(i.invoice_date, 'YYYY-MM-DD'), to_char(i.due_date, 'YYYY-MM-DD')," \
	"           i.amount::text, i.currency, i.description, i.source, i.payload::text," \
	"           i.vendor_key, i.invoice_key, c.known, c.known_id, i.entity_id, i.resend_fence"

/*
 * Claim up to `limit` due rows of the target (they become in_flight): new
 * rows first, in id order, then retries whose time has come.  New rows are
 * read from *cursor on (the highest id claimed so far, 0 = from the start)
 * so that a long queue does not rescan the index entries of rows settled
 * since, which only vacuum removes; callers reset it every round so that a
 * row put back with a lower id is found again.  Result in `into`.
 */
static WorkSet *
claim_rows(const Target *t, int limit, int64 *cursor, MemoryContext into)
{
	static const char *fresh_sql = CLAIM_SQL(
		"status = 'pending' AND next_attempt_at IS NULL AND id > $3"
		" ORDER BY next_attempt_at NULLS FIRST, id");
	static const char *due_sql = CLAIM_SQL(
		"status IN ('pending', 'retry') AND next_attempt_at <= now()"
		" ORDER BY next_attempt_at, id");
	Oid			argtypes[6] = {TEXTOID, INT4OID, INT8OID, BOOLOID, TEXTOID, INT4OID};
	Datum		args[6];
	WorkSet    *ws;
	MemoryContext old;
	int			ret;

	old = MemoryContextSwitchTo(into);
	ws = palloc0(sizeof(WorkSet));
	MemoryContextSwitchTo(old);

	args[0] = CStringGetTextDatum(t->name);
	args[1] = Int32GetDatum(limit);
	args[2] = Int64GetDatum(*cursor);
	args[3] = BoolGetDatum(t->client_ids);
	args[4] = CStringGetTextDatum(t->entity_id_form == ENTITY_ID_GUID ? "guid" : "string");
	args[5] = Int32GetDatum(t->entity_id_length);
	ret = SPI_execute_with_args(fresh_sql, 6, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "d365inv worker: claiming invoices failed: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(into);
	append_rows(ws, limit);
	MemoryContextSwitchTo(old);
	for (int i = 0; i < ws->n; i++)
		*cursor = Max(*cursor, ws->rows[i].id);

	if (ws->n < limit)
	{
		args[1] = Int32GetDatum(limit - ws->n);
		ret = SPI_execute_with_args(due_sql, 6, argtypes, args, NULL, false, 0);
		if (ret != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "d365inv worker: claiming invoices failed: %s", SPI_result_code_string(ret));
		old = MemoryContextSwitchTo(into);
		append_rows(ws, limit);
		MemoryContextSwitchTo(old);
	}
	return ws;
}

/* in_doubt rows of the target that are due, at most `limit`.  Result in `into`. */
static WorkSet *
select_in_doubt(const Target *t, int limit, MemoryContext into)
{
	static const char *in_doubt_sql =
		"SELECT i.id, i.attempts, i.vendor_account, i.invoice_number,"
		"       to_char(i.invoice_date, 'YYYY-MM-DD'), to_char(i.due_date, 'YYYY-MM-DD'),"
		"       i.amount::text, i.currency, i.description, i.source, i.payload::text,"
		"       i.vendor_key, i.invoice_key, false, NULL::text, i.entity_id, i.resend_fence"
		"  FROM d365inv.invoice i"
		" WHERE target = $1 AND status = 'in_doubt'"
		"   AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
		" ORDER BY next_attempt_at NULLS FIRST, id LIMIT $2";
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	Datum		args[2] = {CStringGetTextDatum(t->name), Int32GetDatum(limit)};
	int			ret;
	WorkSet    *ws;
	MemoryContext old;

	ret = SPI_execute_with_args(in_doubt_sql, 2, argtypes, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: selecting invoices failed: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(into);
	ws = palloc0(sizeof(WorkSet));
	append_rows(ws, (int) SPI_processed);
	MemoryContextSwitchTo(old);
	return ws;
}

static int64
insert_request_log(const Target *t, const RequestLog *log)
{
	Oid			argtypes[18] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, FLOAT8OID, INT4OID, INT4OID,
		INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, BOOLOID,
	INT4OID, INT4OID, TEXTOID};
	Datum		args[18];
	char		nulls[18];
	bool		isnull;
	int			ret;

	memset(nulls, ' ', sizeof(nulls));
	args[0] = CStringGetTextDatum(t->name);
	args[1] = CStringGetTextDatum(log->kind);
	args[2] = TimestampTzGetDatum(log->started_at);
	args[3] = Float8GetDatum(log->duration_ms);
	args[4] = Int32GetDatum((int32) log->http_status);
	if (log->http_status == 0)
		nulls[4] = 'n';
	args[5] = Int32GetDatum(log->operations);
	args[6] = Int32GetDatum(log->invoices);
	args[7] = Int32GetDatum(log->created);
	args[8] = Int32GetDatum(log->duplicates);
	args[9] = Int32GetDatum(log->retries);
	args[10] = Int32GetDatum(log->reviews);
	args[11] = Int32GetDatum(log->in_doubt);
	args[12] = Int32GetDatum(log->unanswered);
	args[13] = Int32GetDatum(log->not_found);
	args[14] = BoolGetDatum(log->throttled);
	args[15] = Int32GetDatum(log->retry_after);
	if (log->retry_after < 0)
		nulls[15] = 'n';
	args[16] = Int32GetDatum(log->batch_size > 0 ? log->batch_size : t->batch_size);
	args[17] = log->error ? CStringGetTextDatum(log->error) : (Datum) 0;
	if (log->error == NULL)
		nulls[17] = 'n';

	ret = SPI_execute_with_args(
		"INSERT INTO d365inv.batch_log (target, kind, started_at, duration_ms, http_status,"
		"       operations, invoices, created, duplicates, retries, reviews, in_doubt,"
		"       unanswered, not_found, throttled, retry_after, batch_size, error)"
		" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
		" RETURNING id",
		18, argtypes, args, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "d365inv worker: writing batch_log failed: %s", SPI_result_code_string(ret));
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * A $batch found invoices D365 already has: say which (the first few) and
 * where to read the rest.
 */
static void
warn_duplicates(const Target *t, WorkSet *ws, List *logs, const int64 *log_ids)
{
	for (int k = 0; k < list_length(logs); k++)
	{
		RequestLog *log = list_nth(logs, k);
		StringInfoData names;
		int			named = 0;

		if (log->duplicates == 0 || strcmp(log->kind, "lookup") == 0)
			continue;
		initStringInfo(&names);
		for (int i = 0; i < ws->n && named < 3; i++)
		{
			RowResult  *r = &ws->results[i];

			if (r->log_index != k || r->status == NULL || strcmp(r->status, "duplicate") != 0)
				continue;
			appendStringInfo(&names, "%s%s / %s (invoice %lld)", named > 0 ? ", " : "",
							 ws->rows[i].vendor_account, ws->rows[i].invoice_number,
							 (long long) ws->rows[i].id);
			named++;
		}
		ereport(WARNING,
				(errmsg("d365inv target \"%s\": %d of %d invoices in $batch %lld already exist in D365: %s%s",
						t->name, log->duplicates, log->invoices, (long long) log_ids[k], names.data,
						log->duplicates > named ? ", ..." : ""),
				 errdetail("They are recorded as duplicate and not sent again."),
				 errhint("SELECT * FROM d365inv.invoice WHERE batch_id = %lld AND status = 'duplicate';",
						 (long long) log_ids[k])));
	}
}

/*
 * Write every decided row of ws back, if it is still in status `from`;
 * log the requests; remember keys D365 now has.  Caller has a transaction
 * and SPI.
 */
static void
record_results(const Target *t, TargetState *ts, WorkSet *ws, const char *from, List *logs)
{
	int			n = ws->n;
	int64	   *ids = palloc(sizeof(int64) * Max(n, 1));
	const char **status = palloc(sizeof(char *) * Max(n, 1));
	int		   *counted = palloc(sizeof(int) * Max(n, 1));
	int		   *delay = palloc(sizeof(int) * Max(n, 1));
	bool	   *delay_null = palloc(sizeof(bool) * Max(n, 1));
	int		   *http_status = palloc(sizeof(int) * Max(n, 1));
	bool	   *http_null = palloc(sizeof(bool) * Max(n, 1));
	const char **error = palloc(sizeof(char *) * Max(n, 1));
	const char **d365_id = palloc(sizeof(char *) * Max(n, 1));
	const char **settled_by = palloc(sizeof(char *) * Max(n, 1));
	int64	   *batch_id = palloc(sizeof(int64) * Max(n, 1));
	int64	   *log_ids = palloc(sizeof(int64) * Max(list_length(logs), 1));
	int			m = 0;
	int			nlogs = 0;
	ListCell   *lc;
	Oid			argtypes[12] = {INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID, INT4ARRAYOID,
		INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID, TEXTOID, TEXTOID,
	INT4OID};
	Datum		args[12];
	int			ret;

	foreach(lc, logs)
		log_ids[nlogs++] = insert_request_log(t, (RequestLog *) lfirst(lc));
	warn_duplicates(t, ws, logs, log_ids);

	for (int i = 0; i < n; i++)
	{
		RowResult  *r = &ws->results[i];

		if (r->status == NULL)
			continue;
		ids[m] = ws->rows[i].id;
		status[m] = r->status;
		counted[m] = r->counted ? 1 : 0;
		delay[m] = r->delay_ms;
		delay_null[m] = r->delay_ms < 0;
		http_status[m] = r->http_status;
		http_null[m] = r->http_status == 0;
		error[m] = r->error;
		d365_id[m] = r->d365_id;
		settled_by[m] = r->settled_by;
		batch_id[m] = r->log_index >= 0 ? log_ids[r->log_index] : 0;
		if (strcmp(r->status, "created") == 0 || strcmp(r->status, "duplicate") == 0 ||
			strcmp(r->status, "review") == 0)
			ts->progress_at = GetCurrentTimestamp();
		m++;
	}
	if (m == 0)
		return;

	args[0] = int8_array(ids, m);
	args[1] = sql_text_array(status, m);
	args[2] = int4_array(counted, NULL, m);
	args[3] = int4_array(delay, delay_null, m);
	args[4] = int4_array(http_status, http_null, m);
	args[5] = sql_text_array(error, m);
	args[6] = sql_text_array(d365_id, m);
	args[7] = sql_text_array(settled_by, m);
	args[8] = int8_array(batch_id, m);
	args[9] = CStringGetTextDatum(from);
	args[10] = CStringGetTextDatum(t->name);
	args[11] = Int32GetDatum(d365inv_server_request_lifetime_ms);

	ret = SPI_execute_with_args(
		"WITH u AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::int[], $5::int[],"
		"                                $6::text[], $7::text[], $8::text[], $9::bigint[])"
		"             AS u(id, status, counted, delay_ms, http_status, error, d365_id, settled_by, batch_id)),"
		" changed AS ("
		"  UPDATE d365inv.invoice i"
		"     SET status = u.status::d365inv.invoice_status,"
		"         attempts = i.attempts + u.counted,"
		"         next_attempt_at = now() + u.delay_ms * interval '1 millisecond',"
		"         last_http_status = u.http_status,"
		"         last_error = u.error,"
		"         d365_id = coalesce(u.d365_id, i.d365_id),"
		"         settled_by = u.settled_by,"
		"         batch_id = coalesce(nullif(u.batch_id, 0), i.batch_id),"
		"         updated_at = now(),"
		/* a send given up on may still commit until the fence (see resolve_in_doubt) */
		"         resend_fence = CASE WHEN u.status = 'in_doubt' AND i.status = 'in_flight'"
		"                             THEN now() + $12 * interval '1 millisecond' ELSE i.resend_fence END,"
		"         settled_at = CASE WHEN u.status IN ('created', 'duplicate', 'review') THEN now() END"
		"    FROM u"
		"   WHERE i.id = u.id AND i.status = $10::d365inv.invoice_status"
		"  RETURNING i.target, i.vendor_key, i.invoice_key, i.d365_id, i.status, i.settled_by)"
		" INSERT INTO d365inv.remote_key AS k (target, vendor_key, invoice_key, d365_id, source)"
		" SELECT target, vendor_key, invoice_key, d365_id,"
		"        CASE WHEN status = 'created' AND settled_by = 'response' THEN 'created' ELSE settled_by END"
		"   FROM changed WHERE status IN ('created', 'duplicate')"
		" ON CONFLICT (target, vendor_key, invoice_key)"
		" DO UPDATE SET d365_id = coalesce(excluded.d365_id, k.d365_id), seen_at = now()",
		12, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "d365inv worker: recording outcomes failed: %s", SPI_result_code_string(ret));
}

/* Earliest time this target has work again (retry or in_doubt rows). */
static TimestampTz
next_due_time(const Target *t)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(t->name)};
	bool		isnull;
	Datum		d;
	int			ret;

	ret = SPI_execute_with_args(
		"SELECT next_attempt_at FROM d365inv.invoice"
		" WHERE target = $1 AND status < 'created' AND next_attempt_at IS NOT NULL"
		" ORDER BY next_attempt_at LIMIT 1",
		1, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv worker: reading the next due time failed");
	if (SPI_processed == 0)
		return DT_NOEND;
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return DatumGetTimestampTz(d);
}

/* the memory context begin_tx() was called in, restored by commit_tx() */
static MemoryContext tx_caller_context = NULL;

static void
begin_tx(const char *activity)
{
	tx_caller_context = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_connect();
	pgstat_report_activity(STATE_RUNNING, activity);
}

static void
commit_tx(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	/* a background worker flushes its own table statistics (autovacuum reads them) */
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	/*
	 * Back to the caller's context (the round's): the commit leaves
	 * TopMemoryContext current, and whatever a caller allocated there next
	 * would live as long as the worker.
	 */
	MemoryContextSwitchTo(tx_caller_context);
}

/* ---------------------------------------------------------------------
 * Reading one $batch answer
 * ---------------------------------------------------------------------
 */

static int
find_row(const WorkSet *ws, int first, int count, BrSlice content_id)
{
	char		buf[32];
	int64		id;
	char	   *end;

	if (content_id.len == 0 || content_id.len >= sizeof(buf))
		return -1;
	memcpy(buf, content_id.ptr, content_id.len);
	buf[content_id.len] = '\0';
	errno = 0;
	id = strtoi64(buf, &end, 10);
	if (errno != 0 || *end != '\0')
		return -1;
	for (int i = first; i < first + count; i++)
		if (ws->rows[i].id == id)
			return i;
	return -1;
}

/* The classifier's error text, with D365's error code when it has one */
static char *
error_with_code(const Classification *c)
{
	if (c->error_code[0] == '\0' || strstr(c->error_text, c->error_code) != NULL)
		return pstrdup(c->error_text);
	return psprintf("%s (%s)", c->error_text, c->error_code);
}

/* Outcome of one operation response for row i */
static void
decide_part(const Target *t, AppUser *u, WorkSet *ws, int i, const BatchPart *part,
			RequestLog *log)
{
	RowResult  *r = &ws->results[i];
	Classification c;

	if (part->truncated || part->http_status == 0)
	{
		in_doubt(r, part->http_status, "the answer for this invoice was cut off or unreadable");
		return;
	}
	classify_response(&t->classify, part->http_status, part->headers, part->body, time(NULL), &c);
	if (part->http_status == 429)
		log->throttled = true;
	if (c.retry_after >= 0)
	{
		if (c.retry_after > log->retry_after)
			log_long_retry_after(t, c.retry_after, c.retry_after_capped);
		log->retry_after = Max(log->retry_after, c.retry_after);
	}

	switch (c.outcome)
	{
		case OUTCOME_CREATED:
			set_result(r, "created", true, -1, part->http_status, NULL);
			r->d365_id = c.d365_id[0] ? pstrdup(c.d365_id) : NULL;
			r->settled_by = "response";
			break;
		case OUTCOME_DUPLICATE:
			if (t->client_ids && ws->rows[i].entity_id != NULL)
			{
				/* ours (a late original, a resend) or someone else's: a lookup tells */
				set_result(r, "in_doubt", true, 0, part->http_status,
						   psprintf("D365 has it already (%s): looking up whose it is", error_with_code(&c)));
				break;
			}
			set_result(r, "duplicate", true, -1, part->http_status, error_with_code(&c));
			r->settled_by = "response";
			break;
		case OUTCOME_RETRY:
			if (part->http_status == 429)
				throttled(r, c.retry_after, error_with_code(&c));
			else
				retry_or_review(r, ws->attempts[i], c.retry_after, part->http_status, error_with_code(&c));
			break;
		case OUTCOME_REVIEW:
			set_result(r, "review", true, -1, part->http_status, error_with_code(&c));
			break;
		case OUTCOME_AUTH:
			app_user_auth_refused(u);
			if (u->auth_rejections >= MAX_AUTH_RETRIES)
			{
				snprintf(u->auth_problem, sizeof(u->auth_problem),
						 "D365 refused a fresh token: %s", c.error_text);
				retry_or_review(r, ws->attempts[i], -1, part->http_status, pstrdup(c.error_text));
			}
			else
				unanswered(r, part->http_status, "token refused; sending again with a new one");
			break;
	}
}

/* Outcomes for rows [first, first + count) from their $batch request */
static void
decide_batch(const Target *t, TargetState *ts, AppUser *u, WorkSet *ws, int first, int count,
			 HttpRequest *req, RequestLog *log)
{
	int			status = (int) req->status;
	const char *ct = req->content_type;
	BatchPart  *parts;
	BatchParse	parse;
	int		   *part_of;
	bool		stray = false;
	bool		positional;

	new_batch_jitter();
	if (req->transport_error)
	{
		for (int i = first; i < first + count; i++)
		{
			if (req->maybe_sent)
				in_doubt(&ws->results[i], 0, psprintf("no complete answer: %s", req->error));
			else
				retry_or_review(&ws->results[i], ws->attempts[i], -1, 0,
								psprintf("not sent: %s", req->error));
		}
		return;
	}

	if (status == 429)
		log->throttled = true;
	if (req->retry_after)
	{
		bool		capped = false;

		log->retry_after = parse_retry_after_capped(req->retry_after, strlen(req->retry_after),
													time(NULL), &capped);
		if (log->retry_after >= 0)
			log_long_retry_after(t, log->retry_after, capped);
	}

	if (status == 401)
	{
		char	   *why = describe_body(req->response.data, req->response.len, status);

		app_user_auth_refused(u);
		if (u->auth_rejections >= MAX_AUTH_RETRIES)
			snprintf(u->auth_problem, sizeof(u->auth_problem), "D365 refused a fresh token: %s", why);
		for (int i = first; i < first + count; i++)
		{
			if (u->auth_rejections >= MAX_AUTH_RETRIES)
				retry_or_review(&ws->results[i], ws->attempts[i], -1, status, why);
			else
				unanswered(&ws->results[i], status, "token refused; sending again with a new one");
		}
		log->error = why;
		return;
	}

	if (status == 413)
	{
		/*
		 * Too large: D365 processed none of it.  Send the rows again, not
		 * counted, in batches half this size; one invoice too large on its
		 * own needs a person.
		 */
		char	   *why = describe_body(req->response.data, req->response.len, status);

		log->error = why;
		ts->size_cap = ts->size_cap > 0 ? Min(ts->size_cap, Max(count / 2, 1)) : Max(count / 2, 1);
		ts->size_capped_at = GetCurrentTimestamp();
		for (int i = first; i < first + count; i++)
		{
			if (count > 1)
				unanswered(&ws->results[i], status,
						   psprintf("the $batch of %d was too large for D365 (%s): sent again in batches of %d",
									count, why, ts->size_cap));
			else
				set_result(&ws->results[i], "review", true, -1, status,
						   psprintf("too large for D365 even on its own: %s", why));
		}
		return;
	}

	if (ct == NULL || pg_strncasecmp(ct, "multipart/", 10) != 0)
	{
		/* an answer for the whole request, not per operation */
		char	   *why = describe_body(req->response.data, req->response.len, status);

		log->error = why;
		for (int i = first; i < first + count; i++)
		{
			RowResult  *r = &ws->results[i];

			if (status == 429)
				throttled(r, log->retry_after, why);
			else if (status == 503)
				retry_or_review(r, ws->attempts[i], log->retry_after, status, why);
			else if (status >= 500 || (status >= 200 && status < 300))
				/* a gateway may have passed part of it on: unknown */
				in_doubt(r, status, why);
			else
				set_result(r, "review", true, -1, status, why);
		}
		return;
	}

	parts = palloc0(sizeof(BatchPart) * count);
	br_parse(ct, strlen(ct), req->response.data, req->response.len, parts, count, &parse);
	if (parse.status != BR_OK && parse.status != BR_TRUNCATED)
	{
		char	   *why = psprintf("HTTP %d, unreadable $batch answer: %s (at byte %zu)",
								   status, parse.error ? parse.error : br_status_name(parse.status),
								   parse.error_offset);

		log->error = why;
		for (int i = first; i < first + count; i++)
			in_doubt(&ws->results[i], status, why);
		return;
	}

	/* Parts name their invoice by Content-ID; without any, by position. */
	part_of = palloc(sizeof(int) * count);
	for (int k = 0; k < count; k++)
		part_of[k] = -1;
	positional = parse.status == BR_OK && parse.nparts == count;
	for (int p = 0; p < parse.nparts && positional; p++)
		if (parts[p].content_id.len > 0)
			positional = false;
	for (int p = 0; p < parse.nparts; p++)
	{
		int			row = positional ? first + p : find_row(ws, first, count, parts[p].content_id);

		if (row < 0)
			stray = true;
		else if (part_of[row - first] >= 0)
			part_of[row - first] = -2;	/* two answers for one invoice */
		else
			part_of[row - first] = p;
	}

	for (int i = first; i < first + count; i++)
	{
		int			p = part_of[i - first];

		if (p >= 0)
			decide_part(t, u, ws, i, &parts[p], log);
		else if (p == -2)
			in_doubt(&ws->results[i], status, "two answers for one invoice");
		else if (parse.status == BR_OK && !stray)
			/* a complete answer without it: D365 stopped before it */
			unanswered(&ws->results[i], status, "not processed: D365 stopped at an earlier failure in the $batch");
		else
			in_doubt(&ws->results[i], status,
					 parse.status == BR_TRUNCATED ? "the $batch answer was cut off before this invoice"
					 : "an answer without Content-ID could be this invoice's");
	}
	if (parse.status == BR_TRUNCATED && log->error == NULL)
		log->error = psprintf("HTTP %d, $batch answer cut off: %s", status,
							  parse.error ? parse.error : "truncated");
}

static BatchKind
write_kind(const Target *t)
{
	return batch_kind_from_name(t->write_mode);
}

/* ---------------------------------------------------------------------
 * The round
 * ---------------------------------------------------------------------
 */

HttpSettings
http_settings_from_gucs(void)
{
	HttpSettings s;

	s.connect_timeout_ms = d365inv_http_connect_timeout_ms;
	s.timeout_ms = d365inv_http_timeout_ms;
	s.max_response_bytes = (size_t) d365inv_max_response_kb * 1024;
	s.ca_file = (d365inv_ca_file && d365inv_ca_file[0]) ? d365inv_ca_file : NULL;
	return s;
}

/*
 * The target cannot be used as configured: nothing is claimed or sent (no
 * attempt counted), target_state says blocked and the waiting invoices say
 * why in last_error, and the problem is logged and written to batch_log
 * once (batch_health counts it as a failed request) until it changes.
 * Caller has a transaction.
 */
static void
report_config_problem(const Target *t, TargetState *ts, const char *problem)
{
	char	   *why = psprintf("configuration error: %s", problem);

	target_status_report(t->name, ts, "blocked", "config", why, 0, true);
	if (strcmp(ts->config_problem, problem) == 0)
		return;
	strlcpy(ts->config_problem, problem, sizeof(ts->config_problem));
	ereport(WARNING,
			(errmsg("d365inv target \"%s\": %s; nothing is sent to it until it is fixed", t->name, why)));
	{
		RequestLog *log = palloc0(sizeof(RequestLog));

		log->kind = "config";
		log->started_at = GetCurrentTimestamp();
		log->retry_after = -1;
		log->error = why;
		insert_request_log(t, log);
	}
}

/* The lookups just sent (logs from index `from` on) went out as u: count them */
static void
charge_lookups(const Target *t, AppUser *u, List *logs, int from)
{
	for (int k = from; k < list_length(logs); k++)
	{
		RequestLog *log = list_nth(logs, k);

		app_user_sent(u);
		app_user_done(u, t, log->duration_ms, -1, log->http_status > 0 && log->http_status < 500);
		if (log->throttled)
			app_user_throttled(u, t, log->retry_after, log->error);
	}
}

/* in_doubt rows: a lookup decides; found = created, absent = send again */
static bool
resolve_in_doubt(Target *t, TargetState *ts, AppUser *u, const HttpSettings *http,
				 WorkSet *ws, MemoryContext round)
{
	List	   *logs = NIL;
	LookupState *state;
	LookupAnswer *answers;
	char	  **d365_ids;
	char	  **errors;
	int		   *log_index;
	TimestampTz looked_at;
	TimestampTz now;

	if (ws->n == 0)
		return false;

	/* every lookup request is made after this moment */
	looked_at = GetCurrentTimestamp();
	state = lookup_send(t, u->header, http, ws, &logs);
	charge_lookups(t, u, logs, 0);
	answers = palloc0(sizeof(LookupAnswer) * ws->n);
	d365_ids = palloc0(sizeof(char *) * ws->n);
	errors = palloc0(sizeof(char *) * ws->n);
	log_index = palloc0(sizeof(int) * ws->n);

	new_batch_jitter();
	begin_tx("d365inv: recording lookups");
	now = GetCurrentTimestamp();
	lookup_match(state, answers, d365_ids, errors, log_index);
	if (lookup_auth_rejected(state))
		app_user_auth_refused(u);
	for (int i = 0; i < ws->n; i++)
	{
		RowResult  *r = &ws->results[i];
		RequestLog *log = log_index[i] >= 0 ? list_nth(logs, log_index[i]) : NULL;

		r->log_index = log_index[i];
		if (answers[i] == LOOKUP_FOUND)
		{
			settle_found(t, r, &ws->rows[i], d365_ids[i], true, "lookup");
			if (log && strcmp(r->status, "created") == 0)
				log->created++;
			else if (log)
				log->duplicates++;
		}
		else if (answers[i] == LOOKUP_ABSENT && !t->client_ids && looked_at < ws->fences[i])
		{
			/*
			 * Not there yet, but the request we gave up on may still commit
			 * until the fence: look again after it, never resend before.
			 * (Client ids need no fence: a late original and a resend
			 * collide on the id.)
			 */
			set_result(r, "in_doubt", false,
					   (int) Min(TimestampDifferenceMilliseconds(now, ws->fences[i]) + 1000, INT_MAX / 2),
					   0, psprintf("not in D365 yet; the request may still commit until %s (d365inv.server_request_lifetime): looking again then",
								   timestamptz_to_str(ws->fences[i])));
			if (log)
				log->in_doubt++;
		}
		else if (answers[i] == LOOKUP_ABSENT)
		{
			if (ws->attempts[i] > d365inv_max_retries)
				set_result(r, "review", false, -1, 0,
						   psprintf("sent %d times, never confirmed, and not in D365", ws->attempts[i]));
			else
				set_result(r, "pending", false, -1, 0, "not in D365 after an unknown outcome: sending again");
			if (log)
				log->not_found++;
		}
		else if (log && log->throttled)
		{
			/* throttled: still unknown, looked up again after the wait, not counted */
			set_result(r, "in_doubt", false,
					   log->retry_after >= 0 ? Min(log->retry_after * 1000, d365inv_retry_max_ms) : 1000,
					   429, psprintf("lookup throttled by D365, looked up again after the wait: %s", errors[i]));
			log->in_doubt++;
		}
		else
		{
			/* the lookup failed: still unknown; never resend blindly */
			if (ws->attempts[i] + 1 > d365inv_max_retries)
				set_result(r, "review", true, -1, 0,
						   psprintf("fate unknown and the lookup failed: %s", errors[i]));
			else
				set_result(r, "in_doubt", true, retry_delay_ms(ws->attempts[i] + 1, -1), 0,
						   psprintf("lookup failed: %s", errors[i]));
			if (log)
				log->in_doubt++;
		}
	}
	record_results(t, ts, ws, "in_doubt", logs);
	commit_tx();
	MemoryContextSwitchTo(round);
	return true;
}

/*
 * Before anything is sent: keys the cache (d365inv.remote_key) knows are
 * duplicates outright; with preflight 'always', keys the filter cannot
 * rule out are looked up (as app user u), and those D365 has become
 * duplicates too.
 */
static void
preflight(Target *t, TargetState *ts, AppUser *u, const HttpSettings *http,
		  WorkSet *ws, List **logs)
{
	WorkSet		sub;
	int		   *map;
	LookupState *state;
	LookupAnswer *answers;
	char	  **d365_ids;
	char	  **errors;
	int		   *log_index;
	int			nlogs;

	if (strcmp(t->preflight, "off") == 0)
		return;
	for (int i = 0; i < ws->n; i++)
	{
		if (ws->known[i])
		{
			settle_found(t, &ws->results[i], &ws->rows[i], ws->known_ids[i], false, "cache");
			if (strcmp(ws->results[i].status, "duplicate") == 0 && !t->client_ids)
				ws->results[i].error = "already in D365 (a known key in d365inv.remote_key)";
		}
	}
	if (strcmp(t->preflight, "always") != 0)
		return;

	/*
	 * The rows that may be in D365.  The filter knows the keys of
	 * remote_key: "not there" means "not in D365" only while a refresh has
	 * read all of D365's keys (within the retention); before that every key
	 * is looked up.
	 */
	memset(&sub, 0, sizeof(sub));
	map = palloc(sizeof(int) * ws->n);
	sub.rows = palloc(sizeof(InvoiceRow) * ws->n);
	sub.vendor_keys = palloc(sizeof(char *) * ws->n);
	sub.invoice_keys = palloc(sizeof(char *) * ws->n);
	for (int i = 0; i < ws->n; i++)
	{
		if (ws->results[i].status != NULL ||
			(t->keys_complete &&
			 !key_filter_maybe(t->name, ws->vendor_keys[i], ws->invoice_keys[i])))
			continue;
		map[sub.n] = i;
		sub.rows[sub.n] = ws->rows[i];
		sub.vendor_keys[sub.n] = ws->vendor_keys[i];
		sub.invoice_keys[sub.n] = ws->invoice_keys[i];
		sub.n++;
	}
	if (sub.n == 0)
		return;

	nlogs = list_length(*logs);
	state = lookup_send(t, u->header, http, &sub, logs);
	charge_lookups(t, u, *logs, nlogs);
	answers = palloc0(sizeof(LookupAnswer) * sub.n);
	d365_ids = palloc0(sizeof(char *) * sub.n);
	errors = palloc0(sizeof(char *) * sub.n);
	log_index = palloc0(sizeof(int) * sub.n);

	/* matching compares keys with the database's rules: needs a transaction */
	begin_tx("d365inv: preflight lookups");
	lookup_match(state, answers, d365_ids, errors, log_index);
	commit_tx();
	if (lookup_auth_rejected(state))
		app_user_auth_refused(u);
	new_batch_jitter();
	for (int k = 0; k < sub.n; k++)
	{
		int			i = map[k];
		RowResult  *r = &ws->results[i];
		RequestLog *log = list_nth(*logs, log_index[k]);

		if (answers[k] == LOOKUP_FOUND)
		{
			settle_found(t, r, &ws->rows[i], d365_ids[k], false, "preflight");
			r->log_index = log_index[k];
			if (strcmp(r->status, "created") == 0)
				log->created++;
			else
				log->duplicates++;
		}
		else if (answers[k] == LOOKUP_FAILED)
		{
			/* do not send what could not be checked; try again later */
			if (log->throttled)
				throttled(r, log->retry_after, psprintf("preflight lookup: %s", errors[k]));
			else
				retry_or_review(r, ws->attempts[i], -1, 0, psprintf("preflight lookup failed: %s", errors[k]));
			r->log_index = log_index[k];
			log->retries++;
		}
		else
			log->not_found++;
	}
}

/* The rows of ws not decided yet, contiguous for the request builder */
static WorkSet *
undecided_rows(WorkSet *ws, int **send_index)
{
	WorkSet    *sub = palloc0(sizeof(WorkSet));

	*send_index = palloc(sizeof(int) * Max(ws->n, 1));
	sub->rows = palloc(sizeof(InvoiceRow) * Max(ws->n, 1));
	sub->attempts = palloc(sizeof(int) * Max(ws->n, 1));
	sub->results = palloc0(sizeof(RowResult) * Max(ws->n, 1));
	for (int i = 0; i < ws->n; i++)
	{
		if (ws->results[i].status != NULL)
			continue;
		(*send_index)[sub->n] = i;
		sub->rows[sub->n] = ws->rows[i];
		sub->attempts[sub->n] = ws->attempts[i];
		sub->n++;
	}
	return sub;
}

/*
 * Classify the answer to the $batch of rows [first, first + count) of
 * sendset, sent as app user u; returns its log entry (whose index in the
 * round's list is log_index).  u learns how it went: its budget, a 429.
 */
static RequestLog *
settle_batch(Target *t, TargetState *ts, AppUser *u, WorkSet *sendset, int first, int count,
			 HttpRequest *req, TimestampTz sent_at, int log_index)
{
	RequestLog *log = request_log_new(t->write_mode, sent_at, req, count, count);

	log->batch_size = t->batch_size;
	decide_batch(t, ts, u, sendset, first, count, req, log);
	for (int i = first; i < first + count; i++)
	{
		sendset->results[i].log_index = log_index;
		count_outcome(log, &sendset->results[i]);
	}
	app_user_done(u, t, req->elapsed_ms, req->seconds_left,
				  !req->transport_error && req->status < 500);
	if (log->throttled)
		app_user_throttled(u, t, log->retry_after, log->error);
	return log;
}

/*
 * batch_size_mode 'auto': halve the size after a batch whose trouble grows
 * with its size, grow it by a quarter after a clean one (bigger batches make
 * fewer calls); always within [batch_size_min, batch_size_max].
 *
 * Trouble is what a smaller batch would have suffered less from: a
 * whole-request failure or an answer that leaves invoices in_doubt, a
 * transient failure, and operations D365 left unanswered because it
 * stopped at a failure.  Duplicates and single rejected operations are not:
 * with continue-on-error each costs one operation whatever the batch size,
 * and shrinking for them only adds requests (measured: bench/batchsize).
 * When D365 ignores continue-on-error, they show up as unanswered
 * operations and count.  Neither is throttling: service protection counts
 * requests too, and smaller batches would only make more of them; the app
 * user backs off instead (app_user.c).
 */
static void
adapt_batch_size(const Target *t, TargetState *ts, List *logs)
{
	bool		trouble = false;
	bool		sent = false;
	ListCell   *lc;

	foreach(lc, logs)
	{
		RequestLog *log = lfirst(lc);

		if (strcmp(log->kind, "lookup") == 0 || log->throttled)
			continue;
		sent = true;
		if (log->http_status == 0 || log->in_doubt > 0 || log->retries > 0 || log->unanswered > 0)
			trouble = true;
	}
	if (!sent)
		return;
	if (trouble)
		ts->auto_batch_size = Max(t->batch_size_min, ts->auto_batch_size / 2);
	else
		ts->auto_batch_size = Min(t->batch_size_max,
								  ts->auto_batch_size + Max(1, ts->auto_batch_size / 4));
}

/* ---------------------------------------------------------------------
 * Streaming: a sliding window of $batch requests
 *
 * Without preflight lookups a batch needs nothing from its neighbours, so
 * instead of claim-all / send-all / record-all rounds the worker keeps
 * requests under way, max_in_flight per app user, as its budget allows: as
 * soon as one is answered it is recorded (its own short transaction) and
 * the next batch is claimed (its own) and sent, while the other requests
 * are still in flight.  Each batch lives in a memory context of its own,
 * freed once it is recorded.
 * ---------------------------------------------------------------------
 */

/* claim batches for at most this long per deliver_round(), then drain */
#define STREAM_WINDOW_MS 2000

typedef struct Stream
{
	Target	   *t;
	TargetState *ts;
	const HttpSettings *http;
	BatchKind	kind;
	MemoryContext round;
	TimestampTz stop_at;
	int64		cursor;			/* claim_rows(): new rows from here on */
	bool		drained;		/* a claim came back short: nothing more due */
	bool		busy;
} Stream;

typedef struct StreamBatch
{
	MemoryContext cxt;
	WorkSet    *ws;				/* the claimed rows */
	WorkSet    *sendset;		/* those on the wire */
	int		   *send_index;
	AppUser    *u;				/* sent as */
	TimestampTz sent_at;
	int			batch_size;
} StreamBatch;

static void
record_batch(Stream *st, WorkSet *ws, List *logs)
{
	begin_tx("d365inv: recording outcomes");
	record_results(st->t, st->ts, ws, "in_flight", logs);
	commit_tx();
}

static HttpRequest *
stream_next(void *arg, long *wait_ms)
{
	Stream	   *st = arg;
	Target	   *t = st->t;

	while (!st->drained && GetCurrentTimestamp() < st->stop_at)
	{
		AppUser    *u = app_user_pick(&st->ts->users, t, wait_ms);
		MemoryContext cxt;
		MemoryContext old;
		StreamBatch *b;
		HttpRequest *req;

		if (u == NULL)
		{
			/* paced: wait, unless the wait outlasts the round */
			if (TimestampTzPlusMilliseconds(GetCurrentTimestamp(), *wait_ms) >= st->stop_at)
				*wait_ms = 0;
			return NULL;
		}
		cxt = AllocSetContextCreate(st->round, "d365inv batch", ALLOCSET_SMALL_SIZES);
		old = MemoryContextSwitchTo(cxt);
		b = palloc0(sizeof(StreamBatch));
		b->cxt = cxt;
		begin_tx("d365inv: claiming invoices");
		b->ws = claim_rows(t, t->batch_size, &st->cursor, cxt);
		commit_tx();
		MemoryContextSwitchTo(cxt);
		if (b->ws->n < t->batch_size)
			st->drained = true;
		if (b->ws->n == 0)
		{
			MemoryContextSwitchTo(old);
			MemoryContextDelete(cxt);
			break;
		}
		st->busy = true;
		preflight(t, st->ts, u, st->http, b->ws, NULL);
		b->sendset = undecided_rows(b->ws, &b->send_index);
		if (b->sendset->n == 0)
		{
			/* all known to D365 already: nothing to send */
			record_batch(st, b->ws, NIL);
			MemoryContextSwitchTo(old);
			MemoryContextDelete(cxt);
			continue;
		}
		req = batch_http_request(t, st->kind, b->sendset->rows, b->sendset->n, u->header, NULL);
		req->user = b;
		req->mcxt = cxt;
		b->u = u;
		b->batch_size = t->batch_size;
		b->sent_at = GetCurrentTimestamp();
		app_user_sent(u);
		pgstat_report_activity(STATE_RUNNING, "d365inv: sending $batch requests");
		MemoryContextSwitchTo(old);
		return req;
	}
	*wait_ms = 0;
	return NULL;
}

static void
stream_done(HttpRequest *req, void *arg)
{
	Stream	   *st = arg;
	StreamBatch *b = req->user;
	MemoryContext old = MemoryContextSwitchTo(b->cxt);
	RequestLog *log;
	int			saved_size = st->t->batch_size;

	st->t->batch_size = b->batch_size;
	log = settle_batch(st->t, st->ts, b->u, b->sendset, 0, b->sendset->n, req, b->sent_at, 0);
	st->t->batch_size = saved_size;
	for (int k = 0; k < b->sendset->n; k++)
		b->ws->results[b->send_index[k]] = b->sendset->results[k];
	record_batch(st, b->ws, list_make1(log));
	if (st->ts->auto_batch_size > 0)
	{
		adapt_batch_size(st->t, st->ts, list_make1(log));
		st->t->batch_size = st->ts->auto_batch_size;
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(b->cxt);	/* the request and its answer too */
}

/* Claim, send and record through a sliding window; true if anything was claimed */
static bool
stream_round(Target *t, TargetState *ts, const HttpSettings *http, MemoryContext round)
{
	Stream		st;

	memset(&st, 0, sizeof(st));
	st.t = t;
	st.ts = ts;
	st.http = http;
	st.kind = write_kind(t);
	st.round = round;
	st.stop_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STREAM_WINDOW_MS);
	http_stream(t->max_in_flight * Max(ts->users.n, 1), http, stream_next, stream_done, &st);
	pgstat_report_activity(STATE_IDLE, NULL);
	MemoryContextSwitchTo(round);
	return st.busy;
}

/* ---------------------------------------------------------------------
 * With preflight lookups: claim, look up, then send the batches left
 * ---------------------------------------------------------------------
 */

/* the batches of a sendset, each sent as whichever app user may send */
typedef struct RequestFeed
{
	Target	   *t;
	TargetState *ts;
	WorkSet    *sendset;
	BatchKind	kind;
	int			nbatches;
	int			next;
	HttpRequest **reqs;			/* NULL: not sent */
	AppUser   **users;
	TimestampTz *sent_at;
} RequestFeed;

/* a feed waits this long at most for an app user, then leaves the rest */
#define FEED_MAX_WAIT_MS 2000

static HttpRequest *
feed_next(void *arg, long *wait_ms)
{
	RequestFeed *feed = arg;
	int			b = feed->next;
	int			first = b * feed->t->batch_size;
	AppUser    *u;

	if (b == feed->nbatches)
		return NULL;
	u = app_user_pick(&feed->ts->users, feed->t, wait_ms);
	if (u == NULL)
	{
		if (*wait_ms > FEED_MAX_WAIT_MS)
			*wait_ms = 0;
		return NULL;
	}
	feed->reqs[b] = batch_http_request(feed->t, feed->kind, feed->sendset->rows + first,
									   Min(feed->t->batch_size, feed->sendset->n - first),
									   u->header, NULL);
	feed->users[b] = u;
	feed->sent_at[b] = GetCurrentTimestamp();
	app_user_sent(u);
	feed->next++;
	return feed->reqs[b];
}

static void
feed_done(HttpRequest *req, void *arg)
{
	/* answers are read once all are in */
}

/* Claim, look up, send and record one set of rows; true if any were claimed */
static bool
lookup_round(Target *t, TargetState *ts, AppUser *lookup_user, const HttpSettings *http,
			 MemoryContext round)
{
	WorkSet    *ws;
	WorkSet    *sendset;
	List	   *logs = NIL;
	int			nsend;
	int		   *send_index;
	RequestFeed feed;

	begin_tx("d365inv: claiming invoices");
	{
		int64		cursor = 0;

		/*
		 * Enough for one full lookup $batch at least: with the key filter,
		 * the few candidates of a larger claim share GETs instead of costing
		 * one each.
		 */
		ws = claim_rows(t, Max(t->max_in_flight * Max(ts->users.n, 1) * t->batch_size,
							   LOOKUP_ROWS_PER_REQUEST),
						&cursor, round);
	}
	commit_tx();
	MemoryContextSwitchTo(round);
	if (ws->n == 0)
		return false;

	preflight(t, ts, lookup_user, http, ws, &logs);
	sendset = undecided_rows(ws, &send_index);
	nsend = sendset->n;

	memset(&feed, 0, sizeof(feed));
	feed.t = t;
	feed.ts = ts;
	feed.sendset = sendset;
	feed.kind = write_kind(t);
	feed.nbatches = (nsend + t->batch_size - 1) / t->batch_size;
	feed.reqs = palloc0(sizeof(HttpRequest *) * Max(feed.nbatches, 1));
	feed.users = palloc0(sizeof(AppUser *) * Max(feed.nbatches, 1));
	feed.sent_at = palloc0(sizeof(TimestampTz) * Max(feed.nbatches, 1));
	pgstat_report_activity(STATE_RUNNING, "d365inv: sending $batch requests");
	http_stream(t->max_in_flight * Max(ts->users.n, 1), http, feed_next, feed_done, &feed);
	pgstat_report_activity(STATE_IDLE, NULL);

	for (int b = 0; b < feed.nbatches; b++)
	{
		int			first = b * t->batch_size;
		int			count = Min(t->batch_size, nsend - first);

		if (feed.reqs[b] == NULL)
		{
			/* no app user could send it this round */
			for (int i = first; i < first + count; i++)
				unanswered(&sendset->results[i], 0,
						   "not sent: every app user is throttled or blocked; sent in a later round");
			continue;
		}
		logs = lappend(logs, settle_batch(t, ts, feed.users[b], sendset, first, count,
										  feed.reqs[b], feed.sent_at[b], list_length(logs)));
	}
	for (int k = 0; k < nsend; k++)
		ws->results[send_index[k]] = sendset->results[k];
	if (ts->auto_batch_size > 0)
		adapt_batch_size(t, ts, logs);

	begin_tx("d365inv: recording outcomes");
	record_results(t, ts, ws, "in_flight", logs);
	commit_tx();
	MemoryContextSwitchTo(round);
	return true;
}

/* ---------------------------------------------------------------------
 * The round
 * ---------------------------------------------------------------------
 */

/* What target_state says after a round.  Caller has a transaction. */
static void
report_round(const Target *t, TargetState *ts, bool busy)
{
	TimestampTz until;
	const char *why;
	int			nthrottled;
	const char *auth_problem = app_users_auth_problem(&ts->users, &until);

	if (auth_problem != NULL)
		target_status_report(t->name, ts, "blocked", "auth", auth_problem, until, true);
	else if ((until = app_users_throttled_until(&ts->users, &why, &nthrottled)) != 0)
		target_status_report(t->name, ts, "throttled", NULL, psprintf("throttled by D365: %s", why),
							 until, false);
	else
		target_status_report(t->name, ts, busy ? "delivering" : "idle", NULL,
							 nthrottled > 0
							 ? psprintf("%d of %d app users throttled by D365: %s",
										nthrottled, ts->users.n, why)
							 : NULL, 0, false);
}

void
deliver_not_served(const char *target_name, bool enabled)
{
	TargetState *ts = target_state(target_name);

	if (enabled)
		target_status_report(target_name, ts, "blocked", "config",
							 psprintf("configuration error: target \"%s\" has no service_root (UPDATE d365inv.target SET service_root = 'https://.../api/data/v9.2/')",
									  target_name), 0, true);
	else
		target_status_report(target_name, ts, "blocked", "disabled",
							 psprintf("target \"%s\" is disabled (d365inv.target.enabled = false)", target_name),
							 0, true);
}

bool
deliver_round(const char *target_name, MemoryContext round, TimestampTz *next_due)
{
	Target	   *t;
	TargetState *ts = target_state(target_name);
	HttpSettings http = http_settings_from_gucs();
	bool		busy = false;
	WorkSet    *doubtful;
	char	   *problem;
	AppUser    *lookup_user;
	long		wait_ms;

	MemoryContextSwitchTo(round);
	begin_tx("d365inv: loading target");
	{
		MemoryContext spi = MemoryContextSwitchTo(round);

		t = target_load(target_name);
		MemoryContextSwitchTo(spi);
	}
	if ((problem = target_config_problem(t)) != NULL)
	{
		report_config_problem(t, ts, problem);
		commit_tx();
		MemoryContextSwitchTo(round);
		return false;
	}
	ts->config_problem[0] = '\0';
	app_users_load(&ts->users, t, round);
	/* rows whose fate is unknown, looked up before anything else */
	doubtful = select_in_doubt(t, t->max_in_flight * LOOKUP_ROWS_PER_REQUEST, round);
	commit_tx();
	MemoryContextSwitchTo(round);

	/* from here on t->batch_size is the size this round uses */
	if (strcmp(t->batch_size_mode, "auto") == 0)
	{
		if (ts->auto_batch_size == 0)
			ts->auto_batch_size = t->batch_size;
		ts->auto_batch_size = Max(t->batch_size_min, Min(t->batch_size_max, ts->auto_batch_size));
		t->batch_size = ts->auto_batch_size;
	}
	else
		ts->auto_batch_size = 0;
	/*
	 * Soon after this server took over from another, an invoice loaded
	 * again after asynchronous replication lost it may exist in D365,
	 * created by the old primary: look every key up (server ids cannot
	 * tell; client ids collide instead).
	 */
	if (!t->client_ids && deliver_promoted_at != 0 &&
		GetCurrentTimestamp() - deliver_promoted_at < (int64) d365inv_failover_lookup_window_s * USECS_PER_SEC)
	{
		t->preflight = "always";
		t->keys_complete = false;
	}
	/* after a 413: smaller batches for SIZE_CAP_MS, then the usual size is tried again */
	if (ts->size_cap > 0 &&
		TimestampDifferenceExceeds(ts->size_capped_at, GetCurrentTimestamp(), SIZE_CAP_MS))
		ts->size_cap = 0;
	if (ts->size_cap > 0)
		t->batch_size = Min(t->batch_size, ts->size_cap);

	/* tokens, outside any transaction: the token endpoint may be slow */
	app_users_authenticate(&ts->users, t, &http);
	lookup_user = app_user_pick(&ts->users, t, &wait_ms);
	if (lookup_user != NULL)
	{
		/* 1. rows whose fate is unknown are looked up before anything else */
		if (resolve_in_doubt(t, ts, lookup_user, &http, doubtful, round))
			busy = true;

		/* 2. without preflight lookups: a sliding window of requests; with: claim, look up, send */
		if (strcmp(t->preflight, "always") != 0 ? stream_round(t, ts, &http, round)
			: lookup_round(t, ts, lookup_user, &http, round))
			busy = true;
		app_users_round_done(&ts->users);
	}

	begin_tx("d365inv: scheduling");
	*next_due = Min(*next_due, next_due_time(t));
	report_round(t, ts, busy);
	if (lookup_user == NULL)
	{
		/* nobody may send: come back when the first may */
		TimestampTz until = 0;
		int			nthrottled;
		const char *why;

		if (app_users_auth_problem(&ts->users, &until) == NULL)
			until = app_users_throttled_until(&ts->users, &why, &nthrottled);
		if (until == 0 && wait_ms > 0)
			until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
		if (until != 0)
			*next_due = Min(*next_due, until);
	}
	commit_tx();
	MemoryContextSwitchTo(round);
	return busy;
}
