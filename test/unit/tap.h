/*
 * tap.h: the few TAP helpers the C test programs share (test_wire.c,
 * http_selftest.c).  Header-only, one test program per binary.
 */
#ifndef D365INV_TAP_H
#define D365INV_TAP_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static int	ntests;
static int	nfailed;

static bool ok(bool cond, const char *fmt,...) __attribute__((format(printf, 2, 3)));

static bool
ok(bool cond, const char *fmt,...)
{
	va_list		ap;

	ntests++;
	printf("%sok %d - ", cond ? "" : "not ", ntests);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	if (!cond)
		nfailed++;
	return cond;
}

static __attribute__((unused)) void
is_long(long got, long want, const char *what)
{
	if (!ok(got == want, "%s", what))
		printf("#   got %ld, want %ld\n", got, want);
}

static __attribute__((unused)) void
is_str(const char *got, const char *want, const char *what)
{
	if (!ok(got != NULL && strcmp(got, want) == 0, "%s", what))
		printf("#   got  '%s'\n#   want '%s'\n", got ? got : "(null)", want);
}

/* the plan line and the exit status */
static int
tap_done(void)
{
	printf("1..%d\n", ntests);
	if (nfailed)
		printf("# %d of %d tests failed\n", nfailed, ntests);
	return nfailed ? 1 : 0;
}

#endif							/* D365INV_TAP_H */
