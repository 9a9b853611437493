/*-------------------------------------------------------------------------
 *
 * batch_response.h
 *	  Zero-allocation parser for an OData 4.0 $batch response
 *	  (multipart/mixed, RFC 2046; OData 4.0 Part 1 section 11.7).
 *
 * This module owns the wire format of the $batch *response* only: finding
 * the boundary, splitting parts, descending into changesets, and slicing
 * each inner HTTP response into status / headers / body.  It never copies
 * or allocates: every BrSlice points into the caller's buffer, which must
 * therefore outlive the BatchPart array.
 *
 * Pure C99, no PostgreSQL headers, no global state: the same object is
 * linked into the backend and into the standalone fuzz/unit-test builds.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_BATCH_RESPONSE_H
#define D365INV_BATCH_RESPONSE_H

#include <stdbool.h>
#include <stddef.h>

/* A view into the caller's buffer; never NUL-terminated. */
typedef struct BrSlice
{
	const char *ptr;
	size_t		len;
} BrSlice;

typedef struct BatchPart
{
	BrSlice		content_id;		/* Content-ID (MIME part header, else inner
								 * request header); len 0 when absent */
	int			http_status;	/* from the inner "HTTP/1.1 201 Created"
								 * line; 0 if that line is unparsable */
	BrSlice		reason;			/* reason phrase; the whole raw first line
								 * when http_status is 0 */
	BrSlice		headers;		/* raw inner HTTP header block, for
								 * br_header_get / br_header_next */
	BrSlice		body;			/* inner HTTP body (may be empty) */
	bool		in_changeset;	/* part came from a nested changeset
								 * multipart */
	int			position;		/* 0-based order of this operation response
								 * in the response */

	/* additions */
	bool		truncated;		/* input ended inside this part's body: the
								 * status line and headers are complete,
								 * the body may not be.  Never treat such a
								 * body as complete. */
	int			changeset;		/* 0-based ordinal of the changeset this part
								 * belongs to, -1 when not in a changeset;
								 * parts sharing it share one transaction */
	BrSlice		mime_headers;	/* raw MIME part header block (Content-Type,
								 * Content-ID, ...) of the application/http
								 * part */
} BatchPart;

typedef enum BrStatus
{
	BR_OK = 0,
	BR_TRUNCATED,				/* input ended before the closing delimiter */
	BR_MALFORMED,				/* structurally invalid */
	BR_NO_BOUNDARY,				/* Content-Type not multipart or no usable
								 * boundary (top level or changeset) */
	BR_TOO_MANY_PARTS,			/* more operation responses than max_parts */
	BR_TOO_LARGE				/* body_len > BR_MAX_BODY_BYTES */
} BrStatus;

#define BR_MAX_BODY_BYTES (64 * 1024 * 1024)	/* explicit size limit */
#define BR_MAX_DEPTH 2			/* batch > changeset */
#define BR_MAX_BOUNDARY 70		/* RFC 2046 */

typedef struct BatchParse
{
	BrStatus	status;			/* BR_OK only if the closing delimiter was
								 * seen and every part parsed */
	const char *error;			/* static human-readable description of the
								 * first problem, NULL when OK */
	int			nparts;			/* parts written to the caller's array */
	size_t		error_offset;	/* byte offset in body where the problem was
								 * found */
} BatchParse;

/*
 * Extract the boundary parameter from a Content-Type value: quoted or not,
 * any parameter order, case-insensitive parameter name, RFC 2046 length
 * limit (1..70) and character set.  Writes NUL-terminated into out[71].
 * Does not check the media type; br_parse additionally requires multipart/.
 */
extern bool br_boundary(const char *content_type, size_t len,
						char out[BR_MAX_BOUNDARY + 1]);

/*
 * Parse; fills up to max_parts parts; returns result->status.  Never reads
 * outside [body, body+body_len), never allocates, never crashes: on
 * malformed/truncated input it returns the parts it could parse completely
 * (plus, on truncation, the part that was cut inside its body, flagged
 * truncated) and a non-OK status.  Parsing stops at the first problem.
 * result may be NULL; parts may be NULL when max_parts is 0.
 */
extern BrStatus br_parse(const char *content_type, size_t ct_len,
						 const char *body, size_t body_len,
						 BatchPart *parts, int max_parts,
						 BatchParse *result);

/* Static name of a status ("ok", "truncated", ...), for messages. */
extern const char *br_status_name(BrStatus status);

/* p[0..len) equals the NUL-terminated lit, ASCII case-insensitively */
extern bool br_ieq(const char *p, size_t len, const char *lit);

/*
 * Header lookup in a raw "Name: value" line block (CRLF or LF).  Name is
 * matched case-insensitively, the first occurrence wins, the value is
 * trimmed of surrounding whitespace.  An (obsolete) folded value is
 * returned raw, continuation lines included; lines that are not a valid
 * "token: value" header are skipped; an empty line ends the block.
 */
extern bool br_header_get(BrSlice headers, const char *name, BrSlice *value);

typedef struct BrHeaderIter
{
	BrSlice		rest;
} BrHeaderIter;

extern void br_header_iter_init(BrHeaderIter *it, BrSlice headers);
extern bool br_header_next(BrHeaderIter *it, BrSlice *name, BrSlice *value);

#endif							/* D365INV_BATCH_RESPONSE_H */
