/*-------------------------------------------------------------------------
 *
 * classify.h
 *	  Outcome classifier for one OData operation response.
 *
 * This module owns the decision "what does this inner HTTP response mean
 * for the invoice": created / duplicate / retry / review / auth, plus the
 * facts needed to act on it (new D365 id, OData error code and text,
 * Retry-After).  It does not know about batches or the database.
 *
 * Pure C99 plus cJSON, no PostgreSQL headers, no global state.  cJSON
 * allocates with malloc (or whatever cJSON_InitHooks installed); every
 * allocation is freed before returning.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_CLASSIFY_H
#define D365INV_CLASSIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "batch_response.h"

typedef enum Outcome
{
	OUTCOME_CREATED,
	OUTCOME_DUPLICATE,
	OUTCOME_RETRY,
	OUTCOME_REVIEW,
	OUTCOME_AUTH
} Outcome;

/* "created", "duplicate", "retry", "review", "auth" */
extern const char *outcome_name(Outcome o);

typedef struct ClassifyConfig
{
	/* NULL pointer = default {409, 412}; non-NULL with 0 entries = none */
	const int  *duplicate_statuses;
	int			n_duplicate_statuses;
	/* e.g. "0x80040237", "0x80060892", "0x80040333"; exact, case-insensitive */
	const char *const *duplicate_codes;
	int			n_duplicate_codes;
	/* case-insensitive substrings of error.message or innererror.message */
	const char *const *duplicate_messages;
	int			n_duplicate_messages;
	/* JSON body property holding the new id, e.g. "InvoiceId"; may be NULL */
	const char *id_property;

	/*
	 * The target's service root, e.g. "https://contoso.crm.dynamics.com/
	 * api/data/v9.2/".  An id is taken from an absolute OData-EntityId or
	 * Location URL only when that URL is same-origin with it (see
	 * classify_same_origin); with NULL, only from relative references.
	 */
	const char *service_root;
} ClassifyConfig;

typedef struct Classification
{
	Outcome		outcome;
	char		d365_id[256];	/* created only: body JSON id_property (string
								 * or number), else OData-EntityId, else
								 * Location: the text inside the last (...)
								 * of the URL, percent-decoded; a URL that
								 * is not same-origin with the service root
								 * is ignored.  Left empty rather than
								 * truncated if it does not fit. */
	char		error_code[128];	/* from {"error":{"code":..}} when present */
	char		error_text[1024];	/* "HTTP 400: <message>" (plus innererror
									 * message if different), else the raw
									 * body; valid UTF-8, no control chars */
	int			retry_after;	/* Retry-After in seconds, at most
								 * CLASSIFY_RETRY_AFTER_MAX; -1 when absent
								 * or unparsable; filled whatever the
								 * outcome */
	bool		retry_after_capped; /* the server asked for more than
									 * CLASSIFY_RETRY_AFTER_MAX seconds */
} Classification;

/* Bodies larger than this are not handed to the JSON parser. */
#define CLASSIFY_MAX_JSON_BYTES (4 * 1024 * 1024)

/*
 * headers: raw header block as produced by br_parse (or any "Name: value\n"
 * block).  cfg may be NULL (defaults).  now is used for HTTP-date
 * Retry-After values only.
 */
extern void classify_response(const ClassifyConfig *cfg, int http_status,
							  BrSlice headers, BrSlice body, time_t now,
							  Classification *out);

/*
 * Extract code and message from an OData JSON error body
 * ({"error":{"code":..,"message":..,"innererror":{"message":..}}}; the
 * OData v3 "odata.error" spelling with message {"value":..} is accepted
 * too).  message gets error.message, plus the innererror message when it
 * differs.  Outputs are NUL-terminated, valid UTF-8, control characters
 * replaced, truncated on a character boundary; either size may be 0 to
 * skip that output.  Returns false (outputs empty) if the body is not such
 * an error object.
 */
extern bool odata_error_extract(const char *body, size_t len,
								char *code, size_t code_size,
								char *message, size_t msg_size);

/*
 * Longest wait a Retry-After may ask for, in seconds (one day).  A longer
 * one (a delta of 999999999999, a date in the year 9999) is read as this
 * many seconds and reported as capped; the caller applies its own, usually
 * shorter, limit (d365inv.retry_max_delay) on top.
 */
#define CLASSIFY_RETRY_AFTER_MAX 86400

/*
 * Retry-After value: delta-seconds, or an HTTP-date (IMF-fixdate, RFC 850,
 * asctime) relative to now; dates in the past give 0; values above
 * CLASSIFY_RETRY_AFTER_MAX give CLASSIFY_RETRY_AFTER_MAX and set *capped
 * (capped may be NULL).  Returns -1 if unparsable.  Locale- and
 * timezone-independent; any digit count and any now are safe (now is taken
 * as within 1970..9999).
 */
extern int	parse_retry_after_capped(const char *value, size_t len, time_t now,
									 bool *capped);
/* the same, without telling whether it was capped */
extern int	parse_retry_after(const char *value, size_t len, time_t now);

/*
 * Is url (len bytes, surrounding blanks ignored) same-origin with
 * service_root?  True for a relative reference (it resolves against the
 * request, which went to the service root) and for an absolute http(s) URL
 * with the service root's scheme, host (ASCII case-insensitive) and port
 * (80 and 443 implied by http and https).  False for everything else,
 * including what some URL parser might resolve elsewhere: a network-path
 * reference ("//host") to another host, backslashes for the slashes before
 * a host ("\\host", "https:\\host"), user info ("https://root@evil"), a
 * backslash in the authority, percent-encoded or non-ASCII host names,
 * control characters anywhere in the URL, an empty or out-of-range port,
 * and any absolute URL when service_root is NULL or not an http(s) URL.
 */
extern bool classify_same_origin(const char *url, size_t len,
								 const char *service_root);

/*
 * The entity id in an OData-EntityId or Location value, as classify_response
 * takes it: the text inside the last top-level (...) of the path,
 * percent-decoded, copied only when it fits whole and is valid UTF-8 without
 * control characters, and only when the URL is same-origin with
 * service_root.  Returns false (out[0] = '\0' if size > 0) otherwise.
 */
extern bool classify_entity_id(const char *url, size_t len,
							   const char *service_root, char *out,
							   size_t size);

/*
 * A JSON number as an id's text, the way a human (and D365) would write
 * it: an integer of magnitude below 2^53 in plain digits, anything else as
 * %.17g (so 12345678901234567890 is "1.2345678901234567e+19").  The one
 * conversion of numeric ids: created answers here, lookups and
 * refresh_remote_keys() through odata_page.c.
 */
extern void classify_json_number(double v, char *buf, size_t size);

#endif							/* D365INV_CLASSIFY_H */
