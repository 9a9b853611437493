/*-------------------------------------------------------------------------
 *
 * request.c
 *	  The HTTP requests a delivery sends: the OData headers, the $batch POST
 *	  of a set of invoices, and the batch_log entry each request gets;
 *	  also the HTTP settings from the GUCs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "d365inv.h"
#include "classify.h"
#include "request.h"

const char *const *
wire_headers(const char *content_type, const char *auth)
{
	const char **h = palloc0(sizeof(char *) * 8);
	int			n = 0;

	if (content_type)
		h[n++] = psprintf("Content-Type: %s", content_type);
	h[n++] = "Accept: multipart/mixed, application/json";
	h[n++] = "OData-Version: 4.0";
	h[n++] = "OData-MaxVersion: 4.0";
	/* independent operations: one failure must not stop the others */
	h[n++] = "Prefer: odata.continue-on-error";
	if (auth)
		h[n++] = auth;
	h[n] = NULL;
	return h;
}

/* The HTTP request carrying one $batch of these rows; *noperations if wanted */
HttpRequest *
batch_http_request(const Target *t, BatchKind kind, InvoiceRow *rows, int nrows,
				   const char *auth, int *noperations)
{
	BatchRequest br;
	HttpRequest *req = palloc0(sizeof(HttpRequest));

	build_batch_request(t, kind, rows, nrows, &br);
	req->method = "POST";
	req->url = psprintf("%s$batch", t->service_root);
	req->headers = wire_headers(br.content_type, auth);
	req->body = br.body.data;
	req->body_len = br.body.len;
	if (noperations)
		*noperations = br.noperations;
	return req;
}

const char *
request_kind_name(RequestKind kind)
{
	static const char *const labels[] = {"create", "upsert", "upsert_create_only", "lookup", "config"};

	StaticAssertStmt(lengthof(labels) == REQUEST_CONFIG + 1, "one label per request kind");
	return labels[kind];
}

RequestKind
request_kind_for(WriteMode mode)
{
	switch (mode)
	{
		case WRITE_CREATE:
			return REQUEST_CREATE;
		case WRITE_UPSERT:
			return REQUEST_UPSERT;
		case WRITE_UPSERT_CREATE_ONLY:
			return REQUEST_UPSERT_CREATE_ONLY;
	}
	elog(ERROR, "d365inv: unknown write mode %d", (int) mode);
	return REQUEST_CREATE;		/* keep compiler quiet */
}

RequestLog *
request_log_new(RequestKind kind, TimestampTz sent_at, const HttpRequest *req, int operations,
				int invoices)
{
	RequestLog *log = palloc0(sizeof(RequestLog));

	log->kind = kind;
	log->duration_ms = req->elapsed_ms;
	log->started_at = sent_at;
	log->http_status = req->status;
	log->operations = operations;
	log->invoices = invoices;
	log->retry_after = -1;
	if (req->transport_error)
		log->error = pstrdup(req->error);
	return log;
}

/* "HTTP 503: <OData message or the start of the body>" */
char *
describe_body(const char *body, size_t len, long status)
{
	char		code[128];
	char		message[512];

	if (odata_error_extract(body, len, code, sizeof(code), message, sizeof(message)))
		return psprintf("HTTP %ld: %s%s%s%s", status, message,
						code[0] ? " (" : "", code, code[0] ? ")" : "");
	else
	{
		StringInfoData s;
		size_t		n = Min(len, 200);

		initStringInfo(&s);
		appendStringInfo(&s, "HTTP %ld", status);
		if (n > 0)
		{
			appendStringInfoString(&s, ": ");
			for (size_t i = 0; i < n; i++)
			{
				unsigned char c = (unsigned char) body[i];

				appendStringInfoChar(&s, (c < 0x20 || c == 0x7f || c >= 0x80) ? ' ' : (char) c);
			}
		}
		return s.data;
	}
}

HttpSettings
http_settings_from_gucs(void)
{
	HttpSettings s;

	s.connect_timeout_ms = d365inv_http_connect_timeout_ms;
	s.timeout_ms = d365inv_http_timeout_ms;
	s.max_response_bytes = (size_t) d365inv_max_response_kb * 1024;
	s.ca_file = (d365inv_ca_file && d365inv_ca_file[0]) ? d365inv_ca_file : NULL;
	return s;
}
