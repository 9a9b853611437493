/*-------------------------------------------------------------------------
 *
 * ingest_support.c
 *	  Non-throwing parsers used by d365inv.ingest() to validate inbox lines.
 *
 * ingest() is one set-based statement, so a bad date or amount in one line
 * must not raise an error that aborts the whole load.  PostgreSQL 15 has no
 * soft input errors, so these functions check the text themselves and
 * return NULL (or false) instead of throwing; the caller turns that into a
 * reject reason for the line and field.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_collation.h"
#include "common/jsonapi.h"
#include "lib/stringinfo.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/datetime.h"

/* An amount is at most this many characters: far beyond any currency */
#define MAX_AMOUNT_CHARS 40

PG_FUNCTION_INFO_V1(d365inv_parse_date);
PG_FUNCTION_INFO_V1(d365inv_parse_amount);
PG_FUNCTION_INFO_V1(d365inv_is_json_object);
PG_FUNCTION_INFO_V1(d365inv_invoice_key);
PG_FUNCTION_INFO_V1(d365inv_line_problems);

static inline bool
is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Trim blanks from both ends of [*s, *s + *len) in place. */
static void
trim_blanks(const char **s, int *len)
{
	while (*len > 0 && is_blank((*s)[0]))
	{
		(*s)++;
		(*len)--;
	}
	while (*len > 0 && is_blank((*s)[*len - 1]))
		(*len)--;
}

static bool
read_digits(const char *s, int n, int *value)
{
	int			v = 0;

	for (int i = 0; i < n; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	*value = v;
	return true;
}

/*
 * parse_date(text) -> date: strict ISO 8601 calendar date YYYY-MM-DD, the
 * form D365 itself exchanges.  Anything else, including impossible dates
 * such as 2024-02-30, yields NULL.
 */
static bool
scan_date(const char *s, int len, DateADT *result)
{
	int			year,
				month,
				day;

	trim_blanks(&s, &len);
	if (len != 10 || s[4] != '-' || s[7] != '-' ||
		!read_digits(s, 4, &year) || !read_digits(s + 5, 2, &month) ||
		!read_digits(s + 8, 2, &day))
		return false;
	if (year < 1 || month < 1 || month > 12 || day < 1 ||
		day > day_tab[isleap(year)][month - 1])
		return false;
	*result = date2j(year, month, day) - POSTGRES_EPOCH_JDATE;
	return true;
}

Datum
d365inv_parse_date(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	DateADT		d;

	if (!scan_date(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), &d))
		PG_RETURN_NULL();
	PG_RETURN_DATEADT(d);
}

/*
 * parse_amount(text) -> numeric: an optional sign, digits and at most one
 * decimal point, nothing else (no thousands separators, exponents, NaN or
 * Infinity).  The value is kept exact; NULL when malformed.
 */
static bool
amount_is_valid(const char *s, int len)
{
	int			digits = 0;
	bool		seen_point = false;

	trim_blanks(&s, &len);
	if (len == 0 || len > MAX_AMOUNT_CHARS)
		return false;
	for (int i = 0; i < len; i++)
	{
		char		c = s[i];

		if (c >= '0' && c <= '9')
			digits++;
		else if (c == '.' && !seen_point)
			seen_point = true;
		else if ((c == '+' || c == '-') && i == 0)
			continue;
		else
			return false;
	}
	return digits > 0;
}

Datum
d365inv_parse_amount(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	char		buf[MAX_AMOUNT_CHARS + 1];

	if (!amount_is_valid(s, len))
		PG_RETURN_NULL();
	trim_blanks(&s, &len);
	memcpy(buf, s, len);
	buf[len] = '\0';
	PG_RETURN_DATUM(DirectFunctionCall3(numeric_in, CStringGetDatum(buf),
										ObjectIdGetDatum(InvalidOid),
										Int32GetDatum(-1)));
}

/*
 * is_json_object(text) -> bool: true when the text is one JSON object that
 * jsonb will accept.  Uses the server's own JSON parser, which reports
 * errors by return code, so the later ::jsonb cast cannot fail.
 */
static bool
json_is_object(char *s, int len)
{
	int			i = 0;
	JsonLexContext *lex;

	while (i < len && is_blank(s[i]))
		i++;
	if (i >= len || s[i] != '{')
		return false;

	lex = makeJsonLexContextCstringLen(s, len, GetDatabaseEncoding(), true);
	return pg_parse_json(lex, &nullSemAction) == JSON_SUCCESS;
}

Datum
d365inv_is_json_object(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);

	PG_RETURN_BOOL(json_is_object(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)));
}

/*
 * invoice_key(text) -> text: the key as D365's case-insensitive SQL Server
 * collation sees it: surrounding blanks trimmed, lower case.  ASCII (nearly
 * every key) is folded here; anything else goes through lower() under the
 * database collation.  Used by the unique index and by ingest(), so both
 * always agree.
 */
Datum
d365inv_invoice_key(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	text	   *result;
	char	   *out;

	trim_blanks(&s, &len);
	result = (text *) palloc(len + VARHDRSZ);
	SET_VARSIZE(result, len + VARHDRSZ);
	out = VARDATA(result);
	for (int i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c >= 0x80)
			return DirectFunctionCall1Coll(lower, DEFAULT_COLLATION_OID,
										   PointerGetDatum(cstring_to_text_with_len(s, len)));
		out[i] = (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
	}
	PG_RETURN_TEXT_P(result);
}

static void add_problem(StringInfo reasons, const char *field, const char *fmt,...) pg_attribute_printf(3, 4);

/* Append "field: problem" to the reasons, '; '-separated. */
static void
add_problem(StringInfo reasons, const char *field, const char *fmt,...)
{
	va_list		args;

	if (reasons->len > 0)
		appendStringInfoString(reasons, "; ");
	appendStringInfo(reasons, "%s: ", field);
	for (;;)
	{
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(reasons, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(reasons, needed);
	}
}

/* A bad value, quoted and cut to 40 characters, for a reject reason. */
static char *
shown(text *value)
{
	char	   *s = text_to_cstring(value);

	if (strlen(s) > 40)
		s[pg_mbcliplen(s, strlen(s), 40)] = '\0';
	return quote_literal_cstr(s);
}

/* NULL, or nothing but blanks */
static bool
arg_is_empty(FunctionCallInfo fcinfo, int n)
{
	const char *s;
	int			len;

	if (PG_ARGISNULL(n))
		return true;
	s = VARDATA_ANY(PG_GETARG_TEXT_PP(n));
	len = VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(n));
	trim_blanks(&s, &len);
	return len == 0;
}

static int
trimmed_chars(text *t)
{
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);

	trim_blanks(&s, &len);
	return pg_mbstrlen_with_len(s, len);
}

/*
 * line_problems(target, target_exists, vendor_max_length, invoice_max_length,
 *               vendor_account, invoice_number, invoice_date, due_date,
 *               amount, currency, payload) -> text
 *
 * Why an inbox line cannot be queued, one "field: problem" per bad field, or
 * NULL when the line is good.  One C call per line keeps ingest() fast.
 */
Datum
d365inv_line_problems(PG_FUNCTION_ARGS)
{
	enum
	{
		A_TARGET, A_TARGET_EXISTS, A_VENDOR_MAX, A_INVOICE_MAX, A_VENDOR,
		A_INVOICE, A_INVOICE_DATE, A_DUE_DATE, A_AMOUNT, A_CURRENCY, A_PAYLOAD
	};
	StringInfoData reasons;
	DateADT		d;

	initStringInfo(&reasons);

	if (PG_ARGISNULL(A_TARGET))
		add_problem(&reasons, "target", "empty");
	else if (PG_ARGISNULL(A_TARGET_EXISTS) || !PG_GETARG_BOOL(A_TARGET_EXISTS))
		add_problem(&reasons, "target", "no target named %s", shown(PG_GETARG_TEXT_PP(A_TARGET)));

	if (arg_is_empty(fcinfo, A_VENDOR))
		add_problem(&reasons, "vendor_account", "empty");
	else if (!PG_ARGISNULL(A_VENDOR_MAX) &&
			 trimmed_chars(PG_GETARG_TEXT_PP(A_VENDOR)) > PG_GETARG_INT32(A_VENDOR_MAX))
		add_problem(&reasons, "vendor_account", "longer than %d characters", PG_GETARG_INT32(A_VENDOR_MAX));

	if (arg_is_empty(fcinfo, A_INVOICE))
		add_problem(&reasons, "invoice_number", "empty");
	else if (!PG_ARGISNULL(A_INVOICE_MAX) &&
			 trimmed_chars(PG_GETARG_TEXT_PP(A_INVOICE)) > PG_GETARG_INT32(A_INVOICE_MAX))
		add_problem(&reasons, "invoice_number", "longer than %d characters", PG_GETARG_INT32(A_INVOICE_MAX));

	if (arg_is_empty(fcinfo, A_INVOICE_DATE))
		add_problem(&reasons, "invoice_date", "empty");
	else if (!scan_date(VARDATA_ANY(PG_GETARG_TEXT_PP(A_INVOICE_DATE)),
						VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(A_INVOICE_DATE)), &d))
		add_problem(&reasons, "invoice_date", "%s is not a date (YYYY-MM-DD)",
					shown(PG_GETARG_TEXT_PP(A_INVOICE_DATE)));

	if (!arg_is_empty(fcinfo, A_DUE_DATE) &&
		!scan_date(VARDATA_ANY(PG_GETARG_TEXT_PP(A_DUE_DATE)),
				   VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(A_DUE_DATE)), &d))
		add_problem(&reasons, "due_date", "%s is not a date (YYYY-MM-DD)",
					shown(PG_GETARG_TEXT_PP(A_DUE_DATE)));

	if (arg_is_empty(fcinfo, A_AMOUNT))
		add_problem(&reasons, "amount", "empty");
	else if (!amount_is_valid(VARDATA_ANY(PG_GETARG_TEXT_PP(A_AMOUNT)),
							  VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(A_AMOUNT))))
		add_problem(&reasons, "amount", "%s is not a plain decimal number",
					shown(PG_GETARG_TEXT_PP(A_AMOUNT)));

	if (!arg_is_empty(fcinfo, A_CURRENCY))
	{
		text	   *t = PG_GETARG_TEXT_PP(A_CURRENCY);
		const char *s = VARDATA_ANY(t);
		int			len = VARSIZE_ANY_EXHDR(t);

		trim_blanks(&s, &len);
		if (len != 3 || !isalpha((unsigned char) s[0]) || !isalpha((unsigned char) s[1]) ||
			!isalpha((unsigned char) s[2]) || ((s[0] | s[1] | s[2]) & 0x80))
			add_problem(&reasons, "currency", "%s is not a 3-letter ISO 4217 code", shown(t));
	}

	if (!arg_is_empty(fcinfo, A_PAYLOAD) &&
		!json_is_object(VARDATA_ANY(PG_GETARG_TEXT_PP(A_PAYLOAD)),
						VARSIZE_ANY_EXHDR(PG_GETARG_TEXT_PP(A_PAYLOAD))))
		add_problem(&reasons, "payload", "not a JSON object");

	if (reasons.len == 0)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text_with_len(reasons.data, reasons.len));
}
