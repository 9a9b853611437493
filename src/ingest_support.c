/*-------------------------------------------------------------------------
 *
 * ingest_support.c
 *	  Non-throwing parsers used by d365inv.ingest() to validate inbox lines.
 *
 * ingest() is one set-based statement, so a bad date or amount in one line
 * must not raise an error that aborts the whole load.  PostgreSQL 15 has no
 * soft input errors, so these functions check the text themselves and
 * return NULL (or false) instead of throwing; the caller turns that into a
 * reject reason for the line and field.  Also the invoice table's checks
 * on keys and currency (not_blank(), is_currency_code()) and the currency
 * as ingest() stores it (clean_currency()).
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

/*
 * What a payload may be.  Each limit is well inside what jsonb stores and
 * what D365 takes, so a payload that passes is_json_object() can always be
 * cast to jsonb by ingest() and always be sent.
 */
#define MAX_PAYLOAD_BYTES (1024 * 1024)
#define MAX_PAYLOAD_DEPTH 64
/* digits before and after the decimal point, once the exponent is applied */
#define MAX_PAYLOAD_NUMBER_DIGITS 1000

typedef enum PayloadVerdict
{
	PAYLOAD_OK,
	PAYLOAD_NOT_OBJECT,
	PAYLOAD_NOT_JSON,
	PAYLOAD_TOO_LARGE,
	PAYLOAD_TOO_DEEP,
	PAYLOAD_NUMBER_RANGE
} PayloadVerdict;

PG_FUNCTION_INFO_V1(d365inv_parse_date);
PG_FUNCTION_INFO_V1(d365inv_parse_amount);
PG_FUNCTION_INFO_V1(d365inv_is_json_object);
PG_FUNCTION_INFO_V1(d365inv_invoice_key);
PG_FUNCTION_INFO_V1(d365inv_clean_key);
PG_FUNCTION_INFO_V1(d365inv_line_problems);
PG_FUNCTION_INFO_V1(d365inv_not_blank);
PG_FUNCTION_INFO_V1(d365inv_is_currency_code);
PG_FUNCTION_INFO_V1(d365inv_clean_currency);

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
 * The invoice table's checks, as C: every row ingest() queues passes them,
 * and the btrim()s and the regular expression they replace took about a
 * twentieth of ingest()'s time.
 *
 * not_blank(text) -> bool: btrim(s, E' \t\r\n') <> ''
 */
Datum
d365inv_not_blank(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);

	trim_blanks(&s, &len);
	PG_RETURN_BOOL(len > 0);
}

/* is_currency_code(text) -> bool: s ~ '^[A-Z]{3}$' */
Datum
d365inv_is_currency_code(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);

	PG_RETURN_BOOL(VARSIZE_ANY_EXHDR(t) == 3 &&
				   s[0] >= 'A' && s[0] <= 'Z' &&
				   s[1] >= 'A' && s[1] <= 'Z' &&
				   s[2] >= 'A' && s[2] <= 'Z');
}

/*
 * clean_currency(text) -> text: upper(nullif(btrim(s, E' \t\r\n'), '')),
 * the currency as ingest() stores it.  ASCII (every currency line_problems()
 * lets through) is upper-cased here; anything else goes to upper() under the
 * database collation, so the result is always the same as that expression's.
 */
Datum
d365inv_clean_currency(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	text	   *result;
	char	   *d;

	trim_blanks(&s, &len);
	if (len == 0)
		PG_RETURN_NULL();
	result = (text *) palloc(len + VARHDRSZ);
	SET_VARSIZE(result, len + VARHDRSZ);
	d = VARDATA(result);
	for (int i = 0; i < len; i++)
	{
		if (IS_HIGHBIT_SET(s[i]))
			PG_RETURN_DATUM(DirectFunctionCall1Coll(upper, DEFAULT_COLLATION_OID,
													PointerGetDatum(cstring_to_text_with_len(s, len))));
		d[i] = pg_ascii_toupper((unsigned char) s[i]);
	}
	PG_RETURN_TEXT_P(result);
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
 * A JSON number token within MAX_PAYLOAD_NUMBER_DIGITS digits before and
 * after the point once its exponent is applied: numeric (so jsonb) takes
 * it, exactly.  The token's grammar is pg_parse_json()'s business; this
 * only measures it.
 */
static bool
number_fits(const char *s, int len)
{
	int			i = 0;
	long		int_sig = 0;	/* integer digits after leading zeros */
	long		frac_digits = 0;
	long		frac_zeros = 0; /* leading zeros of the fraction */
	bool		frac_nonzero = false;
	long		exponent = 0;
	long		scale;

	if (i < len && s[i] == '-')
		i++;
	while (i < len && s[i] == '0')
		i++;
	while (i < len && isdigit((unsigned char) s[i]))
		int_sig++, i++;
	if (i < len && s[i] == '.')
	{
		for (i++; i < len && isdigit((unsigned char) s[i]); i++)
		{
			frac_digits++;
			if (s[i] != '0')
				frac_nonzero = true;
			else if (!frac_nonzero)
				frac_zeros++;
		}
	}
	if (i < len && (s[i] == 'e' || s[i] == 'E'))
	{
		bool		negative = false;

		i++;
		if (i < len && (s[i] == '+' || s[i] == '-'))
			negative = (s[i++] == '-');
		for (; i < len && isdigit((unsigned char) s[i]); i++)
		{
			exponent = exponent * 10 + (s[i] - '0');
			if (exponent > 10 * MAX_PAYLOAD_NUMBER_DIGITS)
				return false;
		}
		if (negative)
			exponent = -exponent;
	}
	if (frac_digits > MAX_PAYLOAD_BYTES || int_sig > MAX_PAYLOAD_BYTES)
		return false;
	scale = Max(frac_digits - exponent, 0);
	if (scale > MAX_PAYLOAD_NUMBER_DIGITS)
		return false;
	/* power of ten of the leading digit, for a value that is not zero */
	if (int_sig > 0)
		return int_sig - 1 + exponent < MAX_PAYLOAD_NUMBER_DIGITS;
	if (frac_nonzero)
		return -(frac_zeros + 1) + exponent < MAX_PAYLOAD_NUMBER_DIGITS;
	return true;
}

/*
 * One pass outside the parser: nesting depth (pg_parse_json() recurses, so
 * a deep payload would end in "stack depth limit exceeded", an ERROR that
 * would stop the whole load) and the size of every number.
 */
static PayloadVerdict
payload_scan(const char *s, int len)
{
	int			depth = 0;

	for (int i = 0; i < len; i++)
	{
		char		c = s[i];

		if (c == '"')
		{
			for (i++; i < len && s[i] != '"'; i++)
				if (s[i] == '\\')
					i++;
		}
		else if (c == '{' || c == '[')
		{
			if (++depth > MAX_PAYLOAD_DEPTH)
				return PAYLOAD_TOO_DEEP;
		}
		else if (c == '}' || c == ']')
			depth--;
		else if (c == '-' || isdigit((unsigned char) c))
		{
			int			start = i;

			while (i + 1 < len && strchr("+-.eE0123456789", s[i + 1]) != NULL)
				i++;
			if (!number_fits(s + start, i - start + 1))
				return PAYLOAD_NUMBER_RANGE;
		}
	}
	return PAYLOAD_OK;
}

/*
 * Whether the text is a payload ingest() can store and the worker can send:
 * one JSON object, within the limits above, that the server's own JSON
 * parser (the one the ::jsonb cast uses) accepts, escapes included.  The
 * parser reports errors by return code, so a bad payload rejects its line
 * instead of failing the load.  *detail (when asked for) gets the parser's
 * words for a syntax error.
 */
static PayloadVerdict
payload_verdict(char *s, int len, char **detail)
{
	int			i = 0;
	PayloadVerdict v;
	JsonLexContext *lex;
	JsonParseErrorType error;

	while (i < len && is_blank(s[i]))
		i++;
	if (i >= len || s[i] != '{')
		return PAYLOAD_NOT_OBJECT;
	if (len > MAX_PAYLOAD_BYTES)
		return PAYLOAD_TOO_LARGE;
	if ((v = payload_scan(s, len)) != PAYLOAD_OK)
		return v;
#if PG_VERSION_NUM >= 170000
	/* 17 takes the context to fill first; NULL: palloc one */
	lex = makeJsonLexContextCstringLen(NULL, s, len, GetDatabaseEncoding(), true);
#else
	lex = makeJsonLexContextCstringLen(s, len, GetDatabaseEncoding(), true);
#endif
	if ((error = pg_parse_json(lex, &nullSemAction)) != JSON_SUCCESS)
	{
		if (detail)
			*detail = json_errdetail(error, lex);
		return PAYLOAD_NOT_JSON;
	}
	return PAYLOAD_OK;
}

static const char *
payload_problem(PayloadVerdict v)
{
	switch (v)
	{
		case PAYLOAD_OK:
			break;
		case PAYLOAD_NOT_OBJECT:
			return "not a JSON object";
		case PAYLOAD_NOT_JSON:
			return "not valid JSON";
		case PAYLOAD_TOO_LARGE:
			return "larger than 1 MB";
		case PAYLOAD_TOO_DEEP:
			return "nested deeper than " CppAsString2(MAX_PAYLOAD_DEPTH) " levels";
		case PAYLOAD_NUMBER_RANGE:
			return "a number has more than " CppAsString2(MAX_PAYLOAD_NUMBER_DIGITS) " digits before or after the decimal point";
	}
	return NULL;
}

/* is_json_object(text) -> bool: the payload check of line_problems() */
Datum
d365inv_is_json_object(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);

	PG_RETURN_BOOL(payload_verdict(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), NULL) == PAYLOAD_OK);
}

/*
 * Keys.  Spreadsheet exports bring byte-order marks, no-break spaces and
 * zero-width characters along; none of them is part of a vendor account or
 * an invoice number.  At either end of a key they are trimmed, with every
 * other blank; inside a key they (and control characters) reject the line,
 * since D365 would store them and compare them.
 */
static bool
is_invisible(pg_wchar c)
{
	return c == 0x00AD || c == 0x061C || c == 0x180E ||
		(c >= 0x200B && c <= 0x200F) || (c >= 0x202A && c <= 0x202E) ||
		(c >= 0x2060 && c <= 0x2064) || (c >= 0x2066 && c <= 0x206F) ||
		c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFB);
}

static bool
is_unicode_blank(pg_wchar c)
{
	return c == 0x0085 || c == 0x00A0 || c == 0x1680 ||
		(c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
		c == 0x202F || c == 0x205F || c == 0x3000;
}

static bool
is_control(pg_wchar c)
{
	return c < 0x20 || (c >= 0x7F && c <= 0x9F);
}

static bool
key_edge_char(pg_wchar c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' ||
		is_unicode_blank(c) || is_invisible(c);
}

/* The character starting at s (UTF-8 when the database is, else one byte) */
static pg_wchar
char_at(const char *s, int *charlen)
{
	if (GetDatabaseEncoding() == PG_UTF8)
	{
		*charlen = pg_utf_mblen((const unsigned char *) s);
		return utf8_to_unicode((const unsigned char *) s);
	}
	*charlen = pg_mblen(s);
	return *charlen == 1 ? (unsigned char) s[0] : 0x10FFFF;
}

/* key_edge_char() of an ASCII character */
static inline bool
is_ascii_edge(unsigned char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/*
 * Trim key_edge_char()s from both ends of [*s, *s + *len) in place.  An
 * ASCII byte is a whole character in every server encoding, and at the end
 * of a key in UTF-8 and single-byte ones: nearly every key is decided by
 * its first and last byte alone.
 */
static void
trim_key(const char **s, int *len)
{
	int			n;
	int			encoding = GetDatabaseEncoding();

	while (*len > 0)
	{
		unsigned char c = (unsigned char) (*s)[0];

		if (c < 0x80)
		{
			if (!is_ascii_edge(c))
				break;
			n = 1;
		}
		else if (!key_edge_char(char_at(*s, &n)) || n > *len)
			break;
		*s += n;
		*len -= n;
	}
	while (*len > 0)
	{
		int			start = *len - 1;

		if (encoding == PG_UTF8)
		{
			if ((unsigned char) (*s)[start] < 0x80)
			{
				if (!is_ascii_edge((unsigned char) (*s)[start]))
					break;
				*len = start;
				continue;
			}
			/* back to the first byte of the last character */
			while (start > 0 && ((unsigned char) (*s)[start] & 0xC0) == 0x80)
				start--;
		}
		else if (pg_encoding_max_length(encoding) > 1)
			break;				/* only UTF-8 keys get more than ASCII trimming */
		if (!key_edge_char(char_at(*s + start, &n)))
			break;
		*len = start;
	}
}

/* NULL, or why the (trimmed) key cannot be sent */
static char *
key_char_problem(const char *s, int len)
{
	for (int i = 0, n; i < len; i += n)
	{
		pg_wchar	c;

		/* ASCII: only a control character is a problem */
		if ((unsigned char) s[i] >= 0x20 && (unsigned char) s[i] < 0x7F)
		{
			n = 1;
			continue;
		}
		c = char_at(s + i, &n);
		if (is_control(c))
			return psprintf("contains the control character U+%04X", (unsigned) c);
		if (is_invisible(c) || is_unicode_blank(c))
			return psprintf("contains the invisible or blank character U+%04X", (unsigned) c);
	}
	return NULL;
}

/* clean_key(text) -> text: the key as it is stored and sent (trimmed) */
Datum
d365inv_clean_key(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);

	trim_key(&s, &len);
	PG_RETURN_TEXT_P(cstring_to_text_with_len(s, len));
}

/*
 * The lower case of one non-ASCII character under the database collation,
 * appended to out; the character itself when its lower case is ASCII.  A
 * compatibility character such as the Kelvin sign (U+212A) or the dotted
 * capital I (U+0130) is not the same letter as k or i to D365's
 * accent-sensitive collation, so folding it there would make two invoices
 * one.
 */
static void
append_folded_char(StringInfo out, const char *c, int n)
{
	text	   *lowered = DatumGetTextPP(DirectFunctionCall1Coll(lower, DEFAULT_COLLATION_OID,
																PointerGetDatum(cstring_to_text_with_len(c, n))));
	int			lowlen = VARSIZE_ANY_EXHDR(lowered);

	if (lowlen == 0 || (unsigned char) VARDATA_ANY(lowered)[0] < 0x80)
		appendBinaryStringInfo(out, c, n);
	else
		appendBinaryStringInfo(out, VARDATA_ANY(lowered), lowlen);
}

/*
 * invoice_key(text) -> text: the key as D365's case-insensitive SQL Server
 * collation sees it: trimmed as above, lower case.  ASCII (nearly every
 * key) is folded here; any other character goes through lower() under the
 * database collation, one character at a time (see append_folded_char).
 * Used by the unique index and by ingest(), so both always agree.
 */
Datum
d365inv_invoice_key(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	int			len = VARSIZE_ANY_EXHDR(t);
	StringInfoData out;

	trim_key(&s, &len);

	/* ASCII, nearly every key: one allocation of the exact size */
	{
		text	   *folded = (text *) palloc(len + VARHDRSZ);
		char	   *d = VARDATA(folded);
		int			i;

		for (i = 0; i < len && !IS_HIGHBIT_SET(s[i]); i++)
			d[i] = (s[i] >= 'A' && s[i] <= 'Z') ? s[i] + ('a' - 'A') : s[i];
		if (i == len)
		{
			SET_VARSIZE(folded, len + VARHDRSZ);
			PG_RETURN_TEXT_P(folded);
		}
		pfree(folded);
	}

	initStringInfo(&out);
	enlargeStringInfo(&out, len + VARHDRSZ);
	out.len = VARHDRSZ;
	for (int i = 0, n; i < len; i += n)
	{
		unsigned char c = (unsigned char) s[i];

		if (c < 0x80)
		{
			n = 1;
			appendStringInfoChar(&out, (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c);
		}
		else
		{
			n = pg_mblen(s + i);
			append_folded_char(&out, s + i, Min(n, len - i));
		}
	}
	SET_VARSIZE(out.data, out.len);
	PG_RETURN_TEXT_P((text *) out.data);
}

static void add_problem(StringInfo reasons, const char *field, const char *fmt,...) pg_attribute_printf(3, 4);

/* Append "field: problem" to the reasons, '; '-separated. */
static void
add_problem(StringInfo reasons, const char *field, const char *fmt,...)
{
	va_list		args;

	if (reasons->data == NULL)
		initStringInfo(reasons);	/* the first problem of the line */
	else
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

/*
 * A key argument: not empty once trimmed, within max_arg's length (when
 * given), and nothing inside it that D365 would keep but no one can see.
 */
static void
check_key(StringInfo reasons, const char *field, FunctionCallInfo fcinfo, int arg, int max_arg)
{
	text	   *t;
	const char *s;
	int			len;
	char	   *problem;

	if (PG_ARGISNULL(arg))
	{
		add_problem(reasons, field, "empty");
		return;
	}
	t = PG_GETARG_TEXT_PP(arg);
	s = VARDATA_ANY(t);
	len = VARSIZE_ANY_EXHDR(t);
	trim_key(&s, &len);
	if (len == 0)
		add_problem(reasons, field, "empty");
	/* a key has at most as many characters as bytes */
	else if (!PG_ARGISNULL(max_arg) && len > PG_GETARG_INT32(max_arg) &&
			 pg_mbstrlen_with_len(s, len) > PG_GETARG_INT32(max_arg))
		add_problem(reasons, field, "longer than %d characters", PG_GETARG_INT32(max_arg));
	else if ((problem = key_char_problem(s, len)) != NULL)
		add_problem(reasons, field, "%s", problem);
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
	StringInfoData reasons = {0};	/* made by the first add_problem() */
	DateADT		d;


	if (PG_ARGISNULL(A_TARGET))
		add_problem(&reasons, "target", "empty");
	else if (PG_ARGISNULL(A_TARGET_EXISTS) || !PG_GETARG_BOOL(A_TARGET_EXISTS))
		add_problem(&reasons, "target", "no target named %s", shown(PG_GETARG_TEXT_PP(A_TARGET)));

	check_key(&reasons, "vendor_account", fcinfo, A_VENDOR, A_VENDOR_MAX);
	check_key(&reasons, "invoice_number", fcinfo, A_INVOICE, A_INVOICE_MAX);

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

	if (!arg_is_empty(fcinfo, A_PAYLOAD))
	{
		text	   *t = PG_GETARG_TEXT_PP(A_PAYLOAD);
		char	   *detail = NULL;
		PayloadVerdict v = payload_verdict(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), &detail);

		if (v != PAYLOAD_OK && detail != NULL)
			add_problem(&reasons, "payload", "%s: %s", payload_problem(v), detail);
		else if (v != PAYLOAD_OK)
			add_problem(&reasons, "payload", "%s", payload_problem(v));
	}

	if (reasons.len == 0)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text_with_len(reasons.data, reasons.len));
}
