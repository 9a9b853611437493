/*-------------------------------------------------------------------------
 *
 * entity_id.c
 *	  Deterministic, client-assigned entity ids: the idempotency key D365
 *	  does not offer, made from the primary key it does enforce.
 *
 * In entity_id_mode 'client' every invoice is created with an id of our
 * choosing, derived only from the target name and the normalised keys.  A
 * second create of the same invoice (a resend, a request the server held
 * and committed late, another database delivering to the same target name)
 * carries the same id and collides on the server's primary key instead of
 * making a second invoice.
 *
 * The id is a name-based UUID (RFC 9562 version 5: SHA-1) in the namespace
 * below, of the name  target U+001F vendor_key U+001F invoice_key  (keys
 * cannot contain control characters, so the name is unambiguous), or, for
 * string keys, the same SHA-1 in base32 (RFC 4648, A-Z 2-7) cut to a length.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "common/sha1.h"
#include "fmgr.h"
#include "utils/builtins.h"

#include "entity_id.h"

PG_FUNCTION_INFO_V1(d365inv_entity_id);

/* d365inv's namespace for name-based UUIDs: 903a952f-c780-4fa0-b3c9-f44d930299b8 */
static const uint8 entity_id_namespace[16] = {
	0x90, 0x3a, 0x95, 0x2f, 0xc7, 0x80, 0x4f, 0xa0,
	0xb3, 0xc9, 0xf4, 0x4d, 0x93, 0x02, 0x99, 0xb8
};

static void
sha1_of_name(const char *target, const char *vendor_key, const char *invoice_key,
			 uint8 digest[SHA1_DIGEST_LENGTH])
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA1);
	static const char separator = '\x1f';

	if (ctx == NULL ||
		pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, entity_id_namespace, sizeof(entity_id_namespace)) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) target, strlen(target)) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) &separator, 1) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) vendor_key, strlen(vendor_key)) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) &separator, 1) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) invoice_key, strlen(invoice_key)) < 0 ||
		pg_cryptohash_final(ctx, digest, SHA1_DIGEST_LENGTH) < 0)
		elog(ERROR, "d365inv: could not compute a SHA-1 digest");
	pg_cryptohash_free(ctx);
}

char *
entity_id_make(const char *target, const char *vendor_key, const char *invoice_key,
			   EntityIdForm form, int length)
{
	uint8		d[SHA1_DIGEST_LENGTH];

	sha1_of_name(target, vendor_key, invoice_key, d);
	if (form == ENTITY_ID_GUID)
	{
		d[6] = (d[6] & 0x0F) | 0x50;	/* version 5 */
		d[8] = (d[8] & 0x3F) | 0x80;	/* RFC variant */
		return psprintf("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
						d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
						d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]);
	}
	else
	{
		static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
		char	   *out = palloc(ENTITY_ID_MAX_STRING + 1);
		int			n = Min(Max(length, ENTITY_ID_MIN_STRING), ENTITY_ID_MAX_STRING);

		/* 160 bits are 32 base32 digits of 5 bits each */
		for (int i = 0; i < n; i++)
		{
			int			bit = i * 5;
			int			byte = bit / 8;
			int			v = (d[byte] << 8 | (byte + 1 < SHA1_DIGEST_LENGTH ? d[byte + 1] : 0));

			out[i] = alphabet[(v >> (11 - bit % 8)) & 0x1F];
		}
		out[n] = '\0';
		return out;
	}
}

EntityIdForm
entity_id_form_from_name(const char *name)
{
	if (strcmp(name, "guid") == 0)
		return ENTITY_ID_GUID;
	if (strcmp(name, "string") == 0)
		return ENTITY_ID_STRING;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("entity id form must be \"guid\" or \"string\", not \"%s\"", name)));
	return ENTITY_ID_GUID;
}

/*
 * entity_id(target text, vendor_key text, invoice_key text, form text,
 *           length int) -> text: the id an invoice is created with in
 * entity_id_mode 'client' (what the worker stores in invoice.entity_id).
 */
Datum
d365inv_entity_id(PG_FUNCTION_ARGS)
{
	char	   *target = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *vendor_key = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *invoice_key = text_to_cstring(PG_GETARG_TEXT_PP(2));
	EntityIdForm form = entity_id_form_from_name(text_to_cstring(PG_GETARG_TEXT_PP(3)));
	int			length = PG_GETARG_INT32(4);

	if (form == ENTITY_ID_STRING &&
		(length < ENTITY_ID_MIN_STRING || length > ENTITY_ID_MAX_STRING))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a string entity id has %d to %d characters, not %d",
						ENTITY_ID_MIN_STRING, ENTITY_ID_MAX_STRING, length)));
	PG_RETURN_TEXT_P(cstring_to_text(entity_id_make(target, vendor_key, invoice_key, form, length)));
}
