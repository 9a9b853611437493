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

#include "common/jsonapi.h"
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
Datum
d365inv_parse_date(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	int			year,
				month,
				day;

	trim_blanks(&s, &len);
	if (len != 10 || s[4] != '-' || s[7] != '-' ||
		!read_digits(s, 4, &year) || !read_digits(s + 5, 2, &month) ||
		!read_digits(s + 8, 2, &day))
		PG_RETURN_NULL();
	if (year < 1 || month < 1 || month > 12 || day < 1 ||
		day > day_tab[isleap(year)][month - 1])
		PG_RETURN_NULL();

	PG_RETURN_DATEADT(date2j(year, month, day) - POSTGRES_EPOCH_JDATE);
}

/*
 * parse_amount(text) -> numeric: an optional sign, digits and at most one
 * decimal point, nothing else (no thousands separators, exponents, NaN or
 * Infinity).  The value is kept exact; NULL when malformed.
 */
Datum
d365inv_parse_amount(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	int			digits = 0;
	bool		seen_point = false;
	char		buf[MAX_AMOUNT_CHARS + 1];

	trim_blanks(&s, &len);
	if (len == 0 || len > MAX_AMOUNT_CHARS)
		PG_RETURN_NULL();
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
			PG_RETURN_NULL();
	}
	if (digits == 0)
		PG_RETURN_NULL();

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
Datum
d365inv_is_json_object(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	char	   *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	int			i = 0;
	JsonLexContext *lex;

	while (i < len && is_blank(s[i]))
		i++;
	if (i >= len || s[i] != '{')
		PG_RETURN_BOOL(false);

	lex = makeJsonLexContextCstringLen(s, len, GetDatabaseEncoding(), true);
	PG_RETURN_BOOL(pg_parse_json(lex, &nullSemAction) == JSON_SUCCESS);
}
