/*-------------------------------------------------------------------------
 *
 * fuzz_mask.c
 *	  libFuzzer target for the masking property of auth_mask_secret()
 *	  (src/auth.c): whatever the server text, and however the secret is
 *	  spelled in it, the masked text never shows the secret.
 *
 * Input (every part optional; missing bytes read as 0):
 *	 byte 0        flags: 1 cut the text at a chosen offset; 2 run the
 *	               blank clean-up of auth.c first; 4 no planted secret,
 *	               the rest of the input is the text as it is
 *	 byte 1        secret length, 1..24 characters
 *	 that many     the secret's characters, from an alphabet of printable
 *	               ASCII, a tab, and 2-, 3- and 4-byte UTF-8
 *	 per character its spelling: a byte for how deep (0-3 encodings on top
 *	               of each other), then a byte per encoding (SeMode)
 *	 2 bytes       where to cut
 *	 the rest      text around the secret: first half before, second after
 *
 * Checks, trapping on violation:
 *	 - the result is as long as the text, or 0 (withheld), and only bytes
 *	   that were overwritten differ, all with one filler byte that is not
 *	   in the secret;
 *	 - the independent oracle of test/unit/secret_encode.h reads no secret
 *	   (nor a 4-byte prefix of it at the end) in the result;
 *	 - every byte of the planted, spelled-out secret is overwritten, or,
 *	   when the cut leaves only its start, every byte of that start once
 *	   it spells at least 4 bytes of the secret;
 *	 - masking the result again changes nothing;
 *	 - nothing palloc'd is left behind.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "auth.h"
#include "http.h"

#include "pg_shims.h"
#include "secret_encode.h"

#define CHECK(cond) \
	do { \
		if (!(cond)) \
		{ \
			fprintf(stderr, "contract violated: %s (%s:%d)\n", #cond, \
					__FILE__, __LINE__); \
			abort(); \
		} \
	} while (0)

#define MAX_CHARS 24

static const char *const extra_chars[] = {
	"\t", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\xc2\xa0", "\xef\xbf\xbd"
};

typedef struct Input
{
	const uint8_t *p;
	size_t		n;
} Input;

static uint8_t
next_byte(Input *in)
{
	uint8_t		b = 0;

	if (in->n > 0)
	{
		b = *in->p++;
		in->n--;
	}
	return b;
}

static bool
is_blank_char(const char *c, size_t n)
{
	return n == 1 && ((unsigned char) c[0] <= 0x20 || c[0] == 0x7F);
}

/* auth.c's clean_text() without the cut: controls and blank runs -> ' ' */
static size_t
clean_up(char *s, size_t n)
{
	size_t		i;
	size_t		o = 0;
	bool		space = false;

	for (i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c < 0x20 || c == 0x7F || c == ' ')
		{
			space = (o > 0);
			continue;
		}
		if (space)
			s[o++] = ' ';
		space = false;
		s[o++] = (char) c;
	}
	return o;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	Input		in = {data, size};
	uint8_t		flags = next_byte(&in);
	int			nchars = 1 + next_byte(&in) % MAX_CHARS;
	SeBuf		secret = {0};
	size_t		cstart[MAX_CHARS + 1];	/* char k of the secret: bytes */
	SeBuf		text = {0};
	size_t		ustart[MAX_CHARS + 1];	/* its spelling: text offsets */
	bool		blank[MAX_CHARS];
	size_t		span_start;
	size_t		n;
	size_t		cut;
	size_t		outlen;
	char	   *out;
	char		filler = 0;
	char		why[64];
	long		before = live_chunks(CurrentMemoryContext);
	int			k;
	size_t		i;

	/* the secret */
	for (k = 0; k < nchars; k++)
	{
		uint8_t		b = next_byte(&in);
		const char *c;
		size_t		cl;
		char		one;

		cstart[k] = secret.len;
		if (b < 95)
		{
			one = (char) (0x20 + b);
			c = &one;
			cl = 1;
		}
		else
		{
			c = extra_chars[b % lengthof(extra_chars)];
			cl = strlen(c);
		}
		se_put(&secret, c, cl);
		blank[k] = is_blank_char(c, cl);
	}
	cstart[nchars] = secret.len;

	/* the text: before, the secret spelled out, after */
	if (flags & 4)
	{
		se_put(&text, in.p, in.n);
		span_start = 0;
		for (k = 0; k <= nchars; k++)
			ustart[k] = 0;
	}
	else
	{
		SeBuf		spelled = {0};
		size_t		half;

		for (k = 0; k < nchars; k++)
		{
			SeMode		modes[3];
			int			depth = next_byte(&in) % 4;
			int			d;

			for (d = 0; d < depth; d++)
				modes[d] = (SeMode) (next_byte(&in) % SE_NMODES);
			ustart[k] = spelled.len;
			se_encode_nested(&spelled, (const unsigned char *) secret.p + cstart[k],
							 cstart[k + 1] - cstart[k], modes, depth);
		}
		ustart[nchars] = spelled.len;
		cut = next_byte(&in);
		cut = cut * 256 + next_byte(&in);
		half = in.n / 2;
		se_put(&text, in.p, half);
		span_start = text.len;
		se_put(&text, spelled.p, spelled.len);
		se_put(&text, in.p + half, in.n - half);
		for (k = 0; k <= nchars; k++)
			ustart[k] += span_start;
		se_free(&spelled);
		if (flags & 1)
		{
			cut %= text.len + 1;
			text.len = cut;
		}
	}
	n = text.len;
	if (flags & 2)
		n = clean_up(text.p, n);

	out = malloc(n + 1);
	memcpy(out, text.p ? text.p : "", n);
	out[n] = '\0';
	outlen = auth_mask_secret(out, n, secret.p);
	CHECK(live_chunks(CurrentMemoryContext) == before);

	/* same length or withheld; one filler, not in the secret */
	CHECK(outlen == n || outlen == 0);
	if (outlen == n)
	{
		for (i = 0; i < n; i++)
		{
			if (out[i] == text.p[i])
				continue;
			if (filler == 0)
				filler = out[i];
			CHECK(out[i] == filler);
		}
		if (filler != 0)
		{
			CHECK(strchr("*?^|!=@$:,~.-_", filler) != NULL);
			CHECK(memchr(secret.p, filler, secret.len) == NULL);
		}
	}
	else
		CHECK(n == 0 || out[0] == '\0');

	/* the oracle */
	if (se_leaks(out, outlen, secret.p, why, sizeof(why)))
	{
		fprintf(stderr, "secret readable (%s)\n  secret: '%s'\n  text:   '%.*s'\n  masked: '%.*s'\n",
				why, secret.p, (int) n, text.p, (int) outlen, out);
		abort();
	}

	/* the planted secret, bytes known exactly (no clean-up moved them) */
	if (!(flags & 6) && outlen == n)
	{
		int			first = 0;
		int			last = nchars - 1;
		size_t		want_end = 0;

		/* blanks at either end of the secret do not count */
		while (first < nchars && blank[first])
			first++;
		while (last >= first && blank[last])
			last--;
		if (first <= last)
		{
			if (n >= ustart[last + 1])
				want_end = ustart[last + 1];
			else
			{
				/* cut inside: the whole characters before the cut */
				SeBuf		pre = {0};
				SeBuf		canon = {0};
				int			whole = first;

				while (whole <= last && ustart[whole + 1] <= n)
					whole++;
				se_put(&pre, secret.p + cstart[first], cstart[whole] - cstart[first]);
				se_canon(&canon, pre.p ? pre.p : "", pre.len, false);
				if (canon.len >= 4 && n > ustart[first])
					want_end = n;
				se_free(&pre);
				se_free(&canon);
			}
			for (i = ustart[first]; i < want_end; i++)
			{
				if (out[i] != filler || filler == 0)
				{
					fprintf(stderr, "planted secret not masked at %zu\n  secret: '%s'\n  text:   '%.*s'\n  masked: '%.*s'\n",
							i, secret.p, (int) n, text.p, (int) outlen, out);
					abort();
				}
			}
		}
	}

	/* masking again changes nothing */
	if (outlen > 0)
	{
		char	   *again = malloc(outlen);

		memcpy(again, out, outlen);
		CHECK(auth_mask_secret(again, outlen, secret.p) == outlen);
		CHECK(memcmp(again, out, outlen) == 0);
		free(again);
	}
	CHECK(live_chunks(CurrentMemoryContext) == before);

	free(out);
	se_free(&text);
	se_free(&secret);
	(void) span_start;
	return 0;
}
