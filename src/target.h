/*-------------------------------------------------------------------------
 *
 * target.h
 *	  A D365 destination's configuration, as read from d365inv.target.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_TARGET_H
#define D365INV_TARGET_H

#include "access/htup.h"
#include "access/tupdesc.h"

#include "classify.h"
#include "entity_id.h"

/* Staging column -> entity property, from target.property_map */
typedef struct PropertyMapping
{
	char	   *column;
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
	bool		client_ids;		/* entity_id_mode 'client' */
	EntityIdForm entity_id_form;
	int			entity_id_length;
	char	   *company;		/* NULL when none */
	char	   *company_property;
	PropertyMapping *mappings;
	int			nmappings;
	int			batch_size;
	char	   *url_form;		/* relative | absolute_path | absolute_url */
	ClassifyConfig classify;	/* duplicate rules; arrays palloc'd */

	/* delivery */
	int			max_in_flight;
	char	   *write_mode;		/* create | upsert | upsert_create_only */
	char	   *preflight;		/* off | in_doubt | always */
	char	   *auth;			/* none | oauth2 */
	char	   *token_url;
	char	   *client_id;
	char	   *scope;
	char	   *batch_size_mode;	/* fixed | auto */
	int			batch_size_min;
	int			batch_size_max;
	bool		paced;			/* pacing 'budget': stay within the limits */
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
