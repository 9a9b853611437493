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
 * response body; only the error and error_description fields, which are
 * themselves scrubbed of the secret before being truncated, since a
 * misbehaving server could echo the request back.
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
static bool parse_token_response(const AuthConfig *cfg, const char *body,
								 size_t len, double started, char **header,
								 double *valid_until, char *err, size_t errlen);
static void describe_error_response(const AuthConfig *cfg, long status,
									const char *body, size_t len,
									char *err, size_t errlen);
static TokenEntry *cache_lookup(const AuthConfig *cfg);
static void cache_drop(TokenEntry *e);
static void cache_store(const AuthConfig *cfg, const char *header,
						double valid_until);
static const char *token_url_problem(const char *url);
static char *build_form(const AuthConfig *cfg, size_t *len);
static size_t form_escaped_len(const char *s);
static char *form_escape(char *dst, const char *s);
static void redact(char *s, const char *secret);
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
		describe_error_response(cfg, req.status, req.response.data,
								req.response.len, err, errlen);
	else if (parse_token_response(cfg, req.response.data, req.response.len,
								  started, &header, &valid_until, err, errlen))
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
static bool
parse_token_response(const AuthConfig *cfg, const char *body, size_t len,
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
	*header = psprintf("Authorization: Bearer %s", token);
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
 * and (scrubbed, truncated) description if the body is an OAuth error.
 * Never the body itself.
 */
static void
describe_error_response(const AuthConfig *cfg, long status, const char *body,
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

/* The cached entry for cfg's target, if it was made with the same settings. */
static TokenEntry *
cache_lookup(const AuthConfig *cfg)
{
	const char *target = cfg->target ? cfg->target : "";
	TokenEntry *e;

	for (e = token_cache; e != NULL; e = e->next)
	{
		if (strcmp(e->target, target) != 0)
			continue;
		if (strcmp(e->token_url, cfg->token_url) == 0 &&
			strcmp(e->client_id, cfg->client_id) == 0 &&
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

/* Overwrite every occurrence of secret in s, raw or form-encoded, with '*'. */
static void
redact(char *s, const char *secret)
{
	size_t		len;
	char	   *encoded;
	char	   *p;
	int			pass;

	if (secret == NULL || secret[0] == '\0')
		return;

	len = form_escaped_len(secret);
	encoded = palloc(len + 1);
	*form_escape(encoded, secret) = '\0';

	for (pass = 0; pass < 2; pass++)
	{
		const char *needle = (pass == 0) ? secret : encoded;
		size_t		nlen = strlen(needle);

		for (p = s; (p = strstr(p, needle)) != NULL; p += nlen)
			memset(p, '*', nlen);
	}

	explicit_bzero(encoded, len);
	pfree(encoded);
}

/*
 * Copy text from a server into dst for a message: secret scrubbed first
 * (so truncation cannot leave a piece of it), control characters and runs
 * of blanks turned into one space, cut at maxbytes on a UTF-8 character
 * boundary with "..." appended.  dstsize must exceed maxbytes + 3.
 */
static void
clean_text(char *dst, size_t dstsize, const char *src, size_t maxbytes,
		   const char *secret)
{
	char	   *copy = pstrdup(src);
	const char *s;
	size_t		n = 0;
	bool		space = false;
	bool		cut = false;

	Assert(dstsize > maxbytes + 3);
	redact(copy, secret);

	for (s = copy; *s; s++)
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
	{
		/* do not split a multibyte character */
		while (n > 0 && ((unsigned char) dst[n - 1] & 0xC0) == 0x80)
			n--;
		if (n > 0 && ((unsigned char) dst[n - 1] & 0xC0) == 0xC0)
			n--;
		memcpy(dst + n, "...", 3);
		n += 3;
	}
	dst[n] = '\0';
	pfree(copy);
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

/* Format an error into err, with any trace of the secret overwritten. */
static void
auth_error(char *err, size_t errlen, const AuthConfig *cfg, const char *fmt,...)
{
	va_list		ap;

	if (err == NULL || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	redact(err, cfg->client_secret);
}
