/*-------------------------------------------------------------------------
 *
 * auth.c
 *	  OAuth2 client-credentials flow against Microsoft Entra ID, and the
 *	  per-target cache of the bearer tokens it yields.
 *
 * This file owns the token cache: a short list in TopMemoryContext, keyed by
 * target name and remembering which token URL, client, scope and secret
 * each token was obtained with, so a changed configuration never reuses a
 * stale token even before auth_forget_all() runs.
 *
 * The client secret is the one thing here that must never leak: it is sent
 * only in the form body (over https, except to a loopback test server),
 * the form is wiped after use, and no error message ever includes a server
 * response body; only the error and error_description fields (and a
 * token_type we refuse).  A misbehaving server could echo the request back
 * in them, raw or form-, JSON- or HTML-encoded, so every message is masked
 * by auth_mask_secret() as the last step, after its text has been cleaned
 * up and cut to length: what is masked is exactly what is written.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <math.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "common/hashfn.h"
#include "utils/memutils.h"

#include "auth.h"

/* a token response is a few kB; anything much bigger is not one */
#define AUTH_MAX_RESPONSE_BYTES	(1024 * 1024)
/* longest access token accepted (Entra's JWTs are 1-4 kB) */
#define AUTH_MAX_TOKEN_LEN		(64 * 1024)
/* lifetime assumed when a response has no expires_in, seconds */
#define AUTH_DEFAULT_LIFETIME	300
/* never trust a token longer than this, seconds */
#define AUTH_MAX_LIFETIME		86400
/* bytes of a server's error_description quoted in messages */
#define AUTH_MAX_DESCRIPTION	200
#define AUTH_MAX_ERROR_CODE		64

typedef struct TokenEntry
{
	struct TokenEntry *next;
	char	   *target;
	char	   *token_url;
	char	   *client_id;
	char	   *scope;
	uint64		secret_hash;	/* detects a changed secret, without keeping
								 * a copy of it */
	char	   *header;			/* "Authorization: Bearer <token>" */
	double		valid_until;	/* monotonic clock, seconds */
} TokenEntry;

static TokenEntry *token_cache = NULL;

static char *fetch_token(const AuthConfig *cfg, const HttpSettings *http,
						 char *err, size_t errlen);
static void send_form(HttpRequest *req, const HttpSettings *settings);
static void wipe_form(HttpRequest *req);
static TokenEntry *cache_lookup(const AuthConfig *cfg);
static void cache_drop(TokenEntry *e);
static void cache_store(const AuthConfig *cfg, const char *header,
						double valid_until);
static const char *token_url_problem(const char *url);
static char *build_form(const AuthConfig *cfg, size_t *len);
static size_t form_escaped_len(const char *s);
static char *form_escape(char *dst, const char *s);
static void clean_text(char *dst, size_t dstsize, const char *src,
					   size_t maxbytes, const char *secret);
static bool valid_token(const char *token);
static uint64 hash_secret(const char *secret);
static double monotonic_now(void);
static void auth_error(char *err, size_t errlen, const AuthConfig *cfg,
					   const char *fmt,...) pg_attribute_printf(4, 5);

char *
auth_header(const AuthConfig *cfg, bool force_refresh, const HttpSettings *http,
			char *err, size_t errlen)
{
	const char *target = cfg->target ? cfg->target : "";
	const char *problem;
	TokenEntry *e;

	if (err != NULL && errlen > 0)
		err[0] = '\0';

	if (cfg->token_url == NULL || cfg->token_url[0] == '\0' ||
		cfg->client_id == NULL || cfg->client_id[0] == '\0' ||
		cfg->client_secret == NULL || cfg->client_secret[0] == '\0' ||
		cfg->scope == NULL || cfg->scope[0] == '\0')
	{
		auth_error(err, errlen, cfg,
				   "target %s lacks a token URL, client id, client secret or scope",
				   target);
		return NULL;
	}
	if ((problem = token_url_problem(cfg->token_url)) != NULL)
	{
		auth_error(err, errlen, cfg, "token URL of target %s %s", target, problem);
		return NULL;
	}

	e = cache_lookup(cfg);
	if (e != NULL && (force_refresh || monotonic_now() >= e->valid_until))
	{
		cache_drop(e);
		e = NULL;
	}
	if (e != NULL)
		return pstrdup(e->header);

	return fetch_token(cfg, http, err, errlen);
}

void
auth_forget_all(void)
{
	while (token_cache != NULL)
		cache_drop(token_cache);
}

/* POST the client-credentials form; cache and return the header. */
static char *
fetch_token(const AuthConfig *cfg, const HttpSettings *http, char *err,
			size_t errlen)
{
	const char *target = cfg->target ? cfg->target : "";
	static const char *const headers[] = {
		"Content-Type: application/x-www-form-urlencoded",
		"Accept: application/json",
		NULL
	};
	HttpSettings settings = {0};
	HttpRequest req = {0};
	size_t		formlen;
	double		started;
	char	   *header = NULL;
	char	   *result = NULL;
	double		valid_until = 0;

	if (http != NULL)
		settings = *http;
	if (settings.max_response_bytes == 0 ||
		settings.max_response_bytes > AUTH_MAX_RESPONSE_BYTES)
		settings.max_response_bytes = AUTH_MAX_RESPONSE_BYTES;

	req.method = "POST";
	req.url = cfg->token_url;
	req.headers = headers;
	req.body = build_form(cfg, &formlen);
	req.body_len = formlen;

	/* the token's lifetime runs from when it was asked for */
	started = monotonic_now();
	send_form(&req, &settings);

	if (req.transport_error)
	{
		if (req.too_large)
			auth_error(err, errlen, cfg,
					   "token request for target %s failed: response larger than %d bytes",
					   target, AUTH_MAX_RESPONSE_BYTES);
		else
			auth_error(err, errlen, cfg,
					   "token request for target %s failed: %s", target, req.error);
	}
	else if (req.status != 200)
		auth_describe_error(cfg, req.status, req.response.data,
							req.response.len, err, errlen);
	else if (auth_parse_token_response(cfg, req.response.data, req.response.len,
									   started, &header, &valid_until,
									   err, errlen))
	{
		cache_store(cfg, header, valid_until);
		result = header;
	}

	/* the response holds the access token: do not leave it lying around */
	explicit_bzero(req.response.data, req.response.maxlen);
	pfree(req.response.data);
	if (req.content_type)
		pfree(req.content_type);
	if (req.retry_after)
		pfree(req.retry_after);

	return result;
}

/* Run the token request; the form body is wiped and freed, error or not. */
static void
send_form(HttpRequest *req, const HttpSettings *settings)
{
	HttpRequest *reqs[1];

	reqs[0] = req;
	PG_TRY();
	{
		http_perform(reqs, 1, settings);
	}
	PG_CATCH();
	{
		wipe_form(req);
		PG_RE_THROW();
	}
	PG_END_TRY();
	wipe_form(req);
}

static void
wipe_form(HttpRequest *req)
{
	char	   *form = unconstify(char *, req->body);

	explicit_bzero(form, req->body_len);
	pfree(form);
	req->body = NULL;
}

/*
 * Parse a 200 response from the token endpoint.  On success sets *header
 * (palloc'd) and *valid_until.
 */
bool
auth_parse_token_response(const AuthConfig *cfg, const char *body, size_t len,
						  double started, char **header, double *valid_until,
						  char *err, size_t errlen)
{
	const char *target = cfg->target ? cfg->target : "";
	cJSON	   *json;
	cJSON	   *item;
	const char *token;
	double		lifetime;
	double		margin;
	bool		ok = false;

	json = cJSON_ParseWithLength(body, len);
	if (json == NULL || !cJSON_IsObject(json))
	{
		auth_error(err, errlen, cfg,
				   "token response for target %s is not a JSON object", target);
		goto done;
	}

	item = cJSON_GetObjectItemCaseSensitive(json, "token_type");
	if (!cJSON_IsString(item))
	{
		auth_error(err, errlen, cfg,
				   "token response for target %s has no token_type", target);
		goto done;
	}
	if (pg_strcasecmp(item->valuestring, "Bearer") != 0)
	{
		char		type[40];

		clean_text(type, sizeof(type), item->valuestring, 32, cfg->client_secret);
		auth_error(err, errlen, cfg,
				   "token response for target %s has token_type \"%s\", not Bearer",
				   target, type);
		goto done;
	}

	item = cJSON_GetObjectItemCaseSensitive(json, "expires_in");
	if (item == NULL)
		lifetime = AUTH_DEFAULT_LIFETIME;
	else if (cJSON_IsNumber(item))
		lifetime = item->valuedouble;
	else if (cJSON_IsString(item))
	{
		char	   *end;

		/* the v1 endpoint sends it as a string */
		errno = 0;
		lifetime = strtod(item->valuestring, &end);
		if (end == item->valuestring || *end != '\0' || errno != 0)
			lifetime = -1;
	}
	else
		lifetime = -1;
	if (!(lifetime >= 0) || isinf(lifetime))
	{
		auth_error(err, errlen, cfg,
				   "token response for target %s has an invalid expires_in", target);
		goto done;
	}
	lifetime = Min(lifetime, AUTH_MAX_LIFETIME);

	item = cJSON_GetObjectItemCaseSensitive(json, "access_token");
	if (!cJSON_IsString(item) || item->valuestring[0] == '\0')
	{
		auth_error(err, errlen, cfg,
				   "token response for target %s has no access_token", target);
		goto done;
	}
	token = item->valuestring;
	/* it goes into a header line: no spaces, line breaks or other junk */
	if (!valid_token(token))
	{
		auth_error(err, errlen, cfg,
				   "token response for target %s has a malformed access_token",
				   target);
		goto done;
	}

	/* renew a minute early, or 10% early for short-lived tokens */
	margin = (lifetime >= 600) ? 60 : lifetime / 10;
	*valid_until = started + lifetime - margin;
	{
		/* no ERROR while the (malloc'd) tree holds the token: see d365inv.c */
		size_t		hlen = strlen("Authorization: Bearer ") + strlen(token) + 1;
		char	   *h = MemoryContextAllocExtended(CurrentMemoryContext, hlen, MCXT_ALLOC_NO_OOM);

		if (h == NULL)
		{
			auth_error(err, errlen, cfg,
					   "out of memory for the token of target %s", target);
			goto done;
		}
		snprintf(h, hlen, "Authorization: Bearer %s", token);
		*header = h;
	}
	ok = true;

done:
	if (json != NULL)
	{
		item = cJSON_GetObjectItemCaseSensitive(json, "access_token");
		if (cJSON_IsString(item))
			explicit_bzero(item->valuestring, strlen(item->valuestring));
		cJSON_Delete(json);
	}
	return ok;
}

/*
 * The message for a non-200 answer: the status, plus the OAuth error code
 * and (cleaned, truncated, masked) description if the body is an OAuth
 * error.  Never the body itself.
 */
void
auth_describe_error(const AuthConfig *cfg, long status, const char *body,
					size_t len, char *err, size_t errlen)
{
	const char *target = cfg->target ? cfg->target : "";
	cJSON	   *json = cJSON_ParseWithLength(body, len);
	const char *code = NULL;
	const char *description = NULL;
	char		codebuf[AUTH_MAX_ERROR_CODE + 8];
	char		descbuf[AUTH_MAX_DESCRIPTION + 8];

	if (json != NULL && cJSON_IsObject(json))
	{
		code = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(json, "error"));
		description = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(json, "error_description"));
	}
	codebuf[0] = descbuf[0] = '\0';
	if (code != NULL)
		clean_text(codebuf, sizeof(codebuf), code, AUTH_MAX_ERROR_CODE,
				   cfg->client_secret);
	if (description != NULL)
		clean_text(descbuf, sizeof(descbuf), description, AUTH_MAX_DESCRIPTION,
				   cfg->client_secret);
	if (json != NULL)
		cJSON_Delete(json);

	auth_error(err, errlen, cfg, "token request for target %s failed: HTTP %ld%s%s%s%s",
			   target, status,
			   codebuf[0] ? " " : "", codebuf,
			   descbuf[0] ? ": " : "", descbuf);
}

/*
 * The cached entry for cfg's target and client id (a target may have
 * several app users), if it was made with the same settings.
 */
static TokenEntry *
cache_lookup(const AuthConfig *cfg)
{
	const char *target = cfg->target ? cfg->target : "";
	TokenEntry *e;

	for (e = token_cache; e != NULL; e = e->next)
	{
		if (strcmp(e->target, target) != 0 || strcmp(e->client_id, cfg->client_id) != 0)
			continue;
		if (strcmp(e->token_url, cfg->token_url) == 0 &&
			strcmp(e->scope, cfg->scope) == 0 &&
			e->secret_hash == hash_secret(cfg->client_secret))
			return e;
		cache_drop(e);
		return NULL;
	}
	return NULL;
}

static void
cache_drop(TokenEntry *e)
{
	TokenEntry **p;

	for (p = &token_cache; *p != NULL; p = &(*p)->next)
	{
		if (*p == e)
		{
			*p = e->next;
			break;
		}
	}
	explicit_bzero(e->header, strlen(e->header));
	pfree(e->header);
	pfree(e->target);
	pfree(e->token_url);
	pfree(e->client_id);
	pfree(e->scope);
	pfree(e);
}

static void
cache_store(const AuthConfig *cfg, const char *header, double valid_until)
{
	TokenEntry *e;
	TokenEntry *old = cache_lookup(cfg);

	if (old != NULL)
		cache_drop(old);

	e = MemoryContextAllocZero(TopMemoryContext, sizeof(TokenEntry));
	e->target = MemoryContextStrdup(TopMemoryContext, cfg->target ? cfg->target : "");
	e->token_url = MemoryContextStrdup(TopMemoryContext, cfg->token_url);
	e->client_id = MemoryContextStrdup(TopMemoryContext, cfg->client_id);
	e->scope = MemoryContextStrdup(TopMemoryContext, cfg->scope);
	e->secret_hash = hash_secret(cfg->client_secret);
	e->header = MemoryContextStrdup(TopMemoryContext, header);
	e->valid_until = valid_until;
	e->next = token_cache;
	token_cache = e;
}

/*
 * NULL if url is fit to receive the client secret, else why not.  Plain
 * http is allowed to loopback addresses only, for test servers.
 */
static const char *
token_url_problem(const char *url)
{
	CURLU	   *u = curl_url();
	char	   *scheme = NULL;
	char	   *host = NULL;
	const char *problem = NULL;

	if (u == NULL)
		return "could not be parsed: out of memory";
	if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
		problem = "is not a valid URL";
	else if (pg_strcasecmp(scheme, "https") == 0)
		problem = NULL;
	else if (pg_strcasecmp(scheme, "http") != 0)
		problem = "must use https";
	else
	{
		unsigned char addr[4];

		if (!(pg_strcasecmp(host, "localhost") == 0 ||
			  strcmp(host, "[::1]") == 0 ||
			  (inet_pton(AF_INET, host, addr) == 1 && addr[0] == 127)))
			problem = "must use https (plain http is only allowed to a loopback address)";
	}

	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
	return problem;
}

/*
 * The x-www-form-urlencoded request body.  Sized exactly up front, so that
 * no reallocation leaves a stray copy of the secret behind: the caller
 * wipes the one buffer.
 */
static char *
build_form(const AuthConfig *cfg, size_t *len)
{
	static const char p1[] = "grant_type=client_credentials&client_id=";
	static const char p2[] = "&client_secret=";
	static const char p3[] = "&scope=";
	size_t		size;
	char	   *form;
	char	   *p;

	size = strlen(p1) + form_escaped_len(cfg->client_id) +
		strlen(p2) + form_escaped_len(cfg->client_secret) +
		strlen(p3) + form_escaped_len(cfg->scope);
	form = palloc(size + 1);

	p = form;
	memcpy(p, p1, strlen(p1));
	p = form_escape(p + strlen(p1), cfg->client_id);
	memcpy(p, p2, strlen(p2));
	p = form_escape(p + strlen(p2), cfg->client_secret);
	memcpy(p, p3, strlen(p3));
	p = form_escape(p + strlen(p3), cfg->scope);
	*p = '\0';
	Assert(p - form == size);

	*len = size;
	return form;
}

/* RFC 3986 unreserved characters go as they are, all other bytes as %XX */
#define FORM_SAFE(c) \
	(((c) >= 'A' && (c) <= 'Z') || ((c) >= 'a' && (c) <= 'z') || \
	 ((c) >= '0' && (c) <= '9') || (c) == '-' || (c) == '.' || \
	 (c) == '_' || (c) == '~')

static size_t
form_escaped_len(const char *s)
{
	size_t		n = 0;

	for (; *s; s++)
		n += FORM_SAFE((unsigned char) *s) ? 1 : 3;
	return n;
}

static char *
form_escape(char *dst, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";

	for (; *s; s++)
	{
		unsigned char c = (unsigned char) *s;

		if (FORM_SAFE(c))
			*dst++ = c;
		else
		{
			*dst++ = '%';
			*dst++ = hex[c >> 4];
			*dst++ = hex[c & 15];
		}
	}
	return dst;
}

/*
 * Length of s[0..len) without a trailing incomplete UTF-8 sequence, as a
 * byte cut may leave one.
 */
static size_t
utf8_whole(const char *s, size_t len)
{
	size_t		i = len;
	size_t		need;
	unsigned char c;

	while (i > 0 && len - i < 4 && ((unsigned char) s[i - 1] & 0xC0) == 0x80)
		i--;
	if (i == 0)
		return len;
	c = (unsigned char) s[i - 1];
	if (c < 0xC0)
		return len;				/* ASCII, or stray continuation bytes */
	need = (c >= 0xF0) ? 4 : (c >= 0xE0) ? 3 : 2;
	return (len - (i - 1) < need) ? i - 1 : len;
}

/*
 * Copy text from a server into dst for a message: control characters and
 * runs of blanks turned into one space, cut at maxbytes on a UTF-8
 * character boundary, then the secret masked in exactly that text, then
 * "..." appended if it was cut.  dstsize must exceed maxbytes + 3.
 */
static void
clean_text(char *dst, size_t dstsize, const char *src, size_t maxbytes,
		   const char *secret)
{
	const char *s;
	size_t		n = 0;
	bool		space = false;
	bool		cut = false;

	Assert(dstsize > maxbytes + 3);

	for (s = src; *s; s++)
	{
		unsigned char c = (unsigned char) *s;

		if (c < 0x20 || c == 0x7f || c == ' ')
		{
			space = (n > 0);
			continue;
		}
		if (space)
		{
			if (n + 1 >= maxbytes)
			{
				cut = true;
				break;
			}
			dst[n++] = ' ';
			space = false;
		}
		if (n >= maxbytes)
		{
			cut = true;
			break;
		}
		dst[n++] = c;
	}
	if (cut)
		n = utf8_whole(dst, n);
	dst[n] = '\0';

	n = auth_mask_secret(dst, n, secret);

	if (cut)
	{
		memcpy(dst + n, "...", 3);
		n += 3;
	}
	dst[n] = '\0';
}


/* ---------------------------------------------------------------------
 * Secret masking
 *
 * The text is read as a graph over its byte offsets: an edge from p to q
 * says that text[p..q) decodes to one value, a byte or the UTF-8 of one
 * character.  Level 0 has an edge for every raw byte; each further level
 * adds the escape sequences (%XX, '+', JSON, HTML) spelled by paths of
 * single-byte edges of the levels below, so an escape whose own characters
 * are escaped ("%2541", "&amp;#47;", "\u005cu0041") is read as well.  An
 * escape that the end of the text cuts short gives a "cut" edge to the end.
 *
 * The secret, its blanks collapsed like the text's, is then matched against
 * paths through the graph.  A state is (offset in the text, bytes of the
 * secret matched so far); states are computed forwards from every offset
 * and backwards from a whole match, or from a prefix of MASK_MIN_PREFIX
 * bytes at the end of the text, and every edge between two states that
 * lie on such a path is overwritten.  That covers every occurrence in
 * every mix of encodings at once, in time and memory polynomial in the
 * text and secret lengths; the limits below bound both, and past them the
 * whole text is overwritten rather than risk a leak.
 * ---------------------------------------------------------------------
 */
#define MASK_LEVELS			3	/* escapes nested this deep are read */
#define MASK_MIN_PREFIX		4	/* a trailing prefix this long is masked */
#define MASK_MAX_TEXT		(64 * 1024)
#define MASK_MAX_CELLS		((size_t) 8 * 1024 * 1024)	/* states */
#define MASK_MAX_DIGITS		32	/* digits in one &#...; reference */
#define MASK_MAX_NAME		16	/* longest name in html_names */
#define MASK_WORK_PER_BYTE	4096	/* escape search steps per text byte */
#define MASK_EDGES_PER_BYTE 64

/* fillers, none of which can be part of an escape sequence */
static const char mask_fillers[] = "*?^|!=@$:,~.-_";

typedef struct MaskEdge
{
	int32		from;
	int32		to;
	uint8		len;			/* bytes in val; 0: cut edge */
	bool		blank;			/* val is a space or a control character */
	uint8		val[4];
} MaskEdge;

typedef struct MaskGraph
{
	const unsigned char *s;
	int			n;
	MaskEdge   *edges;			/* sorted by from */
	int			nedges;
	int		   *first;			/* edges from p: [first[p], first[p + 1]) */
	MaskEdge   *added;			/* found at the level being built */
	int			nadded;
	int			maxadded;
	int64		work;			/* escape search steps left */
	bool		overflow;		/* a limit was hit: mask everything */
} MaskGraph;

#define EDGES_FROM(g, q, e) \
	for ((e) = &(g)->edges[(g)->first[q]]; (e) < &(g)->edges[(g)->first[(q) + 1]]; (e)++)

/* HTML named character references for ASCII (and NBSP), lower case */
static const struct
{
	const char *name;
	uint32		cp;
}			html_names[] =
{
	{"tab", '\t'}, {"newline", '\n'}, {"excl", '!'}, {"quot", '"'},
	{"num", '#'}, {"dollar", '$'}, {"percnt", '%'}, {"amp", '&'},
	{"apos", '\''}, {"lpar", '('}, {"rpar", ')'}, {"ast", '*'},
	{"midast", '*'}, {"plus", '+'}, {"comma", ','}, {"period", '.'},
	{"sol", '/'}, {"colon", ':'}, {"semi", ';'}, {"lt", '<'},
	{"equals", '='}, {"gt", '>'}, {"quest", '?'}, {"commat", '@'},
	{"lsqb", '['}, {"lbrack", '['}, {"bsol", '\\'}, {"rsqb", ']'},
	{"rbrack", ']'}, {"hat", '^'}, {"lowbar", '_'}, {"underbar", '_'},
	{"grave", '`'}, {"diacriticalgrave", '`'}, {"lcub", '{'},
	{"lbrace", '{'}, {"verbar", '|'}, {"vert", '|'}, {"verticalline", '|'},
	{"rcub", '}'}, {"rbrace", '}'}, {"nbsp", 0xA0}
};

/* what HTML makes of &#128; .. &#159; (windows-1252); 0: unchanged */
static const uint16 html_c1[32] = {
	0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021,
	0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0, 0x017D, 0,
	0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014,
	0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178
};

static inline bool
mask_tick(MaskGraph *g)
{
	if (--g->work < 0)
		g->overflow = true;
	return !g->overflow;
}

static inline bool
mask_blank(unsigned char c)
{
	return c <= 0x20 || c == 0x7f;
}

static int
hex_value(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* record an edge found at the level being built; len 0: cut edge */
static void
mask_add(MaskGraph *g, int from, int to, const uint8 *val, int len)
{
	MaskEdge   *e;

	if (g->nadded == g->maxadded)
	{
		if (g->nedges + g->nadded >= MASK_EDGES_PER_BYTE * g->n + 1024)
		{
			g->overflow = true;
			return;
		}
		g->maxadded *= 2;
		g->added = repalloc(g->added, g->maxadded * sizeof(MaskEdge));
	}
	e = &g->added[g->nadded++];
	memset(e, 0, sizeof(*e));
	e->from = from;
	e->to = (len == 0) ? g->n : to;
	e->len = (uint8) len;
	if (len > 0)
		memcpy(e->val, val, len);
	e->blank = (len == 1 && mask_blank(val[0]));
}

static void
mask_add_cp(MaskGraph *g, int from, int to, uint32 cp)
{
	uint8		u[4];
	int			len;

	if (cp < 0x80)
	{
		u[0] = (uint8) cp;
		len = 1;
	}
	else if (cp < 0x800)
	{
		u[0] = 0xC0 | (cp >> 6);
		u[1] = 0x80 | (cp & 0x3F);
		len = 2;
	}
	else if (cp < 0x10000)
	{
		u[0] = 0xE0 | (cp >> 12);
		u[1] = 0x80 | ((cp >> 6) & 0x3F);
		u[2] = 0x80 | (cp & 0x3F);
		len = 3;
	}
	else
	{
		u[0] = 0xF0 | (cp >> 18);
		u[1] = 0x80 | ((cp >> 12) & 0x3F);
		u[2] = 0x80 | ((cp >> 6) & 0x3F);
		u[3] = 0x80 | (cp & 0x3F);
		len = 4;
	}
	mask_add(g, from, to, u, len);
}

/* the text ends inside an escape begun at start */
static void
mask_cut(MaskGraph *g, int start)
{
	mask_add(g, start, g->n, NULL, 0);
}

/*
 * Every escape state reads on one byte at a time, the same way.  At the end
 * of the text the escape is cut: mask_text_ends() cuts and says so (the
 * state returns).  BYTE_EDGES_FROM visits the one-byte edges out of q,
 * cutting the escape at every cut edge on the way, until the work budget
 * is spent (mask_tick()).
 */
static bool
mask_text_ends(MaskGraph *g, int start, int q)
{
	if (q != g->n)
		return false;
	mask_cut(g, start);
	return true;
}

/* the one-byte edge out of q after e (NULL: the first); NULL when none is left */
static const MaskEdge *
mask_next_byte(MaskGraph *g, int start, int q, const MaskEdge *e)
{
	const MaskEdge *end = &g->edges[g->first[q + 1]];

	for (e = e ? e + 1 : &g->edges[g->first[q]]; e < end; e++)
	{
		if (!mask_tick(g))
			return NULL;
		if (e->len == 0)
			mask_cut(g, start);
		else if (e->len == 1)
			return e;
	}
	return NULL;
}

#define BYTE_EDGES_FROM(g, start, q, e) \
	for ((e) = mask_next_byte(g, start, q, NULL); (e) != NULL; (e) = mask_next_byte(g, start, q, e))

/* what a fixed-length hex escape stands for, once its digits are read */
typedef void (*HexEscapeDone) (MaskGraph *g, int start, int q, uint32 value, uint32 arg);

/* ndigits more hex digits from q on (%XX, \uXXXX), then done(value, arg) */
static void
esc_hex(MaskGraph *g, int start, int q, int ndigits, uint32 acc, HexEscapeDone done, uint32 arg)
{
	const MaskEdge *e;

	if (ndigits == 0)
	{
		done(g, start, q, acc, arg);
		return;
	}
	if (mask_text_ends(g, start, q))
		return;
	BYTE_EDGES_FROM(g, start, q, e)
	{
		int			h = hex_value(e->val[0]);

		if (h >= 0)
			esc_hex(g, start, e->to, ndigits - 1, acc * 16 + h, done, arg);
	}
}

/* %XX: one byte */
static void
percent_done(MaskGraph *g, int start, int q, uint32 value, uint32 arg)
{
	uint8		b = (uint8) value;

	mask_add(g, start, q, &b, 1);
}

static void esc_json_low(MaskGraph *g, int start, int q, uint32 high);

/* \uXXXX: a code point, or half of one; high: a high surrogate before it */
static void
json_u_done(MaskGraph *g, int start, int q, uint32 acc, uint32 high)
{
	if (high != 0)
	{
		if (acc >= 0xDC00 && acc <= 0xDFFF)
			mask_add_cp(g, start, q,
						0x10000 + ((high - 0xD800) << 10) + (acc - 0xDC00));
	}
	else if (acc >= 0xD800 && acc <= 0xDBFF)
		esc_json_low(g, start, q, acc);
	else if (!(acc >= 0xDC00 && acc <= 0xDFFF))
		mask_add_cp(g, start, q, acc);
}

/* the "\u" of a low surrogate after a high one */
static void
esc_json_low(MaskGraph *g, int start, int q, uint32 high)
{
	const MaskEdge *e;
	const MaskEdge *e2;

	if (mask_text_ends(g, start, q))
		return;
	BYTE_EDGES_FROM(g, start, q, e)
	{
		if (e->val[0] != '\\' || mask_text_ends(g, start, e->to))
			continue;
		BYTE_EDGES_FROM(g, start, e->to, e2)
		{
			if (e2->val[0] == 'u')
				esc_hex(g, start, e2->to, 4, 0, json_u_done, high);
		}
	}
}

/* a JSON escape, after the backslash */
static void
esc_json(MaskGraph *g, int start, int q)
{
	const MaskEdge *e;

	if (mask_text_ends(g, start, q))
		return;
	BYTE_EDGES_FROM(g, start, q, e)
	{
		uint8		c;

		c = e->val[0];
		switch (c)
		{
			case '"':
			case '\\':
			case '/':
				break;
			case 'b':
				c = '\b';
				break;
			case 'f':
				c = '\f';
				break;
			case 'n':
				c = '\n';
				break;
			case 'r':
				c = '\r';
				break;
			case 't':
				c = '\t';
				break;
			case 'u':
				esc_hex(g, start, e->to, 4, 0, json_u_done, 0);
				continue;
			default:
				continue;
		}
		mask_add(g, start, e->to, &c, 1);
	}
}

/* what an HTML numeric reference to cp stands for, per HTML and per XML */
static void
html_numeric(MaskGraph *g, int start, int q, uint32 cp)
{
	if (cp == 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		mask_add_cp(g, start, q, 0xFFFD);
	else
	{
		mask_add_cp(g, start, q, cp);
		if (cp >= 0x80 && cp <= 0x9F && html_c1[cp - 0x80] != 0)
			mask_add_cp(g, start, q, html_c1[cp - 0x80]);
	}
}

/*
 * &#NN; or &#xNN;, after the '#' (base 0), the 'x' (base 16, no digits) or
 * some digits; the ';' is optional, as HTML parsers do not insist on it.
 */
static void
esc_html_num(MaskGraph *g, int start, int q, int base, int ndigits, uint32 acc)
{
	const MaskEdge *e;

	if (ndigits > 0)
		html_numeric(g, start, q, acc);
	if (mask_text_ends(g, start, q))
		return;
	if (ndigits >= MASK_MAX_DIGITS)
	{
		g->overflow = true;
		return;
	}
	BYTE_EDGES_FROM(g, start, q, e)
	{
		int			c;
		int			d;

		c = e->val[0];
		if (c == ';' && ndigits > 0)
			html_numeric(g, start, e->to, acc);
		else if (base == 0 && ndigits == 0 && (c == 'x' || c == 'X'))
			esc_html_num(g, start, e->to, 16, 0, 0);
		else
		{
			int			b = (base == 0) ? 10 : base;

			d = (b == 16) ? hex_value(c) : (c >= '0' && c <= '9') ? c - '0' : -1;
			if (d >= 0)
				esc_html_num(g, start, e->to, b, ndigits + 1,
							 Min(acc * b + d, 0x110000));
		}
	}
}

/*
 * A named reference, after name[0..len) (lower case), which is a prefix of
 * some name in html_names; letters are matched case-insensitively.
 */
static void
esc_html_name(MaskGraph *g, int start, int q, char *name, int len)
{
	const MaskEdge *e;
	int			exact = -1;
	int			i;

	for (i = 0; i < lengthof(html_names); i++)
	{
		if ((int) strlen(html_names[i].name) == len &&
			memcmp(html_names[i].name, name, len) == 0)
		{
			exact = i;
			mask_add_cp(g, start, q, html_names[i].cp);
		}
	}
	if (mask_text_ends(g, start, q))
		return;
	BYTE_EDGES_FROM(g, start, q, e)
	{
		int			c;

		c = e->val[0];
		if (c == ';' && exact >= 0)
			mask_add_cp(g, start, e->to, html_names[exact].cp);
		else if (len < MASK_MAX_NAME &&
				 ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')))
		{
			name[len] = (char) (c | 0x20);
			for (i = 0; i < lengthof(html_names); i++)
			{
				if (strncmp(html_names[i].name, name, len + 1) == 0)
				{
					esc_html_name(g, start, e->to, name, len + 1);
					break;
				}
			}
		}
	}
}

/* an HTML reference, after the '&' */
static void
esc_html(MaskGraph *g, int start, int q)
{
	const MaskEdge *e;
	char		name[MASK_MAX_NAME + 1];

	if (mask_text_ends(g, start, q))
		return;
	BYTE_EDGES_FROM(g, start, q, e)
	{
		int			c;
		int			i;

		c = e->val[0];
		if (c == '#')
			esc_html_num(g, start, e->to, 0, 0, 0);
		else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
		{
			name[0] = (char) (c | 0x20);
			for (i = 0; i < lengthof(html_names); i++)
			{
				if (html_names[i].name[0] == name[0])
				{
					esc_html_name(g, start, e->to, name, 1);
					break;
				}
			}
		}
	}
}

static bool
mask_same_edge(const MaskEdge *a, const MaskEdge *b)
{
	return a->from == b->from && a->to == b->to && a->len == b->len &&
		memcmp(a->val, b->val, a->len) == 0;
}

/*
 * Merge the edges found at this level into the graph, without duplicates.
 * Both lists are sorted by from.  Returns false if nothing was new.
 */
static bool
mask_merge(MaskGraph *g)
{
	MaskEdge   *merged;
	int			nm = 0;
	int			i = 0;
	int			k = 0;
	int			p;
	bool		grew = false;

	merged = palloc((g->nedges + g->nadded) * sizeof(MaskEdge));
	for (p = 0; p <= g->n; p++)
	{
		int			group = nm;

		g->first[p] = nm;
		while (i < g->nedges && g->edges[i].from == p)
			merged[nm++] = g->edges[i++];
		for (; k < g->nadded && g->added[k].from == p; k++)
		{
			int			j;

			for (j = group; j < nm; j++)
			{
				if (mask_same_edge(&merged[j], &g->added[k]))
					break;
			}
			if (j == nm)
			{
				merged[nm++] = g->added[k];
				grew = true;
			}
		}
	}
	g->first[g->n + 1] = nm;
	pfree(g->edges);
	g->edges = merged;
	g->nedges = nm;
	return grew;
}

/* Build the graph of text[0..n): level 0, then the escapes level by level. */
static void
mask_build(MaskGraph *g)
{
	int			p;
	int			level;

	g->nedges = g->n;
	g->edges = palloc0(Max(g->n, 1) * sizeof(MaskEdge));
	g->first = palloc((g->n + 2) * sizeof(int));
	for (p = 0; p < g->n; p++)
	{
		MaskEdge   *e = &g->edges[p];

		e->from = p;
		e->to = p + 1;
		e->len = 1;
		e->val[0] = g->s[p];
		e->blank = mask_blank(g->s[p]);
		g->first[p] = p;
	}
	g->first[g->n] = g->first[g->n + 1] = g->n;
	g->maxadded = 64;
	g->added = palloc(g->maxadded * sizeof(MaskEdge));

	for (level = 1; level <= MASK_LEVELS && !g->overflow; level++)
	{
		g->nadded = 0;
		for (p = 0; p < g->n && !g->overflow; p++)
		{
			const MaskEdge *e;

			EDGES_FROM(g, p, e)
			{
				uint8		space = ' ';

				if (g->overflow)
					break;
				if (e->len != 1)
					continue;
				switch (e->val[0])
				{
					case '%':
						esc_hex(g, p, e->to, 2, 0, percent_done, 0);
						break;
					case '+':
						mask_add(g, p, e->to, &space, 1);
						break;
					case '\\':
						esc_json(g, p, e->to);
						break;
					case '&':
						esc_html(g, p, e->to);
						break;
				}
			}
		}
		if (g->overflow || !mask_merge(g))
			break;
	}
}

/* secret states reached from (q, j) over edge e (len > 0); returns how many */
static int
mask_step(const MaskEdge *e, const uint8 *sec, int m, int j, int *next)
{
	int			k = 0;

	if (e->blank)
	{
		/* one blank in the secret stands for any run of them */
		if (j < m && sec[j] == ' ')
			next[k++] = j + 1;
		if (j > 0 && sec[j - 1] == ' ')
			next[k++] = j;
	}
	else if (j + e->len <= m)
	{
		int			i;

		for (i = 0; i < e->len && sec[j + i] == e->val[i]; i++)
			;
		if (i == e->len)
			next[k++] = j + e->len;
	}
	return k;
}

/* Set mark[] over every stretch of the text that spells the secret. */
static void
mask_match(MaskGraph *g, const uint8 *sec, int m, bool *mark)
{
	int			n = g->n;
	int			w = m + 1;
	int			minp = Min(MASK_MIN_PREFIX, m);
	uint8	   *fw = palloc0((size_t) (n + 1) * w);
	uint8	   *bw = palloc0((size_t) (n + 1) * w);
	bool	   *deep = palloc0((n + 1) * sizeof(bool));	/* FW(q, j > 0) */
	int			q;
	int			j;

#define FW(q, j) fw[(size_t) (q) * w + (j)]
#define BW(q, j) bw[(size_t) (q) * w + (j)]

	/* forwards: a match may start anywhere */
	for (q = 0; q <= n; q++)
		FW(q, 0) = 1;
	for (q = 0; q < n; q++)
	{
		for (j = 0; j < (deep[q] ? m : 1); j++)
		{
			const MaskEdge *e;

			if (!FW(q, j))
				continue;
			EDGES_FROM(g, q, e)
			{
				int			next[2];
				int			k;

				if (e->len == 0)
					continue;
				for (k = mask_step(e, sec, m, j, next) - 1; k >= 0; k--)
				{
					FW(e->to, next[k]) = 1;
					if (next[k] > 0)
						deep[e->to] = true;
				}
			}
		}
	}

	/*
	 * backwards: to a whole match, or to a long enough prefix at the end;
	 * only states reached forwards matter, and every state an edge leads to
	 * from one of those was reached forwards too
	 */
	for (j = 0; j <= m; j++)
		BW(n, j) = (j >= minp);
	for (q = n - 1; q >= 0; q--)
	{
		BW(q, m) = 1;
		for (j = 0; j < (deep[q] ? m : 1); j++)
		{
			const MaskEdge *e;
			bool		b = false;

			if (!FW(q, j))
				continue;
			EDGES_FROM(g, q, e)
			{
				int			next[2];
				int			k;

				if (e->len == 0)
				{
					/* a cut escape stands for (part of) the next character */
					b |= (j + 1 >= minp);
					continue;
				}
				for (k = mask_step(e, sec, m, j, next) - 1; k >= 0 && !b; k--)
					b = BW(e->to, next[k]);
				if (b)
					break;
			}
			BW(q, j) = b;
		}
	}

	/* every edge between two states on such a path */
	for (q = 0; q < n; q++)
	{
		for (j = 0; j < (deep[q] ? m : 1); j++)
		{
			const MaskEdge *e;

			if (!FW(q, j) || !BW(q, j))
				continue;
			EDGES_FROM(g, q, e)
			{
				int			next[2];
				int			k;
				int			p;

				if (e->len == 0)
				{
					if (j + 1 >= minp)
						for (p = q; p < n; p++)
							mark[p] = true;
					continue;
				}
				for (k = mask_step(e, sec, m, j, next) - 1; k >= 0; k--)
				{
					if (BW(e->to, next[k]))
					{
						for (p = q; p < e->to; p++)
							mark[p] = true;
						break;
					}
				}
			}
		}
	}
#undef FW
#undef BW
	pfree(fw);
	pfree(bw);
	pfree(deep);
}

size_t
auth_mask_secret(char *text, size_t len, const char *secret)
{
	uint8	   *sec;
	int			m = 0;
	const unsigned char *p;
	bool	   *mark;
	bool		any = false;
	const char *filler;
	size_t		i;

	if (text == NULL || len == 0 || secret == NULL || secret[0] == '\0')
		return len;

	/* the secret as the text would show it: blanks collapsed, ends trimmed */
	sec = palloc(strlen(secret) + 1);
	for (p = (const unsigned char *) secret; *p; p++)
	{
		if (!mask_blank(*p))
			sec[m++] = *p;
		else if (m > 0 && sec[m - 1] != ' ')
			sec[m++] = ' ';
	}
	if (m > 0 && sec[m - 1] == ' ')
		m--;
	if (m == 0)
	{
		pfree(sec);
		return len;
	}

	mark = palloc0(len * sizeof(bool));
	if (len > MASK_MAX_TEXT || (len + 1) * (size_t) (m + 1) > MASK_MAX_CELLS)
		memset(mark, true, len * sizeof(bool));
	else
	{
		MaskGraph	g;

		memset(&g, 0, sizeof(g));
		g.s = (const unsigned char *) text;
		g.n = (int) len;
		g.work = (int64) MASK_WORK_PER_BYTE * len + 100000;
		mask_build(&g);
		if (g.overflow)
			memset(mark, true, len * sizeof(bool));
		else
			mask_match(&g, sec, m, mark);
		pfree(g.edges);
		pfree(g.first);
		pfree(g.added);
	}

	/* whole characters only: no stray UTF-8 continuation bytes */
	for (i = 1; i < len; i++)
		if (!mark[i] && mark[i - 1] && ((unsigned char) text[i] & 0xC0) == 0x80)
			mark[i] = true;
	for (i = len - 1; i > 0; i--)
		if (!mark[i - 1] && mark[i] && ((unsigned char) text[i] & 0xC0) == 0x80)
			mark[i - 1] = true;

	for (i = 0; i < len && !any; i++)
		any = mark[i];
	if (any)
	{
		for (filler = mask_fillers; *filler; filler++)
		{
			if (memchr(sec, *filler, m) == NULL)
				break;
		}
		if (*filler == '\0')
		{
			/* nothing to overwrite it with: withhold all of it */
			explicit_bzero(text, len);
			len = 0;
		}
		else
		{
			for (i = 0; i < len; i++)
				if (mark[i])
					text[i] = *filler;
		}
	}

	explicit_bzero(sec, m);
	pfree(sec);
	pfree(mark);
	return len;
}

/* RFC 6750 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=" */
static bool
valid_token(const char *token)
{
	size_t		n = 0;
	const char *s;

	for (s = token; *s; s++, n++)
	{
		unsigned char c = (unsigned char) *s;

		if (!(FORM_SAFE(c) || c == '+' || c == '/' || c == '='))
			return false;
	}
	return n > 0 && n <= AUTH_MAX_TOKEN_LEN;
}

static uint64
hash_secret(const char *secret)
{
	return hash_bytes_extended((const unsigned char *) secret,
							   (int) strlen(secret), 0);
}

static double
monotonic_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/*
 * Format an error into err, cut to errlen on a UTF-8 character boundary,
 * then mask any trace of the secret in what is left.
 */
static void
auth_error(char *err, size_t errlen, const AuthConfig *cfg, const char *fmt,...)
{
	va_list		ap;
	int			n;
	size_t		len;

	if (err == NULL || errlen == 0)
		return;
	va_start(ap, fmt);
	n = vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	if (n < 0)
	{
		err[0] = '\0';
		return;
	}
	len = strlen(err);
	if ((size_t) n > len)
	{
		/* cut: do not leave half a character */
		while (len > 0 && ((unsigned char) err[len - 1] & 0xC0) == 0x80)
			len--;
		if (len > 0 && ((unsigned char) err[len - 1] & 0xC0) == 0xC0)
			len--;
		err[len] = '\0';
	}
	auth_mask_secret(err, len, cfg->client_secret);
}
