/*-------------------------------------------------------------------------
 *
 * fuzz_batch_response.c
 *	  libFuzzer target for the $batch wire-format core: br_boundary,
 *	  br_parse, header iteration, parse_retry_after, odata_error_extract
 *	  and classify_response on every part.
 *
 * Input format (same as the seed files in corpus/): the first line, up to
 * '\n', is the response Content-Type value; the rest is the body.  Inputs
 * without a '\n' in their first 512 bytes are parsed as a body under a
 * fixed Content-Type, so unstructured mutations still reach the parser.
 *
 * Besides the sanitizers, the target checks the API contract itself and
 * traps on violation: all slices inside the body, positions in order,
 * truncated only on the last part of a non-OK parse, parsing with a
 * smaller max_parts yields a prefix of the same parts, and every string a
 * Classification carries is NUL-terminated, valid UTF-8 without control
 * characters.  Content-Type and body are copied into their own exact-size
 * heap buffers so that ASan sees any read past either.
 *
 *-------------------------------------------------------------------------
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch_response.h"
#include "classify.h"

#define FUZZ_MAX_PARTS 64
#define FUZZ_NOW ((time_t) 1700000000)

static const char default_ct[] =
"multipart/mixed; boundary=batchresponse_1";

static const char *const dup_codes[] = {"0x80040237", "0x80060892", "0x80040333"};
static const char *const dup_msgs[] = {"already exists", "duplicate"};
static const int dup_statuses[] = {409, 412};

#define CHECK(cond) \
	do { \
		if (!(cond)) \
		{ \
			fprintf(stderr, "contract violated: %s (%s:%d)\n", #cond, \
					__FILE__, __LINE__); \
			abort(); \
		} \
	} while (0)

static void
check_slice(BrSlice s, const char *buf, size_t len)
{
	if (s.len == 0)
		return;
	CHECK(s.ptr != NULL);
	CHECK(s.ptr >= buf && s.ptr + s.len <= buf + len);
}

static void
check_text(const char *s, size_t size)
{
	const unsigned char *p = (const unsigned char *) s;
	const unsigned char *e;

	CHECK(memchr(s, '\0', size) != NULL);
	e = p + strlen(s);
	while (p < e)
	{
		CHECK(*p >= 0x20 && *p != 0x7F);
		if (*p < 0x80)
			p++;
		else if (*p >= 0xC2 && *p <= 0xDF)
		{
			CHECK(e - p >= 2 && (p[1] & 0xC0) == 0x80);
			CHECK(!(*p == 0xC2 && p[1] < 0xA0));	/* C1 controls */
			p += 2;
		}
		else if ((*p & 0xF0) == 0xE0)
		{
			CHECK(e - p >= 3 && (p[1] & 0xC0) == 0x80 && (p[2] & 0xC0) == 0x80);
			CHECK(!(*p == 0xE0 && p[1] < 0xA0));	/* overlong */
			CHECK(!(*p == 0xED && p[1] > 0x9F));	/* surrogates */
			p += 3;
		}
		else
		{
			CHECK(*p >= 0xF0 && *p <= 0xF4);
			CHECK(e - p >= 4 && (p[1] & 0xC0) == 0x80 &&
				  (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80);
			CHECK(!(*p == 0xF0 && p[1] < 0x90));
			CHECK(!(*p == 0xF4 && p[1] > 0x8F));
			p += 4;
		}
	}
}

static void
check_classification(const Classification *c)
{
	CHECK(c->outcome >= OUTCOME_CREATED && c->outcome <= OUTCOME_AUTH);
	CHECK(c->retry_after >= -1 && c->retry_after <= CLASSIFY_RETRY_AFTER_MAX);
	CHECK(!c->retry_after_capped || c->retry_after == CLASSIFY_RETRY_AFTER_MAX);
	check_text(c->d365_id, sizeof(c->d365_id));
	check_text(c->error_code, sizeof(c->error_code));
	check_text(c->error_text, sizeof(c->error_text));
	if (c->outcome == OUTCOME_CREATED)
		CHECK(c->error_text[0] == '\0');
	else
		CHECK(c->d365_id[0] == '\0');
}

static void
walk_headers(BrSlice hs, const char *buf, size_t len)
{
	BrHeaderIter it;
	BrSlice		n;
	BrSlice		v;
	int			guard = 0;

	br_header_iter_init(&it, hs);
	while (br_header_next(&it, &n, &v))
	{
		int			ra;

		check_slice(n, buf, len);
		check_slice(v, buf, len);
		CHECK(n.len > 0);
		CHECK(v.len == 0 || (v.ptr >= hs.ptr && v.ptr + v.len <= hs.ptr + hs.len));
		ra = parse_retry_after(v.ptr, v.len, FUZZ_NOW);
		CHECK(ra >= -1 && ra <= CLASSIFY_RETRY_AFTER_MAX);
		/* the iterator must always make progress */
		CHECK(++guard <= (int) hs.len + 1);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nl = memchr(data, '\n', size < 512 ? size : 512);
	const char *ct_src;
	size_t		ct_len;
	const char *body_src;
	size_t		body_len;
	char	   *ct;
	char	   *body;
	BatchPart	parts[FUZZ_MAX_PARTS];
	BatchPart	few[3];
	BatchParse	res;
	BatchParse	res_few;
	BrStatus	st;
	char		bnd[BR_MAX_BOUNDARY + 1];
	ClassifyConfig cfg;
	Classification cl;
	char		code[24];
	char		msg[64];
	int			i;

	if (nl)
	{
		ct_src = (const char *) data;
		ct_len = (size_t) (nl - data);
		body_src = (const char *) nl + 1;
		body_len = size - ct_len - 1;
	}
	else
	{
		ct_src = default_ct;
		ct_len = sizeof(default_ct) - 1;
		body_src = (const char *) data;
		body_len = size;
	}
	ct = malloc(ct_len ? ct_len : 1);
	body = malloc(body_len ? body_len : 1);
	if (ct == NULL || body == NULL)
	{
		free(ct);
		free(body);
		return 0;
	}
	memcpy(ct, ct_src, ct_len);
	memcpy(body, body_src, body_len);

	if (br_boundary(ct, ct_len, bnd))
	{
		size_t		bl = strlen(bnd);

		CHECK(bl >= 1 && bl <= BR_MAX_BOUNDARY);
	}

	memset(&cfg, 0, sizeof(cfg));
	cfg.duplicate_statuses = dup_statuses;
	cfg.n_duplicate_statuses = 2;
	cfg.duplicate_codes = dup_codes;
	cfg.n_duplicate_codes = 3;
	cfg.duplicate_messages = dup_msgs;
	cfg.n_duplicate_messages = 2;
	cfg.id_property = "InvoiceId";
	cfg.service_root = "https://contoso.crm.dynamics.com/api/data/v9.2/";

	st = br_parse(ct, ct_len, body, body_len, parts, FUZZ_MAX_PARTS, &res);
	CHECK(st == res.status);
	CHECK(res.nparts >= 0 && res.nparts <= FUZZ_MAX_PARTS);
	CHECK((st == BR_OK) == (res.error == NULL));
	CHECK(res.error_offset <= body_len);

	for (i = 0; i < res.nparts; i++)
	{
		const BatchPart *p = &parts[i];

		CHECK(p->position == i);
		CHECK(p->http_status == 0 ||
			  (p->http_status >= 100 && p->http_status <= 599));
		CHECK(p->in_changeset == (p->changeset >= 0));
		CHECK(!p->truncated || (st != BR_OK && i == res.nparts - 1));
		check_slice(p->content_id, body, body_len);
		check_slice(p->reason, body, body_len);
		check_slice(p->headers, body, body_len);
		check_slice(p->body, body, body_len);
		check_slice(p->mime_headers, body, body_len);
		if (i > 0 && p->body.len && parts[i - 1].body.len)
			CHECK(p->body.ptr > parts[i - 1].body.ptr);

		walk_headers(p->headers, body, body_len);
		walk_headers(p->mime_headers, body, body_len);
		(void) br_header_get(p->headers, "Retry-After", NULL);

		classify_response(&cfg, p->http_status, p->headers, p->body,
						  FUZZ_NOW, &cl);
		check_classification(&cl);
		classify_response(NULL, p->http_status, p->headers, p->body,
						  FUZZ_NOW, &cl);
		check_classification(&cl);

		if (odata_error_extract(p->body.ptr, p->body.len, code, sizeof(code),
								msg, sizeof(msg)))
		{
			check_text(code, sizeof(code));
			check_text(msg, sizeof(msg));
		}
		else
			CHECK(code[0] == '\0' && msg[0] == '\0');
	}

	/* fewer slots: same parts, in the same order, up to the limit */
	br_parse(ct, ct_len, body, body_len, few, 3, &res_few);
	CHECK(res_few.nparts <= 3);
	if (res.nparts > 3)
	{
		CHECK(res_few.status != BR_OK && res_few.nparts == 3);
		if (st == BR_OK)
			CHECK(res_few.status == BR_TOO_MANY_PARTS);
	}
	else
		CHECK(res_few.status == st && res_few.nparts == res.nparts);
	for (i = 0; i < res_few.nparts && i < res.nparts; i++)
	{
		CHECK(few[i].http_status == parts[i].http_status);
		CHECK(few[i].body.ptr == parts[i].body.ptr &&
			  few[i].body.len == parts[i].body.len);
		CHECK(few[i].content_id.len == parts[i].content_id.len);
	}

	/* the raw input as one response: headers and body both arbitrary */
	{
		BrSlice		raw;
		int			status = size ? (int) (data[0] * 3) : 0;

		raw.ptr = body;
		raw.len = body_len;
		classify_response(&cfg, status, raw, raw, FUZZ_NOW, &cl);
		check_classification(&cl);
		CHECK(parse_retry_after(ct, ct_len, FUZZ_NOW) >= -1 &&
			  parse_retry_after(ct, ct_len, FUZZ_NOW) <= CLASSIFY_RETRY_AFTER_MAX);
	}

	free(ct);
	free(body);
	return 0;
}
