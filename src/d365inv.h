/*-------------------------------------------------------------------------
 *
 * d365inv.h
 *	  Declarations shared between the backend-side files of d365inv.
 *
 *-------------------------------------------------------------------------
 */
#ifndef D365INV_H
#define D365INV_H

#include "nodes/nodes.h"

extern void _PG_init(void);

/* settings.c */
extern char *d365inv_database;
extern int	d365inv_max_retries;
extern int	d365inv_retry_base_ms;
extern int	d365inv_retry_max_ms;
extern int	d365inv_in_doubt_delay_ms;
extern int	d365inv_server_request_lifetime_ms;
extern int	d365inv_failover_lookup_window_s;
extern bool d365inv_drop_open_invoices;
extern int	d365inv_naptime_ms;
extern int	d365inv_http_connect_timeout_ms;
extern int	d365inv_http_timeout_ms;
extern int	d365inv_max_response_kb;
extern char *d365inv_ca_file;
extern int	d365inv_batch_log_retention_s;
extern int	d365inv_remote_key_retention_s;
extern int	d365inv_audit_retention_s;
extern char *d365inv_change_note;
extern int	d365inv_key_filter_size_kb;
extern double d365inv_key_filter_fpr;
extern bool d365inv_key_filter_enabled;
extern double d365inv_duplicate_alert_threshold;
extern int	d365inv_error_alert_threshold;
extern int	d365inv_alert_interval_ms;
extern int	d365inv_stall_alert_after_ms;
extern int	d365inv_queue_age_alert_after_ms;
extern int	d365inv_progress_interval_ms;
extern void d365inv_define_settings(void);

/* The SQL objects this library works with: d365inv--<version>.sql */
#define D365INV_SQL_VERSION "0.2"

/* worker_ctl.c: shared state, waking, the DROP DATABASE guard */
extern char *d365inv_installed_version(void);	/* NULL: not installed here */
extern void worker_ctl_init(void);	/* from _PG_init, while preloading */
extern bool worker_ctl_before_utility(Node *stmt);	/* true: worker stopped */
extern void worker_ctl_after_utility(Node *stmt, bool stopped);
extern bool worker_ctl_register_worker(void);	/* false: another one runs */
extern void worker_ctl_register_launcher(void);
extern bool worker_ctl_paused(void);
extern int	worker_ctl_worker_pid(void);
extern void worker_ctl_wake_launcher(void);

/* key_filter.c: bloom filter of keys known to exist in D365 */
extern void key_filter_init(void);	/* from _PG_init, while preloading */
extern void key_filter_add(const char *target, const char *vendor_key, const char *invoice_key);
extern bool key_filter_maybe(const char *target, const char *vendor_key, const char *invoice_key);
extern bool key_filter_usable(void);
extern void key_filter_clear(void);
extern void key_filter_ready(void);

/* lifecycle.c: DROP EXTENSION refuses while invoices are open */
extern bool lifecycle_drops_d365inv(Node *stmt);
extern bool lifecycle_before_utility(Node *stmt);	/* true: drops d365inv */
extern void lifecycle_after_utility(void);

/* worker.c */
extern void worker_register_launcher(void);
extern PGDLLEXPORT void d365inv_launcher_main(Datum main_arg);
extern PGDLLEXPORT void d365inv_worker_main(Datum main_arg);

#endif							/* D365INV_H */
