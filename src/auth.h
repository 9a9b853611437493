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

#endif							/* D365INV_AUTH_H */
