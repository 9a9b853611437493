/*-------------------------------------------------------------------------
 *
 * test_auth.c
 *	  TAP unit tests for what src/auth.c makes of a token endpoint's
 *	  answers, without a network: auth_mask_secret(), auth_describe_error()
 *	  and auth_parse_token_response().
 *
 * auth.c (and http.c, which it links against) are compiled against the
 * server headers and run on the stand-ins of pg_shims.h; after every call
 * the test checks that nothing was left allocated.
 *
 * Build and run: make -C test/fuzz unit
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include <cjson/cJSON.h>

#include "auth.h"
#include "http.h"

#include "pg_shims.h"
#include "tap.h"
#include "secret_encode.h"

static const char SECRET[] = "Sup3r~Secret/With+Symbols&=%Q";

/* a secret with a blank, non-ASCII, a 4-byte character and JSON/HTML specials */
static const char ODD_SECRET[] = "p\xc3\xa4$$ w\xc3\xb6rd\xf0\x9f\x98\x80\"\\<>'/&";

static long chunks_before;

static void
leak_check_start(void)
{
	chunks_before = live_chunks(CurrentMemoryContext);
}

static void
leak_check(const char *what)
{
	long		now = live_chunks(CurrentMemoryContext);

	if (now != chunks_before)
		ok(false, "%s: %ld allocation(s) left behind", what, now - chunks_before);
}

/* masked copy of text (malloc'd) */
static char *
masked(const char *text, size_t len, const char *secret, size_t *outlen)
{
	char	   *t = malloc(len + 1);
	size_t		r;

	memcpy(t, text, len);
	t[len] = '\0';
	leak_check_start();
	r = auth_mask_secret(t, len, secret);
	leak_check("auth_mask_secret");
	if (outlen)
		*outlen = r;
	return t;
}

/* pre + n copies of c + post (malloc'd) */
static char *
spelled(const char *pre, char c, size_t n, const char *post)
{
	SeBuf		b = {0};
	size_t		i;

	se_puts(&b, pre);
	for (i = 0; i < n; i++)
		se_put(&b, &c, 1);
	se_puts(&b, post);
	return b.p;
}

static void
is_masked(const char *text, const char *secret, const char *want, const char *what)
{
	char	   *got = masked(text, strlen(text), secret, NULL);

	is_str(got, want, what);
	free(got);
}

/* text = pre + X + post, where X must come out as all '*' */
static void
is_masked_span(const char *pre, const char *x, size_t xlen, const char *post,
			   const char *secret, const char *what)
{
	SeBuf		in = {0};
	char	   *want;
	char	   *got;
	size_t		outlen;

	se_puts(&in, pre);
	se_put(&in, x, xlen);
	se_puts(&in, post);
	want = spelled(pre, '*', xlen, post);
	got = masked(in.p, in.len, secret, &outlen);
	if (!ok(outlen == in.len && memcmp(got, want, in.len) == 0, "%s", what))
		printf("#   in   '%s'\n#   got  '%.*s'\n#   want '%s'\n", in.p, (int) outlen, got, want);
	free(got);
	free(want);
	se_free(&in);
}

#define SPAN(pre, x, post, secret, what) \
	is_masked_span((pre), (x), strlen(x), (post), (secret), (what))

/* ---------------------------------------------------------------------
 * auth_mask_secret
 * ---------------------------------------------------------------------
 */
static void
test_mask_encodings(void)
{
	int			mode;
	int			sidx;

	is_masked("before Sup3r~Secret/With+Symbols&=%Q after", SECRET,
			  "before ***************************** after", "raw secret masked, same length");
	is_masked("Sup3r~Secret/With+Symbols&=%Q", SECRET,
			  "*****************************", "whole text is the secret");

	for (sidx = 0; sidx < 2; sidx++)
	{
		const char *secret = sidx ? ODD_SECRET : SECRET;

		for (mode = 0; mode < SE_NMODES; mode++)
		{
			SeBuf		enc = {0};
			char		what[128];

			se_encode_all(&enc, secret, strlen(secret), (SeMode) mode);
			snprintf(what, sizeof(what), "%s secret, %s encoded: masked",
					 sidx ? "odd" : "plain", se_mode_names[mode]);
			is_masked_span("error: [", enc.p, enc.len, "] end", secret, what);
			se_free(&enc);
		}
	}

	/* the specific spellings the issue names, written out */
	SPAN("Secret: ", "Sup3r~Secret\\/With+Symbols&=%Q", ".", SECRET,
				   "JSON \\/ masked");
	SPAN("Secret: ", "Sup3r~Secret/With+Symbols&amp;=%Q", ".", SECRET,
				   "HTML &amp; masked");
	SPAN("Secret: ", "Sup3r%7eSecret%2fWith%2bSymbols%26%3d%25Q", ".", SECRET,
				   "form encoding, lower-case hex, masked");
	SPAN("s=", "Sup3r%7ESecret%2FWith%2BSymbols%26%3D%25Q", "&scope=x", SECRET,
				   "form encoding as sent, upper-case hex, masked");
	SPAN("<td>", "Sup3r&#126;Secret&#x2F;With&#X2b;Symbols&AMP;&equals;&percnt;Q", "</td>",
				   SECRET, "HTML numeric and HTML5 named references masked");
	SPAN("\"", "a\\\"b\\\\c", "\"", "a\"b\\c", "JSON \\\" and \\\\ masked");
	SPAN("x", "&lt;&gt;&quot;&#39;&#x27;", "x", "<>\"''", "HTML &lt; &gt; &quot; &#39; &#x27; masked");
	SPAN("x ", "\\ud83d\\ude00ok", " x", "\xf0\x9f\x98\x80ok", "JSON surrogate pair masked");
	SPAN("x ", "\\uD83D\\uDE00ok", " x", "\xf0\x9f\x98\x80ok", "JSON surrogate pair, upper-case hex, masked");
	SPAN("x ", "&#128512;ok", " x", "\xf0\x9f\x98\x80ok", "HTML reference above U+FFFF masked");
	SPAN("x ", "%F0%9F%98%80ok", " x", "\xf0\x9f\x98\x80ok", "UTF-8 bytes percent-encoded masked");

	/* mixed within one occurrence, and nested */
	{
		SeBuf		enc = {0};
		const unsigned char *u = (const unsigned char *) ODD_SECRET;
		size_t		n = strlen(ODD_SECRET);
		size_t		i = 0;
		int			k = 0;

		while (i < n)
		{
			size_t		cl = se_charlen(u + i, n - i);

			se_encode_char(&enc, u + i, cl, (SeMode) (k++ % SE_NMODES));
			i += cl;
		}
		is_masked_span("mixed: ", enc.p, enc.len, " :mixed", ODD_SECRET,
					   "every character in another encoding: masked");
		se_free(&enc);
	}
	{
		static const SeMode chains[][3] = {
			{SE_PCT_UPPER, SE_PCT_UPPER, SE_RAW},
			{SE_HTML_NAMED, SE_HTML_NAMED, SE_RAW},
			{SE_JSON_U_LOWER, SE_JSON_SHORT, SE_RAW},
			{SE_HTML_DEC, SE_FORM, SE_RAW},
			{SE_JSON_SHORT, SE_HTML_HEX, SE_PCT_LOWER},
			{SE_HTML_NAMED, SE_JSON_U_UPPER, SE_FORM},
		};
		static const int depth[] = {2, 2, 2, 2, 3, 3};
		int			c;

		for (c = 0; c < (int) lengthof(chains); c++)
		{
			SeBuf		enc = {0};
			const unsigned char *u = (const unsigned char *) ODD_SECRET;
			size_t		n = strlen(ODD_SECRET);
			size_t		i = 0;
			char		what[160];

			while (i < n)
			{
				size_t		cl = se_charlen(u + i, n - i);

				se_encode_nested(&enc, u + i, cl, chains[c], depth[c]);
				i += cl;
			}
			snprintf(what, sizeof(what), "nested %s, then %s%s%s: masked",
					 se_mode_names[chains[c][0]], se_mode_names[chains[c][1]],
					 depth[c] > 2 ? ", then " : "", depth[c] > 2 ? se_mode_names[chains[c][2]] : "");
			is_masked_span("[", enc.p, enc.len, "]", ODD_SECRET, what);
			se_free(&enc);
		}
	}
	SPAN("x ", "Sup3r%257ESecret&amp;#47;With\\u002bSymbols&=%Q", " x", SECRET,
				   "double-encoded pieces (%257E, &amp;#47;) masked");
}

static void
test_mask_text(void)
{
	char	   *big;
	char	   *got;
	size_t		n;
	size_t		outlen;
	size_t		i;
	bool		all;

	is_masked("a Sup3r~Secret/With+Symbols&=%Q b Sup3r%7ESecret%2FWith%2BSymbols%26%3D%25Q c", SECRET,
			  "a ***************************** b ***************************************** c",
			  "every occurrence masked");
	is_masked("Sup3r~Secret is not it, nor Sup3r~Secret/With+Symbols&=%, at all", SECRET,
			  "Sup3r~Secret is not it, nor Sup3r~Secret/With+Symbols&=%, at all",
			  "pieces of the secret inside the text stay (no false alarm)");
	is_masked("client_id=x&grant_type=client_credentials", SECRET,
			  "client_id=x&grant_type=client_credentials", "unrelated text unchanged");

	/* cut at the end */
	SPAN("cut here: ", "Sup3r~Secr", "", SECRET, "trailing prefix masked");
	is_masked("cut here: Sup3", SECRET, "cut here: ****", "trailing prefix of 4 bytes masked");
	is_masked("cut here: Sup", SECRET, "cut here: Sup", "trailing prefix of 3 bytes kept (the documented floor)");
	SPAN("cut here: ", "Sup3r~Secret%2", "", SECRET, "trailing prefix ending in half a %XX masked");
	SPAN("cut: ", "\\u0053\\u0075\\u0070\\u0033\\u00", "", SECRET,
		 "trailing JSON-escaped prefix ending in half a \\u masked");
	SPAN("cut: ", "Sup3r~Secret&#x2", "", SECRET, "trailing prefix ending in half an HTML reference masked");
	SPAN("cut: ", "Sup3r~Secret&am", "", SECRET, "trailing prefix ending in half a named reference masked");
	SPAN("cut: ", "Sup3r%257", "", SECRET, "trailing prefix ending in half a double-encoded escape masked");

	/* blanks: the text may have had them collapsed or replaced */
	SPAN("key=", "open sesame now", ".", "open  sesame\tnow", "secret with blank runs found in collapsed text");
	SPAN("key=", "open\r\n sesame   now", ".", "open sesame now", "secret found across line breaks and blank runs");
	SPAN("key=", "open\\nsesame%20now", ".", "open sesame now", "blank as JSON \\n and %20 masked");
	is_masked("[padded]", " padded ", "[******]", "blanks around the secret ignored");
	is_masked("open sesame", "   ", "open sesame", "all-blank secret: nothing to mask");
	is_masked("abc", "", "abc", "empty secret: unchanged");
	is_masked("abc", NULL, "abc", "NULL secret: unchanged");

	/* filler */
	is_masked("x a*b*cdef y", "a*b*cdef", "x ???????? y", "secret with '*': another filler");
	got = masked("x *?^|!=@$:,~.-_ y", 18, "*?^|!=@$:,~.-_", &outlen);
	ok(outlen == 0 && got[0] == '\0', "secret holding every filler: text withheld");
	free(got);

	/* whole UTF-8 characters only */
	is_masked("1\xe2\x82\xacuros", "\x82\xacuros", "1*******",
			  "match starting inside a character widens to the whole character");
	is_masked("x \xc3\xa9t\xc3\xa9 y", "\xc3\xa9t\xc3\xa9", "x ***** y", "non-ASCII secret masked");

	/* limits: fail closed */
	n = 70 * 1024;
	big = malloc(n + 1);
	memset(big, 'a', n);
	big[n] = '\0';
	got = masked(big, n, SECRET, &outlen);
	for (i = 0, all = true; i < n; i++)
		all &= (got[i] == '*');
	ok(outlen == n && all, "text over the size limit: all of it overwritten");
	free(got);
	free(big);

	SPAN("", "&#0000000000000000000000000000000000000000065;", "", "A",
		 "absurd reference (40 digits): all of it overwritten");

	/* adversarial but legal text stays within the work limit */
	{
		static const char *const units[] = {"%25", "&amp;", "\\\\", "\\u005c", "&#x26;", "+%2B"};
		int			u;

		for (u = 0; u < (int) lengthof(units); u++)
		{
			SeBuf		b = {0};

			for (i = 0; b.len < 4000; i++)
				se_puts(&b, units[u]);
			got = masked(b.p, b.len, SECRET, &outlen);
			if (!ok(outlen == b.len && memcmp(got, b.p, b.len) == 0,
					"4000 bytes of %s: analysed, nothing masked", units[u]))
				printf("#   got '%.60s...'\n", got);
			free(got);
			se_free(&b);
		}
	}
}

/* ---------------------------------------------------------------------
 * auth_describe_error, auth_parse_token_response
 * ---------------------------------------------------------------------
 */
static AuthConfig
config(const char *secret)
{
	AuthConfig	c;

	c.target = "t1";
	c.token_url = "https://login.example.com/tenant/oauth2/v2.0/token";
	c.client_id = "client id/1";
	c.client_secret = secret;
	c.scope = "https://contoso.operations.dynamics.com/.default";
	return c;
}

#define PREFIX401 "token request for target t1 failed: HTTP 401 invalid_client: "

static void
describe(const AuthConfig *c, long status, const char *body, char *err, size_t errlen)
{
	leak_check_start();
	auth_describe_error(c, status, body, strlen(body), err, errlen);
	leak_check("auth_describe_error");
}

/* {"error":"invalid_client","error_description":"<desc, JSON-escaped>"} */
static char *
oauth_error(const char *code, const char *desc)
{
	cJSON	   *o = cJSON_CreateObject();
	char	   *s;

	cJSON_AddStringToObject(o, "error", code);
	cJSON_AddStringToObject(o, "error_description", desc);
	s = cJSON_PrintUnformatted(o);
	cJSON_Delete(o);
	return s;
}

static void
test_describe_error(void)
{
	AuthConfig	c = config(SECRET);
	char		err[512];
	char		why[64];
	char	   *body;
	char	   *want;
	SeBuf		d = {0};

	/* what a server's description says, after cJSON has decoded it */
	body = oauth_error("invalid_client", "AADSTS7000215: Invalid client secret. Secret: Sup3r~Secret\\/With+Symbols&=%Q");
	describe(&c, 401, body, err, sizeof(err));
	is_str(err, PREFIX401 "AADSTS7000215: Invalid client secret. Secret: ******************************",
		   "description echoing the secret JSON-escaped (\\/): masked");
	free(body);

	body = oauth_error("invalid_client", "<p>Secret: Sup3r~Secret/With+Symbols&amp;=%Q</p>");
	describe(&c, 401, body, err, sizeof(err));
	is_str(err, PREFIX401 "<p>Secret: *********************************</p>",
		   "description echoing the secret HTML-escaped (&amp;): masked");
	free(body);

	body = oauth_error("invalid_client", "form: client_secret=Sup3r~Secret%2FWith%2BSymbols%26%3D%25Q&scope=x");
	describe(&c, 401, body, err, sizeof(err));
	is_str(err, PREFIX401 "form: client_secret=***************************************&scope=x",
		   "description echoing the form body: masked");
	free(body);

	/* the clean-up makes the secret: old code masked before it */
	{
		AuthConfig	c2 = config("Sup3r Secret");

		body = oauth_error("invalid_client", "Secret:\r\n\tSup3r\r\n\tSecret\r\n");
		describe(&c2, 401, body, err, sizeof(err));
		is_str(err, PREFIX401 "Secret: ************", "secret formed by the blank clean-up: masked");
		free(body);
	}

	/* cut at 200 bytes: an encoded secret straddling the cut */
	se_puts(&d, "x");
	while (d.len < 170)
		se_puts(&d, "x");
	se_puts(&d, " ");
	se_encode_all(&d, SECRET, strlen(SECRET), SE_JSON_U_LOWER);
	body = oauth_error("invalid_client", d.p);
	describe(&c, 401, body, err, sizeof(err));
	want = spelled("", '*', 200 - 171, "...");
	ok(strlen(err) == strlen(PREFIX401) + 203 &&
	   strcmp(err + strlen(err) - strlen(want), want) == 0 &&
	   !se_leaks(err, strlen(err), SECRET, why, sizeof(why)),
	   "\\u-escaped secret cut at 200 bytes: the piece before the cut masked (%s)", err + strlen(PREFIX401) + 165);
	free(want);
	free(body);
	se_free(&d);

	/* cut at 200 bytes: a server that sends just the start of the secret */
	se_puts(&d, "x");
	while (d.len < 190)
		se_puts(&d, "x");
	se_puts(&d, " Sup3r~Secret/With+S and more");
	body = oauth_error("invalid_client", d.p);
	describe(&c, 401, body, err, sizeof(err));
	ok(strcmp(err + strlen(err) - 12, "*********...") == 0 &&
	   !se_leaks(err, strlen(err), SECRET, why, sizeof(why)),
	   "start of the secret cut at 200 bytes: masked (%s)", err + strlen(PREFIX401) + 180);
	free(body);
	se_free(&d);

	/* the error code */
	body = oauth_error("Sup3r~Secret\\/With+Symbols&=%Q", "x");
	describe(&c, 400, body, err, sizeof(err));
	is_str(err, "token request for target t1 failed: HTTP 400 ******************************: x",
		   "secret in the error code: masked");
	free(body);

	/* a short err buffer cuts the secret: what is left is masked */
	body = oauth_error("invalid_client", "Secret: Sup3r~Secret/With+Symbols&=%Q!");
	describe(&c, 401, body, err, strlen(PREFIX401) + 8 + 10 + 1);
	is_str(err, PREFIX401 "Secret: **********", "err buffer cutting the secret: the piece masked");
	free(body);

	body = oauth_error("invalid_client", "caf\xc3\xa9");
	describe(&c, 401, body, err, strlen(PREFIX401) + 4 + 1);
	is_str(err, PREFIX401 "caf", "err buffer cutting a character: no half character left");
	free(body);

	/* neither body nor anything else of a non-OAuth answer */
	describe(&c, 500, "internal error; request was: client_secret=Sup3r~Secret", err, sizeof(err));
	is_str(err, "token request for target t1 failed: HTTP 500", "non-JSON body: status only");
	describe(&c, 502, "{\"error\":{\"code\":\"x\"}}", err, sizeof(err));
	is_str(err, "token request for target t1 failed: HTTP 502", "non-OAuth JSON: status only");

	/* clean-up and truncation of an innocent description */
	se_puts(&d, "line\r\none\t\ttwo ");
	while (d.len < 201)
		se_puts(&d, "y");
	se_puts(&d, "\xc3\xa9\xc3\xa9 tail");
	body = oauth_error("invalid_client", d.p);
	describe(&c, 401, body, err, sizeof(err));
	ok(strncmp(err, PREFIX401 "line one two yyy", strlen(PREFIX401) + 16) == 0 &&
	   strlen(err) == strlen(PREFIX401) + 199 + 3 &&
	   strcmp(err + strlen(err) - 4, "y...") == 0,
	   "description: blanks collapsed, cut at 200 bytes on a character boundary");
	free(body);
	se_free(&d);
}

static void
test_parse_token(void)
{
	AuthConfig	c = config(SECRET);
	char		err[512];
	char	   *h = NULL;
	double		until = 0;
	bool		r;

#define PARSE(body) \
	(leak_check_start(), h = NULL, \
	 r = auth_parse_token_response(&c, (body), strlen(body), 1000.0, &h, &until, err, sizeof(err)), \
	 (h ? pfree(h) : (void) 0), leak_check("auth_parse_token_response"), r)

	{
		const char *b = "{\"token_type\":\"Bearer\",\"expires_in\":3600,\"access_token\":\"tok.en-_~+/1==\"}";

		r = auth_parse_token_response(&c, b, strlen(b), 1000.0, &h, &until, err, sizeof(err));
	}
	ok(r && strcmp(h, "Authorization: Bearer tok.en-_~+/1==") == 0 && until == 1000.0 + 3600 - 60,
	   "token: header and valid_until (a minute early)");
	if (h)
		pfree(h);
	ok(PARSE("{\"token_type\":\"bearer\",\"expires_in\":\"3599\",\"access_token\":\"v1\"}") &&
	   until == 1000.0 + 3599 - 60, "v1: string expires_in, lower-case bearer");
	ok(PARSE("{\"token_type\":\"Bearer\",\"expires_in\":100,\"access_token\":\"s\"}") &&
	   fabs(until - (1000.0 + 90)) < 1e-9, "short token: 10%% early");
	ok(PARSE("{\"token_type\":\"Bearer\",\"expires_in\":1e12,\"access_token\":\"s\"}") &&
	   until == 1000.0 + 86400 - 60, "huge expires_in capped at a day");
	ok(PARSE("{\"token_type\":\"Bearer\",\"access_token\":\"s\"}") &&
	   until == 1000.0 + 300 - 30, "no expires_in: 300 s assumed");

	ok(!PARSE("{\"token_type\":\"Bearer\",\"expires_in\":-1,\"access_token\":\"s\"}") &&
	   strstr(err, "invalid expires_in") != NULL, "negative expires_in refused");
	ok(!PARSE("{\"token_type\":\"Bearer\",\"expires_in\":\"soon\",\"access_token\":\"s\"}") &&
	   strstr(err, "invalid expires_in") != NULL, "non-numeric expires_in refused");
	ok(!PARSE("{\"token_type\":\"Bearer\",\"expires_in\":3600}") &&
	   strstr(err, "no access_token") != NULL, "missing access_token refused");
	ok(!PARSE("{\"token_type\":\"Bearer\",\"expires_in\":3600,\"access_token\":\"a b\\r\\nX: 1\"}") &&
	   strstr(err, "malformed access_token") != NULL, "access_token with CR/LF refused");
	ok(!PARSE("{\"expires_in\":3600,\"access_token\":\"s\"}") &&
	   strstr(err, "no token_type") != NULL, "missing token_type refused");
	ok(!PARSE("[1]") && strstr(err, "not a JSON object") != NULL, "JSON array refused");
	ok(!PARSE("") && strstr(err, "not a JSON object") != NULL, "empty body refused");

	ok(!PARSE("{\"token_type\":\"mac\",\"access_token\":\"s\"}"), "token_type mac refused");
	is_str(err, "token response for target t1 has token_type \"mac\", not Bearer", "token_type quoted");
	ok(!PARSE("{\"token_type\":\"x Sup3r~Secret\\\\/With+Symbols&=%Q tail\",\"access_token\":\"s\"}"),
	   "token_type echoing the secret refused");
	is_str(err, "token response for target t1 has token_type \"x ******************************...\", not Bearer",
		   "token_type echoing the secret: cut to 32 bytes, then masked");
#undef PARSE
}

int
main(void)
{
	test_mask_encodings();
	test_mask_text();
	test_describe_error();
	test_parse_token();
	return tap_done();
}
