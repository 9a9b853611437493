/*-------------------------------------------------------------------------
 *
 * http_selftest.c
 *	  Standalone TAP tests for src/http.c and src/auth.c, without a backend.
 *
 * The two files are compiled against the server headers, as in the build,
 * and linked with the stand-ins of pg_shims.h for the few backend functions
 * they use: palloc and friends (malloc-backed, with a live-chunk count per
 * memory context so that leaks across calls show up), ereport (longjmp to
 * PG_TRY as the real one does), CHECK_FOR_INTERRUPTS and PostmasterIsAlive
 * (driven by the tests).  The requests go to a small scripted HTTP/1.1 server that runs
 * in a thread of this program, so every case is deterministic: behaviour
 * is chosen by the request path.
 *
 * Build and run (ASan/UBSan):
 *
 *   gcc -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
 *       $(pg_config --cflags) -I$(pg_config --includedir-server) -Isrc \
 *       test/unit/http_selftest.c src/http.c src/auth.c \
 *       -lcurl -lcjson -lpthread -o /tmp/http_selftest && /tmp/http_selftest
 *
 * With D365INV_MOCK_PORT set to the port of a running test/mock-d365, a few
 * more cases run against it (token, $batch, 401 and re-authentication, 429,
 * a batch dropped after processing).  The mock's state is changed.
 *
 *-------------------------------------------------------------------------
 */
#define _GNU_SOURCE				/* memmem, strcasestr */
#include "postgres.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/memnodes.h"
#include "storage/pmsignal.h"
#include "utils/memutils.h"

#include <cjson/cJSON.h>

#include "auth.h"
#include "http.h"

#include "pg_shims.h"
#include "tap.h"
#include "secret_encode.h"

static double
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* ---------------------------------------------------------------------
 * Scripted HTTP/1.1 server, one thread per connection, keep-alive.
 *
 *   /ok          200 text/plain "hello", Retry-After: 7
 *   /echo        200, the request body back (method in X-Method)
 *   /delay       200 after 300 ms
 *   /slow        200 after 3 s
 *   /interim     100 Continue (with a bogus Content-Type), then 429 with
 *                Retry-After: 5 and no Content-Type
 *   /redirect    302 to http://127.0.0.1:1/elsewhere
 *   /bigcl       200 with Content-Length: 2000000 (the body never comes)
 *   /bigchunk    200 chunked, 64 kB chunks until the client gives up
 *   /drop        reads the request, closes without answering
 *   /budget      200 with D365's remaining-budget headers ("5,987", "1,199.87")
 *   /badbudget   200 with unreadable remaining-budget headers
 *   /token/...   token endpoint variants, see token_reply()
 * ---------------------------------------------------------------------
 */
#define SERVER_BUF	(8 << 20)

static int	server_port;
static int	server_connections;
static int	server_requests;
static int	server_drops;
static int	server_token_requests;
static pthread_mutex_t server_lock = PTHREAD_MUTEX_INITIALIZER;

static void
count(int *counter)
{
	pthread_mutex_lock(&server_lock);
	(*counter)++;
	pthread_mutex_unlock(&server_lock);
}

static int
counter(int *counter)
{
	int			v;

	pthread_mutex_lock(&server_lock);
	v = *counter;
	pthread_mutex_unlock(&server_lock);
	return v;
}

static bool
send_all(int fd, const char *buf, size_t len)
{
	while (len > 0)
	{
		ssize_t		n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n <= 0)
			return false;
		buf += n;
		len -= n;
	}
	return true;
}

static bool
respond(int fd, int status, const char *extra_headers, const char *body)
{
	char		head[1024];
	size_t		blen = body ? strlen(body) : 0;

	snprintf(head, sizeof(head), "HTTP/1.1 %d X\r\n%sContent-Length: %zu\r\n\r\n",
			 status, extra_headers ? extra_headers : "", blen);
	return send_all(fd, head, strlen(head)) && send_all(fd, body ? body : "", blen);
}

/* decode a form value in place */
static void
form_decode(char *s)
{
	char	   *d = s;

	for (; *s; s++)
	{
		if (*s == '%' && s[1] && s[2])
		{
			char		hex[3] = {s[1], s[2], 0};

			*d++ = (char) strtol(hex, NULL, 16);
			s += 2;
		}
		else
			*d++ = (*s == '+') ? ' ' : *s;
	}
	*d = '\0';
}

/* JSON string body of s (no quotes), for the few characters that matter */
static void
json_escape(char *dst, size_t size, const char *s)
{
	size_t		n = 0;

	for (; *s && n + 7 < size; s++)
	{
		if (*s == '"' || *s == '\\')
			dst[n++] = '\\';
		dst[n++] = *s;
	}
	dst[n] = '\0';
}

static bool
token_reply(int fd, const char *variant, const char *body)
{
	char		json[4096];

	count(&server_token_requests);
	if (strcmp(variant, "ok") == 0)
		return respond(fd, 200, "Content-Type: application/json\r\n",
					   "{\"token_type\":\"Bearer\",\"expires_in\":3600,"
					   "\"access_token\":\"tok.en-_~+/1==\"}");
	if (strcmp(variant, "v1") == 0)
		return respond(fd, 200, "Content-Type: application/json\r\n",
					   "{\"token_type\":\"bearer\",\"expires_in\":\"3599\","
					   "\"access_token\":\"v1token\"}");
	if (strcmp(variant, "short") == 0)
		return respond(fd, 200, "Content-Type: application/json\r\n",
					   "{\"token_type\":\"Bearer\",\"expires_in\":1,"
					   "\"access_token\":\"shorttoken\"}");
	if (strcmp(variant, "mac") == 0)
		return respond(fd, 200, NULL,
					   "{\"token_type\":\"mac\",\"expires_in\":3600,\"access_token\":\"x\"}");
	if (strcmp(variant, "junk") == 0)
		return respond(fd, 200, NULL,
					   "{\"token_type\":\"Bearer\",\"expires_in\":3600,"
					   "\"access_token\":\"a b\\r\\nX-Evil: 1\"}");
	if (strcmp(variant, "badexp") == 0)
		return respond(fd, 200, NULL,
					   "{\"token_type\":\"Bearer\",\"expires_in\":\"soon\",\"access_token\":\"x\"}");
	if (strcmp(variant, "notjson") == 0)
		return respond(fd, 200, NULL, "hello");
	if (strcmp(variant, "500") == 0)
		return respond(fd, 500, NULL, "internal error; request was: secret body");
	if (strncmp(variant, "echo", 4) == 0 && strcmp(variant, "echo") != 0 &&
		strcmp(variant, "echolong") != 0)
	{
		/*
		 * A server that quotes the secret back in an encoding, or cleaned
		 * up, or cut short:
		 *   echojson    JSON-escaped ("\/") inside the description text
		 *   echohtml    HTML-escaped ("&amp;")
		 *   echoblank   its blanks as line breaks and tabs
		 *   echoprefix  only its first 20 bytes, straddling the 200-byte cut
		 *   echoucut    \u-escaped, straddling the 200-byte cut
		 */
		char		secret[512] = "";
		char		desc[3072];
		SeBuf		enc = {0};
		const char *p = strstr(body, "client_secret=");

		if (p)
		{
			size_t		n = strcspn(p + 14, "&");

			snprintf(secret, sizeof(secret), "%.*s", (int) Min(n, sizeof(secret) - 1), p + 14);
			form_decode(secret);
		}
		if (strcmp(variant, "echojson") == 0)
			se_encode_all(&enc, secret, strlen(secret), SE_JSON_SHORT);
		else if (strcmp(variant, "echohtml") == 0)
			se_encode_all(&enc, secret, strlen(secret), SE_HTML_NAMED);
		else if (strcmp(variant, "echoblank") == 0)
		{
			for (p = secret; *p; p++)
			{
				if (*p == ' ')
					se_puts(&enc, "\r\n\t ");
				else
					se_put(&enc, p, 1);
			}
		}
		else if (strcmp(variant, "echoprefix") == 0)
		{
			se_puts(&enc, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
			se_puts(&enc, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx ");
			se_put(&enc, secret, Min(strlen(secret), 20));
			se_puts(&enc, " and the rest of the message");
		}
		else if (strcmp(variant, "echoucut") == 0)
		{
			se_puts(&enc, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
			se_puts(&enc, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx ");
			se_encode_all(&enc, secret, strlen(secret), SE_JSON_U_LOWER);
		}
		else
			se_puts(&enc, secret);
		/* the description text, then JSON-escaped into the body */
		json_escape(desc, sizeof(desc), enc.p ? enc.p : "");
		se_free(&enc);
		snprintf(json, sizeof(json),
				 "{\"error\":\"invalid_client\",\"error_description\":\"Echo: %s\"}", desc);
		return respond(fd, 401, "Content-Type: application/json\r\n", json);
	}
	if (strcmp(variant, "echo") == 0 || strcmp(variant, "echolong") == 0)
	{
		/* a server that quotes the request back, raw and decoded */
		char		secret[512] = "";
		char		raw[2048];
		char		desc[3072];
		const char *p = strstr(body, "client_secret=");

		if (p)
		{
			size_t		n = strcspn(p + 14, "&");

			snprintf(secret, sizeof(secret), "%.*s", (int) Min(n, sizeof(secret) - 1), p + 14);
			form_decode(secret);
		}
		json_escape(raw, sizeof(raw), body);
		if (strcmp(variant, "echo") == 0)
			snprintf(desc, sizeof(desc), "AADSTS7000215: Invalid client secret.\r\n"
					 "Trace ID: 1\r\nRequest: %s\r\nSecret: %s", raw, secret);
		else
			/* the secret straddles the 200-byte cut */
			snprintf(desc, sizeof(desc), "%0190d %s %s", 0, secret, raw);
		snprintf(json, sizeof(json),
				 "{\"error\":\"invalid_client\",\"error_description\":\"%s\"}", desc);
		return respond(fd, 401, "Content-Type: application/json\r\n", json);
	}
	return respond(fd, 404, NULL, "no such token variant");
}

static void *
serve_connection(void *arg)
{
	int			fd = (int) (intptr_t) arg;
	char	   *buf = malloc(SERVER_BUF);
	size_t		have = 0;

	count(&server_connections);
	for (;;)
	{
		char	   *eoh;
		char		method[16];
		char		path[256];
		size_t		clen = 0;
		size_t		hlen;
		char	   *cl;
		char	   *body;
		bool		alive = true;

		/* one request: headers, then Content-Length bytes of body */
		while ((eoh = memmem(buf, have, "\r\n\r\n", 4)) == NULL)
		{
			ssize_t		n = recv(fd, buf + have, SERVER_BUF - 1 - have, 0);

			if (n <= 0)
				goto out;
			have += n;
		}
		hlen = eoh + 4 - buf;
		buf[hlen - 1] = '\0';
		if (sscanf(buf, "%15s %255s", method, path) != 2)
			goto out;
		cl = strcasestr(buf, "\r\nContent-Length:");
		if (cl)
			clen = strtoul(cl + 17, NULL, 10);
		while (have < hlen + clen)
		{
			ssize_t		n = recv(fd, buf + have, SERVER_BUF - 1 - have, 0);

			if (n <= 0)
				goto out;
			have += n;
		}
		body = malloc(clen + 1);
		memcpy(body, buf + hlen, clen);
		body[clen] = '\0';
		memmove(buf, buf + hlen + clen, have - hlen - clen);
		have -= hlen + clen;
		count(&server_requests);

		if (strcmp(path, "/ok") == 0)
			alive = respond(fd, 200, "Content-Type: text/plain\r\nRetry-After: 7\r\n", "hello");
		else if (strcmp(path, "/echo") == 0)
		{
			char		hdr[64];

			snprintf(hdr, sizeof(hdr), "X-Method: %s\r\n", method);
			alive = respond(fd, 200, hdr, body);
		}
		else if (strcmp(path, "/delay") == 0)
		{
			usleep(300 * 1000);
			alive = respond(fd, 200, NULL, "late");
		}
		else if (strcmp(path, "/slow") == 0)
		{
			sleep(3);
			alive = respond(fd, 200, NULL, "too late");
		}
		else if (strcmp(path, "/interim") == 0)
		{
			const char *c = "HTTP/1.1 100 Continue\r\nContent-Type: bogus/interim\r\n\r\n";

			alive = send_all(fd, c, strlen(c)) &&
				respond(fd, 429, "Retry-After: 5\r\n", "{\"error\":\"slow down\"}");
		}
		else if (strcmp(path, "/redirect") == 0)
			alive = respond(fd, 302, "Location: http://127.0.0.1:1/elsewhere\r\n", "moved");
		else if (strcmp(path, "/bigcl") == 0)
		{
			const char *h = "HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n";

			send_all(fd, h, strlen(h));
			alive = false;
		}
		else if (strcmp(path, "/bigchunk") == 0)
		{
			const char *h = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
			static char chunk[65536 + 16];

			snprintf(chunk, sizeof(chunk), "10000\r\n");
			memset(chunk + 7, 'x', 65536);
			memcpy(chunk + 7 + 65536, "\r\n", 2);
			send_all(fd, h, strlen(h));
			while (send_all(fd, chunk, 7 + 65536 + 2))
				;
			alive = false;
		}
		else if (strcmp(path, "/budget") == 0)
			alive = respond(fd, 200, "x-ms-ratelimit-burst-remaining-xrm-requests: 5,987\r\n"
							"X-MS-RateLimit-Time-Remaining-XRM-Requests: 1,199.87\r\n", "ok");
		else if (strcmp(path, "/badbudget") == 0)
			alive = respond(fd, 200, "x-ms-ratelimit-burst-remaining-xrm-requests: -5\r\n"
							"x-ms-ratelimit-time-remaining-xrm-requests: 1e999\r\n", "ok");
		else if (strcmp(path, "/drop") == 0)
		{
			count(&server_drops);
			alive = false;
		}
		else if (strncmp(path, "/token/", 7) == 0)
			alive = token_reply(fd, path + 7, body);
		else
			alive = respond(fd, 404, NULL, "not found");
		free(body);
		if (!alive)
			break;
	}
out:
	close(fd);
	free(buf);
	return NULL;
}

static void *
server_main(void *arg)
{
	int			lfd = (int) (intptr_t) arg;

	for (;;)
	{
		int			fd = accept(lfd, NULL, NULL);
		pthread_t	t;

		if (fd < 0)
			continue;
		pthread_create(&t, NULL, serve_connection, (void *) (intptr_t) fd);
		pthread_detach(t);
	}
	return NULL;
}

static void
server_start(void)
{
	struct sockaddr_in addr = {0};
	socklen_t	alen = sizeof(addr);
	int			lfd = socket(AF_INET, SOCK_STREAM, 0);
	int			one = 1;
	pthread_t	t;

	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *) &addr, sizeof(addr)) != 0 || listen(lfd, 64) != 0)
	{
		perror("server");
		exit(1);
	}
	getsockname(lfd, (struct sockaddr *) &addr, &alen);
	server_port = ntohs(addr.sin_port);
	pthread_create(&t, NULL, server_main, (void *) (intptr_t) lfd);
	pthread_detach(t);
}

/* a port nobody listens on */
static int
closed_port(void)
{
	struct sockaddr_in addr = {0};
	socklen_t	alen = sizeof(addr);
	int			fd = socket(AF_INET, SOCK_STREAM, 0);
	int			port;

	addr.sin_family = AF_INET;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	bind(fd, (struct sockaddr *) &addr, sizeof(addr));
	getsockname(fd, (struct sockaddr *) &addr, &alen);
	port = ntohs(addr.sin_port);
	close(fd);
	return port;
}

/* ---------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------
 */
static HttpSettings settings = {5000, 10000, 1024 * 1024, NULL};

static char *
url(const char *path)
{
	return psprintf("http://127.0.0.1:%d%s", server_port, path);
}

static void
setup(HttpRequest *r, const char *method, const char *path, const char *body)
{
	memset(r, 0, sizeof(*r));
	r->method = method;
	r->url = url(path);
	r->body = body;
	r->body_len = body ? strlen(body) : 0;
}

static void
perform1(HttpRequest *r)
{
	HttpRequest *reqs[1] = {r};

	http_perform(reqs, 1, &settings);
}

/* run fn with an ereport(ERROR) catcher; returns true if one was thrown */
static bool
catches_error(void (*fn) (void *), void *arg)
{
	sigjmp_buf	jb;
	sigjmp_buf *save = PG_exception_stack;

	if (sigsetjmp(jb, 0) == 0)
	{
		PG_exception_stack = &jb;
		fn(arg);
		PG_exception_stack = save;
		return false;
	}
	PG_exception_stack = save;
	return true;
}

/* ---------------------------------------------------------------------
 * http.c
 * ---------------------------------------------------------------------
 */
static void
test_basic(void)
{
	HttpRequest r;
	HttpRequest e;
	const char *hdrs[] = {"Content-Type: text/plain", "X-Test: 1", NULL};

	setup(&r, "GET", "/ok", NULL);
	r.user = &r;
	perform1(&r);
	is_long(r.status, 200, "GET /ok: 200");
	is_str(r.response.data, "hello", "GET /ok: body");
	is_long(r.response.len, 5, "GET /ok: body length");
	is_str(r.content_type, "text/plain", "GET /ok: Content-Type captured");
	is_str(r.retry_after, "7", "GET /ok: Retry-After captured");
	ok(!r.transport_error && !r.maybe_sent && !r.too_large && r.error[0] == '\0',
	   "GET /ok: no transport error");
	ok(r.elapsed_ms > 0, "GET /ok: elapsed_ms set (%.3f)", r.elapsed_ms);
	ok(r.user == &r, "user pointer untouched");

	setup(&e, "POST", "/echo", "a=1&b=\xff\x01binary");
	e.headers = hdrs;
	perform1(&e);
	is_long(e.status, 200, "POST /echo: 200");
	is_str(e.response.data, "a=1&b=\xff\x01binary", "POST /echo: body sent and received intact");

	/* outputs are reset by the next call */
	perform1(&e);
	is_str(e.response.data, "a=1&b=\xff\x01binary", "second POST on same struct: body not appended");
	ok(e.content_type == NULL && e.retry_after == NULL, "headers reset per request");

	setup(&e, "POST", "/echo", NULL);
	perform1(&e);
	ok(e.status == 200 && e.response.len == 0, "POST with no body");

	setup(&e, "PATCH", "/echo", "{\"x\":1}");
	perform1(&e);
	ok(e.status == 200 && strcmp(e.response.data, "{\"x\":1}") == 0,
	   "PATCH sends its body");

	{
		/* a large body: several read callbacks, no Expect round trip */
		size_t		n = 3 * 1024 * 1024 + 7;
		char	   *big = palloc(n + 1);
		HttpSettings s = settings;
		double		t0;

		memset(big, 'b', n);
		big[n] = '\0';
		big[n / 2] = 'M';
		s.max_response_bytes = 8 * 1024 * 1024;
		setup(&e, "POST", "/echo", big);
		{
			HttpRequest *reqs[1] = {&e};

			t0 = now_ms();
			http_perform(reqs, 1, &s);
		}
		ok(e.status == 200 && e.response.len == n &&
		   memcmp(e.response.data, big, n) == 0, "3 MB POST body round trip");
		ok(now_ms() - t0 < 900, "no 1 s Expect: 100-continue stall (%.0f ms)", now_ms() - t0);
	}
}

static void
test_status_and_headers(void)
{
	HttpRequest r;

	setup(&r, "POST", "/interim", "x");
	perform1(&r);
	is_long(r.status, 429, "interim 100 then 429: final status");
	ok(r.content_type == NULL, "Content-Type of the interim response forgotten");
	is_str(r.retry_after, "5", "Retry-After of the final response");

	setup(&r, "GET", "/redirect", NULL);
	perform1(&r);
	is_long(r.status, 302, "302 returned as is, not followed");
	ok(!r.transport_error, "302 is not a transport error");

	setup(&r, "GET", "/nothing", NULL);
	perform1(&r);
	is_long(r.status, 404, "404 returned");
}

static void
test_transport_errors(void)
{
	HttpRequest r;
	HttpSettings s = settings;
	const char *bad[] = {"X-Evil: 1\r\nX-Injected: 2", NULL};
	int			before;

	/* connection refused: not sent */
	memset(&r, 0, sizeof(r));
	r.method = "POST";
	r.url = psprintf("http://127.0.0.1:%d/x", closed_port());
	r.body = "b";
	r.body_len = 1;
	perform1(&r);
	ok(r.transport_error && !r.maybe_sent && r.status == 0,
	   "connection refused: transport error, not sent");
	ok(strstr(r.error, "curl error 7") != NULL, "connection refused: message (%s)", r.error);

	/* other schemes are refused before anything happens */
	memset(&r, 0, sizeof(r));
	r.method = "GET";
	r.url = "file:///etc/passwd";
	perform1(&r);
	ok(r.transport_error && !r.maybe_sent && r.response.len == 0,
	   "file:// refused (%s)", r.error);
	memset(&r, 0, sizeof(r));
	r.method = "GET";
	r.url = "ftp://127.0.0.1/";
	perform1(&r);
	ok(r.transport_error && !r.maybe_sent, "ftp:// refused");

	/* https with a CA file that does not exist */
	memset(&r, 0, sizeof(r));
	r.method = "GET";
	r.url = psprintf("https://127.0.0.1:%d/x", server_port);
	s.ca_file = "/nonexistent/ca.pem";
	{
		HttpRequest *reqs[1] = {&r};

		http_perform(reqs, 1, &s);
	}
	ok(r.transport_error && r.status == 0, "https with a missing CA file fails (%s)", r.error);
	s = settings;

	/* header injection */
	setup(&r, "GET", "/ok", NULL);
	r.headers = bad;
	before = counter(&server_requests);
	perform1(&r);
	ok(r.transport_error && !r.maybe_sent && counter(&server_requests) == before,
	   "header with a line break refused, nothing sent (%s)", r.error);

	/* a timeout after the request went out */
	s.timeout_ms = 500;
	setup(&r, "POST", "/slow", "x");
	{
		HttpRequest *reqs[1] = {&r};

		http_perform(reqs, 1, &s);
	}
	ok(r.transport_error && r.maybe_sent && r.status == 0,
	   "timeout after sending: transport error, maybe sent (%s)", r.error);
	ok(r.elapsed_ms >= 450 && r.elapsed_ms < 2000, "timeout honoured (%.0f ms)", r.elapsed_ms);

	/* closed without an answer */
	setup(&r, "POST", "/drop", "x");
	perform1(&r);
	ok(r.transport_error && r.maybe_sent, "dropped connection: maybe sent (%s)", r.error);
}

/*
 * The reason the body goes through a read callback: libcurl must not
 * silently resend a POST when a reused connection dies before answering.
 */
static void
test_no_silent_resend(void)
{
	HttpRequest r;
	int			drops;

	/*
	 * libcurl 7.88 opens the fresh connection before it finds it cannot
	 * rewind, so the server may see a second connection, but no request on
	 * it.  (With CURLOPT_POSTFIELDS it gets the POST twice.)
	 */
	setup(&r, "GET", "/ok", NULL);
	perform1(&r);
	drops = counter(&server_drops);

	setup(&r, "POST", "/drop", "{\"batch\":1}");
	perform1(&r);
	is_long(counter(&server_drops) - drops, 1, "server got the POST exactly once");
	ok(r.transport_error && r.maybe_sent, "and it is reported as maybe sent (%s)", r.error);
}

static void
test_too_large(void)
{
	HttpRequest r;
	HttpSettings s = settings;
	HttpRequest *reqs[1] = {&r};

	s.max_response_bytes = 100000;
	setup(&r, "GET", "/bigcl", NULL);
	http_perform(reqs, 1, &s);
	ok(r.too_large && r.transport_error && r.status == 0,
	   "Content-Length over the cap: too_large (%s)", r.error);

	setup(&r, "GET", "/bigchunk", NULL);
	http_perform(reqs, 1, &s);
	ok(r.too_large && r.transport_error, "chunked body over the cap: too_large (%s)", r.error);
	ok(r.response.len <= 100000, "never buffered past the cap (%d)", r.response.len);

	/* a body exactly at the cap is fine */
	s.max_response_bytes = 5;
	setup(&r, "GET", "/ok", NULL);
	http_perform(reqs, 1, &s);
	ok(r.status == 200 && !r.too_large && r.response.len == 5, "body of exactly the cap accepted");
	s.max_response_bytes = 4;
	http_perform(reqs, 1, &s);
	ok(r.too_large, "one byte over the cap refused");
}

static void
test_oom_in_callback(void)
{
	HttpRequest r;

	setup(&r, "GET", "/ok", NULL);
	fail_alloc_after = 0;
	perform1(&r);
	fail_alloc_after = -1;
	ok(r.transport_error && strstr(r.error, "out of memory") != NULL,
	   "allocation failure inside a callback aborts only that request (%s)", r.error);

	setup(&r, "GET", "/ok", NULL);
	perform1(&r);
	is_long(r.status, 200, "and the next request works");
}

static void
test_concurrency_and_reuse(void)
{
	HttpRequest r[8];
	HttpRequest *reqs[8];
	int			conns;
	int			i;
	double		t0;
	bool		all = true;

	for (i = 0; i < 8; i++)
	{
		setup(&r[i], "POST", "/delay", "x");
		reqs[i] = &r[i];
	}
	t0 = now_ms();
	http_perform(reqs, 8, &settings);
	for (i = 0; i < 8; i++)
		all &= (r[i].status == 200 && strcmp(r[i].response.data, "late") == 0);
	ok(all, "8 concurrent requests all answered");
	ok(now_ms() - t0 < 1500, "concurrently: %.0f ms for 8 x 300 ms", now_ms() - t0);

	conns = counter(&server_connections);
	t0 = now_ms();
	http_perform(reqs, 8, &settings);
	all = true;
	for (i = 0; i < 8; i++)
		all &= (r[i].status == 200);
	ok(all, "again");
	is_long(counter(&server_connections) - conns, 0,
			"second round reused the 8 kept-alive connections");

	/* a mix: one failure does not disturb the others */
	setup(&r[0], "GET", "/ok", NULL);
	setup(&r[1], "POST", "/drop", "x");
	setup(&r[2], "GET", "/redirect", NULL);
	memset(&r[3], 0, sizeof(r[3]));
	r[3].method = "GET";
	r[3].url = psprintf("http://127.0.0.1:%d/", closed_port());
	http_perform(reqs, 4, &settings);
	ok(r[0].status == 200 && r[1].transport_error && r[1].maybe_sent &&
	   r[2].status == 302 && r[3].transport_error && !r[3].maybe_sent,
	   "mixed outcomes reported per request");

	http_perform(reqs, 0, &settings);
	ok(true, "n = 0 is a no-op");
}

/* http_stream(): a window of 3 over 10 requests, one of them dropped */
typedef struct StreamTest
{
	HttpRequest r[10];
	int			next;
	int			done[10];
	int			in_flight;
	int			max_in_flight;
} StreamTest;

static HttpRequest *
stream_test_next(void *arg, long *wait_ms)
{
	StreamTest *st = arg;

	if (st->next == 10)
		return NULL;
	setup(&st->r[st->next], "POST", st->next == 4 ? "/drop" : "/delay", "x");
	st->r[st->next].user = st;
	st->in_flight++;
	if (st->in_flight > st->max_in_flight)
		st->max_in_flight = st->in_flight;
	return &st->r[st->next++];
}

static void
stream_test_done(HttpRequest *req, void *arg)
{
	StreamTest *st = arg;

	st->done[req - st->r]++;
	st->in_flight--;
}

static void
test_stream(void)
{
	StreamTest st;
	double		t0;
	bool		once = true;
	bool		answered = true;

	memset(&st, 0, sizeof(st));
	t0 = now_ms();
	http_stream(3, &settings, stream_test_next, stream_test_done, &st);
	for (int i = 0; i < 10; i++)
	{
		once &= st.done[i] == 1;
		if (i != 4)
			answered &= st.r[i].status == 200 && strcmp(st.r[i].response.data, "late") == 0;
	}
	ok(once, "every streamed request handed back exactly once");
	ok(answered, "every streamed request answered");
	ok(st.r[4].transport_error && st.r[4].maybe_sent, "a dropped one is reported, maybe sent");
	is_long(st.max_in_flight, 3, "never more than 3 in flight");
	ok(now_ms() - t0 >= 900 && now_ms() - t0 < 3000,
	   "9 x 300 ms through a window of 3 in %.0f ms", now_ms() - t0);
}

/* http_stream() with pacing: next() asks for a pause before each request */
typedef struct PacedTest
{
	HttpRequest r[3];
	int			next;
	int			done;
	double		last_start;
	double		min_gap;
	bool		paused;
} PacedTest;

static HttpRequest *
paced_next(void *arg, long *wait_ms)
{
	PacedTest  *pt = arg;

	if (pt->next == 3)
		return NULL;
	if (!pt->paused)
	{
		pt->paused = true;
		*wait_ms = 250;
		return NULL;
	}
	if (now_ms() - pt->last_start < 200)
	{
		*wait_ms = 50;
		return NULL;
	}
	if (pt->last_start > 0 && now_ms() - pt->last_start < pt->min_gap)
		pt->min_gap = now_ms() - pt->last_start;
	pt->last_start = now_ms();
	setup(&pt->r[pt->next], "GET", pt->next == 0 ? "/budget" : "/badbudget", NULL);
	return &pt->r[pt->next++];
}

static void
paced_done(HttpRequest *req, void *arg)
{
	((PacedTest *) arg)->done++;
}

static void
test_paced_stream(void)
{
	PacedTest	pt;
	double		t0;

	memset(&pt, 0, sizeof(pt));
	pt.min_gap = 1e9;
	t0 = now_ms();
	http_stream(3, &settings, paced_next, paced_done, &pt);
	is_long(pt.done, 3, "a paused stream goes on: all 3 requests done");
	ok(pt.min_gap >= 199, "requests started no closer than the pause allowed (%.0f ms)", pt.min_gap);
	ok(now_ms() - t0 >= 400, "pauses were waited out (%.0f ms)", now_ms() - t0);
	ok(pt.r[0].requests_left == 5987 && pt.r[0].seconds_left > 1199.869 && pt.r[0].seconds_left < 1199.871,
	   "remaining-budget headers read with thousands separators (%g, %g)",
	   pt.r[0].requests_left, pt.r[0].seconds_left);
	ok(pt.r[1].requests_left == -1 && pt.r[1].seconds_left == -1,
	   "unreadable remaining-budget headers read as absent");
	ok(pt.r[0].status == 200 && strcmp(pt.r[0].response.data, "ok") == 0, "paced answer intact");
}

/*
 * http_stream_idle(): the caller's work overlaps the requests.  Each request
 * started owes 80 ms of work that idle() does while requests are under way:
 * 2 x 300 ms through a window of 3 plus 6 x 80 ms of work takes about 600 ms
 * when the work overlaps the requests, 1,080 ms when it does not.
 */
typedef struct IdleTest
{
	HttpRequest r[6];
	int			next;
	int			done[6];
	int			in_flight;
	int			owed;
	int			worked;
	int			worked_full;	/* work done while all 3 were under way */
} IdleTest;

static HttpRequest *
idle_test_next(void *arg, long *wait_ms)
{
	IdleTest   *it = arg;

	if (it->next == 6)
		return NULL;
	setup(&it->r[it->next], "POST", "/delay", "x");
	it->in_flight++;
	it->owed++;
	return &it->r[it->next++];
}

static void
idle_test_done(HttpRequest *req, void *arg)
{
	IdleTest   *it = arg;

	it->done[req - it->r]++;
	it->in_flight--;
}

static bool
idle_test_idle(void *arg)
{
	IdleTest   *it = arg;

	if (it->owed == 0)
		return false;
	it->owed--;
	it->worked++;
	if (it->in_flight == 3)
		it->worked_full++;
	usleep(80 * 1000);
	return true;
}

static void
test_idle_stream(void)
{
	IdleTest	it;
	double		t0;
	bool		once = true;
	bool		answered = true;

	memset(&it, 0, sizeof(it));
	t0 = now_ms();
	http_stream_idle(3, &settings, idle_test_next, idle_test_done, idle_test_idle, &it);
	for (int i = 0; i < 6; i++)
	{
		once &= it.done[i] == 1;
		answered &= it.r[i].status == 200 && strcmp(it.r[i].response.data, "late") == 0;
	}
	ok(once && answered, "every request answered and handed back exactly once");
	is_long(it.worked, 6, "idle() did all the work owed");
	ok(it.worked_full >= 5, "idle() ran while every place was taken (%d of 6 times)", it.worked_full);
	ok(now_ms() - t0 >= 590 && now_ms() - t0 < 950,
	   "the work overlapped the requests: %.0f ms (1,080 if it did not)", now_ms() - t0);
}

static void
cancel_while_slow(void *arg)
{
	perform1((HttpRequest *) arg);
}

static void
alarm_handler(int signo)
{
	InterruptPending = true;
}

static void
test_interrupts(void)
{
	HttpRequest r;
	HttpRequest r2[3];
	HttpRequest *reqs[3] = {&r2[0], &r2[1], &r2[2]};
	struct itimerval it = {{0, 0}, {0, 300 * 1000}};
	double		t0;
	bool		thrown;

	/* a cancel arrives while waiting: the error propagates promptly */
	signal(SIGALRM, alarm_handler);
	setup(&r, "POST", "/slow", "x");
	interrupts_seen = 0;
	t0 = now_ms();
	setitimer(ITIMER_REAL, &it, NULL);
	thrown = catches_error(cancel_while_slow, &r);
	ok(thrown && interrupts_seen == 1, "CHECK_FOR_INTERRUPTS error propagates out of http_perform");
	ok(now_ms() - t0 < 1000, "within %.0f ms", now_ms() - t0);

	/* the aborted transfer was detached: the pool still works */
	reset_ctx(&batch_ctx_data);
	setup(&r, "GET", "/ok", NULL);
	perform1(&r);
	is_long(r.status, 200, "next call after an error works");

	/* postmaster death: give up on everything still running */
	setup(&r2[0], "GET", "/ok", NULL);
	setup(&r2[1], "POST", "/slow", "x");
	setup(&r2[2], "POST", "/slow", "y");
	postmaster_possibly_dead = true;
	pm_checks_before_death = 2;
	t0 = now_ms();
	http_perform(reqs, 3, &settings);
	postmaster_possibly_dead = false;
	pm_checks_before_death = -1;
	ok(now_ms() - t0 < 1500, "postmaster death: returns early (%.0f ms)", now_ms() - t0);
	ok(r2[0].status == 200, "finished request kept its result");
	ok(r2[1].transport_error && r2[1].maybe_sent && r2[2].transport_error && r2[2].maybe_sent &&
	   strstr(r2[1].error, "postmaster") != NULL,
	   "unfinished requests: transport error, maybe sent (%s)", r2[1].error);
}

/* ---------------------------------------------------------------------
 * auth.c
 * ---------------------------------------------------------------------
 */
static AuthConfig
cfg_for(const char *variant, const char *secret)
{
	AuthConfig	c;

	c.target = "t1";
	c.token_url = url(psprintf("/token/%s", variant));
	c.client_id = "client id/1";
	c.client_secret = secret;
	c.scope = "https://contoso.operations.dynamics.com/.default";
	return c;
}

static bool
leaks_secret(const char *msg, const char *secret)
{
	size_t		n = strlen(secret);
	size_t		k;

	/* any 6-byte piece of the secret counts */
	for (k = 0; k + 6 <= n; k++)
	{
		char		piece[7];

		memcpy(piece, secret + k, 6);
		piece[6] = '\0';
		if (strstr(msg, piece))
			return true;
	}
	return false;
}

static void
test_auth(void)
{
	const char *secret = "Sup3r~Secret/With+Symbols&=%Q";
	AuthConfig	c = cfg_for("ok", secret);
	char		err[512];
	char	   *h;
	int			n0;

	n0 = counter(&server_token_requests);
	h = auth_header(&c, false, &settings, err, sizeof(err));
	is_str(h, "Authorization: Bearer tok.en-_~+/1==", "token fetched");
	h = auth_header(&c, false, &settings, err, sizeof(err));
	is_str(h, "Authorization: Bearer tok.en-_~+/1==", "token from cache");
	is_long(counter(&server_token_requests) - n0, 1, "one token request for two calls");
	h = auth_header(&c, true, &settings, err, sizeof(err));
	ok(h != NULL && counter(&server_token_requests) - n0 == 2, "force_refresh fetches again");

	/* a changed configuration is never served a stale token */
	c.scope = "https://other/.default";
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h != NULL && counter(&server_token_requests) - n0 == 3, "changed scope: new token");
	c.client_secret = "another";
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h != NULL && counter(&server_token_requests) - n0 == 4, "changed secret: new token");
	auth_forget_all();
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h != NULL && counter(&server_token_requests) - n0 == 5, "auth_forget_all empties the cache");

	/* v1-style response: string expires_in, lower-case bearer */
	c = cfg_for("v1", secret);
	c.target = "t2";
	h = auth_header(&c, false, &settings, err, sizeof(err));
	is_str(h, "Authorization: Bearer v1token", "string expires_in, token_type bearer");

	/* a 1 s token is renewed after 0.9 s */
	c = cfg_for("short", secret);
	c.target = "t3";
	n0 = counter(&server_token_requests);
	auth_header(&c, false, &settings, err, sizeof(err));
	auth_header(&c, false, &settings, err, sizeof(err));
	is_long(counter(&server_token_requests) - n0, 1, "short token cached");
	usleep(950 * 1000);
	auth_header(&c, false, &settings, err, sizeof(err));
	is_long(counter(&server_token_requests) - n0, 2, "short token renewed after 90% of its life");

	/* failures */
	c = cfg_for("mac", secret);
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL &&
	   strstr(err, "token_type \"mac\"") != NULL, "token_type mac refused: %s", err);
	c = cfg_for("junk", secret);
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL &&
	   strstr(err, "malformed access_token") != NULL, "token with CR/LF refused: %s", err);
	c = cfg_for("badexp", secret);
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL &&
	   strstr(err, "expires_in") != NULL, "bad expires_in refused: %s", err);
	c = cfg_for("notjson", secret);
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL &&
	   strstr(err, "not a JSON object") != NULL, "non-JSON refused: %s", err);
	c = cfg_for("500", secret);
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL, "HTTP 500 fails");
	is_str(err, "token request for target t1 failed: HTTP 500", "HTTP 500: status only, no body");

	c = cfg_for("echo", secret);
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h == NULL && strncmp(err, "token request for target t1 failed: HTTP 401 invalid_client: "
							"AADSTS7000215: Invalid client secret. Trace ID: 1 Request: ", 117) == 0,
	   "401 invalid_client message: %s", err);
	ok(!leaks_secret(err, secret), "echoed secret redacted (raw and form-encoded)");
	ok(strchr(err, '\r') == NULL && strchr(err, '\n') == NULL, "no line breaks in the message");
	ok(strlen(err) <= strlen("token request for target t1 failed: HTTP 401 invalid_client: ") + 203,
	   "description truncated (%zu bytes)", strlen(err));

	c = cfg_for("echolong", secret);
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h == NULL && !leaks_secret(err, secret), "secret cut by truncation still redacted: %s", err);

	/* echoed encoded, cleaned up or cut short: masked all the same */
	{
		static const char *const variants[][2] = {
			{"echojson", "JSON-escaped (\\/)"},
			{"echohtml", "HTML-escaped (&amp;)"},
			{"echoblank", "with its blanks as line breaks"},
			{"echoprefix", "only its start, cut at 200 bytes"},
			{"echoucut", "\\u-escaped, cut at 200 bytes"},
		};
		int			v;

		for (v = 0; v < (int) lengthof(variants); v++)
		{
			const char *sec = strcmp(variants[v][0], "echoblank") == 0 ?
				"Sup3r Secret With Blanks" : secret;
			char		why[64] = "";

			c = cfg_for(variants[v][0], sec);
			h = auth_header(&c, false, &settings, err, sizeof(err));
			ok(h == NULL && strncmp(err, "token request for target t1 failed: HTTP 401 invalid_client: Echo: ", 67) == 0 &&
			   strchr(err, '*') != NULL && !leaks_secret(err, sec) &&
			   !se_leaks(err, strlen(err), sec, why, sizeof(why)),
			   "secret echoed %s: masked: %s", variants[v][1], err + 67);
			if (why[0])
				printf("#   still readable as %s\n", why);
		}
	}

	c = cfg_for("ok", secret);
	c.token_url = psprintf("http://127.0.0.1:%d/token/ok", closed_port());
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h == NULL && strncmp(err, "token request for target t1 failed: Failed to connect", 53) == 0,
	   "transport failure: %s", err);

	c.token_url = "http://login.example.com/token";
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL &&
	   strstr(err, "must use https") != NULL, "plain http to a remote host refused: %s", err);
	c.token_url = "http://127.evil.example/token";
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL,
	   "127.-prefixed host name is not loopback");
	c.token_url = "ldap://127.0.0.1/";
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL, "other schemes refused");
	c = cfg_for("ok", "");
	ok(auth_header(&c, false, &settings, err, sizeof(err)) == NULL &&
	   strstr(err, "lacks") != NULL, "empty secret refused: %s", err);

	/* tiny error buffers are fine */
	c = cfg_for("500", secret);
	ok(auth_header(&c, false, &settings, err, 8) == NULL && strlen(err) == 7,
	   "message truncated to errlen");
	ok(auth_header(&c, false, &settings, NULL, 0) == NULL, "err may be NULL");
}

/* ---------------------------------------------------------------------
 * Against test/mock-d365 (optional)
 * ---------------------------------------------------------------------
 */
static int	mock_port;

static char *
mock_url(const char *path)
{
	return psprintf("http://127.0.0.1:%d%s", mock_port, path);
}

static long
mock_admin(const char *method, const char *path, const char *json, cJSON **out)
{
	static const char *const hdrs[] = {"Content-Type: application/json", NULL};
	HttpRequest r = {0};

	r.method = method;
	r.url = mock_url(path);
	r.headers = hdrs;
	r.body = json;
	r.body_len = json ? strlen(json) : 0;
	perform1(&r);
	if (out)
		*out = cJSON_ParseWithLength(r.response.data, r.response.len);
	return r.status;
}

static int
mock_batches(void)
{
	cJSON	   *stats = NULL;
	int			n = -1;

	mock_admin("GET", "/_admin/stats", NULL, &stats);
	if (stats && cJSON_IsNumber(cJSON_GetObjectItem(stats, "batches")))
		n = cJSON_GetObjectItem(stats, "batches")->valueint;
	cJSON_Delete(stats);
	return n;
}

static const char batch_body[] =
"--batch_1\r\n"
"Content-Type: multipart/mixed; boundary=changeset_1\r\n"
"\r\n"
"--changeset_1\r\n"
"Content-Type: application/http\r\n"
"Content-Transfer-Encoding: binary\r\n"
"Content-ID: 1\r\n"
"\r\n"
"POST VendorInvoices HTTP/1.1\r\n"
"Content-Type: application/json; type=entry\r\n"
"\r\n"
"{\"VendorAccount\":\"V1\",\"InvoiceNumber\":\"%s\"}\r\n"
"--changeset_1--\r\n"
"--batch_1--\r\n";

static void
mock_batch(HttpRequest *r, const char *auth, const char *invoice)
{
	const char **hdrs = palloc(4 * sizeof(char *));

	hdrs[0] = "Content-Type: multipart/mixed; boundary=batch_1";
	hdrs[1] = "OData-Version: 4.0";
	hdrs[2] = auth;
	hdrs[3] = NULL;
	memset(r, 0, sizeof(*r));
	r->method = "POST";
	r->url = mock_url("/api/data/v9.2/$batch");
	r->headers = hdrs;
	r->body = psprintf(batch_body, invoice);
	r->body_len = strlen(r->body);
	perform1(r);
}

static void
test_mock(void)
{
	AuthConfig	c;
	char		err[512];
	char	   *h;
	HttpRequest r;
	int			before;

	mock_admin("POST", "/_admin/reset", "{}", NULL);
	is_long(mock_admin("POST", "/_admin/config", "{\"require_auth\":true}", NULL), 200,
			"mock: require_auth on");

	c.target = "mock";
	c.token_url = mock_url("/tenant/oauth2/v2.0/token");
	c.client_id = "test-client";
	c.client_secret = "wrong-secret";
	c.scope = "https://mock/.default";
	h = auth_header(&c, false, &settings, err, sizeof(err));
	is_str(h ? "token" : err, "token request for target mock failed: HTTP 401 invalid_client",
		   "mock: wrong secret");

	c.client_secret = "test-secret";
	h = auth_header(&c, false, &settings, err, sizeof(err));
	ok(h != NULL && strncmp(h, "Authorization: Bearer ", 22) == 0, "mock: token (%s)", h ? "ok" : err);
	if (h == NULL)
		return;

	mock_batch(&r, h, "I1");
	is_long(r.status, 200, "mock: $batch accepted");
	ok(r.content_type && strncmp(r.content_type, "multipart/mixed; boundary=", 26) == 0,
	   "mock: multipart answer (%s)", r.content_type ? r.content_type : "none");
	ok(strstr(r.response.data, "201 Created") != NULL, "mock: operation created");

	mock_batch(&r, "X-No-Auth: 1", "I2");
	is_long(r.status, 401, "mock: no token, 401");

	/* a token the server forgot: 401, then force_refresh */
	mock_admin("POST", "/_admin/config", "{\"fault_next\":{\"expire_token\":1}}", NULL);
	mock_batch(&r, h, "I3");
	is_long(r.status, 401, "mock: expired token, 401");
	h = auth_header(&c, false, &settings, err, sizeof(err));
	mock_batch(&r, h, "I3");
	is_long(r.status, 401, "mock: the cached token is still the stale one");
	h = auth_header(&c, true, &settings, err, sizeof(err));
	mock_batch(&r, h, "I3");
	is_long(r.status, 200, "mock: force_refresh fixes it");

	mock_admin("POST", "/_admin/config", "{\"fault_next\":{\"throttle\":1}}", NULL);
	mock_batch(&r, h, "I4");
	ok(r.status == 429 && r.retry_after != NULL, "mock: 429 with Retry-After %s",
	   r.retry_after ? r.retry_after : "(none)");

	/* processed, then dropped: reported as maybe sent, and not resent */
	mock_batch(&r, h, "I5");
	before = mock_batches();
	mock_admin("POST", "/_admin/config", "{\"fault_next\":{\"drop_after\":1}}", NULL);
	mock_batch(&r, h, "I6");
	ok(r.transport_error && r.maybe_sent, "mock: batch dropped after processing: maybe sent (%s)",
	   r.error);
	is_long(mock_batches() - before, 1, "mock: the batch reached the server once");

	mock_admin("POST", "/_admin/config", "{\"fault_next\":{\"drop_before\":1}}", NULL);
	mock_batch(&r, h, "I7");
	ok(r.transport_error && r.maybe_sent, "mock: batch dropped before processing: maybe sent (%s)",
	   r.error);

	mock_admin("POST", "/_admin/reset", "{}", NULL);
}

/* ---------------------------------------------------------------------
 * main
 * ---------------------------------------------------------------------
 */
static void
run(const char *name, void (*fn) (void))
{
	long		top_before = live_chunks(TopMemoryContext);

	printf("# %s\n", name);
	fn();
	/* what the caller's per-batch reset does */
	reset_ctx(&batch_ctx_data);
	if (top_before > 0 && fn != test_concurrency_and_reuse && fn != test_auth &&
		fn != test_mock)
		is_long(live_chunks(TopMemoryContext), top_before,
				"nothing left behind in TopMemoryContext");
}

int
main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	server_start();

	run("basic", test_basic);
	run("status and headers", test_status_and_headers);
	run("transport errors", test_transport_errors);
	run("no silent resend", test_no_silent_resend);
	run("too large", test_too_large);
	run("oom", test_oom_in_callback);
	run("concurrency", test_concurrency_and_reuse);
	run("sliding window", test_stream);
	run("paced window", test_paced_stream);
	run("window with idle work", test_idle_stream);
	run("interrupts", test_interrupts);
	run("auth", test_auth);
	if (getenv("D365INV_MOCK_PORT") != NULL)
	{
		mock_port = atoi(getenv("D365INV_MOCK_PORT"));
		run("mock-d365", test_mock);
	}

	auth_forget_all();
	http_cleanup();
	http_cleanup();
	is_long(live_chunks(TopMemoryContext), 0, "http_cleanup and auth_forget_all free everything");

	return tap_done();
}
