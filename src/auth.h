/*-------------------------------------------------------------------------
 *
 * auth.h
 *	  OAuth2 client-credentials tokens from Microsoft Entra ID, cached per
 *	  target for the life of the process.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_AUTH_H
#define D365INV_AUTH_H

#include "http.h"

typedef struct AuthConfig
{
	const char *target;			/* target name, for messages and the cache key */
	const char *token_url;		/* e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token */
	const char *client_id;
	const char *client_secret;	/* never logged, never in error messages */
	const char *scope;			/* e.g. https://contoso.operations.dynamics.com/.default */
} AuthConfig;

/*
 * Returns "Authorization: Bearer <token>" (palloc'd in CurrentMemoryContext),
 * from a per-target cache in TopMemoryContext valid until expires_in minus a
 * margin (60 s, or 10% for lifetimes under 10 minutes); force_refresh drops
 * the cached token first (after a 401).  On failure returns NULL and writes a
 * message (without secrets) into err (size errlen).
 *
 * The token URL must be https, except on a loopback host (tests).
 */
extern char *auth_header(const AuthConfig *cfg, bool force_refresh,
						 const HttpSettings *http, char *err, size_t errlen);

/* Drop every cached token (on SIGHUP: the configuration may have changed). */
extern void auth_forget_all(void);

/*
 * The pieces of auth_header() that read what a token endpoint sent, for the
 * unit tests and fuzz targets; other callers use auth_header().
 *
 * auth_parse_token_response: a 200 answer's body; on success sets *header
 * (palloc'd "Authorization: Bearer <token>") and *valid_until (started plus
 * the token's lifetime minus the renewal margin) and returns true, else
 * writes a message into err.
 *
 * auth_describe_error: the message for a non-200 answer: the status, plus
 * the OAuth error code and cleaned, truncated description when the body is
 * an OAuth error object.
 *
 * Every message either writes has been through auth_mask_secret() with
 * cfg->client_secret, after all clean-up and truncation.
 */
extern bool auth_parse_token_response(const AuthConfig *cfg, const char *body,
									  size_t len, double started,
									  char **header, double *valid_until,
									  char *err, size_t errlen);
extern void auth_describe_error(const AuthConfig *cfg, long status,
								const char *body, size_t len,
								char *err, size_t errlen);

/*
 * Overwrite in text[0..len) every stretch that spells secret, in place and
 * at the same length, with a filler character that occurs nowhere in the
 * secret ('*' unless the secret has one).  "Spells" covers the encodings a
 * server may echo a secret in, mixed freely within one occurrence and
 * nested up to three deep (e.g. %2541 for 'A'):
 *
 *	 raw; form/URL encoding (%XX in either case, '+' for a space); JSON
 *	 escapes (\/ \" \\ \b \f \n \r \t, \uXXXX in either case, surrogate
 *	 pairs); HTML character references (named ones for ASCII characters,
 *	 &#NN; and &#xNN; with any leading zeros, ';' optional).
 *
 * Blanks and control characters count as one space either way, so text that
 * has had its whitespace collapsed or its control characters replaced
 * still matches, and blanks at either end of the secret are ignored.
 *
 * Text is taken to have been cut at its end: a trailing stretch that spells
 * at least the first 4 bytes of the secret (or the whole of a shorter one)
 * is overwritten too, including an escape sequence cut in the middle.
 *
 * Returns len.  Fails closed: if the text is too large to analyse within
 * bounded time and memory, all of it is overwritten, and if every filler
 * candidate occurs in the secret, the text is emptied (text[0] = '\0') and
 * 0 is returned.
 */
extern size_t auth_mask_secret(char *text, size_t len, const char *secret);

#endif							/* D365INV_AUTH_H */
