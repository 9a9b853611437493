/*-------------------------------------------------------------------------
 *
 * fuzz_retry_after.c
 *	  libFuzzer target for parse_retry_after_capped() (src/classify.c):
 *	  delta-seconds and the three HTTP-date forms.
 *
 * Input: 8 bytes of clock (any int64, extremes included), then the header
 * value.  Shorter inputs are a value with a fixed clock.
 *
 * Besides the sanitizers the target checks, and traps on violation:
 *	 - the result is -1 or 0..CLASSIFY_RETRY_AFTER_MAX, capped exactly when
 *	   the cap was applied, and parse_retry_after() agrees;
 *	 - blanks around the value change nothing;
 *	 - all digits: the result is the number (however many digits, leading
 *	   zeros included), capped at a day, from an independent reading;
 *	 - an IMF-fixdate or asctime date that glibc's strptime() + timegm()
 *	   read as well gives the same instant;
 *	 - a date one second further from the clock is one second more away,
 *	   unless capped or past.
 * The value is copied into an exact-size heap buffer so ASan sees any
 * read past it.
 *
 *-------------------------------------------------------------------------
 */
#define _GNU_SOURCE				/* strptime, timegm */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "classify.h"

#define FUZZ_NOW ((int64_t) 1700000000)
#define LAST_DATE ((int64_t) 253402300799)	/* 9999-12-31 23:59:59 */

#define CHECK(cond) \
	do { \
		if (!(cond)) \
		{ \
			fprintf(stderr, "contract violated: %s (%s:%d)\n", #cond, \
					__FILE__, __LINE__); \
			abort(); \
		} \
	} while (0)

static int
parse(const char *v, size_t n, int64_t now, bool *capped)
{
	char	   *copy = malloc(n ? n : 1);
	int			r;

	memcpy(copy, v, n);
	r = parse_retry_after_capped(copy, n, (time_t) now, capped);
	free(copy);
	return r;
}

static bool
sp(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int64_t		now = FUZZ_NOW;
	const char *v;
	size_t		n;
	bool		capped;
	bool		capped2;
	int			r;
	int			r2;
	char	   *padded;
	const char *t;
	size_t		tn;
	size_t		i;

	if (size >= 8)
	{
		uint64_t	u = 0;

		for (i = 0; i < 8; i++)
			u = (u << 8) | data[i];
		now = (int64_t) u;
		data += 8;
		size -= 8;
	}
	v = (const char *) data;
	n = size;

	r = parse(v, n, now, &capped);
	CHECK(r >= -1 && r <= CLASSIFY_RETRY_AFTER_MAX);
	CHECK(!capped || r == CLASSIFY_RETRY_AFTER_MAX);
	CHECK(r == parse_retry_after(v, n, (time_t) now));
	CHECK(r == parse(v, n, now, &capped2) && capped == capped2);

	/* blanks around it change nothing */
	padded = malloc(n + 6);
	memcpy(padded, " \t ", 3);
	memcpy(padded + 3, v, n);
	memcpy(padded + 3 + n, "\r\n ", 3);
	CHECK(parse(padded, n + 6, now, &capped2) == r && capped2 == capped);
	free(padded);

	/* the trimmed value */
	t = v;
	tn = n;
	while (tn > 0 && sp(*t))
		t++, tn--;
	while (tn > 0 && sp(t[tn - 1]))
		tn--;

	/* all digits: an independent reading of the number */
	if (tn > 0)
	{
		bool		digits = true;

		for (i = 0; i < tn && digits; i++)
			digits = (t[i] >= '0' && t[i] <= '9');
		if (digits)
		{
			size_t		z = 0;
			bool		big;
			long		val = 0;

			while (z < tn - 1 && t[z] == '0')
				z++;
			big = (tn - z > 6);
			if (!big)
			{
				for (i = z; i < tn; i++)
					val = val * 10 + (t[i] - '0');
				big = (val > CLASSIFY_RETRY_AFTER_MAX);
			}
			CHECK(capped == big);
			CHECK(r == (big ? CLASSIFY_RETRY_AFTER_MAX : (int) val));
			return 0;
		}
	}

	/* dates: glibc as a second opinion on the two fixed-layout forms */
	if (r >= 0 && tn > 0 && tn < 64 && memchr(t, '-', tn) == NULL)
	{
		char		buf[64];
		struct tm	tm;
		const char *end;
		int64_t		clock = now < 0 ? 0 : now > LAST_DATE ? LAST_DATE : now;

		memcpy(buf, t, tn);
		buf[tn] = '\0';
		memset(&tm, 0, sizeof(tm));
		end = strptime(buf, strchr(buf, ',') ? "%a, %d %b %Y %H:%M:%S GMT" : "%a %b %d %H:%M:%S %Y", &tm);
		if (end != NULL && *end == '\0' && tm.tm_year + 1900 >= 1 &&
			tm.tm_year + 1900 <= 9999)
		{
			int64_t		when = (int64_t) timegm(&tm);
			int64_t		want = when - clock;

			if (want < 0)
				want = 0;
			if (want > CLASSIFY_RETRY_AFTER_MAX)
				want = CLASSIFY_RETRY_AFTER_MAX;
			CHECK(r == (int) want);
		}

		/* a second earlier clock: a second further away */
		if (clock > 0)
		{
			r2 = parse(v, n, clock - 1, &capped2);
			if (r > 0 && r < CLASSIFY_RETRY_AFTER_MAX)
				CHECK(r2 == r + 1);
			else if (r == 0)
				CHECK(r2 == 0 || r2 == 1);
			else
				CHECK(r2 == CLASSIFY_RETRY_AFTER_MAX && capped2);
		}
	}
	return 0;
}
