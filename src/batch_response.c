/*-------------------------------------------------------------------------
 *
 * batch_response.c
 *	  Zero-allocation parser for an OData 4.0 $batch multipart/mixed
 *	  response.
 *
 * Owns: boundary extraction, delimiter recognition, part splitting,
 * changeset recursion, inner HTTP response slicing and header iteration.
 * Does not own: what an operation's status means (classify.c).
 *
 * Design notes
 *	- Everything is a slice of the caller's buffer; nothing is copied, so
 *	  nothing is allocated and nothing needs NUL termination.
 *	- Every scan moves forward line by line with memchr, and a delimiter
 *	  comparison stops at the first mismatching byte, so the cost is linear
 *	  in the input: each byte is looked at by the batch-level scan, at most
 *	  once more by the changeset-level scan and once more by the header
 *	  scan of its part.
 *	- CRLF and bare LF are both accepted as line ends everywhere; a CR is
 *	  only ever stripped directly before an LF.
 *	- Parsing stops at the first problem.  Whatever follows a structural
 *	  error cannot be matched to a request reliably, and callers act on
 *	  these results (retry / mark created), so we prefer to say less.
 *
 * Pure C99, no PostgreSQL headers, no global state.
 *
 *-------------------------------------------------------------------------
 */
#include "batch_response.h"

#include <string.h>

/* What sits at the beginning of a line, as far as delimiters go. */
typedef enum DelimKind
{
	DL_NONE,					/* not a delimiter line */
	DL_PART,					/* "--boundary" + padding + line end */
	DL_CLOSE,					/* "--boundary--" + padding + (line end|EOF) */
	DL_PARTIAL					/* input ends while it could still become one */
} DelimKind;

typedef struct ParseCtx
{
	const char *base;			/* start of the whole body, for offsets */
	BatchPart  *parts;
	int			max_parts;
	int			nparts;
	int			nchangesets;
	BrStatus	status;
	const char *error;
	size_t		error_offset;
} ParseCtx;

static void parse_multipart(ParseCtx *cx, const char *start, const char *end,
							const char *bnd, size_t blen, int depth,
							int changeset, bool eof_is_cut);


/* ---------------------------------------------------------------------
 * Small character helpers (locale-independent on purpose: header names
 * and HTTP syntax are ASCII, and the backend may run under any locale).
 * ---------------------------------------------------------------------
 */
static inline char
ascii_lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? (char) (c + ('a' - 'A')) : c;
}

static inline bool
is_ws(char c)
{
	return c == ' ' || c == '\t';
}

static inline bool
is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/* RFC 7230 tchar: what a header name or a parameter name may consist of */
static bool
is_tchar(char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || is_digit(c))
		return true;
	return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* RFC 2046 bchars (without the space, which is handled by the caller) */
static bool
is_bchar_nospace(char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || is_digit(c))
		return true;
	return c != '\0' && strchr("'()+_,-./:=?", c) != NULL;
}

bool
br_ieq(const char *p, size_t len, const char *lit)
{
	size_t		i;

	for (i = 0; i < len; i++)
	{
		if (lit[i] == '\0' || ascii_lower(p[i]) != ascii_lower(lit[i]))
			return false;
	}
	return lit[len] == '\0';
}

static bool
slice_iprefix(const char *p, size_t len, const char *lit)
{
	size_t		n = strlen(lit);

	return len >= n && br_ieq(p, n, lit);
}

static BrSlice
mk_slice(const char *p, const char *e)
{
	BrSlice		s;

	s.ptr = p;
	s.len = (size_t) (e - p);
	return s;
}

static void
trim(const char **p, const char **e)
{
	while (*p < *e && (is_ws(**p) || **p == '\r' || **p == '\n'))
		(*p)++;
	while (*e > *p && (is_ws((*e)[-1]) || (*e)[-1] == '\r' || (*e)[-1] == '\n'))
		(*e)--;
}

/*
 * Find the end of the line starting at p.  Returns the end of the line's
 * content (a CR before the LF excluded) and sets *next to the start of the
 * next line and *terminated to whether an LF was found.  An unterminated
 * line runs to end.
 */
static const char *
line_end(const char *p, const char *end, const char **next, bool *terminated)
{
	const char *lf = memchr(p, '\n', (size_t) (end - p));

	if (lf == NULL)
	{
		*next = end;
		*terminated = false;
		return end;
	}
	*next = lf + 1;
	*terminated = true;
	if (lf > p && lf[-1] == '\r')
		return lf - 1;
	return lf;
}

static void
fail(ParseCtx *cx, BrStatus status, const char *msg, const char *at)
{
	/* first problem wins; later ones are usually consequences */
	if (cx->status != BR_OK)
		return;
	cx->status = status;
	cx->error = msg;
	cx->error_offset = (size_t) (at - cx->base);
}


/* ---------------------------------------------------------------------
 * Content-Type parameters
 * ---------------------------------------------------------------------
 */

/* Does a Content-Type value name a multipart media type? */
static bool
ct_is_multipart(const char *ct, size_t len)
{
	const char *p = ct;
	const char *e = ct + len;

	while (p < e && is_ws(*p))
		p++;
	return slice_iprefix(p, (size_t) (e - p), "multipart/");
}

bool
br_boundary(const char *content_type, size_t len, char out[BR_MAX_BOUNDARY + 1])
{
	const char *p = content_type;
	const char *e;

	out[0] = '\0';
	if (content_type == NULL)
		return false;
	e = content_type + len;

	/* skip the media type; it cannot contain ';' or quotes */
	while (p < e && *p != ';')
		p++;

	while (p < e)
	{
		const char *name;
		size_t		name_len;
		char		val[BR_MAX_BOUNDARY + 1];
		size_t		vlen = 0;
		bool		too_long = false;
		bool		bad = false;

		/* here *p == ';' */
		p++;
		while (p < e && is_ws(*p))
			p++;
		name = p;
		while (p < e && is_tchar(*p))
			p++;
		name_len = (size_t) (p - name);
		while (p < e && is_ws(*p))
			p++;

		if (name_len > 0 && p < e && *p == '=')
		{
			p++;
			while (p < e && is_ws(*p))
				p++;
			if (p < e && *p == '"')
			{
				bool		closed = false;

				p++;
				while (p < e)
				{
					char		c = *p++;

					if (c == '"')
					{
						closed = true;
						break;
					}
					if (c == '\\')
					{
						if (p == e)
							break;
						c = *p++;
					}
					if (vlen < BR_MAX_BOUNDARY)
						val[vlen++] = c;
					else
						too_long = true;
				}
				/* an unterminated quoted string poisons the whole header */
				if (!closed)
					return false;
			}
			else
			{
				/*
				 * Unquoted: accept up to ';' or whitespace.  Strictly this
				 * must be a token, but servers send e.g. boundary=batch(guid)
				 * and the bchars check below still applies.
				 */
				while (p < e && *p != ';' && !is_ws(*p))
				{
					if (*p == '"')
						bad = true;
					if (vlen < BR_MAX_BOUNDARY)
						val[vlen++] = *p;
					else
						too_long = true;
					p++;
				}
			}
			val[vlen] = '\0';

			if (br_ieq(name, name_len, "boundary"))
			{
				size_t		i;

				if (bad || too_long || vlen == 0 || val[vlen - 1] == ' ')
					return false;
				for (i = 0; i < vlen; i++)
				{
					if (val[i] != ' ' && !is_bchar_nospace(val[i]))
						return false;
				}
				memcpy(out, val, vlen + 1);
				return true;
			}
		}

		/*
		 * Skip whatever is left of this parameter (garbage after a value, a
		 * parameter without '=') up to the next ';' outside quotes, so that
		 * a quoted "...; boundary=x" inside another parameter is never
		 * mistaken for ours.
		 */
		{
			bool		inq = false;

			while (p < e && (inq || *p != ';'))
			{
				if (inq && *p == '\\' && p + 1 < e)
					p++;
				else if (*p == '"')
					inq = !inq;
				p++;
			}
		}
	}
	return false;
}


/* ---------------------------------------------------------------------
 * Header blocks
 * ---------------------------------------------------------------------
 */
void
br_header_iter_init(BrHeaderIter *it, BrSlice headers)
{
	it->rest = headers;
	if (it->rest.ptr == NULL)
		it->rest.len = 0;
}

bool
br_header_next(BrHeaderIter *it, BrSlice *name, BrSlice *value)
{
	const char *p = it->rest.ptr;
	const char *end = p + it->rest.len;

	while (it->rest.len > 0 && p < end)
	{
		const char *next;
		const char *le;
		const char *colon;
		const char *n;
		const char *v;
		const char *ve;
		bool		term;

		le = line_end(p, end, &next, &term);

		/* an empty line ends a header block */
		if (le == p)
		{
			it->rest.len = 0;
			return false;
		}

		/*
		 * A line starting with whitespace continues a previous header
		 * (obs-fold).  Reaching one here means its header was skipped, so
		 * skip it too rather than reading " Name: x" as a header.
		 */
		if (is_ws(*p))
		{
			p = next;
			continue;
		}

		n = p;
		while (n < le && is_tchar(*n))
			n++;
		colon = n;
		if (colon == p || colon == le || *colon != ':')
		{
			/* not "token:"; e.g. "Name : v" or garbage: skip the line */
			p = next;
			continue;
		}

		v = colon + 1;
		ve = le;

		/* absorb obs-fold continuation lines into the raw value */
		while (next < end && is_ws(*next))
		{
			const char *cnext;
			const char *cle = line_end(next, end, &cnext, &term);

			ve = cle;
			next = cnext;
		}

		trim(&v, &ve);
		name->ptr = p;
		name->len = (size_t) (colon - p);
		value->ptr = v;
		value->len = (size_t) (ve - v);
		it->rest.ptr = next;
		it->rest.len = (size_t) (end - next);
		return true;
	}
	it->rest.len = 0;
	return false;
}

bool
br_header_get(BrSlice headers, const char *name, BrSlice *value)
{
	BrHeaderIter it;
	BrSlice		n;
	BrSlice		v;

	if (name == NULL)
		return false;
	br_header_iter_init(&it, headers);
	while (br_header_next(&it, &n, &v))
	{
		if (br_ieq(n.ptr, n.len, name))
		{
			if (value)
				*value = v;
			return true;
		}
	}
	if (value)
	{
		value->ptr = NULL;
		value->len = 0;
	}
	return false;
}


/* ---------------------------------------------------------------------
 * Delimiters
 * ---------------------------------------------------------------------
 */

/*
 * Classify the line starting at p (which must be at a line start).  The
 * comparison stops at the first mismatch, so it costs at most the length of
 * the line plus one.  On DL_PART / DL_CLOSE, *after is the start of the
 * next line (or end).
 */
static DelimKind
match_delim(const char *p, const char *end, const char *bnd, size_t blen,
			const char **after)
{
	size_t		avail = (size_t) (end - p);
	size_t		i;
	const char *q;
	bool		closing = false;

	for (i = 0; i < blen + 2; i++)
	{
		char		want = (i < 2) ? '-' : bnd[i - 2];

		if (i == avail)
			return DL_PARTIAL;
		if (p[i] != want)
			return DL_NONE;
	}
	q = p + blen + 2;

	if (end - q >= 2 && q[0] == '-' && q[1] == '-')
	{
		closing = true;
		q += 2;
	}
	else if (end - q == 1 && q[0] == '-')
		return DL_PARTIAL;

	/* transport padding */
	while (q < end && is_ws(*q))
		q++;

	if (q < end && *q == '\r')
	{
		q++;
		if (q < end && *q != '\n')
			return DL_NONE;
	}
	if (q == end)
	{
		/* a closing delimiter may end the input; a part delimiter may not */
		if (closing)
		{
			*after = end;
			return DL_CLOSE;
		}
		return DL_PARTIAL;
	}
	if (*q != '\n')
		return DL_NONE;
	*after = q + 1;
	return closing ? DL_CLOSE : DL_PART;
}

/*
 * Scan forward from line start p for the next delimiter line.  Returns its
 * kind and sets *dstart to the start of that line (DL_NONE: no delimiter
 * at all; DL_PARTIAL: the last, unterminated line could still have become
 * one).
 */
static DelimKind
find_delim(const char *p, const char *end, const char *bnd, size_t blen,
		   const char **dstart, const char **after)
{
	while (p < end)
	{
		DelimKind	k = match_delim(p, end, bnd, blen, after);
		const char *lf;

		if (k != DL_NONE)
		{
			*dstart = p;
			return k;
		}
		lf = memchr(p, '\n', (size_t) (end - p));
		if (lf == NULL)
			break;
		p = lf + 1;
	}
	*dstart = end;
	return DL_NONE;
}

/*
 * The line break in front of a delimiter belongs to the delimiter
 * (RFC 2046 "delimiter := CRLF dash-boundary"), not to the part before it.
 */
static const char *
strip_delim_linebreak(const char *part_start, const char *d)
{
	if (d > part_start && d[-1] == '\n')
	{
		d--;
		if (d > part_start && d[-1] == '\r')
			d--;
	}
	return d;
}


/* ---------------------------------------------------------------------
 * Parts
 * ---------------------------------------------------------------------
 */

/*
 * Parse "HTTP/1.x SP 3DIGIT [SP reason]" in [p, e).  Returns the status,
 * or 0 if the line does not look like an HTTP/1 status line or the code is
 * outside 100..599.
 */
static int
parse_status_line(const char *p, const char *e, BrSlice *reason)
{
	const char *q = p;
	int			status;

	reason->ptr = p;
	reason->len = (size_t) (e - p);

	if (e - q < 8 || memcmp(q, "HTTP/", 5) != 0 || !is_digit(q[5]) ||
		q[6] != '.' || !is_digit(q[7]))
		return 0;
	q += 8;
	if (q == e || !is_ws(*q))
		return 0;
	while (q < e && is_ws(*q))
		q++;
	if (e - q < 3 || !is_digit(q[0]) || !is_digit(q[1]) || !is_digit(q[2]))
		return 0;
	status = (q[0] - '0') * 100 + (q[1] - '0') * 10 + (q[2] - '0');
	q += 3;
	if (q < e && !is_ws(*q))
		return 0;
	if (status < 100 || status > 599)
		return 0;
	while (q < e && is_ws(*q))
		q++;
	while (e > q && is_ws(e[-1]))
		e--;
	reason->ptr = q;
	reason->len = (size_t) (e - q);
	return status;
}

/*
 * Find the end of a header block starting at p: the first empty line.
 * Returns true and sets *hend (end of the block, i.e. start of the empty
 * line) and *body (start of what follows the empty line) if found.
 * Returns false if the input ends first; *hend is then the end.
 */
static bool
find_header_end(const char *p, const char *end, const char **hend,
				const char **body)
{
	while (p < end)
	{
		const char *next;
		bool		term;
		const char *le = line_end(p, end, &next, &term);

		if (le == p && term)
		{
			*hend = p;
			*body = next;
			return true;
		}
		if (!term)
			break;
		p = next;
	}
	*hend = end;
	*body = end;
	return false;
}

static void
emit_part(ParseCtx *cx, const char *at, BatchPart *tmpl)
{
	BatchPart  *bp;

	if (cx->nparts >= cx->max_parts)
	{
		fail(cx, BR_TOO_MANY_PARTS,
			 "more operation responses than the caller's max_parts", at);
		return;
	}
	bp = &cx->parts[cx->nparts];
	*bp = *tmpl;
	bp->position = cx->nparts;
	cx->nparts++;
}

/*
 * Parse one body part [start, end).  cut means the input ended inside
 * this part (no delimiter after it), so anything incomplete is truncation
 * rather than malformation, and a leaf part is flagged truncated.
 */
static void
parse_part(ParseCtx *cx, const char *start, const char *end, int depth,
		   int changeset, bool cut)
{
	const char *mh_end;
	const char *content;
	const char *p;
	BrSlice		ct;
	BatchPart	bp;

	/* MIME part headers, up to the first empty line */
	if (!find_header_end(start, end, &mh_end, &content))
	{
		if (cut)
			fail(cx, BR_TRUNCATED, "input ends inside MIME part headers", end);
		else
			fail(cx, BR_MALFORMED,
				 "MIME part has no empty line after its headers", start);
		return;
	}

	if (br_header_get(mk_slice(start, mh_end), "Content-Type", &ct) &&
		ct_is_multipart(ct.ptr, ct.len))
	{
		char		inner[BR_MAX_BOUNDARY + 1];

		if (depth >= BR_MAX_DEPTH)
		{
			fail(cx, BR_MALFORMED,
				 "multipart nested inside a changeset", start);
			return;
		}
		if (!br_boundary(ct.ptr, ct.len, inner))
		{
			fail(cx, BR_NO_BOUNDARY,
				 "changeset part has no usable boundary parameter", ct.ptr);
			return;
		}
		parse_multipart(cx, content, end, inner, strlen(inner), depth + 1,
						cx->nchangesets++, cut);
		return;
	}

	/*
	 * Anything else is taken to be application/http; if it is not, the
	 * status line will not parse and callers see http_status 0.
	 */
	memset(&bp, 0, sizeof(bp));
	bp.mime_headers = mk_slice(start, mh_end);
	bp.in_changeset = (changeset >= 0);
	bp.changeset = changeset;
	bp.truncated = cut;

	/* RFC 7230 3.5: tolerate empty lines before the status line */
	p = content;
	for (;;)
	{
		const char *next;
		bool		term;
		const char *le;

		if (p == end)
		{
			if (cut)
			{
				fail(cx, BR_TRUNCATED,
					 "input ends before the inner HTTP status line", end);
				return;
			}
			/* a part with no HTTP message at all: keep it, status 0 */
			bp.reason = mk_slice(end, end);
			bp.headers = mk_slice(end, end);
			bp.body = mk_slice(end, end);
			break;
		}
		le = line_end(p, end, &next, &term);
		if (le == p && term)
		{
			p = next;
			continue;
		}
		if (!term && cut)
		{
			fail(cx, BR_TRUNCATED,
				 "input ends inside the inner HTTP status line", end);
			return;
		}
		bp.http_status = parse_status_line(p, le, &bp.reason);

		/* inner HTTP headers */
		p = next;
		if (find_header_end(p, end, &mh_end, &content))
		{
			bp.headers = mk_slice(p, mh_end);
			bp.body = mk_slice(content, end);
		}
		else if (cut)
		{
			fail(cx, BR_TRUNCATED,
				 "input ends inside inner HTTP headers", end);
			return;
		}
		else
		{
			/*
			 * No empty line before the delimiter: the delimiter's own line
			 * break swallowed it ("HTTP/1.1 204 ..\r\n\r\n--b" with the
			 * blank line missing).  Treat it as headers with no body.
			 */
			bp.headers = mk_slice(p, end);
			bp.body = mk_slice(end, end);
		}
		break;
	}

	if (!br_header_get(bp.mime_headers, "Content-ID", &bp.content_id))
		br_header_get(bp.headers, "Content-ID", &bp.content_id);
	if (bp.content_id.ptr == NULL)
		bp.content_id = mk_slice(start, start);

	emit_part(cx, start, &bp);
}

/*
 * Parse a multipart body [start, end) with the given boundary.  eof_is_cut
 * says whether end is where the input was cut (top level, or inside a
 * part that was itself cut) rather than a real part boundary.
 */
static void
parse_multipart(ParseCtx *cx, const char *start, const char *end,
				const char *bnd, size_t blen, int depth, int changeset,
				bool eof_is_cut)
{
	const char *d;
	const char *after = end;
	const char *p;
	DelimKind	k;

	/* the preamble, if any, is ignored */
	k = find_delim(start, end, bnd, blen, &d, &after);
	if (k == DL_NONE || k == DL_PARTIAL)
	{
		if (eof_is_cut && (k == DL_PARTIAL || start == end))
			fail(cx, BR_TRUNCATED, "input ends before the first delimiter", end);
		else if (depth > 1)
			fail(cx, BR_MALFORMED, "changeset has no delimiter", start);
		else
			fail(cx, BR_MALFORMED, "no multipart delimiter found", start);
		return;
	}
	if (k == DL_CLOSE)
		return;					/* no parts; the epilogue is ignored */

	p = after;
	for (;;)
	{
		const char *part_start = p;

		k = find_delim(p, end, bnd, blen, &d, &after);
		if (k == DL_PART || k == DL_CLOSE)
		{
			parse_part(cx, part_start, strip_delim_linebreak(part_start, d),
					   depth, changeset, false);
			if (cx->status != BR_OK || k == DL_CLOSE)
				return;
			p = after;
			continue;
		}

		/*
		 * Ran out of input without a delimiter.  Drop a trailing partial
		 * delimiter so the cut body does not end in "--batchresp".
		 */
		if (k == DL_PARTIAL)
			d = strip_delim_linebreak(part_start, d);
		else
			d = end;

		if (eof_is_cut)
		{
			/* let the part say where exactly it was cut, then generalise */
			parse_part(cx, part_start, d, depth, changeset, true);
			fail(cx, BR_TRUNCATED, "input ends before the closing delimiter",
				 end);
		}
		else
		{
			/*
			 * The enclosing part ended but this changeset was never closed.
			 * The last part may well be complete, but we cannot know.
			 */
			fail(cx, BR_MALFORMED,
				 "changeset closing delimiter missing", end);
			parse_part(cx, part_start, d, depth, changeset, true);
		}
		return;
	}
}

BrStatus
br_parse(const char *content_type, size_t ct_len,
		 const char *body, size_t body_len,
		 BatchPart *parts, int max_parts, BatchParse *result)
{
	ParseCtx	cx;
	BatchParse	local;
	char		bnd[BR_MAX_BOUNDARY + 1];

	if (result == NULL)
		result = &local;
	if (body == NULL)
	{
		body = "";
		body_len = 0;
	}
	if (parts == NULL || max_parts < 0)
		max_parts = 0;

	memset(&cx, 0, sizeof(cx));
	cx.base = body;
	cx.parts = parts;
	cx.max_parts = max_parts;
	cx.status = BR_OK;

	if (body_len > (size_t) BR_MAX_BODY_BYTES)
		fail(&cx, BR_TOO_LARGE, "response body exceeds BR_MAX_BODY_BYTES",
			 body);
	else if (content_type == NULL || !ct_is_multipart(content_type, ct_len))
		fail(&cx, BR_NO_BOUNDARY, "response Content-Type is not multipart",
			 body);
	else if (!br_boundary(content_type, ct_len, bnd))
		fail(&cx, BR_NO_BOUNDARY,
			 "response Content-Type has no usable boundary parameter", body);
	else
		parse_multipart(&cx, body, body + body_len, bnd, strlen(bnd), 1, -1,
						true);

	result->status = cx.status;
	result->error = cx.error;
	result->nparts = cx.nparts;
	result->error_offset = cx.error_offset;
	return cx.status;
}

const char *
br_status_name(BrStatus status)
{
	switch (status)
	{
		case BR_OK:
			return "ok";
		case BR_TRUNCATED:
			return "truncated";
		case BR_MALFORMED:
			return "malformed";
		case BR_NO_BOUNDARY:
			return "no boundary";
		case BR_TOO_MANY_PARTS:
			return "too many parts";
		case BR_TOO_LARGE:
			return "too large";
	}
	return "unknown";
}
