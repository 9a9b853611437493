/*-------------------------------------------------------------------------
 *
 * classify.c
 *	  Outcome classifier for one OData operation response: OData JSON
 *	  error extraction, duplicate detection, new-id extraction and
 *	  Retry-After parsing.
 *
 * Owns: the mapping (status, headers, body) -> Outcome and the text that
 * ends up in the invoice's status columns.  Every string written to a
 * Classification is NUL-terminated, valid UTF-8 and free of control
 * characters, because the backend stores it in a text column (invalid
 * UTF-8 would make the INSERT fail) and logs it.
 *
 * Pure C99 plus cJSON, no PostgreSQL headers, no global state, no locale
 * or timezone dependence.
 *
 *-------------------------------------------------------------------------
 */
#include "classify.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static const int default_duplicate_statuses[] = {409, 412};


/* ---------------------------------------------------------------------
 * ASCII helpers (no <ctype.h>: its answers depend on the locale)
 * ---------------------------------------------------------------------
 */
static inline char
ascii_lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? (char) (c + ('a' - 'A')) : c;
}

static inline bool
is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static inline bool
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Case-insensitive (ASCII) substring test.  An empty needle never matches:
 * an empty string in the configuration must not turn every error into a
 * duplicate.  Quadratic in the worst case, but the needles are short
 * configuration strings and the haystack is bounded by
 * CLASSIFY_MAX_JSON_BYTES.
 */
static bool
ci_contains(const char *hay, const char *needle)
{
	size_t		nlen;
	const char *h;

	if (hay == NULL || needle == NULL || needle[0] == '\0')
		return false;
	nlen = strlen(needle);
	for (h = hay; *h; h++)
	{
		size_t		i;

		for (i = 0; i < nlen; i++)
		{
			if (h[i] == '\0' || ascii_lower(h[i]) != ascii_lower(needle[i]))
				break;
		}
		if (i == nlen)
			return true;
	}
	return false;
}


/* ---------------------------------------------------------------------
 * Safe text output
 * ---------------------------------------------------------------------
 */

/*
 * Length of the well-formed UTF-8 sequence at s (RFC 3629: no overlongs,
 * no surrogates, nothing above U+10FFFF), or 0 if it is not one.
 */
static size_t
utf8_seq_len(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];

	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
	if (c >= 0xE0 && c <= 0xEF)
	{
		unsigned char lo = (c == 0xE0) ? 0xA0 : 0x80;
		unsigned char hi = (c == 0xED) ? 0x9F : 0xBF;

		if (n >= 3 && s[1] >= lo && s[1] <= hi && (s[2] & 0xC0) == 0x80)
			return 3;
		return 0;
	}
	if (c >= 0xF0 && c <= 0xF4)
	{
		unsigned char lo = (c == 0xF0) ? 0x90 : 0x80;
		unsigned char hi = (c == 0xF4) ? 0x8F : 0xBF;

		if (n >= 4 && s[1] >= lo && s[1] <= hi &&
			(s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80)
			return 4;
		return 0;
	}
	return 0;
}

/* Bounded output buffer that only ever holds whole UTF-8 characters. */
typedef struct TextBuf
{
	char	   *buf;
	size_t		size;
	size_t		len;
	bool		full;			/* something did not fit */
	bool		last_space;		/* for whitespace collapsing */
} TextBuf;

static void
tb_init(TextBuf *tb, char *buf, size_t size)
{
	tb->buf = buf;
	tb->size = size;
	tb->len = 0;
	tb->full = (size == 0);
	tb->last_space = false;
	if (size > 0)
		buf[0] = '\0';
}

static void
tb_put(TextBuf *tb, const char *s, size_t n)
{
	if (tb->full)
		return;
	if (tb->len + n + 1 > tb->size)
	{
		tb->full = true;
		return;
	}
	memcpy(tb->buf + tb->len, s, n);
	tb->len += n;
	tb->buf[tb->len] = '\0';
}

/*
 * Append src[0..n): control characters (C0, DEL, C1) become spaces,
 * ill-formed UTF-8 becomes '?'.  With collapse, runs of whitespace become
 * one space (for raw bodies: HTML, pretty-printed JSON).  Stops as soon as
 * the buffer is full, so a 64 MB body costs no more than a short one.
 */
static void
tb_append(TextBuf *tb, const char *src, size_t n, bool collapse)
{
	const unsigned char *s = (const unsigned char *) src;
	size_t		i = 0;

	while (i < n && !tb->full)
	{
		size_t		cl = utf8_seq_len(s + i, n - i);
		bool		ctl;

		if (cl == 0)
		{
			tb->last_space = false;
			tb_put(tb, "?", 1);
			i++;
			continue;
		}
		ctl = (cl == 1 && (s[i] < 0x20 || s[i] == 0x7F)) ||
			(cl == 2 && s[i] == 0xC2 && s[i + 1] < 0xA0);
		if (ctl || s[i] == ' ')
		{
			if (!(collapse && tb->last_space))
				tb_put(tb, " ", 1);
			tb->last_space = true;
		}
		else
		{
			tb->last_space = false;
			tb_put(tb, (const char *) s + i, cl);
		}
		i += cl;
	}
}

static void
tb_append_str(TextBuf *tb, const char *s)
{
	tb_append(tb, s, strlen(s), false);
}

/*
 * If anything was cut off, end with "..." so a reader knows; backing off
 * over whole characters keeps the result valid UTF-8.
 */
static void
tb_finish(TextBuf *tb)
{
	if (!tb->full || tb->size < 4)
		return;
	while (tb->len > 0 && tb->len + 3 + 1 > tb->size)
	{
		tb->len--;
		while (tb->len > 0 && ((unsigned char) tb->buf[tb->len] & 0xC0) == 0x80)
			tb->len--;
	}
	memcpy(tb->buf + tb->len, "...", 4);
	tb->len += 3;
}

/*
 * Copy an identifier verbatim, or refuse: a truncated or "sanitised" id
 * would silently point at the wrong record.
 */
static bool
copy_id(char *dst, size_t size, const char *src, size_t n)
{
	const unsigned char *s = (const unsigned char *) src;
	size_t		i = 0;

	if (n == 0 || n + 1 > size)
		return false;
	while (i < n)
	{
		size_t		cl = utf8_seq_len(s + i, n - i);

		if (cl == 0 || (cl == 1 && (s[i] < 0x20 || s[i] == 0x7F)) ||
			(cl == 2 && s[i] == 0xC2 && s[i + 1] < 0xA0))
			return false;
		i += cl;
	}
	memcpy(dst, src, n);
	dst[n] = '\0';
	return true;
}


/* ---------------------------------------------------------------------
 * JSON
 * ---------------------------------------------------------------------
 */

/*
 * Parse a response body as JSON.  The body is copied into a NUL-padded
 * buffer first: cJSON_ParseWithLength in cJSON 1.7.x has been seen to read
 * one byte past buffer_length (cJSON issue #804), and bodies from br_parse
 * are slices of a larger buffer with no terminator.  A UTF-8 BOM is
 * skipped, cJSON does not accept one.
 */
static cJSON *
parse_json(const char *body, size_t len)
{
	char	   *copy;
	cJSON	   *root;

	if (body == NULL || len == 0 || len > CLASSIFY_MAX_JSON_BYTES)
		return NULL;
	if (len >= 3 && memcmp(body, "\xEF\xBB\xBF", 3) == 0)
	{
		body += 3;
		len -= 3;
	}
	while (len > 0 && is_space(*body))
	{
		body++;
		len--;
	}
	/* cheap reject: error and entity bodies are objects */
	if (len == 0 || *body != '{')
		return NULL;

	copy = malloc(len + 1);
	if (copy == NULL)
		return NULL;
	memcpy(copy, body, len);
	copy[len] = '\0';
	root = cJSON_ParseWithLength(copy, len);
	free(copy);
	return root;
}

/* Render a JSON number the way a human (and D365) would write it. */
void
classify_json_number(double v, char *buf, size_t size)
{
	/* integers are exact up to 2^53; print those without exponent */
	if (v > -9007199254740992.0 && v < 9007199254740992.0 &&
		v == (double) (long long) v)
		snprintf(buf, size, "%lld", (long long) v);
	else
		snprintf(buf, size, "%.17g", v);
}

typedef struct ErrInfo
{
	const char *code;			/* points into the cJSON tree or codebuf */
	const char *message;
	const char *inner;
	char		codebuf[40];
} ErrInfo;

static const char *
json_string_or_value(const cJSON *item)
{
	if (cJSON_IsString(item) && item->valuestring)
		return item->valuestring;
	/* OData v3 verbose: "message": {"lang": "en-US", "value": "..."} */
	if (cJSON_IsObject(item))
	{
		const cJSON *v = cJSON_GetObjectItemCaseSensitive(item, "value");

		if (cJSON_IsString(v) && v->valuestring)
			return v->valuestring;
	}
	return NULL;
}

/* Find the OData error object in a parsed body; false if there is none. */
static bool
error_info(const cJSON *root, ErrInfo *ei)
{
	const cJSON *err;
	const cJSON *code;
	const cJSON *inner;

	memset(ei, 0, sizeof(*ei));
	if (!cJSON_IsObject(root))
		return false;
	err = cJSON_GetObjectItemCaseSensitive(root, "error");
	if (!cJSON_IsObject(err))
		err = cJSON_GetObjectItemCaseSensitive(root, "odata.error");
	if (!cJSON_IsObject(err))
		return false;

	code = cJSON_GetObjectItemCaseSensitive(err, "code");
	if (cJSON_IsString(code) && code->valuestring)
		ei->code = code->valuestring;
	else if (cJSON_IsNumber(code))
	{
		classify_json_number(code->valuedouble, ei->codebuf, sizeof(ei->codebuf));
		ei->code = ei->codebuf;
	}

	ei->message = json_string_or_value(
		cJSON_GetObjectItemCaseSensitive(err, "message"));

	inner = cJSON_GetObjectItemCaseSensitive(err, "innererror");
	if (cJSON_IsObject(inner))
		ei->inner = json_string_or_value(
			cJSON_GetObjectItemCaseSensitive(inner, "message"));
	return true;
}

/* "message [innererror: inner]", either part optional */
static void
append_error_message(TextBuf *tb, const ErrInfo *ei)
{
	bool		have_msg = ei->message && ei->message[0];
	bool		have_inner = ei->inner && ei->inner[0] &&
		!(have_msg && strcmp(ei->message, ei->inner) == 0);

	if (have_msg)
		tb_append_str(tb, ei->message);
	if (have_inner)
	{
		if (have_msg)
		{
			tb_append_str(tb, " [innererror: ");
			tb_append_str(tb, ei->inner);
			tb_append_str(tb, "]");
		}
		else
			tb_append_str(tb, ei->inner);
	}
}

bool
odata_error_extract(const char *body, size_t len, char *code,
					size_t code_size, char *message, size_t msg_size)
{
	cJSON	   *root;
	ErrInfo		ei;
	TextBuf		tb;
	bool		found;

	if (code && code_size > 0)
		code[0] = '\0';
	if (message && msg_size > 0)
		message[0] = '\0';

	root = parse_json(body, len);
	if (root == NULL)
		return false;
	found = error_info(root, &ei);
	if (found)
	{
		if (code && code_size > 0 && ei.code)
		{
			tb_init(&tb, code, code_size);
			tb_append_str(&tb, ei.code);
		}
		if (message && msg_size > 0)
		{
			tb_init(&tb, message, msg_size);
			append_error_message(&tb, &ei);
			tb_finish(&tb);
		}
	}
	cJSON_Delete(root);
	return found;
}


/* ---------------------------------------------------------------------
 * New-record id
 * ---------------------------------------------------------------------
 */

/* %XX decoding in place; %00 and malformed escapes are kept literally */
static size_t
percent_decode(char *s, size_t n)
{
	size_t		i;
	size_t		o = 0;

	for (i = 0; i < n; i++)
	{
		if (s[i] == '%' && i + 2 < n)
		{
			int			hi = -1;
			int			lo = -1;
			char		a = ascii_lower(s[i + 1]);
			char		b = ascii_lower(s[i + 2]);

			if (is_digit(a))
				hi = a - '0';
			else if (a >= 'a' && a <= 'f')
				hi = a - 'a' + 10;
			if (is_digit(b))
				lo = b - '0';
			else if (b >= 'a' && b <= 'f')
				lo = b - 'a' + 10;
			if (hi >= 0 && lo >= 0 && (hi | lo) != 0)
			{
				s[o++] = (char) (hi * 16 + lo);
				i += 2;
				continue;
			}
		}
		s[o++] = s[i];
	}
	return o;
}

/*
 * The key of an entity URL: the text inside the last top-level (...),
 * e.g. ".../vendinvoices(5f1c...)" -> "5f1c...", or
 * "/data/VendorInvoiceHeaders(dataAreaId='usmf',HeaderReference='A(1)')"
 * -> "dataAreaId='usmf',HeaderReference='A(1)'".  Parentheses inside
 * single-quoted literals do not count; a '?' or '#' outside the key ends
 * the path.  Works the same for absolute and relative URLs.
 */
static bool
id_from_url(const char *url, size_t n, char *out, size_t size)
{
	const char *p = url;
	const char *e = url + n;
	const char *open = NULL;
	const char *key_open = NULL;
	const char *key_close = NULL;
	int			depth = 0;
	bool		inq = false;
	char		tmp[1024];
	size_t		klen;

	for (; p < e; p++)
	{
		char		c = *p;

		if (depth > 0 && c == '\'')
			inq = !inq;
		else if (inq)
			continue;
		else if (c == '(')
		{
			if (depth++ == 0)
				open = p;
		}
		else if (c == ')' && depth > 0)
		{
			if (--depth == 0)
			{
				key_open = open;
				key_close = p;
			}
		}
		else if (depth == 0 && (c == '?' || c == '#'))
			break;
	}
	if (key_open == NULL)
		return false;
	klen = (size_t) (key_close - key_open - 1);
	if (klen == 0 || klen >= sizeof(tmp))
		return false;
	memcpy(tmp, key_open + 1, klen);
	klen = percent_decode(tmp, klen);
	return copy_id(out, size, tmp, klen);
}

/*
 * The origin of a URL: scheme, host and port.  host points into the URL.
 */
typedef struct Origin
{
	bool		https;
	const char *host;
	size_t		hostlen;
	long		port;
} Origin;

typedef enum UrlKind
{
	URL_RELATIVE,				/* a relative reference without authority */
	URL_ABSOLUTE,				/* *out filled */
	URL_BAD						/* anything else: never trusted */
} UrlKind;

static inline bool
is_alpha(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static inline bool
is_slash(char c)
{
	/* WHATWG URL parsers treat '\' as '/' in http(s) URLs */
	return c == '/' || c == '\\';
}

/*
 * Classify url[0..n) and, for an absolute http(s) URL or a network-path
 * reference (which takes base's scheme), parse its origin.  Strict on
 * purpose: whatever some URL parser could resolve to a host other than the
 * one read here is URL_BAD.
 */
static UrlKind
url_origin(const char *s, size_t n, const Origin *base, Origin *out)
{
	const char *e = s + n;
	const char *a;				/* authority */
	const char *ae;
	const char *h;
	const char *p;
	size_t		i;

	while (s < e && (*s == ' ' || *s == '\t'))
		s++;
	while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
		e--;
	if (s == e)
		return URL_BAD;
	/* parsers drop tabs and line breaks anywhere: "/\t/evil" is "//evil" */
	for (p = s; p < e; p++)
	{
		if ((unsigned char) *p < 0x20 || *p == 0x7F)
			return URL_BAD;
	}

	if (e - s >= 2 && is_slash(s[0]) && is_slash(s[1]))
	{
		/*
		 * network-path reference: scheme of the base.  With a backslash
		 * parsers disagree on whether there is a host at all: refuse it.
		 */
		if (base == NULL || s[0] != '/' || s[1] != '/')
			return URL_BAD;
		out->https = base->https;
		a = s + 2;
	}
	else
	{
		/* scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":" */
		i = 0;
		if (is_alpha(s[0]))
		{
			for (i = 1; s + i < e; i++)
			{
				char		c = s[i];

				if (!(is_alpha(c) || is_digit(c) || c == '+' || c == '-' || c == '.'))
					break;
			}
		}
		if (i == 0 || s + i == e || s[i] != ':')
			return URL_RELATIVE;
		if (br_ieq(s, i, "https"))
			out->https = true;
		else if (br_ieq(s, i, "http"))
			out->https = false;
		else
			return URL_BAD;
		/*
		 * "https:host", "https:/host" and "https:\\host" mean a host to some
		 * parsers and none to others: only "//" is taken
		 */
		if (e - (s + i + 1) < 2 || s[i + 1] != '/' || s[i + 2] != '/')
			return URL_BAD;
		a = s + i + 3;
	}

	/*
	 * The authority ends at '/', '?' or '#' (RFC 3986).  A '\' in it ends it
	 * for WHATWG parsers but not for others ("https://root\@evil/"), so the
	 * host check below refuses it, with '@' and anything else unusual.
	 */
	for (ae = a; ae < e && *ae != '/' && *ae != '?' && *ae != '#'; ae++)
		;
	if (ae == a)
		return URL_BAD;

	/* host: reg-name of unreserved characters, or an IPv6 literal */
	h = a;
	if (*h == '[')
	{
		for (p = h + 1; p < ae && *p != ']'; p++)
		{
			char		c = ascii_lower(*p);

			if (!(is_digit(c) || (c >= 'a' && c <= 'f') || c == ':' || c == '.'))
				return URL_BAD;
		}
		if (p == ae || p == h + 1)
			return URL_BAD;
		p++;
	}
	else
	{
		for (p = h; p < ae && *p != ':'; p++)
		{
			char		c = *p;

			/* no '@' (user info), '%' (encoded host), '\', blanks, non-ASCII */
			if (!(is_alpha(c) || is_digit(c) || c == '-' || c == '.' ||
				  c == '_' || c == '~'))
				return URL_BAD;
		}
		if (p == h)
			return URL_BAD;
	}
	out->host = h;
	out->hostlen = (size_t) (p - h);

	out->port = out->https ? 443 : 80;
	if (p < ae)
	{
		long		port = 0;

		if (*p != ':' || ++p == ae)
			return URL_BAD;
		for (; p < ae; p++)
		{
			if (!is_digit(*p))
				return URL_BAD;
			port = port * 10 + (*p - '0');
			if (port > 65535)
				return URL_BAD;
		}
		out->port = port;
	}
	return URL_ABSOLUTE;
}

bool
classify_same_origin(const char *url, size_t len, const char *service_root)
{
	Origin		root;
	Origin		o;
	bool		have_root;
	size_t		i;

	if (url == NULL)
		return false;
	have_root = service_root != NULL &&
		url_origin(service_root, strlen(service_root), NULL, &root) == URL_ABSOLUTE;

	switch (url_origin(url, len, have_root ? &root : NULL, &o))
	{
		case URL_RELATIVE:
			return true;
		case URL_BAD:
			return false;
		case URL_ABSOLUTE:
			break;
	}
	if (!have_root || o.https != root.https || o.port != root.port ||
		o.hostlen != root.hostlen)
		return false;
	for (i = 0; i < o.hostlen; i++)
	{
		if (ascii_lower(o.host[i]) != ascii_lower(root.host[i]))
			return false;
	}
	return true;
}

bool
classify_entity_id(const char *url, size_t len, const char *service_root,
				   char *out, size_t size)
{
	if (out == NULL || size == 0)
		return false;
	out[0] = '\0';
	if (url == NULL || !classify_same_origin(url, len, service_root))
		return false;
	if (!id_from_url(url, len, out, size))
	{
		out[0] = '\0';
		return false;
	}
	return true;
}

static bool
id_from_body(const char *prop, BrSlice body, char *out, size_t size)
{
	cJSON	   *root;
	const cJSON *item;
	bool		ok = false;

	if (prop == NULL || prop[0] == '\0')
		return false;
	root = parse_json(body.ptr, body.len);
	if (root == NULL)
		return false;
	item = cJSON_GetObjectItemCaseSensitive(root, prop);
	if (cJSON_IsString(item) && item->valuestring)
		ok = copy_id(out, size, item->valuestring, strlen(item->valuestring));
	else if (cJSON_IsNumber(item))
	{
		char		num[64];

		classify_json_number(item->valuedouble, num, sizeof(num));
		ok = copy_id(out, size, num, strlen(num));
	}
	cJSON_Delete(root);
	return ok;
}


/* ---------------------------------------------------------------------
 * Retry-After
 * ---------------------------------------------------------------------
 */

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant). */
static int64_t
days_from_civil(int64_t y, int m, int d)
{
	int64_t		era;
	int64_t		yoe;
	int64_t		doy;
	int64_t		doe;

	y -= (m <= 2);
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = y - era * 400;
	doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + doe - 719468;
}

/* Gregorian year of a day number (inverse of the above, year only). */
static int64_t
year_from_days(int64_t z)
{
	int64_t		era;
	int64_t		doe;
	int64_t		yoe;
	int64_t		doy;
	int64_t		mp;

	z += 719468;
	era = (z >= 0 ? z : z - 146096) / 146097;
	doe = z - era * 146097;
	yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	mp = (5 * doy + 2) / 153;
	return yoe + era * 400 + (mp >= 10 ? 1 : 0);
}

static int
days_in_month(int64_t y, int m)
{
	static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};

	if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
		return 29;
	return dim[m - 1];
}

typedef struct Cursor
{
	const char *p;
	const char *e;
} Cursor;

static void
cur_skip_sp(Cursor *c)
{
	while (c->p < c->e && *c->p == ' ')
		c->p++;
}

static bool
cur_char(Cursor *c, char ch)
{
	if (c->p < c->e && *c->p == ch)
	{
		c->p++;
		return true;
	}
	return false;
}

/* exactly min..max digits */
static bool
cur_digits(Cursor *c, int min, int max, int *val)
{
	int			n = 0;
	int			v = 0;

	while (c->p < c->e && is_digit(*c->p) && n < max)
	{
		v = v * 10 + (*c->p - '0');
		c->p++;
		n++;
	}
	if (n < min || (c->p < c->e && is_digit(*c->p)))
		return false;
	*val = v;
	return true;
}

/* a run of ASCII letters, compared case-insensitively against names */
static int
cur_word(Cursor *c, const char *const *names, int nnames)
{
	const char *w = c->p;
	size_t		wl;
	int			i;

	while (c->p < c->e && ((*c->p >= 'a' && *c->p <= 'z') ||
						   (*c->p >= 'A' && *c->p <= 'Z')))
		c->p++;
	wl = (size_t) (c->p - w);
	for (i = 0; i < nnames; i++)
	{
		if (br_ieq(w, wl, names[i]))
			return i;
	}
	return -1;
}

static bool
cur_time(Cursor *c, int *h, int *mi, int *s)
{
	return cur_digits(c, 2, 2, h) && cur_char(c, ':') &&
		cur_digits(c, 2, 2, mi) && cur_char(c, ':') &&
		cur_digits(c, 2, 2, s) &&
		*h <= 23 && *mi <= 59 && *s <= 60;
}

static const char *const month_names[12] = {
	"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
};
static const char *const day_names[14] = {
	"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun",
	"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
	"Sunday"
};

/*
 * HTTP-date (RFC 7231 7.1.1.1) -> seconds since the epoch.
 *	 IMF-fixdate  Sun, 06 Nov 1994 08:49:37 GMT
 *	 RFC 850      Sunday, 06-Nov-94 08:49:37 GMT
 *	 asctime      Sun Nov  6 08:49:37 1994
 * Names are matched case-insensitively and the weekday is not checked
 * against the date; runs of spaces are tolerated.  Pure arithmetic, so
 * neither TZ nor the locale matter.
 */
static bool
parse_http_date(const char *p, const char *e, time_t now, int64_t *out)
{
	Cursor		c;
	int			wd;
	int			day = 0;
	int			mon;
	int			year = 0;
	int			h = 0;
	int			mi = 0;
	int			s = 0;
	int64_t		y;

	c.p = p;
	c.e = e;
	wd = cur_word(&c, day_names, 14);
	if (wd < 0)
		return false;

	if (cur_char(&c, ','))
	{
		cur_skip_sp(&c);
		if (!cur_digits(&c, 1, 2, &day))
			return false;
		if (cur_char(&c, '-'))
		{
			/* RFC 850 */
			const char *ys;

			mon = cur_word(&c, month_names, 12);
			if (mon < 0 || !cur_char(&c, '-'))
				return false;
			ys = c.p;
			if (!cur_digits(&c, 2, 4, &year) || c.p - ys == 3)
				return false;
			if (c.p - ys == 2)
			{
				/* two-digit year: RFC 7231 "more than 50 years in the future" rule */
				int64_t		cy = year_from_days((int64_t) now / 86400);
				int64_t		full = cy - cy % 100 + year;

				if (full > cy + 50)
					full -= 100;
				y = full;
			}
			else
				y = year;
		}
		else
		{
			/* IMF-fixdate */
			cur_skip_sp(&c);
			mon = cur_word(&c, month_names, 12);
			cur_skip_sp(&c);
			if (mon < 0 || !cur_digits(&c, 4, 4, &year))
				return false;
			y = year;
		}
		cur_skip_sp(&c);
		if (!cur_time(&c, &h, &mi, &s))
			return false;
		cur_skip_sp(&c);
		if (c.e - c.p != 3 || !br_ieq(c.p, 3, "GMT"))
			return false;
	}
	else
	{
		/* asctime: weekday must be the short form */
		if (wd >= 7)
			return false;
		cur_skip_sp(&c);
		mon = cur_word(&c, month_names, 12);
		cur_skip_sp(&c);
		if (mon < 0 || !cur_digits(&c, 1, 2, &day))
			return false;
		cur_skip_sp(&c);
		if (!cur_time(&c, &h, &mi, &s))
			return false;
		cur_skip_sp(&c);
		if (!cur_digits(&c, 4, 4, &year) || c.p != c.e)
			return false;
		y = year;
	}

	if (y < 1 || day < 1 || day > days_in_month(y, mon + 1))
		return false;
	*out = days_from_civil(y, mon + 1, day) * 86400 +
		(int64_t) h * 3600 + mi * 60 + s;
	return true;
}

/* 9999-12-31 23:59:59 GMT, the last second an HTTP-date can name */
#define RA_LAST_DATE INT64_C(253402300799)

int
parse_retry_after_capped(const char *value, size_t len, time_t now,
						 bool *capped)
{
	const char *p = value;
	const char *e;
	int64_t		now64 = (int64_t) now;
	int64_t		t;

	if (capped != NULL)
		*capped = false;
	if (value == NULL)
		return -1;
	e = value + len;
	while (p < e && is_space(*p))
		p++;
	while (e > p && is_space(e[-1]))
		e--;
	if (p == e)
		return -1;

	/* a clock outside the dates an HTTP-date can name is not one to trust */
	if (now64 < 0)
		now64 = 0;
	else if (now64 > RA_LAST_DATE)
		now64 = RA_LAST_DATE;

	if (is_digit(*p))
	{
		const char *q;

		/* accumulates no further than one past the cap: no overflow */
		t = 0;
		for (q = p; q < e && is_digit(*q); q++)
		{
			if (t <= CLASSIFY_RETRY_AFTER_MAX)
				t = t * 10 + (*q - '0');
		}
		if (q != e)
			return -1;
	}
	else
	{
		if (!parse_http_date(p, e, (time_t) now64, &t))
			return -1;
		/* both within 0001..9999: no overflow */
		t -= now64;
		if (t < 0)
			t = 0;
	}
	if (t > CLASSIFY_RETRY_AFTER_MAX)
	{
		if (capped != NULL)
			*capped = true;
		return CLASSIFY_RETRY_AFTER_MAX;
	}
	return (int) t;
}

int
parse_retry_after(const char *value, size_t len, time_t now)
{
	return parse_retry_after_capped(value, len, now, NULL);
}


/* ---------------------------------------------------------------------
 * Classification
 * ---------------------------------------------------------------------
 */
const char *
outcome_name(Outcome o)
{
	switch (o)
	{
		case OUTCOME_CREATED:
			return "created";
		case OUTCOME_DUPLICATE:
			return "duplicate";
		case OUTCOME_RETRY:
			return "retry";
		case OUTCOME_REVIEW:
			return "review";
		case OUTCOME_AUTH:
			return "auth";
	}
	return "unknown";
}

static bool
is_duplicate(const ClassifyConfig *cfg, int status, const ErrInfo *ei)
{
	const int  *st = default_duplicate_statuses;
	int			nst = 2;
	int			i;

	if (cfg && cfg->duplicate_statuses)
	{
		st = cfg->duplicate_statuses;
		nst = cfg->n_duplicate_statuses;
	}
	for (i = 0; i < nst; i++)
	{
		if (st[i] == status)
			return true;
	}
	if (cfg == NULL || ei == NULL)
		return false;

	if (ei->code && cfg->duplicate_codes)
	{
		for (i = 0; i < cfg->n_duplicate_codes; i++)
		{
			const char *dc = cfg->duplicate_codes[i];

			if (dc && dc[0] && br_ieq(ei->code, strlen(ei->code), dc))
				return true;
		}
	}
	if (cfg->duplicate_messages)
	{
		for (i = 0; i < cfg->n_duplicate_messages; i++)
		{
			const char *dm = cfg->duplicate_messages[i];

			if (ci_contains(ei->message, dm) || ci_contains(ei->inner, dm))
				return true;
		}
	}
	return false;
}

void
classify_response(const ClassifyConfig *cfg, int http_status,
				  BrSlice headers, BrSlice body, time_t now,
				  Classification *out)
{
	BrSlice		v;
	cJSON	   *root = NULL;
	ErrInfo		ei;
	bool		have_err = false;
	TextBuf		tb;
	char		prefix[48];

	memset(out, 0, sizeof(*out));
	memset(&ei, 0, sizeof(ei));
	out->outcome = OUTCOME_REVIEW;
	out->retry_after = -1;
	if (body.ptr == NULL)
		body.len = 0;
	if (headers.ptr == NULL)
		headers.len = 0;

	/* reported whatever the outcome; only meaningful for retry */
	if (br_header_get(headers, "Retry-After", &v))
		out->retry_after = parse_retry_after_capped(v.ptr, v.len, now,
													&out->retry_after_capped);

	/*
	 * Success first: a 2xx is the server telling us the record exists now,
	 * and a success body is never an OData error body.
	 */
	if (http_status >= 200 && http_status <= 299)
	{
		out->outcome = OUTCOME_CREATED;
		if (!id_from_body(cfg ? cfg->id_property : NULL, body,
						  out->d365_id, sizeof(out->d365_id)))
		{
			const char *root = cfg ? cfg->service_root : NULL;

			/* a URL on another origin is not ours to trust: skip it */
			out->d365_id[0] = '\0';
			if (!(br_header_get(headers, "OData-EntityId", &v) &&
				  classify_entity_id(v.ptr, v.len, root, out->d365_id,
									 sizeof(out->d365_id))) &&
				!(br_header_get(headers, "Location", &v) &&
				  classify_entity_id(v.ptr, v.len, root, out->d365_id,
									 sizeof(out->d365_id))))
				out->d365_id[0] = '\0';
		}
		return;
	}

	root = parse_json(body.ptr, body.len);
	if (root)
		have_err = error_info(root, &ei);

	if (have_err && ei.code)
	{
		tb_init(&tb, out->error_code, sizeof(out->error_code));
		tb_append_str(&tb, ei.code);
	}

	/* error_text: "HTTP 400: message", falling back to the raw body */
	tb_init(&tb, out->error_text, sizeof(out->error_text));
	if (http_status > 0)
		snprintf(prefix, sizeof(prefix), "HTTP %d", http_status);
	else
		snprintf(prefix, sizeof(prefix), "no valid HTTP status");
	tb_append_str(&tb, prefix);
	if (have_err && ((ei.message && ei.message[0]) || (ei.inner && ei.inner[0])))
	{
		tb_append_str(&tb, ": ");
		append_error_message(&tb, &ei);
	}
	else if (have_err && ei.code && ei.code[0])
	{
		tb_append_str(&tb, ": error code ");
		tb_append_str(&tb, ei.code);
	}
	else
	{
		const char *b = body.ptr;
		size_t		n = body.len;

		while (n > 0 && is_space(*b))
		{
			b++;
			n--;
		}
		if (n > 0)
		{
			tb_append_str(&tb, ": ");
			tb_append(&tb, b, n, true);
		}
	}
	tb_finish(&tb);

	/* duplicate wins over everything: a duplicate must never be retried */
	if (is_duplicate(cfg, http_status, have_err ? &ei : NULL))
		out->outcome = OUTCOME_DUPLICATE;
	else if (http_status == 401)
		out->outcome = OUTCOME_AUTH;
	else if (http_status == 408 || http_status == 429 ||
			 http_status == 500 || http_status == 502 ||
			 http_status == 503 || http_status == 504)
		out->outcome = OUTCOME_RETRY;
	else
		out->outcome = OUTCOME_REVIEW;

	cJSON_Delete(root);
}
