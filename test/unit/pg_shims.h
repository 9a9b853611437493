/*-------------------------------------------------------------------------
 *
 * pg_shims.h
 *	  Stand-ins for the few backend functions src/http.c and src/auth.c
 *	  use, so that they run in a plain program: palloc and friends
 *	  (malloc-backed, with a live-chunk count per memory context so that
 *	  leaks show up), ereport (longjmp to PG_TRY as the real one does),
 *	  CHECK_FOR_INTERRUPTS and PostmasterIsAlive (driven by the program
 *	  through the variables below).
 *
 * Definitions, not just declarations: include it in exactly one file of
 * each program (http_selftest.c, test_auth.c, the auth fuzz targets),
 * after "postgres.h".
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_PG_SHIMS_H
#define D365INV_PG_SHIMS_H

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/memnodes.h"
#include "storage/pmsignal.h"
#include "utils/memutils.h"

/* the stand-ins below call the C library, not PostgreSQL's replacements */
#undef vsnprintf
#undef snprintf
#undef printf
#undef fprintf
#undef vprintf

typedef struct Chunk
{
	struct Chunk *prev;
	struct Chunk *next;
	MemoryContext ctx;
	size_t		size;
} Chunk;						/* 32 bytes: keeps the payload 16-aligned */

static MemoryContextData top_ctx_data;
static MemoryContextData batch_ctx_data;
MemoryContext TopMemoryContext = &top_ctx_data;
MemoryContext CurrentMemoryContext = &batch_ctx_data;
static Chunk chunks = {&chunks, &chunks, NULL, 0};

volatile sig_atomic_t InterruptPending = false;
volatile sig_atomic_t postmaster_possibly_dead = false;
sigjmp_buf *PG_exception_stack = NULL;
ErrorContextCallback *error_context_stack = NULL;

static int	fail_alloc_after = -1;	/* NO_OOM allocations left before failing */
static int	interrupts_seen;
static int	pm_checks_before_death = -1;
static int	err_elevel;
static char err_message[512];

static pg_attribute_unused() long
live_chunks(MemoryContext ctx)
{
	long		n = 0;
	Chunk	   *c;

	for (c = chunks.next; c != &chunks; c = c->next)
		if (c->ctx == ctx)
			n++;
	return n;
}

/* free every chunk of ctx, as MemoryContextReset would */
static pg_attribute_unused() void
reset_ctx(MemoryContext ctx)
{
	Chunk	   *c = chunks.next;

	while (c != &chunks)
	{
		Chunk	   *next = c->next;

		if (c->ctx == ctx)
		{
			c->prev->next = c->next;
			c->next->prev = c->prev;
			free(c);
		}
		c = next;
	}
}

static void *
alloc_in(MemoryContext ctx, size_t size, bool zero)
{
	Chunk	   *c = zero ? calloc(1, sizeof(Chunk) + size) : malloc(sizeof(Chunk) + size);

	if (c == NULL)
		abort();
	c->ctx = ctx;
	c->size = size;
	c->next = chunks.next;
	c->prev = &chunks;
	chunks.next->prev = c;
	chunks.next = c;
	return c + 1;
}

void *
palloc(Size size)
{
	return alloc_in(CurrentMemoryContext, size, false);
}

void *
palloc0(Size size)
{
	return alloc_in(CurrentMemoryContext, size, true);
}

void *
MemoryContextAllocZero(MemoryContext context, Size size)
{
	return alloc_in(context, size, true);
}

void *
MemoryContextAllocExtended(MemoryContext context, Size size, int flags)
{
	if ((flags & MCXT_ALLOC_NO_OOM) && fail_alloc_after >= 0 &&
		fail_alloc_after-- == 0)
		return NULL;
	return alloc_in(context, size, (flags & MCXT_ALLOC_ZERO) != 0);
}

void
pfree(void *pointer)
{
	Chunk	   *c = ((Chunk *) pointer) - 1;

	c->prev->next = c->next;
	c->next->prev = c->prev;
	free(c);
}

void *
repalloc(void *pointer, Size size)
{
	Chunk	   *c = ((Chunk *) pointer) - 1;
	void	   *p = alloc_in(c->ctx, size, false);

	memcpy(p, pointer, Min(size, c->size));
	pfree(pointer);
	return p;
}

char *
MemoryContextStrdup(MemoryContext context, const char *string)
{
	char	   *p = alloc_in(context, strlen(string) + 1, false);

	strcpy(p, string);
	return p;
}

char *
pstrdup(const char *in)
{
	return MemoryContextStrdup(CurrentMemoryContext, in);
}

char *
psprintf(const char *fmt,...)
{
	va_list		ap;
	int			n;
	char	   *p;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	p = palloc(n + 1);
	va_start(ap, fmt);
	vsnprintf(p, n + 1, fmt, ap);
	va_end(ap);
	return p;
}

void
initStringInfo(StringInfo str)
{
	str->data = palloc(1024);
	str->maxlen = 1024;
	str->len = 0;
	str->cursor = 0;
	str->data[0] = '\0';
}

int
pg_snprintf(char *str, size_t count, const char *fmt,...)
{
	va_list		ap;
	int			n;

	va_start(ap, fmt);
	n = vsnprintf(str, count, fmt, ap);
	va_end(ap);
	return n;
}

int
pg_vsnprintf(char *str, size_t count, const char *fmt, va_list args)
{
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wsuggest-attribute=format"
#endif
	return vsnprintf(str, count, fmt, args);
}

int
pg_strcasecmp(const char *s1, const char *s2)
{
	return strcasecmp(s1, s2);
}

int
pg_strncasecmp(const char *s1, const char *s2, size_t n)
{
	return strncasecmp(s1, s2, n);
}

uint64
hash_bytes_extended(const unsigned char *k, int keylen, uint64 seed)
{
	uint64		h = 14695981039346656037ULL ^ seed;

	while (keylen-- > 0)
		h = (h ^ *k++) * 1099511628211ULL;
	return h;
}

/* Assert() in an assert-enabled build's headers */
void
ExceptionalCondition(const char *conditionName, const char *errorType,
					 const char *fileName, int lineNumber)
{
	fprintf(stderr, "%s(\"%s\", File: \"%s\", Line: %d)\n",
			errorType, conditionName, fileName, lineNumber);
	abort();
}

void
pg_re_throw(void)
{
	if (PG_exception_stack == NULL)
		abort();
	siglongjmp(*PG_exception_stack, 1);
}

bool
errstart(int elevel, const char *domain)
{
	err_elevel = elevel;
	err_message[0] = '\0';
	return true;
}

bool
errstart_cold(int elevel, const char *domain)
{
	return errstart(elevel, domain);
}

int
errcode(int sqlerrcode)
{
	return 0;
}

int
errmsg(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(err_message, sizeof(err_message), fmt, ap);
	va_end(ap);
	return 0;
}

int
errdetail(const char *fmt,...)
{
	return 0;
}

void
errfinish(const char *filename, int lineno, const char *funcname)
{
	if (err_elevel >= ERROR)
		pg_re_throw();
}

/* CHECK_FOR_INTERRUPTS(): what a query cancel does */
void
ProcessInterrupts(void)
{
	InterruptPending = false;
	interrupts_seen++;
	ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
					errmsg("canceling statement due to user request")));
}

bool
PostmasterIsAliveInternal(void)
{
	if (pm_checks_before_death < 0)
		return true;
	if (pm_checks_before_death == 0)
		return false;
	pm_checks_before_death--;
	return true;
}

#endif							/* D365INV_PG_SHIMS_H */
