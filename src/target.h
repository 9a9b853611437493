/*-------------------------------------------------------------------------
 *
 * target.h
 *	  A D365 destination's configuration, as read from d365inv.target,
 *	  with its mode columns as C enums (target.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_TARGET_H
#define D365INV_TARGET_H

#include "access/htup.h"
#include "access/tupdesc.h"

#include "classify.h"
#include "entity_id.h"

/*
 * The target's mode columns as C enums, parsed once by target_load() (each
 * enum's order is that of its label table in target.c).
 */
typedef enum UrlForm
{
	URL_RELATIVE,				/* EntitySet */
	URL_ABSOLUTE_PATH,			/* /data/EntitySet */
	URL_ABSOLUTE_URL			/* https://host/data/EntitySet */
} UrlForm;

typedef enum WriteMode
{
	WRITE_CREATE,				/* POST */
	WRITE_UPSERT,				/* PATCH by alternate key */
	WRITE_UPSERT_CREATE_ONLY	/* the same with If-None-Match: * */
} WriteMode;

typedef enum Preflight
{
	PREFLIGHT_OFF,
	PREFLIGHT_IN_DOUBT,			/* only rows whose fate is unknown */
	PREFLIGHT_ALWAYS			/* every key before it is sent */
} Preflight;

typedef enum AuthMode
{
	AUTH_NONE,					/* a local endpoint */
	AUTH_OAUTH2					/* client credentials */
} AuthMode;

typedef enum BatchSizeMode
{
	BATCH_SIZE_FIXED,
	BATCH_SIZE_AUTO				/* shrink after trouble, grow after clean batches */
} BatchSizeMode;

typedef enum EntityIdMode
{
	ENTITY_ID_SERVER,			/* D365 chooses the id */
	ENTITY_ID_CLIENT			/* created with d365inv.entity_id() */
} EntityIdMode;

typedef enum Pacing
{
	PACING_BUDGET,				/* stay within the service protection limits */
	PACING_OFF					/* only back off on a 429 */
} Pacing;

/* The staging columns property_map may map */
typedef enum StagingColumn
{
	COLUMN_UNKNOWN = -1,		/* not one: target_config_problem() says so */
	COLUMN_INVOICE_DATE,
	COLUMN_DUE_DATE,
	COLUMN_AMOUNT,				/* sent as a JSON number */
	COLUMN_CURRENCY,
	COLUMN_DESCRIPTION,
	COLUMN_SOURCE
} StagingColumn;

/* Staging column -> entity property, from target.property_map */
typedef struct PropertyMapping
{
	char	   *column;			/* as written in property_map */
	StagingColumn staging;
	char	   *property;
} PropertyMapping;

typedef struct Target
{
	char	   *name;
	char	   *service_root;	/* always ends in '/'; NULL when not set */
	char	   *entity_set;
	char	   *vendor_property;
	char	   *invoice_property;
	char	   *id_property;
	EntityIdMode entity_id_mode;
	EntityIdForm entity_id_form;
	int			entity_id_length;
	char	   *company;		/* NULL when none */
	char	   *company_property;
	PropertyMapping *mappings;
	int			nmappings;
	int			batch_size;
	UrlForm		url_form;
	ClassifyConfig classify;	/* duplicate rules; arrays palloc'd */

	/* delivery */
	int			max_in_flight;
	WriteMode	write_mode;
	Preflight	preflight;
	AuthMode	auth;
	char	   *token_url;
	char	   *client_id;
	char	   *scope;
	BatchSizeMode batch_size_mode;
	int			batch_size_min;
	int			batch_size_max;
	Pacing		pacing;
	int			limit_window_s; /* D365's service protection limits per app */
	int			limit_requests; /* user: requests and seconds of execution */
	int			limit_execution_s;	/* time within a window of this length */
	bool		keys_complete;	/* refresh_remote_keys() ran within the key
								 * retention: remote_key covers D365 */
} Target;

/* NULL, or why the target cannot be used as configured */
extern char *target_config_problem(const Target *t);
/* Reads one target; ERROR when it does not exist.  Caller has SPI connected. */
extern Target *target_load(const char *name);
/* text column n of an SPI result row, palloc'd in CurrentMemoryContext; NULL stays NULL */
extern char *spi_text_column(HeapTuple tuple, TupleDesc desc, int n);

#endif							/* D365INV_TARGET_H */
