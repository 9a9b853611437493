/*-------------------------------------------------------------------------
 *
 * queue.c
 *	  All of a delivery's SQL on the queue: claiming due invoices,
 *	  selecting in_doubt ones, writing outcomes back (invoice, batch_log,
 *	  remote_key) guarded by "still in the status we left it in", the next
 *	  due time; and the worker's short transactions around them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "d365inv.h"
#include "queue.h"

/*
 * The statements the worker runs for every batch are parsed and planned
 * once per process and kept (SPI_keepplan).  A kept plan is a plan cache
 * entry: it is planned again when a table, function or type it uses
 * changes (ALTER or DROP and CREATE EXTENSION, ANALYZE), and analysed again
 * from its text if search_path changed, so it never runs against objects
 * that are gone.  The plans are generic: every one of these statements has
 * a single sensible plan (an index probe in queue order, or one row per
 * array element), and a custom plan per call would cost as much planning as
 * not keeping it at all.
 *
 * Those that read tables are planned, and run, with sequential scans off
 * (run_kept()).  A generic plan is made from the statistics of the moment:
 * made while invoice was small (the first claim after a fresh start, or
 * after a large DELETE), "id = ANY (...)" became a sequential scan of
 * invoice, kept while the table grew to millions until autovacuum analysed
 * it again (a minute at best, hours on a busy server): every claim and
 * every record read the whole queue.  Each of these statements reads a
 * handful of rows by an index, however small or large the tables are.
 */
static SPIPlanPtr
kept_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *argtypes)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

		if (p == NULL)
			elog(ERROR, "d365inv worker: preparing a statement failed: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(p) != 0)
			elog(ERROR, "d365inv worker: keeping a prepared statement failed");
		*plan = p;
	}
	return *plan;
}

/*
 * Run a kept plan with enable_seqscan off for the statement, so that a plan
 * made (or made again after an invalidation) inside it never scans a table
 * whole.  An error unwinds the setting with the (sub)transaction.
 */
static int
run_kept(SPIPlanPtr plan, Datum *args, const char *nulls)
{
	int			nest = NewGUCNestLevel();
	int			ret;

	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	ret = SPI_execute_plan(plan, args, nulls, false, 0);
	AtEOXact_GUC(true, nest);
	return ret;
}

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

/*
 * $4..$6: entity_id_mode = 'client', entity_id_form, entity_id_length.
 *
 * The plan is kept, generic: "LIMIT $2" is planned as a tenth of the queue.
 * Written as joins (UPDATE ... FROM the due rows LEFT JOIN remote_key), that
 * made every claim of a queue of a million hash the whole invoice and
 * remote_key tables (2 requests a second).  Here nothing can be planned as a
 * join: the due rows are an array, found once, and each row's key is looked
 * up in remote_key by its primary key.  Both look-ups are scalar subqueries:
 * an EXISTS may be planned as a hashed subplan, which reads remote_key whole
 * on every claim (chosen while remote_key was small, it stays with the kept
 * plan however many keys arrive until autovacuum analyses the table).
 */
#define REMOTE_KEY_OF_I \
	" FROM d365inv.remote_key k" \
	" WHERE k.target = i.target AND k.vendor_key = i.vendor_key AND k.invoice_key = i.invoice_key"
#define CLAIM_SQL(which) \
	"UPDATE d365inv.invoice i SET status = 'in_flight', next_attempt_at = NULL, updated_at = now()," \
	"       entity_id = CASE WHEN $4 THEN coalesce(i.entity_id," \
	"                   d365inv.entity_id(i.target, i.vendor_key, i.invoice_key, $5, $6)) ELSE i.entity_id END" \
	" WHERE i.id = ANY (ARRAY(SELECT id FROM d365inv.invoice" \
	"                          WHERE target = $1 AND status < 'created' AND " which \
	"                          LIMIT $2 FOR UPDATE SKIP LOCKED))" \
	" RETURNING i.id, i.attempts, i.vendor_account, i.invoice_number," \
	"           to_char(i.invoice_date, 'YYYY-MM-DD'), to_char(i.due_date, 'YYYY-MM-DD')," \
	"           i.amount::text, i.currency, i.description, i.source, i.payload::text," \
	"           i.vendor_key, i.invoice_key, coalesce((SELECT true" REMOTE_KEY_OF_I "), false)," \
	"           (SELECT k.d365_id" REMOTE_KEY_OF_I "), i.entity_id, i.resend_fence"

/*
 * Claim up to `limit` due rows of the target (they become in_flight): new
 * rows first, in id order, then retries whose time has come.  New rows are
 * read from *cursor on (the highest id claimed so far, 0 = from the start)
 * so that a long queue does not rescan the index entries of rows settled
 * since, which only vacuum removes; callers reset it every round so that a
 * row put back with a lower id is found again.  Result in `into`.
 */
WorkSet *
claim_rows(const Target *t, int limit, int64 *cursor, MemoryContext into)
{
	static const char *fresh_sql = CLAIM_SQL(
		"status = 'pending' AND next_attempt_at IS NULL AND id > $3"
		" ORDER BY next_attempt_at NULLS FIRST, id");
	static const char *due_sql = CLAIM_SQL(
		"status IN ('pending', 'retry') AND next_attempt_at <= now()"
		" ORDER BY next_attempt_at, id");
	static SPIPlanPtr fresh_plan = NULL;
	static SPIPlanPtr due_plan = NULL;
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
	args[3] = BoolGetDatum(t->entity_id_mode == ENTITY_ID_CLIENT);
	args[4] = CStringGetTextDatum(t->entity_id_form == ENTITY_ID_GUID ? "guid" : "string");
	args[5] = Int32GetDatum(t->entity_id_length);
	ret = run_kept(kept_plan(&fresh_plan, fresh_sql, 6, argtypes), args, NULL);
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
		ret = run_kept(kept_plan(&due_plan, due_sql, 6, argtypes), args, NULL);
		if (ret != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "d365inv worker: claiming invoices failed: %s", SPI_result_code_string(ret));
		old = MemoryContextSwitchTo(into);
		append_rows(ws, limit);
		MemoryContextSwitchTo(old);
	}
	return ws;
}

/* in_doubt rows of the target that are due, at most `limit`.  Result in `into`. */
WorkSet *
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

int64
insert_request_log(const Target *t, const RequestLog *log)
{
	static const char *sql =
	"INSERT INTO d365inv.batch_log (target, kind, started_at, duration_ms, http_status,"
	"       operations, invoices, created, duplicates, retries, reviews, in_doubt,"
	"       unanswered, not_found, throttled, retry_after, batch_size, error)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
	" RETURNING id";
	static SPIPlanPtr plan = NULL;
	Oid			argtypes[18] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, FLOAT8OID, INT4OID, INT4OID,
		INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID, BOOLOID,
	INT4OID, INT4OID, TEXTOID};
	Datum		args[18];
	char		nulls[18];
	bool		isnull;
	int			ret;

	memset(nulls, ' ', sizeof(nulls));
	args[0] = CStringGetTextDatum(t->name);
	args[1] = CStringGetTextDatum(request_kind_name(log->kind));
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

	/* reads no table: no need for run_kept() */
	ret = SPI_execute_plan(kept_plan(&plan, sql, 18, argtypes), args, nulls, false, 0);
	if (ret != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "d365inv worker: writing batch_log failed: %s", SPI_result_code_string(ret));
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

const char *
invoice_status_name(InvoiceStatus status)
{
	static const char *const labels[] = {NULL, "pending", "in_flight", "in_doubt", "retry",
	"created", "duplicate", "review"};

	StaticAssertStmt(lengthof(labels) == INVOICE_REVIEW + 1, "one label per invoice status");
	if (status <= INVOICE_UNDECIDED || status > INVOICE_REVIEW)
		elog(ERROR, "d365inv: invoice status %d has no label", (int) status);
	return labels[status];
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

		if (log->duplicates == 0 || log->kind == REQUEST_LOOKUP)
			continue;
		initStringInfo(&names);
		for (int i = 0; i < ws->n && named < 3; i++)
		{
			RowResult  *r = &ws->results[i];

			if (r->log_index != k || r->status != INVOICE_DUPLICATE)
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
 * The outcomes of a whole answer in one statement: one array per column,
 * one element per row (unnest), written only where the row is still in
 * status $10; the keys D365 now has go to remote_key in the same statement.
 */
static const char *record_sql =
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
	/* the kept generic plan guesses u's size: with id = ANY it reads invoice by its key, whatever the guess */
	"   WHERE i.id = ANY ($1::bigint[]) AND i.id = u.id AND i.status = $10::d365inv.invoice_status"
	"  RETURNING i.target, i.vendor_key, i.invoice_key, i.d365_id, i.status, i.settled_by)"
	" INSERT INTO d365inv.remote_key AS k (target, vendor_key, invoice_key, d365_id, source)"
	" SELECT target, vendor_key, invoice_key, d365_id,"
	"        CASE WHEN status = 'created' AND settled_by = 'response' THEN 'created' ELSE settled_by END"
	"   FROM changed WHERE status IN ('created', 'duplicate')"
	" ON CONFLICT (target, vendor_key, invoice_key)"
	" DO UPDATE SET d365_id = coalesce(excluded.d365_id, k.d365_id), seen_at = now()";

/* The rows of one record statement, gathered batch by batch */
typedef struct RecordRows
{
	int			n;
	int			cap;
	int64	   *ids;
	const char **status;
	int		   *counted;
	int		   *delay;
	bool	   *delay_null;
	int		   *http_status;
	bool	   *http_null;
	const char **error;
	const char **d365_id;
	const char **settled_by;
	int64	   *batch_id;
} RecordRows;

static void
record_rows_init(RecordRows *rr, int cap)
{
	cap = Max(cap, 1);
	rr->n = 0;
	rr->cap = cap;
	rr->ids = palloc(sizeof(int64) * cap);
	rr->status = palloc(sizeof(char *) * cap);
	rr->counted = palloc(sizeof(int) * cap);
	rr->delay = palloc(sizeof(int) * cap);
	rr->delay_null = palloc(sizeof(bool) * cap);
	rr->http_status = palloc(sizeof(int) * cap);
	rr->http_null = palloc(sizeof(bool) * cap);
	rr->error = palloc(sizeof(char *) * cap);
	rr->d365_id = palloc(sizeof(char *) * cap);
	rr->settled_by = palloc(sizeof(char *) * cap);
	rr->batch_id = palloc(sizeof(int64) * cap);
}

/* Log ws's requests (logs) and add its decided rows */
static void
record_rows_add(RecordRows *rr, const Target *t, WorkSet *ws, List *logs, TimestampTz *progress_at)
{
	int64	   *log_ids = palloc(sizeof(int64) * Max(list_length(logs), 1));
	int			nlogs = 0;
	ListCell   *lc;

	foreach(lc, logs)
		log_ids[nlogs++] = insert_request_log(t, (RequestLog *) lfirst(lc));
	warn_duplicates(t, ws, logs, log_ids);

	for (int i = 0; i < ws->n; i++)
	{
		RowResult  *r = &ws->results[i];
		int			m = rr->n;

		if (r->status == INVOICE_UNDECIDED)
			continue;
		Assert(m < rr->cap);
		rr->ids[m] = ws->rows[i].id;
		rr->status[m] = invoice_status_name(r->status);
		rr->counted[m] = r->counted ? 1 : 0;
		rr->delay[m] = r->delay_ms;
		rr->delay_null[m] = r->delay_ms < 0;
		rr->http_status[m] = r->http_status;
		rr->http_null[m] = r->http_status == 0;
		rr->error[m] = r->error;
		rr->d365_id[m] = r->d365_id;
		rr->settled_by[m] = r->settled_by;
		rr->batch_id[m] = r->log_index >= 0 ? log_ids[r->log_index] : 0;
		if (r->status == INVOICE_CREATED || r->status == INVOICE_DUPLICATE ||
			r->status == INVOICE_REVIEW)
			*progress_at = GetCurrentTimestamp();
		rr->n++;
	}
}

/* Write the gathered rows back, those still in status `from`: one statement */
static void
record_rows_write(RecordRows *rr, const Target *t, InvoiceStatus from)
{
	static SPIPlanPtr plan = NULL;
	Oid			argtypes[12] = {INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID, INT4ARRAYOID,
		INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID, TEXTOID, TEXTOID,
	INT4OID};
	Datum		args[12];
	int			m = rr->n;
	int			ret;

	if (m == 0)
		return;
	args[0] = int8_array(rr->ids, m);
	args[1] = sql_text_array(rr->status, m);
	args[2] = int4_array(rr->counted, NULL, m);
	args[3] = int4_array(rr->delay, rr->delay_null, m);
	args[4] = int4_array(rr->http_status, rr->http_null, m);
	args[5] = sql_text_array(rr->error, m);
	args[6] = sql_text_array(rr->d365_id, m);
	args[7] = sql_text_array(rr->settled_by, m);
	args[8] = int8_array(rr->batch_id, m);
	args[9] = CStringGetTextDatum(invoice_status_name(from));
	args[10] = CStringGetTextDatum(t->name);
	args[11] = Int32GetDatum(d365inv_server_request_lifetime_ms);

	ret = run_kept(kept_plan(&plan, record_sql, 12, argtypes), args, NULL);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "d365inv worker: recording outcomes failed: %s", SPI_result_code_string(ret));
}

/*
 * Write every decided row of ws back, if it is still in status `from`;
 * log the requests; remember keys D365 now has.  Caller has a transaction
 * and SPI.
 */
void
record_results(const Target *t, WorkSet *ws, InvoiceStatus from, List *logs, TimestampTz *progress_at)
{
	RecordRows	rr;

	record_rows_init(&rr, ws->n);
	record_rows_add(&rr, t, ws, logs, progress_at);
	record_rows_write(&rr, t, from);
}

/*
 * record_results() for n answered batches at once, each with the log of
 * its one request: one statement writes the rows of them all.
 */
void
record_answers(const Target *t, WorkSet **ws, RequestLog **logs, int n, InvoiceStatus from,
			   TimestampTz *progress_at)
{
	RecordRows	rr;
	int			rows = 0;

	for (int k = 0; k < n; k++)
		rows += ws[k]->n;
	record_rows_init(&rr, rows);
	for (int k = 0; k < n; k++)
		record_rows_add(&rr, t, ws[k], list_make1(logs[k]), progress_at);
	record_rows_write(&rr, t, from);
}

/* Earliest time this target has work again (retry or in_doubt rows). */
TimestampTz
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

void
begin_tx(const char *activity)
{
	tx_caller_context = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_connect();
	pgstat_report_activity(STATE_RUNNING, activity);
}

void
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
