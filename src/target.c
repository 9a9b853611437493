/*-------------------------------------------------------------------------
 *
 * target.c
 *	  Loading a D365 destination's configuration from d365inv.target, and
 *	  the labels of its mode columns and of property_map's staging columns:
 *	  each text is parsed into its C enum (target.h) here, once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "target.h"

char *
spi_text_column(HeapTuple tuple, TupleDesc desc, int n)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, n, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* text column n of the first SPI result row */
static char *
spi_text(int n)
{
	return spi_text_column(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, n);
}

/* int or bool column n of the first SPI result row (NOT NULL columns only) */
static Datum
spi_datum(int n)
{
	bool		isnull;

	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, n, &isnull);
}

#define spi_int(n)	DatumGetInt32(spi_datum(n))
#define spi_bool(n)	DatumGetBool(spi_datum(n))

/*
 * The labels of each mode column of d365inv.target, in the order of its C
 * enum (target.h): the one place that maps one to the other.
 */
static const char *const url_form_labels[] = {"relative", "absolute_path", "absolute_url"};
static const char *const write_mode_labels[] = {"create", "upsert", "upsert_create_only"};
static const char *const preflight_labels[] = {"off", "in_doubt", "always"};
static const char *const auth_labels[] = {"none", "oauth2"};
static const char *const batch_size_mode_labels[] = {"fixed", "auto"};
static const char *const entity_id_mode_labels[] = {"server", "client"};
static const char *const pacing_labels[] = {"budget", "off"};
static const char *const staging_column_labels[] = {"invoice_date", "due_date", "amount", "currency",
"description", "source"};

StaticAssertDecl(lengthof(url_form_labels) == URL_ABSOLUTE_URL + 1, "url_form labels");
StaticAssertDecl(lengthof(write_mode_labels) == WRITE_UPSERT_CREATE_ONLY + 1, "write_mode labels");
StaticAssertDecl(lengthof(preflight_labels) == PREFLIGHT_ALWAYS + 1, "preflight labels");
StaticAssertDecl(lengthof(auth_labels) == AUTH_OAUTH2 + 1, "auth labels");
StaticAssertDecl(lengthof(batch_size_mode_labels) == BATCH_SIZE_AUTO + 1, "batch_size_mode labels");
StaticAssertDecl(lengthof(entity_id_mode_labels) == ENTITY_ID_CLIENT + 1, "entity_id_mode labels");
StaticAssertDecl(lengthof(pacing_labels) == PACING_OFF + 1, "pacing labels");
StaticAssertDecl(lengthof(staging_column_labels) == COLUMN_SOURCE + 1, "staging column labels");

/* a property_map key: the staging column, or COLUMN_UNKNOWN (a configuration problem, not an ERROR) */
static StagingColumn
staging_column(const char *column)
{
	for (int i = 0; i < lengthof(staging_column_labels); i++)
		if (strcmp(column, staging_column_labels[i]) == 0)
			return (StagingColumn) i;
	return COLUMN_UNKNOWN;
}

/*
 * Text column n of the first SPI result row, a mode column of target
 * `name`: its index in labels.  The column's CHECK constraint allows only
 * these; anything else (a constraint dropped, a newer script) is an error,
 * never a silent default.
 */
static int
spi_mode(int n, const char *name, const char *const *labels, int nlabels)
{
	char	   *value = spi_text(n);
	StringInfoData known;

	for (int i = 0; i < nlabels; i++)
		if (value != NULL && strcmp(value, labels[i]) == 0)
			return i;
	initStringInfo(&known);
	for (int i = 0; i < nlabels; i++)
		appendStringInfo(&known, "%s%s", i > 0 ? ", " : "", labels[i]);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("d365inv target \"%s\": unknown %s \"%s\"", name,
					SPI_fname(SPI_tuptable->tupdesc, n), value ? value : "(null)"),
			 errdetail("This version of d365inv knows %s.", known.data),
			 errhint("The column's CHECK constraint on d365inv.target allows only these.")));
	return 0;					/* keep compiler quiet */
}

#define spi_mode_of(n, name, labels) spi_mode(n, name, labels, lengthof(labels))

static void
text_array(int n, const char *const **items, int *nitems)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, n, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	int			count;
	char	  **out;

	*items = NULL;
	*nitems = 0;
	if (isnull)
		return;
	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &count);
	out = palloc0(sizeof(char *) * (count + 1));
	for (int i = 0; i < count; i++)
		if (!nulls[i])
			out[(*nitems)++] = TextDatumGetCString(elems[i]);
	*items = (const char *const *) out;
}

static void
int_array(int n, const int **items, int *nitems)
{
	bool		isnull;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, n, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	int			count;
	int		   *out;

	*nitems = 0;
	out = palloc0(sizeof(int) * 1);
	*items = out;				/* non-NULL: "no statuses" rather than defaults */
	if (isnull)
		return;
	deconstruct_array(DatumGetArrayTypeP(d), INT4OID, 4, true, TYPALIGN_INT,
					  &elems, &nulls, &count);
	out = palloc0(sizeof(int) * (count + 1));
	for (int i = 0; i < count; i++)
		if (!nulls[i])
			out[(*nitems)++] = DatumGetInt32(elems[i]);
	*items = out;
}

/*
 * NULL, or why this target cannot be sent to as configured.  The target's
 * own checks refuse such rows when they are written; a row from before them
 * (an update from 0.1, a trigger switched off) is caught here, before any
 * invoice is claimed.
 */
char *
target_config_problem(const Target *t)
{
	for (int i = 0; i < t->nmappings; i++)
	{
		const char *p = t->mappings[i].property;

		if (t->mappings[i].staging == COLUMN_UNKNOWN)
			return psprintf("property_map maps \"%s\", which is not a staging column", t->mappings[i].column);
		if (!(isalpha((unsigned char) p[0]) || p[0] == '_') ||
			strspn(p, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_") != strlen(p))
			return psprintf("property_map maps \"%s\" to \"%s\", which is not an OData property name",
							t->mappings[i].column, p);
	}
	return NULL;
}

Target *
target_load(const char *name)
{
	MemoryContext caller = CurrentMemoryContext;
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1] = {CStringGetTextDatum(name)};
	Target	   *t;
	int			ret;

	ret = SPI_execute_with_args(
		"SELECT name, service_root, entity_set, vendor_property, invoice_property,"
		"       id_property, company, company_property, batch_size, url_form,"
		"       duplicate_statuses, duplicate_codes, duplicate_messages,"
		"       (SELECT array_agg(key ORDER BY key) FROM jsonb_each_text(property_map)),"
		"       (SELECT array_agg(value ORDER BY key) FROM jsonb_each_text(property_map)),"
		"       max_in_flight, write_mode, preflight, auth, token_url, client_id, scope,"
		"       batch_size_mode, batch_size_min, batch_size_max,"
		"       coalesce(keys_refreshed_at > now() - current_setting('d365inv.remote_key_retention')::interval,"
		"                false),"
		"       entity_id_mode, entity_id_form, entity_id_length,"
		"       pacing, limit_window, limit_requests, limit_execution"
		"  FROM d365inv.target WHERE name = $1",
		1, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "d365inv: reading target \"%s\" failed: %s", name, SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("d365inv target \"%s\" does not exist", name),
				 errhint("Targets are rows of d365inv.target.")));

	/* SPI runs in its own context; the result must outlive SPI_finish */
	MemoryContextSwitchTo(caller);
	t = palloc0(sizeof(Target));
	t->name = spi_text(1);
	t->service_root = spi_text(2);
	if (t->service_root && t->service_root[strlen(t->service_root) - 1] != '/')
		t->service_root = psprintf("%s/", t->service_root);
	t->entity_set = spi_text(3);
	t->vendor_property = spi_text(4);
	t->invoice_property = spi_text(5);
	t->id_property = spi_text(6);
	t->company = spi_text(7);
	t->company_property = spi_text(8);
	t->batch_size = spi_int(9);
	t->url_form = spi_mode_of(10, name, url_form_labels);
	int_array(11, &t->classify.duplicate_statuses, &t->classify.n_duplicate_statuses);
	text_array(12, &t->classify.duplicate_codes, &t->classify.n_duplicate_codes);
	text_array(13, &t->classify.duplicate_messages, &t->classify.n_duplicate_messages);
	t->classify.id_property = t->id_property;
	t->classify.service_root = t->service_root;
	{
		const char *const *columns;
		const char *const *properties;
		int			ncolumns,
					nproperties;

		text_array(14, &columns, &ncolumns);
		text_array(15, &properties, &nproperties);
		t->nmappings = Min(ncolumns, nproperties);
		t->mappings = palloc0(sizeof(PropertyMapping) * (t->nmappings + 1));
		for (int i = 0; i < t->nmappings; i++)
		{
			t->mappings[i].column = (char *) columns[i];
			t->mappings[i].staging = staging_column(columns[i]);
			t->mappings[i].property = (char *) properties[i];
		}
	}
	t->max_in_flight = spi_int(16);
	t->write_mode = spi_mode_of(17, name, write_mode_labels);
	t->preflight = spi_mode_of(18, name, preflight_labels);
	t->auth = spi_mode_of(19, name, auth_labels);
	t->token_url = spi_text(20);
	t->client_id = spi_text(21);
	t->scope = spi_text(22);
	t->batch_size_mode = spi_mode_of(23, name, batch_size_mode_labels);
	t->batch_size_min = spi_int(24);
	t->batch_size_max = spi_int(25);
	t->keys_complete = spi_bool(26);
	t->entity_id_mode = spi_mode_of(27, name, entity_id_mode_labels);
	t->entity_id_form = entity_id_form_from_name(spi_text(28));
	t->entity_id_length = spi_int(29);
	t->pacing = spi_mode_of(30, name, pacing_labels);
	t->limit_window_s = spi_int(31);
	t->limit_requests = spi_int(32);
	t->limit_execution_s = spi_int(33);
	return t;
}
