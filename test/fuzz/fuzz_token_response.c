/*-------------------------------------------------------------------------
 *
 * fuzz_token_response.c
 *	  libFuzzer target for what src/auth.c makes of a token endpoint's
 *	  answer: auth_parse_token_response() for a 200, auth_describe_error()
 *	  for anything else.
 *
 * auth.c is compiled against the server headers and runs on the stand-ins
 * of test/unit/pg_shims.h (palloc on malloc, with a count of live chunks).
 *
 * Input: the client secret up to the first '\n' (a fixed one when there is
 * none in the first 128 bytes; made valid UTF-8), one byte choosing the
 * status and the size of the message buffer, then the body.
 *
 * Besides the sanitizers the target checks, and traps on violation:
 *	 - a message is NUL-terminated inside its buffer, has no control
 *	   characters, and does not show the secret in any reading of the
 *	   independent oracle in test/unit/secret_encode.h (raw, form, JSON,
 *	   HTML and their compositions; a prefix of 4+ bytes at the end);
 *	 - a token comes as "Authorization: Bearer " + RFC 6750 characters,
 *	   valid for no more than a day from the start;
 *	 - nothing palloc'd is left behind.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

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

static const char default_secret[] = "Sup3r~Secret/With+Symbols&=%Q";
static const long statuses[8] = {200, 200, 200, 400, 401, 403, 500, 503};
static const size_t errlens[8] = {512, 256, 120, 64, 48, 8, 2, 1};

/* copy s[0..n) as valid UTF-8 (other bytes become '?'), NUL-terminated */
static char *
utf8_copy(const uint8_t *s, size_t n)
{
	char	   *o = malloc(n + 1);
	size_t		i = 0;
	size_t		k = 0;

	while (i < n)
	{
		size_t		cl = se_charlen(s + i, n - i);

		if (s[i] == '\0' || (cl == 1 && s[i] >= 0x80))
		{
			o[k++] = '?';
			i++;
			continue;
		}
		memcpy(o + k, s + i, cl);
		k += cl;
		i += cl;
	}
	o[k] = '\0';
	return o;
}

static void
check_message(const char *err, size_t errlen, const char *secret)
{
	const char *end = memchr(err, '\0', errlen);
	const char *p;
	char		why[64];

	CHECK(end != NULL);
	for (p = err; p < end; p++)
		CHECK((unsigned char) *p >= 0x20 && *p != 0x7F);
	if (se_leaks(err, (size_t) (end - err), secret, why, sizeof(why)))
	{
		fprintf(stderr, "secret readable (%s) in: %s\n", why, err);
		abort();
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nl = memchr(data, '\n', size < 128 ? size : 128);
	char	   *secret;
	AuthConfig	cfg;
	long		status;
	size_t		errlen;
	char		err[512];
	char	   *body;
	size_t		blen;
	long		before = live_chunks(CurrentMemoryContext);

	if (nl != NULL)
	{
		secret = utf8_copy(data, (size_t) (nl - data));
		size -= (size_t) (nl - data) + 1;
		data = nl + 1;
	}
	else
	{
		secret = malloc(sizeof(default_secret));
		memcpy(secret, default_secret, sizeof(default_secret));
	}
	if (size == 0 || secret[0] == '\0')
	{
		free(secret);
		return 0;
	}
	status = statuses[data[0] & 7];
	errlen = errlens[(data[0] >> 3) & 7];
	blen = size - 1;
	body = malloc(blen ? blen : 1);
	memcpy(body, data + 1, blen);

	cfg.target = "t1";
	cfg.token_url = "https://login.example.com/tenant/oauth2/v2.0/token";
	cfg.client_id = "client";
	cfg.client_secret = secret;
	cfg.scope = "https://contoso.operations.dynamics.com/.default";

	memset(err, 'x', sizeof(err));
	if (status == 200)
	{
		char	   *header = NULL;
		double		until = -1;

		if (auth_parse_token_response(&cfg, body, blen, 1000.0, &header, &until,
									  err, errlen))
		{
			const char *t;

			CHECK(header != NULL);
			CHECK(strncmp(header, "Authorization: Bearer ", 22) == 0);
			CHECK(header[22] != '\0');
			for (t = header + 22; *t; t++)
				CHECK(strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
							 "0123456789-._~+/=", *t) != NULL);
			CHECK(isfinite(until) && until >= 1000.0 && until <= 1000.0 + 86400);
			pfree(header);
		}
		else
		{
			CHECK(header == NULL);
			check_message(err, errlen, secret);
		}
	}
	else
	{
		auth_describe_error(&cfg, status, body, blen, err, errlen);
		check_message(err, errlen, secret);
	}
	CHECK(live_chunks(CurrentMemoryContext) == before);

	free(body);
	free(secret);
	return 0;
}
