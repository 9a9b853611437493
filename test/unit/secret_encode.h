/*-------------------------------------------------------------------------
 *
 * secret_encode.h
 *	  Encoders and an independent leak oracle for testing auth_mask_secret()
 *	  (test/unit/test_auth.c, test/fuzz/fuzz_mask.c,
 *	  test/fuzz/fuzz_token_response.c).  Plain C99, header-only.
 *
 * The encoders spell one character of a secret the way a server might echo
 * it: raw, %XX, '+', JSON escapes, HTML references.  Applying several in
 * turn to one character's spelling gives nested encodings ("%2526").
 *
 * The oracle deliberately shares no code with the masker: it decodes a
 * whole text greedily, left to right, with one plain textbook decoder per
 * family (and every composition of up to three of them), collapses blanks,
 * and looks for the secret, or a prefix of at least 4 bytes of it at the
 * end.  Anything it finds in masked text is a leak: every such decoding is
 * one of the readings the masker must cover.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_SECRET_ENCODE_H
#define D365INV_SECRET_ENCODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* not every program uses every helper */
#define SE_UNUSED __attribute__((unused))

/* ---------------------------------------------------------------------
 * Growable byte buffer (malloc; NUL-terminated for convenience)
 * ---------------------------------------------------------------------
 */
typedef struct SeBuf
{
	char	   *p;
	size_t		len;
	size_t		cap;
} SeBuf;

static SE_UNUSED void
se_put(SeBuf *b, const void *s, size_t n)
{
	if (b->len + n + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 64;

		while (b->len + n + 1 > cap)
			cap *= 2;
		b->p = realloc(b->p, cap);
		if (b->p == NULL)
			abort();
		b->cap = cap;
	}
	if (n > 0)
		memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static SE_UNUSED void
se_puts(SeBuf *b, const char *s)
{
	se_put(b, s, strlen(s));
}

static SE_UNUSED void
se_free(SeBuf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

/* length of the UTF-8 character at s (1 for anything ill-formed) */
static SE_UNUSED size_t
se_charlen(const unsigned char *s, size_t n)
{
	size_t		need = (s[0] >= 0xF0 && s[0] <= 0xF4) ? 4 :
		(s[0] >= 0xE0 && s[0] <= 0xEF) ? 3 :
		(s[0] >= 0xC2 && s[0] <= 0xDF) ? 2 : 1;
	size_t		i;

	if (need > n)
		return 1;
	for (i = 1; i < need; i++)
		if ((s[i] & 0xC0) != 0x80)
			return 1;
	return need;
}

static SE_UNUSED uint32_t
se_codepoint(const unsigned char *s, size_t clen)
{
	switch (clen)
	{
		case 2:
			return ((uint32_t) (s[0] & 0x1F) << 6) | (s[1] & 0x3F);
		case 3:
			return ((uint32_t) (s[0] & 0x0F) << 12) | ((uint32_t) (s[1] & 0x3F) << 6) |
				(s[2] & 0x3F);
		case 4:
			return ((uint32_t) (s[0] & 0x07) << 18) | ((uint32_t) (s[1] & 0x3F) << 12) |
				((uint32_t) (s[2] & 0x3F) << 6) | (s[3] & 0x3F);
		default:
			return s[0];
	}
}

static SE_UNUSED void
se_put_utf8(SeBuf *b, uint32_t cp)
{
	unsigned char u[4];
	size_t		n;

	if (cp < 0x80)
	{
		u[0] = (unsigned char) cp;
		n = 1;
	}
	else if (cp < 0x800)
	{
		u[0] = 0xC0 | (cp >> 6);
		u[1] = 0x80 | (cp & 0x3F);
		n = 2;
	}
	else if (cp < 0x10000)
	{
		u[0] = 0xE0 | (cp >> 12);
		u[1] = 0x80 | ((cp >> 6) & 0x3F);
		u[2] = 0x80 | (cp & 0x3F);
		n = 3;
	}
	else
	{
		u[0] = 0xF0 | (cp >> 18);
		u[1] = 0x80 | ((cp >> 12) & 0x3F);
		u[2] = 0x80 | ((cp >> 6) & 0x3F);
		u[3] = 0x80 | (cp & 0x3F);
		n = 4;
	}
	se_put(b, u, n);
}

/* ---------------------------------------------------------------------
 * Encoders: one character (its UTF-8 bytes) in one spelling
 * ---------------------------------------------------------------------
 */
typedef enum SeMode
{
	SE_RAW,
	SE_PCT_UPPER,				/* %2F for every byte */
	SE_PCT_LOWER,				/* %2f for every byte */
	SE_FORM,					/* application/x-www-form-urlencoded */
	SE_JSON_SHORT,				/* \" \\ \/ \b \f \n \r \t, else raw */
	SE_JSON_U_LOWER,			/* \u002f, surrogate pairs above U+FFFF */
	SE_JSON_U_UPPER,			/* \u002F */
	SE_HTML_NAMED,				/* &amp; &lt; &gt; &quot; &#39;, else raw */
	SE_HTML_DEC,				/* &#47; */
	SE_HTML_HEX,				/* &#x2f; */
	SE_HTML_HEX_UPPER,			/* &#X2F; */
	SE_HTML_DEC_ZEROS,			/* &#00047; */
	SE_HTML_NO_SEMI,			/* &#47 */
	SE_NMODES
} SeMode;

static SE_UNUSED const char *const se_mode_names[SE_NMODES] = {
	"raw", "%XX", "%xx", "form", "JSON short", "JSON \\uxxxx",
	"JSON \\uXXXX", "HTML named", "HTML &#NN;", "HTML &#xhh;",
	"HTML &#XHH;", "HTML &#000NN;", "HTML &#NN"
};

static SE_UNUSED void
se_encode_char(SeBuf *out, const unsigned char *c, size_t clen, SeMode mode)
{
	uint32_t	cp = se_codepoint(c, clen);
	char		tmp[32];
	size_t		i;

	switch (mode)
	{
		case SE_RAW:
			se_put(out, c, clen);
			return;
		case SE_PCT_UPPER:
		case SE_PCT_LOWER:
			for (i = 0; i < clen; i++)
			{
				snprintf(tmp, sizeof(tmp), mode == SE_PCT_UPPER ? "%%%02X" : "%%%02x", c[i]);
				se_puts(out, tmp);
			}
			return;
		case SE_FORM:
			if (clen == 1 && c[0] == ' ')
				se_puts(out, "+");
			else if (clen == 1 && ((c[0] >= 'A' && c[0] <= 'Z') || (c[0] >= 'a' && c[0] <= 'z') ||
								   (c[0] >= '0' && c[0] <= '9') || strchr("-._~", c[0])))
				se_put(out, c, 1);
			else
				se_encode_char(out, c, clen, SE_PCT_UPPER);
			return;
		case SE_JSON_SHORT:
			if (clen == 1)
			{
				const char *esc = NULL;

				switch (c[0])
				{
					case '"':
						esc = "\\\"";
						break;
					case '\\':
						esc = "\\\\";
						break;
					case '/':
						esc = "\\/";
						break;
					case '\b':
						esc = "\\b";
						break;
					case '\f':
						esc = "\\f";
						break;
					case '\n':
						esc = "\\n";
						break;
					case '\r':
						esc = "\\r";
						break;
					case '\t':
						esc = "\\t";
						break;
				}
				if (esc)
				{
					se_puts(out, esc);
					return;
				}
			}
			se_put(out, c, clen);
			return;
		case SE_JSON_U_LOWER:
		case SE_JSON_U_UPPER:
			{
				const char *f = (mode == SE_JSON_U_LOWER) ? "\\u%04x" : "\\u%04X";

				if (clen == 1 && c[0] >= 0x80)
				{
					/* not a character: cannot be \u-escaped */
					se_put(out, c, clen);
					return;
				}
				if (cp >= 0x10000)
				{
					snprintf(tmp, sizeof(tmp), f, 0xD800 + ((cp - 0x10000) >> 10));
					se_puts(out, tmp);
					cp = 0xDC00 + ((cp - 0x10000) & 0x3FF);
				}
				snprintf(tmp, sizeof(tmp), f, cp);
				se_puts(out, tmp);
				return;
			}
		case SE_HTML_NAMED:
			if (clen == 1)
			{
				const char *esc = NULL;

				switch (c[0])
				{
					case '&':
						esc = "&amp;";
						break;
					case '<':
						esc = "&lt;";
						break;
					case '>':
						esc = "&gt;";
						break;
					case '"':
						esc = "&quot;";
						break;
					case '\'':
						esc = "&#39;";
						break;
				}
				if (esc)
				{
					se_puts(out, esc);
					return;
				}
			}
			se_put(out, c, clen);
			return;
		case SE_HTML_DEC:
		case SE_HTML_HEX:
		case SE_HTML_HEX_UPPER:
		case SE_HTML_DEC_ZEROS:
		case SE_HTML_NO_SEMI:
			if ((clen == 1 && c[0] >= 0x80) || cp == 0 || (cp >= 0x80 && cp <= 0x9F))
			{
				/* no reference spells these as themselves */
				se_put(out, c, clen);
				return;
			}
			snprintf(tmp, sizeof(tmp),
					 mode == SE_HTML_DEC ? "&#%u;" :
					 mode == SE_HTML_HEX ? "&#x%x;" :
					 mode == SE_HTML_HEX_UPPER ? "&#X%X;" :
					 mode == SE_HTML_DEC_ZEROS ? "&#000%u;" : "&#%u",
					 (unsigned) cp);
			se_puts(out, tmp);
			return;
		case SE_NMODES:
			break;
	}
	se_put(out, c, clen);
}

/* every character of s[0..n) in the given mode */
static SE_UNUSED void
se_encode_all(SeBuf *out, const char *s, size_t n, SeMode mode)
{
	const unsigned char *u = (const unsigned char *) s;
	size_t		i = 0;

	while (i < n)
	{
		size_t		cl = se_charlen(u + i, n - i);

		se_encode_char(out, u + i, cl, mode);
		i += cl;
	}
}

/*
 * One character spelled in modes[0], that spelling in modes[1], and so on
 * (ndepth of them): e.g. '/' in {SE_PCT_UPPER, SE_PCT_UPPER} is "%252F".
 */
static SE_UNUSED void
se_encode_nested(SeBuf *out, const unsigned char *c, size_t clen,
				 const SeMode *modes, int ndepth)
{
	SeBuf		cur = {0};
	SeBuf		next = {0};
	int			d;

	se_put(&cur, c, clen);
	for (d = 0; d < ndepth; d++)
	{
		next.len = 0;
		se_encode_all(&next, cur.p, cur.len, modes[d]);
		cur.len = 0;
		se_put(&cur, next.p, next.len);
	}
	se_put(out, cur.p, cur.len);
	se_free(&cur);
	se_free(&next);
}

/* ---------------------------------------------------------------------
 * Oracle: textbook decoders and the search
 * ---------------------------------------------------------------------
 */
static SE_UNUSED int
se_hex(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* %XX and '+' */
static SE_UNUSED void
se_decode_form(SeBuf *out, const char *s, size_t n)
{
	size_t		i;

	for (i = 0; i < n; i++)
	{
		if (s[i] == '%' && i + 2 < n && se_hex(s[i + 1]) >= 0 && se_hex(s[i + 2]) >= 0)
		{
			char		b = (char) (se_hex(s[i + 1]) * 16 + se_hex(s[i + 2]));

			se_put(out, &b, 1);
			i += 2;
		}
		else if (s[i] == '+')
			se_puts(out, " ");
		else
			se_put(out, s + i, 1);
	}
}

static SE_UNUSED bool
se_hex4(const char *s, size_t n, size_t i, uint32_t *v)
{
	size_t		k;

	*v = 0;
	if (i + 4 > n)
		return false;
	for (k = 0; k < 4; k++)
	{
		int			h = se_hex(s[i + k]);

		if (h < 0)
			return false;
		*v = *v * 16 + (uint32_t) h;
	}
	return true;
}

/* JSON string escapes; a lone surrogate becomes 0xFF, never in a secret */
static SE_UNUSED void
se_decode_json(SeBuf *out, const char *s, size_t n)
{
	size_t		i;

	for (i = 0; i < n; i++)
	{
		const char *m = (i + 1 < n) ? strchr("\"\\/bfnrt", s[i + 1]) : NULL;
		uint32_t	cp;
		uint32_t	lo;

		if (s[i] != '\\' || i + 1 >= n || s[i + 1] == '\0')
		{
			se_put(out, s + i, 1);
			continue;
		}
		if (m != NULL)
		{
			static const char to[] = "\"\\/\b\f\n\r\t";

			se_put(out, &to[m - "\"\\/bfnrt"], 1);
			i++;
			continue;
		}
		if (s[i + 1] != 'u' || !se_hex4(s, n, i + 2, &cp))
		{
			se_put(out, s + i, 1);
			continue;
		}
		i += 5;
		if (cp >= 0xD800 && cp <= 0xDBFF && i + 2 < n && s[i + 1] == '\\' &&
			s[i + 2] == 'u' && se_hex4(s, n, i + 3, &lo) && lo >= 0xDC00 && lo <= 0xDFFF)
		{
			se_put_utf8(out, 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00));
			i += 6;
		}
		else if (cp >= 0xD800 && cp <= 0xDFFF)
			se_puts(out, "\xFF");
		else
			se_put_utf8(out, cp);
	}
}

/* &amp; &lt; &gt; &quot; &apos; &#NN; &#xNN; (';' required) */
static SE_UNUSED void
se_decode_html(SeBuf *out, const char *s, size_t n)
{
	static const struct
	{
		const char *name;
		char		c;
	}			names[] = {{"amp;", '&'}, {"lt;", '<'}, {"gt;", '>'}, {"quot;", '"'}, {"apos;", '\''}};
	size_t		i;

	for (i = 0; i < n; i++)
	{
		size_t		k;
		bool		done = false;

		if (s[i] != '&')
		{
			se_put(out, s + i, 1);
			continue;
		}
		for (k = 0; k < sizeof(names) / sizeof(names[0]) && !done; k++)
		{
			size_t		nl = strlen(names[k].name);

			if (i + 1 + nl <= n && memcmp(s + i + 1, names[k].name, nl) == 0)
			{
				se_put(out, &names[k].c, 1);
				i += nl;
				done = true;
			}
		}
		if (!done && i + 2 < n && s[i + 1] == '#')
		{
			bool		hex = (s[i + 2] == 'x' || s[i + 2] == 'X');
			size_t		j = i + 2 + (hex ? 1 : 0);
			size_t		d0 = j;
			uint64_t	v = 0;

			for (; j < n; j++)
			{
				int			d = hex ? se_hex(s[j]) : (s[j] >= '0' && s[j] <= '9') ? s[j] - '0' : -1;

				if (d < 0)
					break;
				if (v <= 0x10FFFF)
					v = v * (hex ? 16 : 10) + (uint64_t) d;
			}
			if (j > d0 && j < n && s[j] == ';')
			{
				if (v == 0 || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
					se_puts(out, "\xFF");
				else
					se_put_utf8(out, (uint32_t) v);
				i = j;
				done = true;
			}
		}
		if (!done)
			se_put(out, s + i, 1);
	}
}

/* blanks and control characters collapsed to one space; trim if asked */
static SE_UNUSED void
se_canon(SeBuf *out, const char *s, size_t n, bool trim)
{
	size_t		i;
	bool		blank = false;

	for (i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c <= 0x20 || c == 0x7F)
		{
			blank = true;
			continue;
		}
		if (blank && !(trim && out->len == 0))
			se_puts(out, " ");
		blank = false;
		se_put(out, s + i, 1);
	}
	if (blank && !trim && out->len > 0)
		se_puts(out, " ");
}

static SE_UNUSED const char *
se_memmem(const char *h, size_t hn, const char *nd, size_t nn)
{
	size_t		i;

	if (nn == 0 || nn > hn)
		return NULL;
	/* by hand: libFuzzer hooks memcmp, and this runs a lot */
	for (i = 0; i + nn <= hn; i++)
	{
		size_t		k;

		for (k = 0; k < nn && h[i + k] == nd[k]; k++)
			;
		if (k == nn)
			return h + i;
	}
	return NULL;
}

typedef void (*SeDecoder) (SeBuf *, const char *, size_t);

static SE_UNUSED const SeDecoder se_decoders[3] = {se_decode_form, se_decode_json, se_decode_html};
static SE_UNUSED const char *const se_decoder_names[3] = {"form", "JSON", "HTML"};

/* the secret, or a prefix of at least minp bytes at the end, in canon */
static SE_UNUSED bool
se_shows(const char *t, size_t n, const SeBuf *sec, size_t minp)
{
	SeBuf		canon = {0};
	bool		leak;
	size_t		k;

	se_canon(&canon, t, n, false);
	leak = se_memmem(canon.p, canon.len, sec->p, sec->len) != NULL;
	for (k = minp; k < sec->len && !leak; k++)
		if (canon.len >= k && se_memmem(canon.p + canon.len - k, k, sec->p, k))
			leak = true;
	se_free(&canon);
	return leak;
}

/*
 * The text as it is, then each decoder on it, then each on those, three
 * deep; a decoder that changes nothing adds no new reading.
 */
static SE_UNUSED bool
se_leaks_from(const char *t, size_t n, const SeBuf *sec, size_t minp,
			  int depth, char *why, size_t whylen, size_t whypos)
{
	int			d;

	if (se_shows(t, n, sec, minp))
		return true;
	if (depth == 3)
		return false;
	for (d = 0; d < 3; d++)
	{
		SeBuf		dec = {0};
		bool		leak = false;

		se_decoders[d] (&dec, t, n);
		if (!(dec.len == n && (n == 0 || memcmp(dec.p, t, n) == 0)))
		{
			if (why && whypos < whylen)
				snprintf(why + whypos, whylen - whypos, "+%s", se_decoder_names[d]);
			leak = se_leaks_from(dec.p ? dec.p : "", dec.len, sec, minp, depth + 1,
								 why, whylen, why ? strlen(why) : 0);
			if (!leak && why && whypos < whylen)
				why[whypos] = '\0';
		}
		se_free(&dec);
		if (leak)
			return true;
	}
	return false;
}

/*
 * Does text[0..n) still show the secret, in one of the readings?  why (if
 * not NULL) gets the decoders of the first one found, e.g. "raw+form+HTML".
 */
static SE_UNUSED bool
se_leaks(const char *text, size_t n, const char *secret, char *why, size_t whylen)
{
	SeBuf		sec = {0};
	bool		leak;

	se_canon(&sec, secret, strlen(secret), true);
	if (sec.len == 0)
	{
		se_free(&sec);
		return false;
	}
	if (why && whylen > 0)
		snprintf(why, whylen, "raw");
	leak = se_leaks_from(text, n, &sec, sec.len < 4 ? sec.len : 4, 0,
						 why, whylen, why ? strlen(why) : 0);
	se_free(&sec);
	return leak;
}

#endif							/* D365INV_SECRET_ENCODE_H */
