/*-------------------------------------------------------------------------
 *
 * test_wire.c
 *	  Standalone TAP unit tests for the $batch wire-format core:
 *	  src/batch_response.c and src/classify.c.
 *
 * Fixtures are hand-written in the shape of real Dataverse / Finance &
 * Operations $batch responses (OData 4.0 Part 1 11.7, Microsoft's "Execute
 * batch operations using the Web API" examples).  Every body is copied
 * into an exactly-sized heap buffer before parsing so that ASan catches
 * any read past its end; after every parse all returned slices are checked
 * to lie inside that buffer.
 *
 * Build and run: make -C test/fuzz unit
 *
 *-------------------------------------------------------------------------
 */
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "batch_response.h"
#include "classify.h"
#include "tap.h"

static bool
slice_eq(BrSlice s, const char *lit)
{
	size_t		n = strlen(lit);

	return s.len == n && (n == 0 || memcmp(s.ptr, lit, n) == 0);
}

static void
is_slice(BrSlice s, const char *want, const char *what)
{
	if (!ok(slice_eq(s, want), "%s", what))
		printf("#   got  '%.*s'\n#   want '%s'\n", (int) s.len,
			   s.ptr ? s.ptr : "", want);
}

static bool
utf8_valid_no_ctl(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	while (*p)
	{
		if (*p < 0x20 || *p == 0x7F)
			return false;
		if (*p < 0x80)
			p++;
		else if (*p >= 0xC2 && *p <= 0xDF && (p[1] & 0xC0) == 0x80)
			p += 2;
		else if ((*p & 0xF0) == 0xE0 && (p[1] & 0xC0) == 0x80 &&
				 (p[2] & 0xC0) == 0x80)
			p += 3;
		else if (*p >= 0xF0 && *p <= 0xF4 && (p[1] & 0xC0) == 0x80 &&
				 (p[2] & 0xC0) == 0x80 && (p[3] & 0xC0) == 0x80)
			p += 4;
		else
			return false;
	}
	return true;
}

/* ---------------------------------------------------------------------
 * Parse harness
 * ---------------------------------------------------------------------
 */
#define MAXP 32

typedef struct Parsed
{
	char	   *buf;
	size_t		len;
	BatchPart	parts[MAXP];
	BatchParse	res;
	BrStatus	st;
} Parsed;

static bool
in_buf(const Parsed *P, BrSlice s)
{
	if (s.len == 0)
		return true;
	return s.ptr >= P->buf && s.ptr + s.len <= P->buf + P->len;
}

/* copy body into an exact-size heap buffer, parse, check invariants */
static void
parse_n(Parsed *P, const char *ct, const char *body, size_t len, int max)
{
	int			i;
	bool		bounds = true;

	memset(P, 0, sizeof(*P));
	P->buf = malloc(len ? len : 1);
	memcpy(P->buf, body, len);
	P->len = len;
	P->st = br_parse(ct, strlen(ct), P->buf, len, P->parts, max, &P->res);

	for (i = 0; i < P->res.nparts; i++)
	{
		BatchPart  *bp = &P->parts[i];

		if (!in_buf(P, bp->content_id) || !in_buf(P, bp->reason) ||
			!in_buf(P, bp->headers) || !in_buf(P, bp->body) ||
			!in_buf(P, bp->mime_headers) || bp->position != i)
			bounds = false;
		if (bp->truncated && (P->st == BR_OK || i != P->res.nparts - 1))
			bounds = false;
	}
	if ((P->st == BR_OK) != (P->res.error == NULL) || P->st != P->res.status ||
		P->res.error_offset > len || P->res.nparts > max)
		bounds = false;
	if (!bounds)
		ok(false, "parse invariants (slices in bounds, positions, flags)");
}

static void
parse(Parsed *P, const char *ct, const char *body)
{
	parse_n(P, ct, body, strlen(body), MAXP);
}

static void
done(Parsed *P)
{
	free(P->buf);
	P->buf = NULL;
}

/* CRLF -> LF copy (caller frees) */
static char *
lf_only(const char *s)
{
	char	   *o = malloc(strlen(s) + 1);
	char	   *q = o;

	for (; *s; s++)
	{
		if (s[0] == '\r' && s[1] == '\n')
			continue;
		*q++ = *s;
	}
	*q = '\0';
	return o;
}

/* does slice a equal slice b once CRs before LFs are dropped from both */
static bool
slice_eq_modulo_cr(BrSlice a, BrSlice b)
{
	size_t		i = 0;
	size_t		j = 0;

	for (;;)
	{
		while (i < a.len && a.ptr[i] == '\r' && i + 1 < a.len && a.ptr[i + 1] == '\n')
			i++;
		while (j < b.len && b.ptr[j] == '\r' && j + 1 < b.len && b.ptr[j + 1] == '\n')
			j++;
		if (i == a.len || j == b.len)
			return i == a.len && j == b.len;
		if (a.ptr[i] != b.ptr[j])
			return false;
		i++;
		j++;
	}
}

static bool
same_part(const BatchPart *a, const BatchPart *b)
{
	return a->http_status == b->http_status &&
		a->in_changeset == b->in_changeset &&
		a->changeset == b->changeset &&
		a->position == b->position &&
		slice_eq_modulo_cr(a->content_id, b->content_id) &&
		slice_eq_modulo_cr(a->reason, b->reason) &&
		slice_eq_modulo_cr(a->headers, b->headers) &&
		slice_eq_modulo_cr(a->body, b->body);
}

/* ---------------------------------------------------------------------
 * Fixtures
 * ---------------------------------------------------------------------
 */
#define B1 "batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f"
#define CS1 "changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc"
#define CT1 "multipart/mixed; boundary=" B1
#define ORG "https://contoso.crm.dynamics.com/api/data/v9.2/"

/* Dataverse: changeset (204 + 201) followed by a GET; CRLF throughout */
static const char dv_ok[] =
"--" B1 "\r\n"
"Content-Type: multipart/mixed; boundary=" CS1 "\r\n"
"\r\n"
"--" CS1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: 1\r\n"
"\r\n"
"HTTP/1.1 204 No Content\r\n"
"OData-Version: 4.0\r\n"
"Location: " ORG "tasks(a59c24f3-fafc-ea11-a813-000d3a579805)\r\n"
"OData-EntityId: " ORG "tasks(a59c24f3-fafc-ea11-a813-000d3a579805)\r\n"
"\r\n"
"\r\n"
"--" CS1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: 2\r\n"
"\r\n"
"HTTP/1.1 201 Created\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"OData-Version: 4.0\r\n"
"Location: " ORG "vendinvoices(b1c2d3e4-0000-0000-0000-000000000002)\r\n"
"\r\n"
"{\"@odata.context\":\"" ORG "$metadata#vendinvoices/$entity\",\"InvoiceId\":\"INV-0002\"}\r\n"
"--" CS1 "--\r\n"
"--" B1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"\r\n"
"HTTP/1.1 200 OK\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"OData-Version: 4.0\r\n"
"\r\n"
"{\"@odata.context\":\"" ORG "$metadata#tasks(subject)\",\"value\":[]}\r\n"
"--" B1 "--\r\n";

/* continue-on-error: 204, duplicate 400, throttled 429 */
static const char dv_mixed[] =
"--" B1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: inv-1\r\n"
"\r\n"
"HTTP/1.1 204 No Content\r\n"
"OData-Version: 4.0\r\n"
"OData-EntityId: " ORG "vendinvoices(11111111-2222-3333-4444-555555555555)\r\n"
"\r\n"
"\r\n"
"--" B1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: inv-2\r\n"
"\r\n"
"HTTP/1.1 400 Bad Request\r\n"
"Access-Control-Expose-Headers: Preference-Applied,OData-EntityId,Location,ETag,OData-Version,Content-Encoding,Transfer-Encoding,Content-Length,Retry-After\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"OData-Version: 4.0\r\n"
"\r\n"
"{\"error\":{\"code\":\"0x80040237\",\"message\":\"A record with matching key values already exists.\"}}\r\n"
"--" B1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: inv-3\r\n"
"\r\n"
"HTTP/1.1 429 Too Many Requests\r\n"
"Retry-After: 17\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"\r\n"
"{\"error\":{\"code\":\"0x80072322\",\"message\":\"Number of requests exceeded the limit of 6000 over time window of 300 seconds.\"}}\r\n"
"--" B1 "--\r\n";

/* Without continue-on-error Dataverse answers 400 for the whole $batch
 * with only the failing operation inside; a failed changeset is answered
 * by one application/http part, not by a nested multipart. */
static const char dv_failed_changeset[] =
"--" B1 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: 2\r\n"
"\r\n"
"HTTP/1.1 400 Bad Request\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"OData-Version: 4.0\r\n"
"\r\n"
"{\"error\":{\"code\":\"0x80060892\",\"message\":\"A record that has the attribute values Invoice Number already exists. The entity key Invoice Key requires that this set of attributes contains unique values.\"}}\r\n"
"--" B1 "--\r\n";

/* Finance & Operations style: quoted boundary, composite keys, LF only in
 * places, changeset answered out of request order */
#define B2 "batchresponse_8f5a7c2e-3b1d-4e6f-9a0b-1c2d3e4f5a6b"
#define CS2 "changesetresponse_0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
static const char fo_reordered[] =
"--" B2 "\r\n"
"Content-Type: multipart/mixed; boundary=\"" CS2 "\"\r\n"
"\r\n"
"--" CS2 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: 2\r\n"
"\r\n"
"HTTP/1.1 201 Created\r\n"
"Location: https://usmf.operations.dynamics.com/data/VendorInvoiceHeaders(dataAreaId='usmf',HeaderReference='APINV-000124')\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"\r\n"
"{\"@odata.etag\":\"W/\\\"JzEsNTYzNzE0NDU3Nic=\\\"\",\"dataAreaId\":\"usmf\",\"HeaderReference\":\"APINV-000124\",\"InvoiceId\":\"V-INV-124\"}\r\n"
"--" CS2 "\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: 1\r\n"
"\r\n"
"HTTP/1.1 201 Created\r\n"
"Location: https://usmf.operations.dynamics.com/data/VendorInvoiceHeaders(dataAreaId='usmf',HeaderReference='APINV-000123')\r\n"
"Content-Type: application/json; odata.metadata=minimal\r\n"
"\r\n"
"{\"dataAreaId\":\"usmf\",\"HeaderReference\":\"APINV-000123\",\"InvoiceId\":\"V-INV-123\"}\r\n"
"--" CS2 "--\r\n"
"--" B2 "--\r\n";

/* ---------------------------------------------------------------------
 * br_boundary
 * ---------------------------------------------------------------------
 */
static void
test_boundary(void)
{
	char		b[BR_MAX_BOUNDARY + 1];
	char		ct[256];

#define BND(ctstr) br_boundary((ctstr), strlen(ctstr), b)
	ok(BND("multipart/mixed; boundary=batchresponse_abc") &&
	   strcmp(b, "batchresponse_abc") == 0, "boundary: plain token");
	ok(BND("multipart/mixed;boundary=\"batch_x y\"") &&
	   strcmp(b, "batch_x y") == 0, "boundary: quoted with space");
	ok(BND("multipart/mixed; charset=utf-8; BOUNDARY=abc") &&
	   strcmp(b, "abc") == 0, "boundary: not first parameter, upper-case name");
	ok(BND("Multipart/Mixed ; Boundary = \"a\\bc\" ; x=y") &&
	   strcmp(b, "abc") == 0, "boundary: spaces around '=', quoted-pair");
	ok(BND("multipart/mixed; foo=\"x; boundary=evil\"; boundary=good") &&
	   strcmp(b, "good") == 0, "boundary: ignores boundary= inside another quoted parameter");
	ok(!BND("multipart/mixed; foo=\"x; boundary=evil\""),
	   "boundary: only inside a quoted parameter -> none");
	ok(BND("multipart/mixed; boundary=batch(36522ad7-fc75-4b56-8c71-56071383e77b)") &&
	   strcmp(b, "batch(36522ad7-fc75-4b56-8c71-56071383e77b)") == 0,
	   "boundary: unquoted with parentheses (MS-ODATA example)");
	ok(BND("multipart/mixed; boundary=ab;c") && strcmp(b, "ab") == 0,
	   "boundary: ends at ';'");
	snprintf(ct, sizeof(ct), "multipart/mixed; boundary=%070d", 7);
	ok(BND(ct) && strlen(b) == 70, "boundary: 70 chars accepted");
	snprintf(ct, sizeof(ct), "multipart/mixed; boundary=%071d", 7);
	ok(!BND(ct), "boundary: 71 chars rejected");
	snprintf(ct, sizeof(ct), "multipart/mixed; boundary=\"%071d\"", 7);
	ok(!BND(ct), "boundary: 71 chars quoted rejected");
	ok(!BND("multipart/mixed; boundary="), "boundary: empty token rejected");
	ok(!BND("multipart/mixed; boundary=\"\""), "boundary: empty quoted rejected");
	ok(!BND("multipart/mixed; boundary=\"abc \""), "boundary: trailing space rejected");
	ok(!BND("multipart/mixed; boundary=\"ab;c\""), "boundary: non-bchar rejected");
	ok(!BND("multipart/mixed; boundary=\"abc"), "boundary: unterminated quote rejected");
	ok(!BND("multipart/mixed"), "boundary: absent");
	ok(!BND(""), "boundary: empty Content-Type");
	ok(!br_boundary(NULL, 0, b), "boundary: NULL Content-Type");
	ok(!br_boundary("multipart/mixed; boundary=a\0b", 29, b),
	   "boundary: NUL byte rejected");
	ok(BND("multipart/mixed; x; foo=bar baz; q=\"a\\\";b\" junk\"c;d\"; boundary=z") &&
	   strcmp(b, "z") == 0, "boundary: skips valueless and garbage-laden parameters");
	ok(!BND("multipart/mixed; boundary=ab\"c"), "boundary: quote in token rejected");
	ok(!BND("multipart/mixed; boundary=\"abc\\"), "boundary: dangling backslash rejected");
	ok(BND("multipart/mixed; boundary=x; boundary=y") && strcmp(b, "x") == 0,
	   "boundary: first boundary parameter wins");
	/* length-bounded: the parameter is cut by len */
	ok(br_boundary("multipart/mixed; boundary=abcdef", 29, b) && strcmp(b, "abc") == 0,
	   "boundary: respects len, no NUL needed");
#undef BND
}

/* ---------------------------------------------------------------------
 * br_parse: happy paths
 * ---------------------------------------------------------------------
 */
static void
test_dataverse_ok(void)
{
	Parsed		P;
	BrSlice		v;

	parse(&P, CT1, dv_ok);
	is_long(P.st, BR_OK, "dv_ok: status OK");
	ok(P.res.error == NULL, "dv_ok: no error text");
	is_long(P.res.nparts, 3, "dv_ok: 3 operation responses");
	is_long(P.parts[0].http_status, 204, "dv_ok: part 0 is 204");
	is_slice(P.parts[0].reason, "No Content", "dv_ok: part 0 reason");
	is_slice(P.parts[0].content_id, "1", "dv_ok: part 0 Content-ID");
	ok(P.parts[0].in_changeset && P.parts[0].changeset == 0,
	   "dv_ok: part 0 in changeset 0");
	is_long((long) P.parts[0].body.len, 0, "dv_ok: 204 has empty body");
	ok(br_header_get(P.parts[0].headers, "OData-EntityId", &v) &&
	   slice_eq(v, ORG "tasks(a59c24f3-fafc-ea11-a813-000d3a579805)"),
	   "dv_ok: part 0 OData-EntityId header");
	ok(br_header_get(P.parts[0].mime_headers, "content-transfer-encoding", &v) &&
	   slice_eq(v, "binary"), "dv_ok: MIME part headers exposed");
	is_long(P.parts[1].http_status, 201, "dv_ok: part 1 is 201");
	is_slice(P.parts[1].content_id, "2", "dv_ok: part 1 Content-ID");
	is_slice(P.parts[1].body,
			 "{\"@odata.context\":\"" ORG "$metadata#vendinvoices/$entity\",\"InvoiceId\":\"INV-0002\"}",
			 "dv_ok: part 1 body exact (CRLF before delimiter excluded)");
	ok(P.parts[1].in_changeset, "dv_ok: part 1 in changeset");
	is_long(P.parts[2].http_status, 200, "dv_ok: part 2 is 200");
	ok(!P.parts[2].in_changeset && P.parts[2].changeset == -1,
	   "dv_ok: part 2 not in changeset");
	is_long((long) P.parts[2].content_id.len, 0, "dv_ok: part 2 has no Content-ID");
	ok(P.parts[0].position == 0 && P.parts[1].position == 1 &&
	   P.parts[2].position == 2, "dv_ok: positions 0,1,2");
	ok(!P.parts[0].truncated && !P.parts[1].truncated && !P.parts[2].truncated,
	   "dv_ok: nothing flagged truncated");
	done(&P);
}

static void
test_lf_equivalence(void)
{
	const char *fixtures[] = {dv_ok, dv_mixed, dv_failed_changeset, fo_reordered};
	const char *cts[] = {CT1, CT1, CT1, ("multipart/mixed; boundary=" B2)};
	int			f;

	for (f = 0; f < 4; f++)
	{
		Parsed		A;
		Parsed		L;
		char	   *lf = lf_only(fixtures[f]);
		bool		same;
		int			i;

		parse(&A, cts[f], fixtures[f]);
		parse(&L, cts[f], lf);
		same = A.st == BR_OK && L.st == BR_OK && A.res.nparts == L.res.nparts &&
			A.res.nparts > 0;
		for (i = 0; same && i < A.res.nparts; i++)
			same = same_part(&A.parts[i], &L.parts[i]);
		ok(same, "LF-only copy of fixture %d parses identically", f);
		done(&A);
		done(&L);
		free(lf);
	}
}

static void
test_mixed_line_endings(void)
{
	Parsed		P;
	static const char body[] =
	"--b1\n"
	"Content-Type: application/http\r\n"
	"\n"
	"HTTP/1.1 201 Created\n"
	"OData-EntityId: https://x/data/Foo(1)\r\n"
	"\r\n"
	"{\"a\":1}\n"
	"--b1\r\n"
	"Content-Type: application/http\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\n"
	"\r\n"
	"--b1--";

	parse(&P, "multipart/mixed; boundary=b1", body);
	is_long(P.st, BR_OK, "mixed CRLF/LF: OK");
	is_long(P.res.nparts, 2, "mixed CRLF/LF: 2 parts");
	is_slice(P.parts[0].body, "{\"a\":1}", "mixed CRLF/LF: body without LF before delimiter");
	is_long(P.parts[1].http_status, 204, "mixed CRLF/LF: 204");
	is_long((long) P.parts[1].body.len, 0, "mixed CRLF/LF: empty body");
	done(&P);
}

static void
test_lowercase_and_quoted(void)
{
	Parsed		P;
	static const char body[] =
	"--" B1 "\r\n"
	"content-type: MULTIPART/MIXED; charset=utf-8; BOUNDARY=\"" CS1 "\"\r\n"
	"\r\n"
	"--" CS1 "\r\n"
	"content-type: application/http\r\n"
	"content-transfer-encoding: binary\r\n"
	"content-id: 7\r\n"
	"\r\n"
	"HTTP/1.1 201 Created\r\n"
	"odata-entityid: " ORG "vendinvoices(aaaaaaaa-0000-0000-0000-000000000007)\r\n"
	"\r\n"
	"\r\n"
	"--" CS1 "--\r\n"
	"--" B1 "--\r\n";

	parse(&P, "Multipart/Mixed; type=\"application/http\"; Boundary=\"" B1 "\"", body);
	is_long(P.st, BR_OK, "lowercase headers, quoted params: OK");
	is_long(P.res.nparts, 1, "lowercase headers: 1 part");
	ok(P.parts[0].in_changeset, "lowercase headers: changeset recognised");
	is_slice(P.parts[0].content_id, "7", "lowercase headers: content-id");
	done(&P);
}

static void
test_preamble_epilogue(void)
{
	Parsed		P;
	static const char body[] =
	"This is the preamble.  It is to be ignored, though it\r\n"
	"is a handy place for composition agents to include an\r\n"
	"explanatory note. --b2 not at line start, and\r\n"
	"--b2x is not our delimiter either.\r\n"
	"--b2\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--b2--\r\n"
	"This is the epilogue.  It is also to be ignored.\r\n"
	"--b2\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 500 Internal Server Error\r\n"
	"\r\n";

	parse(&P, "multipart/mixed; boundary=b2", body);
	is_long(P.st, BR_OK, "preamble/epilogue: OK");
	is_long(P.res.nparts, 1, "preamble/epilogue: delimiter-like text in both ignored");
	is_long(P.parts[0].http_status, 204, "preamble/epilogue: the one part");
	done(&P);
}

static void
test_content_id_sources(void)
{
	Parsed		P;
	static const char body[] =
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"Content-ID: mime-1\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"Content-ID:   inner-2  \r\n"
	"\r\n"
	"\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"Content-ID: mime-3\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"Content-ID: inner-3\r\n"
	"\r\n"
	"\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--b--\r\n";

	parse(&P, "multipart/mixed; boundary=b", body);
	is_long(P.res.nparts, 4, "content-id: 4 parts");
	is_slice(P.parts[0].content_id, "mime-1", "content-id: from MIME part header");
	is_slice(P.parts[1].content_id, "inner-2", "content-id: from inner header, trimmed");
	is_slice(P.parts[2].content_id, "mime-3", "content-id: MIME header wins over inner");
	is_long((long) P.parts[3].content_id.len, 0, "content-id: absent -> len 0");
	done(&P);
}

static void
test_reordered_changeset(void)
{
	Parsed		P;

	parse(&P, "multipart/mixed; boundary=\"" B2 "\"", fo_reordered);
	is_long(P.st, BR_OK, "reordered: OK");
	is_long(P.res.nparts, 2, "reordered: 2 parts");
	ok(slice_eq(P.parts[0].content_id, "2") && slice_eq(P.parts[1].content_id, "1"),
	   "reordered: response order kept (2 then 1) for caller to match by Content-ID");
	ok(P.parts[0].position == 0 && P.parts[1].position == 1,
	   "reordered: positions follow the response");
	done(&P);
}

static void
test_two_changesets(void)
{
	Parsed		P;
	static const char body[] =
	"--b\r\n"
	"Content-Type: multipart/mixed; boundary=c1\r\n"
	"\r\n"
	"--c1\r\n"
	"Content-Type: application/http\r\n"
	"Content-ID: 1\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--c1--\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 200 OK\r\n"
	"\r\n"
	"{}\r\n"
	"--b\r\n"
	"Content-Type: multipart/mixed; boundary=c2\r\n"
	"\r\n"
	"--c2\r\n"
	"Content-Type: application/http\r\n"
	"Content-ID: 2\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--c2\r\n"
	"Content-Type: application/http\r\n"
	"Content-ID: 3\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--c2--\r\n"
	"--b\r\n"
	"Content-Type: multipart/mixed; boundary=c3\r\n"
	"\r\n"
	"--c3--\r\n"
	"--b--\r\n";

	parse(&P, "multipart/mixed; boundary=b", body);
	is_long(P.st, BR_OK, "two changesets: OK");
	is_long(P.res.nparts, 4, "two changesets: 4 operations (empty changeset adds none)");
	ok(P.parts[0].changeset == 0 && P.parts[1].changeset == -1 &&
	   P.parts[2].changeset == 1 && P.parts[3].changeset == 1,
	   "two changesets: changeset ordinals 0,-1,1,1");
	ok(P.parts[0].in_changeset && !P.parts[1].in_changeset &&
	   P.parts[2].in_changeset && P.parts[3].in_changeset,
	   "two changesets: in_changeset flags");
	done(&P);
}

static void
test_failed_changeset_single_part(void)
{
	Parsed		P;

	parse(&P, CT1, dv_failed_changeset);
	is_long(P.st, BR_OK, "failed changeset / 400 outer: OK");
	is_long(P.res.nparts, 1, "failed changeset / 400 outer: one part");
	is_long(P.parts[0].http_status, 400, "failed changeset: 400");
	ok(!P.parts[0].in_changeset, "failed changeset: plain part, not in_changeset");
	is_slice(P.parts[0].content_id, "2", "failed changeset: Content-ID of the failing request");
	ok(P.parts[0].body.len > 0 && P.parts[0].body.ptr[0] == '{' &&
	   P.parts[0].body.ptr[P.parts[0].body.len - 1] == '}',
	   "failed changeset: body is exactly the JSON error");
	done(&P);
}

static void
test_boundary_text_in_body(void)
{
	Parsed		P;
	static const char body[] =
	"--bb\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 200 OK\r\n"
	"Content-Type: text/plain\r\n"
	"\r\n"
	"note: --bb is mentioned here\r\n"
	"--bbx starts a line but is another boundary\r\n"
	"--bb-- x is not a closing delimiter\r\n"
	" --bb indented\r\n"
	"end\r\n"
	"--bb--\r\n";

	parse(&P, "multipart/mixed; boundary=bb", body);
	is_long(P.st, BR_OK, "boundary text in body: OK");
	is_long(P.res.nparts, 1, "boundary text in body: still one part");
	is_slice(P.parts[0].body,
			 "note: --bb is mentioned here\r\n"
			 "--bbx starts a line but is another boundary\r\n"
			 "--bb-- x is not a closing delimiter\r\n"
			 " --bb indented\r\n"
			 "end", "boundary text in body: body intact");
	done(&P);
}

static void
test_padding_and_eof_close(void)
{
	Parsed		P;
	static const char body[] =
	"--b \t\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 201 Created\r\n"
	"\r\n"
	"x\r\n"
	"--b\t\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 201 Created\r\n"
	"\r\n"
	"y\r\n"
	"--b--  ";

	parse(&P, "multipart/mixed; boundary=b", body);
	is_long(P.st, BR_OK, "transport padding, close at EOF without CRLF: OK");
	is_long(P.res.nparts, 2, "transport padding: 2 parts");
	ok(slice_eq(P.parts[0].body, "x") && slice_eq(P.parts[1].body, "y"),
	   "transport padding: bodies");
	done(&P);
}

static void
test_status_lines(void)
{
	Parsed		P;
	static const char body[] =
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.0 200 OK\r\n\r\n\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 201\r\n\r\n\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 2O1 Created\r\n\r\n\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 600 Whatever\r\n\r\n\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"\r\n"
	"HTTP/1.1 503  Service Unavailable \r\n\r\n\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 2010 Created\r\n\r\n\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"OData-Version: 4.0\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"\r\n"
	"--b--\r\n";

	parse(&P, "multipart/mixed; boundary=b", body);
	is_long(P.st, BR_OK, "status lines: OK");
	is_long(P.res.nparts, 8, "status lines: 8 parts");
	is_long(P.parts[0].http_status, 200, "status: HTTP/1.0 accepted");
	is_long(P.parts[1].http_status, 201, "status: missing reason accepted");
	is_long((long) P.parts[1].reason.len, 0, "status: missing reason is empty");
	is_long(P.parts[2].http_status, 0, "status: 2O1 unparsable -> 0");
	is_slice(P.parts[2].reason, "HTTP/1.1 2O1 Created", "status: unparsable line kept as reason");
	is_long(P.parts[3].http_status, 0, "status: 600 -> 0");
	is_long(P.parts[4].http_status, 503, "status: leading empty line tolerated");
	is_slice(P.parts[4].reason, "Service Unavailable", "status: reason trimmed");
	is_long(P.parts[5].http_status, 0, "status: 4-digit code -> 0");
	is_long(P.parts[6].http_status, 204, "status: blank line swallowed by delimiter tolerated");
	ok(br_header_get(P.parts[6].headers, "OData-Version", NULL) &&
	   P.parts[6].body.len == 0, "status: ... headers kept, body empty");
	is_long(P.parts[7].http_status, 0, "status: empty HTTP message -> 0");
	done(&P);
}

static void
test_400_outer(void)
{
	Parsed		P;
	Classification c;
	static const char *const codes[] = {"0x80040237", "0x80060892", "0x80040333"};
	ClassifyConfig cfg = {NULL, 0, codes, 3, NULL, 0, "InvoiceId", ORG};

	/* same body as the failed changeset; the outer 400 does not matter */
	parse(&P, CT1, dv_failed_changeset);
	is_long(P.res.nparts, 1, "400 outer: one part");
	classify_response(&cfg, P.parts[0].http_status, P.parts[0].headers,
					  P.parts[0].body, 0, &c);
	is_str(outcome_name(c.outcome), "duplicate", "400 outer: 0x80060892 -> duplicate");
	is_str(c.error_code, "0x80060892", "400 outer: error_code");
	done(&P);
}

/* ---------------------------------------------------------------------
 * br_parse: errors
 * ---------------------------------------------------------------------
 */
static void
test_truncation(void)
{
	Parsed		P;
	const char *cut;
	size_t		at;

	/* cut inside the MIME headers of the GET part */
	cut = strstr(dv_ok, "Content-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 200");
	at = (size_t) (cut - dv_ok) + 10;
	parse_n(&P, CT1, dv_ok, at, MAXP);
	is_long(P.st, BR_TRUNCATED, "cut in MIME headers: TRUNCATED");
	is_long(P.res.nparts, 2, "cut in MIME headers: 2 complete parts");
	ok(!P.parts[0].truncated && !P.parts[1].truncated, "cut in MIME headers: none flagged");
	ok(P.res.error != NULL && P.res.error_offset <= at, "cut in MIME headers: error and offset");
	done(&P);

	/* cut inside the inner HTTP headers */
	cut = strstr(dv_ok, "HTTP/1.1 200 OK\r\n");
	at = (size_t) (cut - dv_ok) + 25;
	parse_n(&P, CT1, dv_ok, at, MAXP);
	is_long(P.st, BR_TRUNCATED, "cut in inner headers: TRUNCATED");
	is_long(P.res.nparts, 2, "cut in inner headers: part not returned");
	done(&P);

	/* cut inside the status line */
	at = (size_t) (cut - dv_ok) + 8;
	parse_n(&P, CT1, dv_ok, at, MAXP);
	is_long(P.st, BR_TRUNCATED, "cut in status line: TRUNCATED");
	is_long(P.res.nparts, 2, "cut in status line: part not returned");
	done(&P);

	/* cut inside the body of the last part */
	cut = strstr(dv_ok, "\"value\":[]}");
	at = (size_t) (cut - dv_ok) + 5;
	parse_n(&P, CT1, dv_ok, at, MAXP);
	is_long(P.st, BR_TRUNCATED, "cut in body: TRUNCATED");
	is_long(P.res.nparts, 3, "cut in body: cut part returned");
	ok(P.parts[2].truncated && !P.parts[1].truncated && !P.parts[0].truncated,
	   "cut in body: only the cut part flagged truncated");
	is_long(P.parts[2].http_status, 200, "cut in body: status still known");
	done(&P);

	/* cut inside the body of a changeset operation */
	cut = strstr(dv_ok, "\"InvoiceId\":\"INV-0002\"");
	at = (size_t) (cut - dv_ok) + 3;
	parse_n(&P, CT1, dv_ok, at, MAXP);
	is_long(P.st, BR_TRUNCATED, "cut in changeset body: TRUNCATED");
	is_long(P.res.nparts, 2, "cut in changeset body: 1 complete + 1 cut");
	ok(P.parts[1].truncated && P.parts[1].in_changeset && !P.parts[0].truncated,
	   "cut in changeset body: flagged");
	done(&P);

	/* closing delimiter missing entirely */
	cut = strstr(dv_ok, "--" B1 "--");
	at = (size_t) (cut - dv_ok);
	parse_n(&P, CT1, dv_ok, at, MAXP);
	is_long(P.st, BR_TRUNCATED, "no closing delimiter: TRUNCATED");
	is_long(P.res.nparts, 3, "no closing delimiter: 3 parts");
	ok(P.parts[2].truncated, "no closing delimiter: last part flagged (cannot know it is complete)");
	is_slice(P.parts[2].body,
			 "{\"@odata.context\":\"" ORG "$metadata#tasks(subject)\",\"value\":[]}\r\n",
			 "no closing delimiter: body runs to EOF");
	done(&P);

	/* cut inside the closing delimiter: partial delimiter not in body */
	parse_n(&P, CT1, dv_ok, at + 10, MAXP);
	is_long(P.st, BR_TRUNCATED, "cut in closing delimiter: TRUNCATED");
	ok(P.res.nparts == 3 && P.parts[2].truncated, "cut in closing delimiter: last part flagged");
	is_slice(P.parts[2].body,
			 "{\"@odata.context\":\"" ORG "$metadata#tasks(subject)\",\"value\":[]}",
			 "cut in closing delimiter: partial delimiter trimmed from body");
	done(&P);

	/* one byte short of the closing "--" */
	parse_n(&P, CT1, dv_ok, at + strlen("--" B1 "-"), MAXP);
	is_long(P.st, BR_TRUNCATED, "closing delimiter missing last '-': TRUNCATED");
	done(&P);

	/* full closing delimiter but no CRLF: complete */
	parse_n(&P, CT1, dv_ok, at + strlen("--" B1 "--"), MAXP);
	is_long(P.st, BR_OK, "closing delimiter without CRLF at EOF: OK");
	done(&P);
}

/* every prefix of a fixture parses to a prefix of the full result */
static void
test_every_prefix(const char *name, const char *ct, const char *body)
{
	Parsed		F;
	size_t		full = strlen(body);
	size_t		close_end;
	size_t		n;
	bool		good = true;
	const char *last_close = NULL;
	const char *s = body;
	char		b[BR_MAX_BOUNDARY + 1];
	char		delim[BR_MAX_BOUNDARY + 5];

	br_boundary(ct, strlen(ct), b);
	snprintf(delim, sizeof(delim), "--%s--", b);
	while ((s = strstr(s, delim)) != NULL)
		last_close = s++;
	close_end = (size_t) (last_close - body) + strlen(delim);

	parse(&F, ct, body);
	for (n = 0; n < full && good; n++)
	{
		Parsed		P;
		int			i;

		parse_n(&P, ct, body, n, MAXP);
		if (n < close_end)
		{
			if (P.st != BR_TRUNCATED)
			{
				printf("# prefix %zu: status %s (%s)\n", n,
					   br_status_name(P.st), P.res.error ? P.res.error : "");
				good = false;
			}
		}
		else if (P.st != BR_OK || P.res.nparts != F.res.nparts)
			good = false;
		if (P.res.nparts > F.res.nparts)
			good = false;
		for (i = 0; good && i < P.res.nparts; i++)
		{
			const BatchPart *a = &P.parts[i];
			const BatchPart *f = &F.parts[i];

			/* complete parts identical; a cut part has a prefix body */
			if (a->http_status != f->http_status ||
				!slice_eq_modulo_cr(a->content_id, f->content_id) ||
				!slice_eq_modulo_cr(a->headers, f->headers) ||
				a->in_changeset != f->in_changeset ||
				a->body.len > f->body.len + 2 ||
				memcmp(a->body.ptr, f->body.ptr,
					   a->body.len < f->body.len ? a->body.len : f->body.len) != 0 ||
				(!a->truncated && a->body.len != f->body.len))
			{
				printf("# prefix %zu: part %d differs\n", n, i);
				good = false;
			}
		}
		done(&P);
	}
	ok(good, "every prefix of %s: TRUNCATED with a consistent prefix of the parts", name);
	done(&F);
}

static void
test_changeset_errors(void)
{
	Parsed		P;
	static const char unclosed[] =
	"--b\r\n"
	"Content-Type: multipart/mixed; boundary=c\r\n"
	"\r\n"
	"--c\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--b--\r\n";
	static const char too_deep[] =
	"--b\r\n"
	"Content-Type: multipart/mixed; boundary=c\r\n"
	"\r\n"
	"--c\r\n"
	"Content-Type: multipart/mixed; boundary=d\r\n"
	"\r\n"
	"--d\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 204 No Content\r\n"
	"\r\n"
	"\r\n"
	"--d--\r\n"
	"--c--\r\n"
	"--b--\r\n";
	static const char no_cs_boundary[] =
	"--b\r\n"
	"Content-Type: multipart/mixed\r\n"
	"\r\n"
	"--c--\r\n"
	"--b--\r\n";
	static const char no_blank[] =
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"Content-ID: 1\r\n"
	"--b--\r\n";
	static const char cs_garbage[] =
	"--b\r\n"
	"Content-Type: multipart/mixed; boundary=c\r\n"
	"\r\n"
	"nothing here\r\n"
	"--b--\r\n";

	parse(&P, "multipart/mixed; boundary=b", unclosed);
	is_long(P.st, BR_MALFORMED, "changeset without closing delimiter: MALFORMED");
	ok(P.res.nparts == 1 && P.parts[0].truncated,
	   "changeset without closing delimiter: its last part is returned flagged");
	done(&P);

	parse(&P, "multipart/mixed; boundary=b", too_deep);
	is_long(P.st, BR_MALFORMED, "multipart inside changeset: MALFORMED (depth limit)");
	is_long(P.res.nparts, 0, "multipart inside changeset: no parts");
	done(&P);

	parse(&P, "multipart/mixed; boundary=b", no_cs_boundary);
	is_long(P.st, BR_NO_BOUNDARY, "changeset without boundary: NO_BOUNDARY");
	done(&P);

	parse(&P, "multipart/mixed; boundary=b", no_blank);
	is_long(P.st, BR_MALFORMED, "MIME headers without empty line: MALFORMED");
	done(&P);

	parse(&P, "multipart/mixed; boundary=b", cs_garbage);
	is_long(P.st, BR_MALFORMED, "changeset without any delimiter: MALFORMED");
	done(&P);
}

static void
test_misc_parse(void)
{
	Parsed		P;
	static const char cr_not_lf[] =
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1\r\n"
	"\r\n"
	"--b\rX\r\n"
	"--b\r\n"
	"Content-Type: application/http\r\n"
	"\r\n"
	"HTTP/1.1 20\r\n"
	"\r\n"
	"\r\n"
	"--b--\r\n";

	parse(&P, "  multipart/mixed; boundary=b", cr_not_lf);
	is_long(P.st, BR_OK, "'--b\\rX' is not a delimiter; leading space in Content-Type");
	is_long(P.res.nparts, 2, "... 2 parts");
	is_long(P.parts[0].http_status, 0, "status line 'HTTP/1.1' alone -> 0");
	is_slice(P.parts[0].body, "--b\rX", "... and the CR-not-LF line is body");
	is_long(P.parts[1].http_status, 0, "status line with 2-digit code -> 0");
	done(&P);

	is_str(br_status_name(BR_OK), "ok", "br_status_name ok");
	is_str(br_status_name(BR_TRUNCATED), "truncated", "br_status_name truncated");
	is_str(br_status_name(BR_MALFORMED), "malformed", "br_status_name malformed");
	is_str(br_status_name(BR_NO_BOUNDARY), "no boundary", "br_status_name no boundary");
	is_str(br_status_name(BR_TOO_MANY_PARTS), "too many parts", "br_status_name too many");
	is_str(br_status_name(BR_TOO_LARGE), "too large", "br_status_name too large");
	is_str(br_status_name((BrStatus) 99), "unknown", "br_status_name out of range");
}

static void
test_garbage(void)
{
	Parsed		P;
	static const char bin[] = "\0\0\xff\xfe--\0\r\n\r\n";

	parse(&P, CT1, "<html><body>502 Bad Gateway</body></html>");
	is_long(P.st, BR_MALFORMED, "garbage (HTML): MALFORMED");
	is_long(P.res.nparts, 0, "garbage: no parts");
	done(&P);

	parse_n(&P, CT1, bin, sizeof(bin) - 1, MAXP);
	is_long(P.st, BR_MALFORMED, "garbage (binary with NULs): MALFORMED");
	done(&P);

	parse(&P, CT1, "");
	is_long(P.st, BR_TRUNCATED, "empty body: TRUNCATED");
	done(&P);

	parse(&P, CT1, "--batchresp");
	is_long(P.st, BR_TRUNCATED, "cut in the first delimiter: TRUNCATED");
	done(&P);

	parse(&P, "application/json; odata.metadata=minimal",
		  "{\"error\":{\"code\":\"0x80048d19\",\"message\":\"Error identified in Payload\"}}");
	is_long(P.st, BR_NO_BOUNDARY, "non-multipart Content-Type: NO_BOUNDARY");
	done(&P);

	parse(&P, "multipart/mixed", dv_ok);
	is_long(P.st, BR_NO_BOUNDARY, "multipart without boundary: NO_BOUNDARY");
	done(&P);

	parse(&P, "multipart/mixed; boundary=" B1, "--" B1 "--\r\n");
	ok(P.st == BR_OK && P.res.nparts == 0, "closing delimiter only: OK, 0 parts");
	done(&P);

	ok(br_parse(CT1, strlen(CT1), NULL, 0, NULL, 0, NULL) == BR_TRUNCATED,
	   "NULL body, NULL parts, NULL result: no crash");
}

static void
test_too_many_parts(void)
{
	Parsed		P;
	BatchParse	r;
	const char *third = strstr(dv_mixed, "--" B1 "\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: inv-3");

	parse_n(&P, CT1, dv_mixed, strlen(dv_mixed), 2);
	is_long(P.st, BR_TOO_MANY_PARTS, "3 parts, max 2: TOO_MANY_PARTS");
	is_long(P.res.nparts, 2, "3 parts, max 2: 2 filled");
	ok(P.res.error_offset > (size_t) (third - dv_mixed),
	   "3 parts, max 2: error offset in the third part");
	done(&P);

	ok(br_parse(CT1, strlen(CT1), dv_mixed, strlen(dv_mixed), NULL, 0, &r) ==
	   BR_TOO_MANY_PARTS && r.nparts == 0, "max_parts 0: TOO_MANY_PARTS");

	parse_n(&P, CT1, dv_mixed, strlen(dv_mixed), 3);
	is_long(P.st, BR_OK, "3 parts, max 3: OK");
	done(&P);
}

static void
test_too_large(void)
{
	size_t		n = (size_t) BR_MAX_BODY_BYTES + 1;
	char	   *big = malloc(n);
	BatchPart	parts[2];
	BatchParse	r;

	memset(big, 'x', n);
	ok(br_parse(CT1, strlen(CT1), big, n, parts, 2, &r) == BR_TOO_LARGE &&
	   r.nparts == 0 && r.error != NULL, "body > BR_MAX_BODY_BYTES: TOO_LARGE");
	free(big);
}

/* linear time: pathological inputs of 8 MiB parse quickly */
static void
test_linear_time(void)
{
	size_t		n = 8u << 20;
	char	   *buf = malloc(n);
	BatchPart	parts[4];
	BatchParse	r;
	clock_t		t0;
	double		secs;
	size_t		i;
	const char *pat = "--" B1 "x\n";
	size_t		pl = strlen(pat);

	/* lines that almost match the delimiter, inside one part's headers */
	memset(buf, '\n', n);
	for (i = 0; i + pl <= n; i += pl)
		memcpy(buf + i, pat, pl);
	memcpy(buf, "--" B1 "\n\n", strlen("--" B1 "\n\n"));
	t0 = clock();
	br_parse(CT1, strlen(CT1), buf, n, parts, 4, &r);
	/* and a body of empty lines */
	memset(buf, '\n', n);
	br_parse(CT1, strlen(CT1), buf, n, parts, 4, &r);
	/* and huge header blocks */
	memset(buf, 'a', n);
	for (i = 0; i + 40 < n; i += 40)
		memcpy(buf + i, "X-Header-Name: some value\r\n", 27);
	memcpy(buf, "--" B1 "\r\n", strlen("--" B1 "\r\n"));
	br_parse(CT1, strlen(CT1), buf, n, parts, 4, &r);
	secs = (double) (clock() - t0) / CLOCKS_PER_SEC;
	ok(secs < 10.0, "3 x 8 MiB pathological inputs parse in linear time (%.2fs)", secs);
	free(buf);
}

/* ---------------------------------------------------------------------
 * Header iteration
 * ---------------------------------------------------------------------
 */
static void
test_headers(void)
{
	static const char block[] =
	"  orphan continuation: x\r\n"
	"OData-Version: 4.0\r\n"
	"Location:   https://x/data/Foo(1)  \r\n"
	"this line has no colon\r\n"
	" : empty name\r\n"
	"X-Folded: first\r\n"
	"  second\r\n"
	"Bad Name: v\r\n"
	"Name : v\r\n"
	"Empty:\r\n"
	"Last:lf-only\n"
	"NoEOL: yes";
	char	   *buf = malloc(sizeof(block) - 1);
	BrSlice		hs;
	BrHeaderIter it;
	BrSlice		n;
	BrSlice		v;
	int			count = 0;
	bool		good = true;
	const char *want[][2] = {
		{"OData-Version", "4.0"},
		{"Location", "https://x/data/Foo(1)"},
		{"X-Folded", "first\r\n  second"},
		{"Empty", ""},
		{"Last", "lf-only"},
		{"NoEOL", "yes"},
	};

	memcpy(buf, block, sizeof(block) - 1);
	hs.ptr = buf;
	hs.len = sizeof(block) - 1;
	br_header_iter_init(&it, hs);
	while (br_header_next(&it, &n, &v))
	{
		if (count >= 6 || !slice_eq(n, want[count][0]) || !slice_eq(v, want[count][1]))
		{
			printf("# header %d: '%.*s' = '%.*s'\n", count, (int) n.len, n.ptr,
				   (int) v.len, v.ptr);
			good = false;
		}
		count++;
	}
	ok(good && count == 6, "header iteration: valid headers only, trimmed, folding kept raw");
	ok(br_header_get(hs, "location", &v) && slice_eq(v, "https://x/data/Foo(1)"),
	   "br_header_get: case-insensitive");
	ok(br_header_get(hs, "ODATA-VERSION", &v) && slice_eq(v, "4.0"),
	   "br_header_get: upper-case lookup");
	ok(!br_header_get(hs, "second", &v) && v.len == 0,
	   "br_header_get: continuation line is not a header");
	ok(!br_header_get(hs, "Name", &v), "br_header_get: 'Name :' not accepted");
	ok(!br_header_get(hs, "Loc", &v), "br_header_get: no prefix match");
	ok(!br_header_get(hs, NULL, &v), "br_header_get: NULL name");

	hs.len = strlen("  orphan continuation: x\r\nOData-Version: 4.0\r\n\r\nAfter: blank");
	memcpy(buf, "  orphan continuation: x\r\nOData-Version: 4.0\r\n\r\nAfter: blank", hs.len);
	ok(!br_header_get(hs, "After", &v), "br_header_get: empty line ends the block");
	hs.ptr = NULL;
	hs.len = 5;
	ok(!br_header_get(hs, "x", &v), "br_header_get: NULL block");
	free(buf);
}

/* ---------------------------------------------------------------------
 * classify
 * ---------------------------------------------------------------------
 */
static const char *const dup_codes[] = {"0x80040237", "0x80060892", "0x80040333"};
static const char *const dup_msgs[] = {"already exists", "Duplicate Record", ""};
static const ClassifyConfig cfg = {NULL, 0, dup_codes, 3, dup_msgs, 3, "InvoiceId", ORG};

#define NOW ((time_t) 1700000000)	/* Tue, 14 Nov 2023 22:13:20 GMT */

static void
classify_lit(const ClassifyConfig *c, int status, const char *headers,
			 const char *body, size_t blen, Classification *out)
{
	char	   *h = malloc(strlen(headers) ? strlen(headers) : 1);
	char	   *b = malloc(blen ? blen : 1);
	BrSlice		hs;
	BrSlice		bs;

	/* exact-size copies: no terminator for classify to rely on */
	memcpy(h, headers, strlen(headers));
	memcpy(b, body, blen);
	hs.ptr = h;
	hs.len = strlen(headers);
	bs.ptr = b;
	bs.len = blen;
	classify_response(c, status, hs, bs, NOW, out);
	free(h);
	free(b);
	if (!utf8_valid_no_ctl(out->d365_id) || !utf8_valid_no_ctl(out->error_code) ||
		!utf8_valid_no_ctl(out->error_text))
		ok(false, "classification strings are valid UTF-8 without control chars");
}

static Outcome
outcome_of(const ClassifyConfig *c, int status, const char *headers, const char *body)
{
	Classification out;

	classify_lit(c, status, headers, body, strlen(body), &out);
	return out.outcome;
}

static void
test_classify_branches(void)
{
	static const int st_422[] = {422};
	ClassifyConfig only422 = cfg;
	const char *e500dup = "{\"error\":{\"code\":\"0x80040333\",\"message\":\"A record was not created or updated because a duplicate of the current record already exists.\"}}";
	const char *e500 = "{\"error\":{\"code\":\"0x80040216\",\"message\":\"An unexpected error occurred.\"}}";
	const char *e400 = "{\"error\":{\"code\":\"0x80044331\",\"message\":\"A validation error occurred. The value of 'amount' must be positive.\"}}";

	only422.duplicate_statuses = st_422;
	only422.n_duplicate_statuses = 1;

	is_str(outcome_name(outcome_of(&cfg, 200, "", "")), "created", "200 -> created");
	is_str(outcome_name(outcome_of(&cfg, 201, "", "")), "created", "201 -> created");
	is_str(outcome_name(outcome_of(&cfg, 204, "", "")), "created", "204 -> created");
	is_str(outcome_name(outcome_of(&cfg, 299, "", "")), "created", "299 -> created");
	is_str(outcome_name(outcome_of(&cfg, 201, "", "{\"error\":{\"code\":\"0x80040237\",\"message\":\"already exists\"}}")),
		   "created", "2xx is created even with an error-looking body");

	is_str(outcome_name(outcome_of(&cfg, 409, "", "")), "duplicate", "409 -> duplicate");
	is_str(outcome_name(outcome_of(&cfg, 412, "", "{\"error\":{\"code\":\"0x80060882\",\"message\":\"A record with matching key values already exists.\"}}")),
		   "duplicate", "412 -> duplicate");
	is_str(outcome_name(outcome_of(&cfg, 500, "Retry-After: 5\r\n", e500dup)), "duplicate",
		   "500 + 0x80040333 -> duplicate (never retried)");
	is_str(outcome_name(outcome_of(&cfg, 400, "", "{\"error\":{\"code\":\"0X80040237\",\"message\":\"x\"}}")),
		   "duplicate", "duplicate code matched case-insensitively");
	is_str(outcome_name(outcome_of(&cfg, 400, "", "{\"error\":{\"code\":\"\",\"message\":\"Invoice INV-1 ALREADY EXISTS for vendor V1.\"}}")),
		   "duplicate", "duplicate by message substring (case-insensitive)");
	is_str(outcome_name(outcome_of(&cfg, 500, "", "{\"error\":{\"code\":\"\",\"message\":\"An error has occurred.\",\"innererror\":{\"message\":\"Write failed: duplicate record for VendInvoiceInfoTable\",\"type\":\"Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException\",\"stacktrace\":\"\"}}}")),
		   "duplicate", "duplicate by innererror.message substring, beats 500 retry");
	is_str(outcome_name(outcome_of(&cfg, 401, "", "{\"error\":{\"code\":\"0x80040237\",\"message\":\"x\"}}")),
		   "duplicate", "duplicate wins over 401");
	is_str(outcome_name(outcome_of(&cfg, 400, "", "{\"error\":{\"code\":\"0x800402370\",\"message\":\"x\"}}")),
		   "review", "duplicate code is an exact match, not a prefix");
	is_str(outcome_name(outcome_of(&cfg, 400, "", e400)), "review",
		   "empty configured message does not match everything");
	is_str(outcome_name(outcome_of(&only422, 409, "", "")), "review",
		   "configured statuses replace the default {409,412}");
	is_str(outcome_name(outcome_of(&only422, 422, "", "")), "duplicate",
		   "configured duplicate status 422");
	is_str(outcome_name(outcome_of(NULL, 412, "", "")), "duplicate", "NULL config: 412 duplicate");
	is_str(outcome_name(outcome_of(NULL, 500, "", e500dup)), "retry",
		   "NULL config: no codes configured, 500 -> retry");

	is_str(outcome_name(outcome_of(&cfg, 401, "WWW-Authenticate: Bearer\r\n", "")), "auth", "401 -> auth");
	is_str(outcome_name(outcome_of(&cfg, 403, "", "")), "review", "403 -> review");

	is_str(outcome_name(outcome_of(&cfg, 408, "", "")), "retry", "408 -> retry");
	is_str(outcome_name(outcome_of(&cfg, 429, "", "")), "retry", "429 -> retry");
	is_str(outcome_name(outcome_of(&cfg, 500, "", e500)), "retry", "500 -> retry");
	is_str(outcome_name(outcome_of(&cfg, 502, "", "<html>Bad Gateway</html>")), "retry", "502 -> retry");
	is_str(outcome_name(outcome_of(&cfg, 503, "", "")), "retry", "503 -> retry");
	is_str(outcome_name(outcome_of(&cfg, 504, "", "")), "retry", "504 -> retry");

	is_str(outcome_name(outcome_of(&cfg, 400, "", e400)), "review", "400 -> review");
	is_str(outcome_name(outcome_of(&cfg, 404, "", "")), "review", "404 -> review");
	is_str(outcome_name(outcome_of(&cfg, 0, "", "")), "review", "0 (unparsable) -> review");
	is_str(outcome_name(outcome_of(&cfg, 100, "", "")), "review", "100 -> review");
	is_str(outcome_name(outcome_of(&cfg, 302, "Location: https://login.microsoftonline.com/\r\n", "")),
		   "review", "302 -> review");
	is_str(outcome_name(outcome_of(&cfg, 501, "", "")), "review", "501 -> review");
	is_str(outcome_name(outcome_of(&cfg, 505, "", "")), "review", "505 -> review");

	is_str(outcome_name(OUTCOME_CREATED), "created", "outcome_name created");
	is_str(outcome_name(OUTCOME_DUPLICATE), "duplicate", "outcome_name duplicate");
	is_str(outcome_name(OUTCOME_RETRY), "retry", "outcome_name retry");
	is_str(outcome_name(OUTCOME_REVIEW), "review", "outcome_name review");
	is_str(outcome_name(OUTCOME_AUTH), "auth", "outcome_name auth");
	is_str(outcome_name((Outcome) 42), "unknown", "outcome_name out of range");
}

static void
test_classify_ids(void)
{
	Classification c;

#define ID(cfgp, hdrs, body) \
	(classify_lit((cfgp), 201, (hdrs), (body), strlen(body), &c), c.d365_id)

	is_str(ID(&cfg, "OData-EntityId: " ORG "vendinvoices(0000000a-0000-0000-0000-000000000001)\r\n",
			  "{\"InvoiceId\":\"INV-77\"}"),
		   "INV-77", "id: body property wins over headers");
	is_str(ID(&cfg, "", "{\"InvoiceId\":5637144576}"), "5637144576",
		   "id: numeric body property");
	is_str(ID(&cfg, "", "\xEF\xBB\xBF {\"InvoiceId\":\"INV-BOM\"}"), "INV-BOM",
		   "id: body with UTF-8 BOM");
	is_str(ID(&cfg, "OData-EntityId: " ORG "vendinvoices(0000000a-0000-0000-0000-000000000001)\r\n",
			  "{\"Other\":1}"),
		   "0000000a-0000-0000-0000-000000000001",
		   "id: OData-EntityId absolute URL when body lacks the property");
	is_str(ID(&cfg, "OData-EntityId: " ORG "vendinvoices(0000000a-0000-0000-0000-000000000001)\r\n",
			  "{\"InvoiceId\":null}"),
		   "0000000a-0000-0000-0000-000000000001", "id: null body property falls back");
	is_str(ID(&cfg, "Location: /data/VendorInvoiceHeaders(dataAreaId='usmf',HeaderReference='APINV-000123')\r\n", ""),
		   "dataAreaId='usmf',HeaderReference='APINV-000123'",
		   "id: Location relative URL, composite key");
	is_str(ID(&cfg, "Location: VendorInvoiceHeaders(VendorAccount='V(1)',InvoiceNumber='I1')\r\n", ""),
		   "VendorAccount='V(1)',InvoiceNumber='I1'",
		   "id: parentheses inside a quoted key value");
	is_str(ID(&cfg, "Location: Vendors(Name='O''Brien (x)')\r\n", ""),
		   "Name='O''Brien (x)'", "id: doubled quote inside key value");
	is_str(ID(&cfg, "Location: https://contoso.crm.dynamics.com/data/VendorInvoiceHeaders(dataAreaId=%27usmf%27,InvoiceNumber=%27A%20B%27)\r\n", ""),
		   "dataAreaId='usmf',InvoiceNumber='A B'", "id: percent-decoded");
	is_str(ID(&cfg, "Location: Foo(K=%27a%2fb%2Fc%zz%4%27)\r\n", ""), "K='a/b/c%zz%4'",
		   "id: lower/upper-case %-hex decoded, malformed escapes kept");
	is_str(ID(&cfg, "Location: Foo(%00)\r\n", ""), "%00", "id: %00 kept literally");
	is_str(ID(&cfg, "", "{\"InvoiceId\":1.5}"), "1.5", "id: non-integer number");
	is_str(ID(&cfg, "", "{\"InvoiceId\":-42}"), "-42", "id: negative integer");
	is_str(ID(&cfg, "Location: https://contoso.crm.dynamics.com/data/Foo(42)?$select=a(b)\r\n", ""), "42",
		   "id: query string ignored");
	is_str(ID(&cfg, "Location: https://contoso.crm.dynamics.com/api/data/v9.2/accounts(1)/contact_customer_accounts(2)\r\n", ""),
		   "2", "id: last (...) of the path");
	is_str(ID(&cfg, "OData-EntityId: https://contoso.crm.dynamics.com/data/Foo()\r\nLocation: https://contoso.crm.dynamics.com/data/Foo(7)\r\n", ""),
		   "7", "id: empty key in OData-EntityId falls back to Location");
	is_str(ID(&cfg, "Location: https://contoso.crm.dynamics.com/data/Foo\r\n", ""), "", "id: no key -> empty");
	is_str(ID(NULL, "", "{\"InvoiceId\":\"x\"}"), "", "id: no id_property, no headers -> empty");
	{
		char		hdr[600];

		snprintf(hdr, sizeof(hdr), "Location: https://contoso.crm.dynamics.com/data/Foo('%0300d')\r\n", 1);
		is_str(ID(&cfg, hdr, ""), "", "id: too long -> left empty, never truncated");
	}
	is_str(ID(&cfg, "Location: https://contoso.crm.dynamics.com/data/Foo(%01)\r\n", ""), "",
		   "id: control character -> rejected");
	is_str(ID(&cfg, "", "{\"InvoiceId\":\"A\xc2\x85" "B\"}"), "",
		   "id: C1 control character -> rejected");
	is_str(ID(&cfg, "", "{\"InvoiceId\":\"A\xff\"}"), "",
		   "id: ill-formed UTF-8 -> rejected");
	is_str(ID(&cfg, "", "{\"InvoiceId\":\"R\xc3\x89" "F-1\"}"), "R\xc3\x89" "F-1",
		   "id: non-ASCII UTF-8 kept");
	ok(c.error_text[0] == '\0' && c.error_code[0] == '\0',
	   "created: no error text or code");

	/* only from a URL on the service root's origin */
	is_str(ID(&cfg, "OData-EntityId: https://evil.example/api/data/v9.2/vendinvoices(6)\r\n", ""), "",
		   "id: OData-EntityId on another host ignored");
	is_str(ID(&cfg, "Location: https://contoso.crm.dynamics.com.evil.example/data/Foo(6)\r\n", ""), "",
		   "id: Location on a host that merely starts like the root's ignored");
	is_str(ID(&cfg, "OData-EntityId: https://evil.example/data/Foo(6)\r\n"
			  "Location: https://contoso.crm.dynamics.com/data/Foo(7)\r\n", ""), "7",
		   "id: cross-origin OData-EntityId skipped, same-origin Location used");
	is_str(ID(&cfg, "OData-EntityId: http://contoso.crm.dynamics.com/data/Foo(6)\r\n", ""), "",
		   "id: same host over http (root is https) ignored");
	is_str(ID(&cfg, "OData-EntityId: https://contoso.crm.dynamics.com:8443/data/Foo(6)\r\n", ""), "",
		   "id: same host, other port ignored");
	is_str(ID(&cfg, "OData-EntityId: HTTPS://Contoso.CRM.dynamics.com:443/data/Foo(6)\r\n", ""), "6",
		   "id: scheme and host case-insensitive, :443 same as none");
	is_str(ID(&cfg, "Location: //evil.example/data/Foo(6)\r\n", ""), "",
		   "id: network-path reference to another host ignored");
	is_str(ID(&cfg, "Location: /data/Foo(6)\r\n", ""), "6", "id: absolute-path reference is same-origin");
	{
		ClassifyConfig noroot = cfg;

		noroot.service_root = NULL;
		is_str(ID(&noroot, "OData-EntityId: " ORG "vendinvoices(6)\r\n", ""), "",
			   "id: no service root: absolute URL ignored");
		is_str(ID(&noroot, "Location: vendinvoices(6)\r\n", ""), "6",
			   "id: no service root: relative reference still used");
		is_str(ID(NULL, "Location: " ORG "vendinvoices(6)\r\n", ""), "",
			   "id: NULL config: absolute URL ignored");
	}
#undef ID
}

static void
test_same_origin(void)
{
	const char *root = ORG;
	char		id[64];

#define SO(url) classify_same_origin((url), strlen(url), root)
	ok(SO(ORG "vendinvoices(1)"), "same origin: the root itself");
	ok(SO("https://contoso.crm.dynamics.com/other/path(1)"), "same origin: any path");
	ok(SO("HTTPS://CONTOSO.CRM.DYNAMICS.COM/x(1)"), "same origin: scheme and host case-insensitive");
	ok(SO("https://contoso.crm.dynamics.com:443/x(1)"), "same origin: explicit default port 443");
	ok(SO("https://contoso.crm.dynamics.com:0443/x(1)"), "same origin: port 0443 is 443");
	ok(SO("https://contoso.crm.dynamics.com?x"), "same origin: no path, query");
	ok(SO("  https://contoso.crm.dynamics.com/x(1) \t"), "same origin: surrounding blanks ignored");
	ok(SO("x(1)"), "same origin: relative reference");
	ok(SO("/api/data/v9.2/x(1)"), "same origin: absolute-path reference");
	ok(SO("VendorInvoiceHeaders(VendorAccount='V:1',InvoiceNumber='I1')"),
	   "same origin: relative reference with ':' inside the key");
	ok(SO("//contoso.crm.dynamics.com/x(1)"), "same origin: network-path reference to the root's host");

	ok(!SO("https://evil.example/x(1)"), "cross origin: other host");
	ok(!SO("https://contoso.crm.dynamics.com.evil.example/x(1)"), "cross origin: root host as a prefix");
	ok(!SO("https://xcontoso.crm.dynamics.com/x(1)"), "cross origin: root host as a suffix");
	ok(!SO("https://contoso.crm.dynamics.co/x(1)"), "cross origin: root host minus a letter");
	ok(!SO("https://contoso.crm.dynamics.com./x(1)"), "cross origin: trailing dot (not the same name)");
	ok(!SO("http://contoso.crm.dynamics.com/x(1)"), "cross origin: http vs https");
	ok(!SO("http://contoso.crm.dynamics.com:443/x(1)"), "cross origin: http on port 443");
	ok(!SO("https://contoso.crm.dynamics.com:8443/x(1)"), "cross origin: other port");
	ok(!SO("https://contoso.crm.dynamics.com:/x(1)"), "refused: empty port");
	ok(!SO("https://contoso.crm.dynamics.com:99999/x(1)"), "refused: port out of range");
	ok(!SO("https://contoso.crm.dynamics.com:44a/x(1)"), "refused: port not a number");
	ok(!SO("https://contoso.crm.dynamics.com@evil.example/x(1)"), "refused: user info (host is evil.example)");
	ok(!SO("https://user@contoso.crm.dynamics.com/x(1)"), "refused: any user info");
	ok(!SO("https://%63ontoso.crm.dynamics.com/x(1)"), "refused: percent-encoded host");
	ok(!SO("https://contoso.crm.dynamics.com\\@evil.example/x(1)"), "refused: backslash ends the host");
	ok(!SO("https:\\\\evil.example\\x(1)"), "refused: backslashes for slashes, other host");
	ok(!SO("//evil.example/x(1)"), "cross origin: network-path reference");
	ok(!SO("\\\\evil.example/x(1)"), "cross origin: network-path reference with backslashes");
	ok(!SO("/\\evil.example/x(1)"), "cross origin: slash-backslash is a network path too");
	ok(!SO("\\\\contoso.crm.dynamics.com/x(1)"), "refused: backslashes before even the root's host");
	ok(!SO("https:\\\\contoso.crm.dynamics.com/x(1)"), "refused: https: and backslashes, even to the root's host");
	ok(!SO("https:/\\contoso.crm.dynamics.com/x(1)"), "refused: https:/ and a backslash");
	ok(!SO("https:evil.example/x(1)"), "refused: scheme without //");
	ok(!SO("https:/evil.example/x(1)"), "refused: scheme with one /");
	ok(!SO("https:///evil.example/x(1)"), "refused: empty authority");
	ok(!SO("https://con\ttoso.crm.dynamics.com/x(1)"), "refused: tab inside the URL");
	ok(!SO("/\t/evil.example/x(1)"), "refused: tab between the slashes");
	ok(!SO("ftp://contoso.crm.dynamics.com/x(1)"), "refused: other scheme");
	ok(!SO("javascript:alert(1)"), "refused: javascript:");
	ok(!SO(""), "refused: empty");
	ok(!SO("https://contoso.crm.dynamics.c\xc3\xb6m/x(1)"), "refused: non-ASCII host");
	ok(!classify_same_origin(NULL, 0, root), "refused: NULL URL");
#undef SO

	ok(classify_same_origin("http://[::1]:8080/x(1)", 22, "http://[::1]:8080/data/"),
	   "IPv6 literal: same");
	ok(!classify_same_origin("http://[::2]:8080/x(1)", 22, "http://[::1]:8080/data/"),
	   "IPv6 literal: other address");
	ok(classify_same_origin("http://localhost/x(1)", 21, "http://LOCALHOST:80/data/"),
	   "http: port 80 implied");
	ok(!classify_same_origin("https://h/x(1)", 14, NULL), "no root: absolute URL refused");
	ok(classify_same_origin("x(1)", 4, NULL), "no root: relative reference accepted");
	ok(!classify_same_origin("https://h/x(1)", 14, "not a URL"), "unusable root: absolute URL refused");
	ok(!classify_same_origin("https://h/x(1)", 14, "ftp://h/"), "non-http root: absolute URL refused");

	ok(classify_entity_id(ORG "vendinvoices(42)", strlen(ORG) + 16, root, id, sizeof(id)) &&
	   strcmp(id, "42") == 0, "classify_entity_id: same origin");
	ok(!classify_entity_id("https://evil.example/vendinvoices(42)", 37, root, id, sizeof(id)) &&
	   id[0] == '\0', "classify_entity_id: cross origin -> false, empty");
	ok(!classify_entity_id(ORG "vendinvoices(42)", strlen(ORG) + 16, root, id, 2) && id[0] == '\0',
	   "classify_entity_id: too small -> false, empty");
}

static void
test_classify_errors(void)
{
	Classification c;
	char	   *big;
	size_t		i;
	size_t		n;
	char		code[16];
	char		msg[32];

#define CL(st, hdrs, body) classify_lit(&cfg, (st), (hdrs), (body), strlen(body), &c)

	CL(400, "", "{\"error\":{\"code\":\"0x80044331\",\"message\":\"A validation error occurred.\"}}");
	is_str(c.error_code, "0x80044331", "error: code extracted");
	is_str(c.error_text, "HTTP 400: A validation error occurred.", "error: text format");

	CL(500, "", "{\"error\":{\"code\":\"\",\"message\":\"An error has occurred.\",\"innererror\":{\"message\":\"Write failed for table row.\",\"type\":\"T\"}}}");
	is_str(c.error_text, "HTTP 500: An error has occurred. [innererror: Write failed for table row.]",
		   "error: innererror message appended");
	is_str(c.error_code, "", "error: empty code stays empty");

	CL(400, "", "{\"error\":{\"code\":\"X\",\"message\":\"same\",\"innererror\":{\"message\":\"same\"}}}");
	is_str(c.error_text, "HTTP 400: same", "error: identical innererror not repeated");

	CL(400, "", "{\"odata.error\":{\"code\":\"BadRequest\",\"message\":{\"lang\":\"en-US\",\"value\":\"v3 style\"}}}");
	ok(strcmp(c.error_code, "BadRequest") == 0 && strcmp(c.error_text, "HTTP 400: v3 style") == 0,
	   "error: OData v3 odata.error / message.value");

	CL(400, "", "{\"error\":{\"code\":404,\"message\":\"numeric code\"}}");
	is_str(c.error_code, "404", "error: numeric code formatted");

	CL(400, "", "{\"error\":{\"code\":\"0x80040237\",\"message\":\"Dupl");
	is_str(outcome_name(c.outcome), "review",
		   "malformed JSON: not duplicate by code (code unknown)");
	is_str(c.error_text, "HTTP 400: {\"error\":{\"code\":\"0x80040237\",\"message\":\"Dupl",
		   "malformed JSON: raw body fallback");
	is_str(c.error_code, "", "malformed JSON: no code");

	CL(502, "", "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n\t<body>\x01</body>\r\n</html>\r\n");
	is_str(c.error_text, "HTTP 502: <html> <head><title>502 Bad Gateway</title></head> <body> </body> </html> ",
		   "raw body: control characters replaced, whitespace collapsed");

	CL(400, "", "\xff\xfe bad \xc3\x28 utf8 \xed\xa0\x80 \xe2\x82\xac");
	is_str(c.error_text, "HTTP 400: ?? bad ?( utf8 ??? \xe2\x82\xac",
		   "raw body: ill-formed UTF-8 replaced, valid kept");

	CL(404, "", "");
	is_str(c.error_text, "HTTP 404", "empty body: status only");

	CL(404, "", " \r\n\t ");
	is_str(c.error_text, "HTTP 404", "whitespace-only body: status only");

	CL(400, "", "\r\n  plain text\r\n");
	is_str(c.error_text, "HTTP 400: plain text ", "raw body: leading whitespace dropped");

	CL(500, "", "{\"error\":{\"code\":\"\",\"message\":\"\",\"innererror\":{\"message\":\"only inner\"}}}");
	is_str(c.error_text, "HTTP 500: only inner", "error: innererror message alone");

	CL(400, "", "{\"error\":{\"message\":\"emoji \xf0\x9f\x98\x80 ok, bad \xf5\x80\x80\x80 \xf0\x80\x80\x80\"}}");
	is_str(c.error_text, "HTTP 400: emoji \xf0\x9f\x98\x80 ok, bad ???? ????",
		   "error: 4-byte UTF-8 kept, invalid 4-byte forms replaced");

	CL(400, "", "{\"error\":{\"message\":\"C1 control \xc2\x85 and DEL \x7f end\"}}");
	is_str(c.error_text, "HTTP 400: C1 control   and DEL   end", "error: C1 controls and DEL replaced");

	{
		Classification c2;
		BrSlice		none = {NULL, 10};

		classify_response(&cfg, 503, none, none, NOW, &c2);
		ok(c2.outcome == OUTCOME_RETRY && strcmp(c2.error_text, "HTTP 503") == 0,
		   "classify: NULL header and body slices");
	}

	CL(0, "", "garbage");
	is_str(c.error_text, "no valid HTTP status: garbage", "status 0: text says so");

	CL(400, "", "[1,2,3]");
	is_str(c.error_text, "HTTP 400: [1,2,3]", "JSON array: raw fallback");
	CL(400, "", "{\"error\":\"just a string\"}");
	is_str(c.error_text, "HTTP 400: {\"error\":\"just a string\"}", "error not an object: raw fallback");
	CL(400, "", "{\"error\":{\"code\":\"C1\"}}");
	is_str(c.error_text, "HTTP 400: error code C1", "error without message: code in text");
	CL(400, "", "{\"error\":{\"code\":\"C1\",\"message\":\"line1\\nline2\\u0000tail\"}}");
	ok(utf8_valid_no_ctl(c.error_text) && strncmp(c.error_text, "HTTP 400: line1 line2", 21) == 0,
	   "JSON escapes for control chars sanitised");

	/* a huge message: truncated on a character boundary with "..." */
	n = 100000;
	big = malloc(n + 64);
	strcpy(big, "{\"error\":{\"code\":\"0x1\",\"message\":\"");
	i = strlen(big);
	while (i + 2 < n)
	{
		big[i++] = '\xc3';
		big[i++] = '\xa9';		/* é */
	}
	strcpy(big + i, "\"}}");
	CL(400, "", big);
	ok(strlen(c.error_text) <= 1023 && strlen(c.error_text) > 1000 &&
	   utf8_valid_no_ctl(c.error_text) &&
	   strcmp(c.error_text + strlen(c.error_text) - 3, "...") == 0,
	   "huge message: truncated to %zu bytes on a UTF-8 boundary, ends with ...",
	   strlen(c.error_text));

	/* huge raw body */
	memset(big, '\xe2', n);
	for (i = 0; i + 3 <= n; i += 3)
		memcpy(big + i, "\xe2\x82\xac", 3);
	classify_lit(&cfg, 503, "", big, n, &c);
	ok(strlen(c.error_text) <= 1023 && utf8_valid_no_ctl(c.error_text),
	   "huge raw body: truncated, valid UTF-8");

	/* deeply nested JSON: no stack overflow, raw fallback */
	memset(big, '[', n);
	memcpy(big, "{\"a\":", 5);
	classify_lit(&cfg, 400, "", big, n, &c);
	ok(strncmp(c.error_text, "HTTP 400: {\"a\":[[[", 18) == 0, "deeply nested JSON: raw fallback");
	free(big);

	/* odata_error_extract directly */
	{
		const char *e = "{\"error\":{\"code\":\"0x80040237abcdef\",\"message\":\"A record with matching key values already exists.\"}}";

		ok(odata_error_extract(e, strlen(e), code, sizeof(code), msg, sizeof(msg)) &&
		   strcmp(code, "0x80040237abcde") == 0 &&
		   strcmp(msg, "A record with matching key v...") == 0,
		   "odata_error_extract: small buffers truncate safely");
		ok(odata_error_extract(e, strlen(e), NULL, 0, NULL, 0),
		   "odata_error_extract: NULL outputs allowed");
		ok(!odata_error_extract(e, 20, code, sizeof(code), msg, sizeof(msg)) &&
		   code[0] == '\0' && msg[0] == '\0',
		   "odata_error_extract: respects len (truncated JSON -> false)");
		ok(!odata_error_extract("{\"value\":[]}", 12, code, sizeof(code), msg, sizeof(msg)),
		   "odata_error_extract: non-error JSON -> false");
		ok(!odata_error_extract(NULL, 0, code, sizeof(code), msg, sizeof(msg)),
		   "odata_error_extract: NULL body -> false");
	}
#undef CL
}

static void
test_retry_after(void)
{
	Classification c;
	const char *big = "99999999999999999999";

#define RA(s) parse_retry_after((s), strlen(s), NOW)
	is_long(RA("120"), 120, "Retry-After: seconds");
	is_long(RA(" 120 \r\n"), 120, "Retry-After: whitespace trimmed");
	is_long(RA("0"), 0, "Retry-After: zero");
	is_long(RA(big), CLASSIFY_RETRY_AFTER_MAX, "Retry-After: huge seconds capped at a day");
	is_long(RA("-1"), -1, "Retry-After: negative rejected");
	is_long(RA("1.5"), -1, "Retry-After: fraction rejected");
	is_long(RA("12a"), -1, "Retry-After: trailing junk rejected");
	is_long(RA(""), -1, "Retry-After: empty rejected");
	is_long(RA("soon"), -1, "Retry-After: word rejected");
	is_long(parse_retry_after(NULL, 0, NOW), -1, "Retry-After: NULL");
	is_long(parse_retry_after("120", 2, NOW), 12, "Retry-After: respects len");
	is_long(RA("Tue, 14 Nov 2023 22:15:20 GMT"), 120, "Retry-After: IMF-fixdate");
	is_long(RA("tue, 14 nov 2023 22:15:20 gmt"), 120, "Retry-After: IMF-fixdate, any case");
	is_long(RA("Tuesday, 14-Nov-23 22:15:20 GMT"), 120, "Retry-After: RFC 850");
	is_long(RA("Tue Nov 14 22:15:20 2023"), 120, "Retry-After: asctime");
	is_long(RA("Wed Nov  1 00:00:00 2023"), 0, "Retry-After: asctime single-digit day, past -> 0");
	is_long(RA("Sun, 06 Nov 1994 08:49:37 GMT"), 0, "Retry-After: past date -> 0");
	is_long(RA("Friday, 01-Jan-99 00:00:00 GMT"), 0,
		   "Retry-After: RFC 850 year 99 is 1999 (50-year rule) -> past");
	is_long(RA("Tuesday, 01-Jan-70 00:00:00 GMT"), CLASSIFY_RETRY_AFTER_MAX,
		   "Retry-After: RFC 850 year 70 is 2070 (within 50 years): future, capped");
	is_long(parse_retry_after("Tuesday, 01-Jan-70 00:00:00 GMT", 31, (time_t) (3155760000LL - 60)), 60,
		   "Retry-After: RFC 850 year 70 is 2070 exactly");
	is_long(parse_retry_after("Thu, 29 Feb 2024 00:00:00 GMT", 29, (time_t) (1709164800LL - 60)), 60,
		   "Retry-After: leap day 2024");
	is_long(RA("Wed, 29 Feb 2023 00:00:00 GMT"), -1, "Retry-After: 29 Feb 2023 invalid");
	is_long(RA("Tue, 31 Apr 2024 00:00:00 GMT"), -1, "Retry-After: 31 Apr invalid");
	is_long(RA("Tue, 14 Nov 2023 24:00:00 GMT"), -1, "Retry-After: hour 24 invalid");
	is_long(RA("Tue, 14 Nov 2023 22:15:20"), -1, "Retry-After: missing GMT");
	is_long(RA("Tue, 14 Nov 2023 22:15:20 PST"), -1, "Retry-After: non-GMT zone");
	is_long(RA("Tue, 14 Nov 2023 22:15:20 GMT x"), -1, "Retry-After: trailing junk after date");
	is_long(RA("Xyz, 14 Nov 2023 22:15:20 GMT"), -1, "Retry-After: bad weekday");
	is_long(RA("Tue, 14 Foo 2023 22:15:20 GMT"), -1, "Retry-After: bad month");
	is_long(RA("Tue, 14 Nov 123 22:15:20 GMT"), -1, "Retry-After: 3-digit year");
	is_long(RA("Fri, 31 Dec 9999 23:59:59 GMT"), CLASSIFY_RETRY_AFTER_MAX,
			"Retry-After: far future capped at a day");
	is_long(RA("Tue, 14-Nov-123 22:15:20 GMT"), -1, "Retry-After: RFC 850 3-digit year");
	is_long(RA("Tuesday, 14-Nov-2023 22:15:20 GMT"), 120, "Retry-After: RFC 850 with 4-digit year tolerated");
	is_long(RA("Tuesday Nov 14 22:15:20 2023"), -1, "Retry-After: asctime needs short weekday");
	is_long(RA("Tue Foo 14 22:15:20 2023"), -1, "Retry-After: asctime bad month");
	is_long(RA("Tue Nov 14 22:15 2023"), -1, "Retry-After: asctime bad time");
	is_long(RA("Tue Nov 14 22:15:20 23"), -1, "Retry-After: asctime 2-digit year");
	is_long(RA("Tue Nov 14 22:15:20 2023 x"), -1, "Retry-After: asctime trailing junk");
	is_long(RA("Tue Nov 32 22:15:20 2023"), -1, "Retry-After: asctime day 32");
	is_long(RA("Tue, 14 Nov 2023 22:15:61 GMT"), -1, "Retry-After: second 61");
	is_long(RA("Tue, 14 Nov 2023 22:15:60 GMT"), 160, "Retry-After: leap second 60 accepted");
	is_long(RA("Tue, 00 Nov 2023 22:15:20 GMT"), -1, "Retry-After: day 0");
	is_long(RA("Tue, 14 Nov 0000 22:15:20 GMT"), -1, "Retry-After: year 0");
	is_long(RA("Tue, 14-Nov-23 22:15:20 GMT"), 120, "Retry-After: RFC 850 with short weekday tolerated");
	is_long(RA("Tue,14 Nov 2023 22:15:20 GMT"), 120, "Retry-After: missing space after comma tolerated");
	is_long(RA("Tue, 1 Nov 2023 22:15:20 GMT"), 0, "Retry-After: 1-digit day tolerated (past)");

	/* cross-check the calendar arithmetic against gmtime in the C locale,
	 * under a non-UTC TZ to prove there is no timezone dependence */
	{
		bool		good = true;
		int64_t		t;

		setenv("TZ", "America/New_York", 1);
		tzset();
		for (t = 0; t < 2145916800LL && good; t += 86400LL * 13 + 3607)
		{
			time_t		tt = (time_t) t;
			struct tm	tm;
			char		s[64];
			static const char *wd[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
			static const char *mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
			"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

			gmtime_r(&tt, &tm);
			snprintf(s, sizeof(s), "%s, %02d %s %04d %02d:%02d:%02d GMT",
					 wd[tm.tm_wday], tm.tm_mday, mo[tm.tm_mon], tm.tm_year + 1900,
					 tm.tm_hour, tm.tm_min, tm.tm_sec);
			/* 1000 s after now, or t after the epoch when that is earlier */
			if (parse_retry_after(s, strlen(s), (time_t) (t - 1000)) != (t < 1000 ? t : 1000))
			{
				printf("# %s -> %d, want %lld\n", s,
					   parse_retry_after(s, strlen(s), (time_t) (t - 1000)),
					   (long long) (t < 1000 ? t : 1000));
				good = false;
			}
		}
		ok(good, "HTTP-date arithmetic matches gmtime for 1970..2038 (TZ=America/New_York)");
		unsetenv("TZ");
		tzset();
	}

	/* passed through classify */
	classify_lit(&cfg, 429, "Retry-After: 17\r\n", "", 0, &c);
	ok(c.outcome == OUTCOME_RETRY && c.retry_after == 17, "classify 429: retry_after seconds");
	classify_lit(&cfg, 503, "retry-after: Tue, 14 Nov 2023 22:18:20 GMT\r\n", "", 0, &c);
	ok(c.outcome == OUTCOME_RETRY && c.retry_after == 300, "classify 503: retry_after HTTP-date");
	classify_lit(&cfg, 503, "", "", 0, &c);
	is_long(c.retry_after, -1, "classify: no Retry-After -> -1");
	classify_lit(&cfg, 503, "Retry-After: later\r\n", "", 0, &c);
	is_long(c.retry_after, -1, "classify: unparsable Retry-After -> -1");

	/* the cap: a day, flagged */
	{
		bool		capped = true;
		char		many[2100];

		ok(parse_retry_after_capped("86400", 5, NOW, &capped) == 86400 && !capped,
		   "Retry-After: 86400 s is not capped");
		ok(parse_retry_after_capped("86401", 5, NOW, &capped) == CLASSIFY_RETRY_AFTER_MAX && capped,
		   "Retry-After: 86401 s capped at a day, flagged");
		ok(parse_retry_after_capped("999999999999", 12, NOW, &capped) == CLASSIFY_RETRY_AFTER_MAX && capped,
		   "Retry-After: 999999999999 s (the 24-day wait) capped at a day, flagged");
		memset(many, '9', sizeof(many));
		ok(parse_retry_after_capped(many, sizeof(many), NOW, &capped) == CLASSIFY_RETRY_AFTER_MAX && capped,
		   "Retry-After: 2100 digits capped, no overflow");
		memset(many, '0', sizeof(many));
		memcpy(many + sizeof(many) - 3, "120", 3);
		ok(parse_retry_after_capped(many, sizeof(many), NOW, &capped) == 120 && !capped,
		   "Retry-After: 2097 leading zeros, then 120");
		ok(parse_retry_after_capped("120", 3, NOW, &capped) == 120 && !capped,
		   "Retry-After: small value not flagged");
		ok(parse_retry_after_capped("x", 1, NOW, &capped) == -1 && !capped,
		   "Retry-After: unparsable not flagged");
		ok(parse_retry_after_capped("Wed, 15 Nov 2023 22:13:20 GMT", 29, NOW, &capped) == 86400 && !capped,
		   "Retry-After: date exactly a day ahead not capped");
		ok(parse_retry_after_capped("Wed, 15 Nov 2023 22:13:21 GMT", 29, NOW, &capped) == 86400 && capped,
		   "Retry-After: date a day and a second ahead capped, flagged");
		ok(parse_retry_after_capped("Fri, 31 Dec 9999 23:59:59 GMT", 29, NOW, &capped) == 86400 && capped,
		   "Retry-After: year 9999 capped, flagged");
		ok(parse_retry_after_capped("Fri, 31 Dec 9999 23:59:59 GMT", 29, (time_t) INT64_MAX, &capped) == 0 &&
		   !capped, "Retry-After: any date with the clock at its maximum: past, 0");
		ok(parse_retry_after_capped("Thu, 01 Jan 1970 00:00:01 GMT", 29, (time_t) INT64_MIN, &capped) == 1 &&
		   !capped, "Retry-After: clock at its minimum taken as 1970");
		ok(parse_retry_after_capped("Sunday, 06-Nov-94 08:49:37 GMT", 30, (time_t) INT64_MAX, &capped) == 0,
		   "Retry-After: RFC 850 date with the clock at its maximum: no overflow");
		ok(parse_retry_after_capped("120", 3, NOW, NULL) == 120, "Retry-After: capped flag optional");

		classify_lit(&cfg, 429, "Retry-After: 999999999999\r\n", "", 0, &c);
		ok(c.outcome == OUTCOME_RETRY && c.retry_after == CLASSIFY_RETRY_AFTER_MAX && c.retry_after_capped,
		   "classify 429: Retry-After 999999999999 -> a day, retry_after_capped");
		classify_lit(&cfg, 429, "Retry-After: 30\r\n", "", 0, &c);
		ok(c.retry_after == 30 && !c.retry_after_capped, "classify 429: Retry-After 30 not capped");
		classify_lit(&cfg, 503, "", "", 0, &c);
		ok(!c.retry_after_capped, "classify: no Retry-After, not capped");
	}
#undef RA
}

/* a whole response end to end: parse, then classify every part */
static void
test_end_to_end(void)
{
	Parsed		P;
	Classification c[3];
	int			i;

	parse(&P, CT1, dv_mixed);
	is_long(P.res.nparts, 3, "end to end: 3 parts");
	for (i = 0; i < P.res.nparts && i < 3; i++)
		classify_response(&cfg, P.parts[i].http_status, P.parts[i].headers,
						  P.parts[i].body, NOW, &c[i]);
	ok(c[0].outcome == OUTCOME_CREATED &&
	   strcmp(c[0].d365_id, "11111111-2222-3333-4444-555555555555") == 0,
	   "end to end: inv-1 created with id from OData-EntityId");
	ok(c[1].outcome == OUTCOME_DUPLICATE && strcmp(c[1].error_code, "0x80040237") == 0,
	   "end to end: inv-2 duplicate");
	ok(c[2].outcome == OUTCOME_RETRY && c[2].retry_after == 17 &&
	   strcmp(c[2].error_code, "0x80072322") == 0,
	   "end to end: inv-3 retry after 17 s");
	done(&P);

	parse(&P, "multipart/mixed; boundary=" B2, fo_reordered);
	classify_response(&cfg, P.parts[0].http_status, P.parts[0].headers,
					  P.parts[0].body, NOW, &c[0]);
	is_str(c[0].d365_id, "V-INV-124", "end to end F&O: id from body property");
	done(&P);
}

int
main(void)
{
	test_boundary();
	test_dataverse_ok();
	test_lf_equivalence();
	test_mixed_line_endings();
	test_lowercase_and_quoted();
	test_preamble_epilogue();
	test_content_id_sources();
	test_reordered_changeset();
	test_two_changesets();
	test_failed_changeset_single_part();
	test_boundary_text_in_body();
	test_padding_and_eof_close();
	test_status_lines();
	test_400_outer();
	test_truncation();
	test_every_prefix("dv_ok", CT1, dv_ok);
	test_every_prefix("dv_mixed", CT1, dv_mixed);
	test_every_prefix("fo_reordered", "multipart/mixed; boundary=" B2, fo_reordered);
	test_changeset_errors();
	test_misc_parse();
	test_garbage();
	test_too_many_parts();
	test_too_large();
	test_linear_time();
	test_headers();
	test_classify_branches();
	test_classify_ids();
	test_same_origin();
	test_classify_errors();
	test_retry_after();
	test_end_to_end();

	return tap_done();
}
