/*-------------------------------------------------------------------------
 *
 * fuzz_entity_id.c
 *	  libFuzzer target for the entity id taken from an OData-EntityId or
 *	  Location URL (src/classify.c: classify_same_origin,
 *	  classify_entity_id, and classify_response on a 201).
 *
 * Input: the service root up to the first '\n' (a fixed one when there is
 * none in the first 256 bytes), then the URL.
 *
 * Besides the sanitizers the target checks, and traps on violation:
 *	 - an id comes only from a URL classify_same_origin() accepts, is
 *	   NUL-terminated, valid UTF-8 without control characters, and
 *	   out[0] is '\0' when there is none;
 *	 - an accepted absolute URL names, read the naive way (after "://", up
 *	   to the first of "/?#:"), the same host as the root (ASCII
 *	   case-insensitive), with no '@', '\', '%' or non-ASCII in it;
 *	 - without a root, no absolute URL is accepted;
 *	 - the relation is symmetric between two absolute http(s) URLs;
 *	 - classify_response() on a 201 with the URL as OData-EntityId, or as
 *	   Location, takes exactly that id.
 * Root and URL are copied into exact-size heap buffers.
 *
 *-------------------------------------------------------------------------
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch_response.h"
#include "classify.h"

#define CHECK(cond) \
	do { \
		if (!(cond)) \
		{ \
			fprintf(stderr, "contract violated: %s (%s:%d)\n", #cond, \
					__FILE__, __LINE__); \
			abort(); \
		} \
	} while (0)

static const char default_root[] = "https://contoso.operations.dynamics.com/data/";

static bool
valid_text(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	while (*p)
	{
		if (*p < 0x20 || *p == 0x7F)
			return false;
		if (*p < 0x80)
			p++;
		else if (*p >= 0xC2 && *p <= 0xDF && (p[1] & 0xC0) == 0x80)
		{
			if (*p == 0xC2 && p[1] < 0xA0)
				return false;
			p += 2;
		}
		else if ((*p & 0xF0) == 0xE0 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80)
			p += 3;
		else if (*p >= 0xF0 && *p <= 0xF4 && (p[1] & 0xC0) == 0x80 &&
				 (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80)
			p += 4;
		else
			return false;
	}
	return true;
}

static char
lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? (char) (c + 32) : c;
}

/* "http(s)://" at the start (after blanks), case-insensitive */
static const char *
after_scheme(const char *s, size_t n)
{
	while (n > 0 && (*s == ' ' || *s == '\t'))
		s++, n--;
	if (n >= 7 && strncasecmp(s, "http://", 7) == 0)
		return s + 7;
	if (n >= 8 && strncasecmp(s, "https://", 8) == 0)
		return s + 8;
	return NULL;
}

/* naive host: up to the first of "/?#:" or a blank or the end */
static size_t
naive_host(const char *h, const char *e)
{
	const char *p = h;

	if (p < e && *p == '[')
	{
		while (p < e && *p != ']')
			p++;
		return (size_t) (p - h) + (p < e);
	}
	while (p < e && !strchr("/?#: \t", *p))
		p++;
	return (size_t) (p - h);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nl = memchr(data, '\n', size < 256 ? size : 256);
	char	   *root;
	char	   *url;
	size_t		n;
	char		out[64];
	char		big[256];
	bool		so;
	bool		got;
	const char *uh;

	if (nl != NULL)
	{
		size_t		rl = (size_t) (nl - data);

		root = malloc(rl + 1);
		memcpy(root, data, rl);
		root[rl] = '\0';
		data = nl + 1;
		size -= rl + 1;
	}
	else
	{
		root = malloc(sizeof(default_root));
		memcpy(root, default_root, sizeof(default_root));
	}
	n = size;
	url = malloc(n ? n : 1);
	memcpy(url, data, n);

	so = classify_same_origin(url, n, root);
	CHECK(so == classify_same_origin(url, n, root));

	memset(out, 'x', sizeof(out));
	got = classify_entity_id(url, n, root, out, sizeof(out));
	CHECK(memchr(out, '\0', sizeof(out)) != NULL);
	CHECK(got ? (out[0] != '\0' && so && valid_text(out)) : out[0] == '\0');

	/* no root, no absolute URL */
	if (classify_same_origin(url, n, NULL))
		CHECK(after_scheme(url, n) == NULL);

	/* an accepted absolute URL: the naive host is the root's */
	uh = after_scheme(url, n);
	if (so && uh != NULL)
	{
		const char *rh = after_scheme(root, strlen(root));
		const char *ue = url + n;
		size_t		ul;
		size_t		rl;
		size_t		i;

		CHECK(rh != NULL);
		ul = naive_host(uh, ue);
		rl = naive_host(rh, root + strlen(root));
		CHECK(ul > 0 && ul == rl);
		for (i = 0; i < ul; i++)
		{
			CHECK(lower(uh[i]) == lower(rh[i]));
			CHECK(uh[i] != '@' && uh[i] != '\\' && uh[i] != '%' &&
				  (unsigned char) uh[i] < 0x80);
		}

		/* symmetric between two absolute URLs */
		if (memchr(url, '\0', n) == NULL)
		{
			char	   *u0 = malloc(n + 1);

			memcpy(u0, url, n);
			u0[n] = '\0';
			if (classify_same_origin(u0, n, u0))
				CHECK(classify_same_origin(root, strlen(root), u0));
			free(u0);
		}
	}

	/* the same id through classify_response, from either header */
	if (memchr(url, '\r', n) == NULL && memchr(url, '\n', n) == NULL &&
		memchr(url, '\0', n) == NULL)
	{
		static const char *const names[2] = {"OData-EntityId: ", "Location: "};
		int			k;

		for (k = 0; k < 2; k++)
		{
			size_t		hl = strlen(names[k]);
			char	   *hdr = malloc(hl + n + 2);
			ClassifyConfig cfg;
			Classification c;
			BrSlice		hs;
			BrSlice		bs = {NULL, 0};

			memcpy(hdr, names[k], hl);
			memcpy(hdr + hl, url, n);
			memcpy(hdr + hl + n, "\r\n", 2);
			hs.ptr = hdr;
			hs.len = hl + n + 2;
			memset(&cfg, 0, sizeof(cfg));
			cfg.service_root = root;
			classify_response(&cfg, 201, hs, bs, 1700000000, &c);
			CHECK(c.outcome == OUTCOME_CREATED);
			got = classify_entity_id(url, n, root, big, sizeof(big));
			CHECK(sizeof(big) == sizeof(c.d365_id));
			CHECK(strcmp(c.d365_id, got ? big : "") == 0);
			free(hdr);
		}
	}

	free(url);
	free(root);
	return 0;
}
