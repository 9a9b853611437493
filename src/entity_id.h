/*-------------------------------------------------------------------------
 *
 * entity_id.h
 *	  Deterministic client-assigned entity ids (see entity_id.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_ENTITY_ID_H
#define D365INV_ENTITY_ID_H

typedef enum EntityIdForm
{
	ENTITY_ID_GUID,				/* name-based UUID, for Guid keys */
	ENTITY_ID_STRING			/* base32, for string keys */
} EntityIdForm;

/* 8 base32 digits are 40 bits; 32 are the whole SHA-1 */
#define ENTITY_ID_MIN_STRING 8
#define ENTITY_ID_MAX_STRING 32

extern EntityIdForm entity_id_form_from_name(const char *name);
extern char *entity_id_make(const char *target, const char *vendor_key, const char *invoice_key,
							EntityIdForm form, int length);

#endif							/* D365INV_ENTITY_ID_H */
