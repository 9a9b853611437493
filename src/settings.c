/*-------------------------------------------------------------------------
 *
 * settings.c
 *	  The d365inv.* configuration parameters (GUCs).
 *
 * Everything that changes where or how data is sent is PGC_SIGHUP or
 * PGC_POSTMASTER: only a superuser (postgresql.conf, ALTER SYSTEM) sets
 * it, and the worker picks it up on reload.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "miscadmin.h"
#include "utils/guc.h"

#include "d365inv.h"

char	   *d365inv_database = NULL;
int			d365inv_max_retries = 3;
int			d365inv_retry_base_ms = 1000;
int			d365inv_retry_max_ms = 3600 * 1000;
int			d365inv_in_doubt_delay_ms = 10 * 1000;
int			d365inv_server_request_lifetime_ms = 20 * 60 * 1000;
int			d365inv_failover_lookup_window_s = 24 * 3600;
bool		d365inv_drop_open_invoices = false;
int			d365inv_naptime_ms = 10 * 1000;
int			d365inv_http_connect_timeout_ms = 10 * 1000;
int			d365inv_http_timeout_ms = 120 * 1000;
int			d365inv_max_response_kb = 64 * 1024;
char	   *d365inv_ca_file = NULL;
int			d365inv_batch_log_retention_s = 30 * 86400;
int			d365inv_remote_key_retention_s = 48 * 3600;
int			d365inv_audit_retention_s = 365 * 86400;
char	   *d365inv_change_note = NULL;
char	   *d365inv_source = NULL;
int			d365inv_key_filter_size_kb = 8192;
double		d365inv_key_filter_fpr = 0.01;
bool		d365inv_key_filter_enabled = true;
double		d365inv_duplicate_alert_threshold = 0.05;
int			d365inv_error_alert_threshold = 10;
int			d365inv_alert_interval_ms = 60 * 1000;
int			d365inv_stall_alert_after_ms = 10 * 60 * 1000;
int			d365inv_queue_age_alert_after_ms = 3600 * 1000;
int			d365inv_progress_interval_ms = 10 * 1000;

void
d365inv_define_settings(void)
{
	/*
	 * Server-start settings can only be defined while the library is being
	 * preloaded; elsewhere (LOAD, CREATE EXTENSION or ingest() on a server
	 * without the preload) defining them would end the session.  Those
	 * sessions have no worker and no key filter, so they need none of them.
	 */
	if (process_shared_preload_libraries_in_progress)
	{
		DefineCustomStringVariable("d365inv.database",
								   "Database the d365inv worker serves.",
								   "The extension must be installed there; the worker idles until it is.",
								   &d365inv_database, "postgres",
								   PGC_POSTMASTER, 0, NULL, NULL, NULL);

		DefineCustomIntVariable("d365inv.key_filter_size",
								"Memory for the bloom filter of keys known to exist in D365 (0: none).",
								"Set at server start; 8 MB holds about 6.7 million keys at a 1% false-positive rate.",
								&d365inv_key_filter_size_kb, 8192, 0, 1024 * 1024,
								PGC_POSTMASTER, GUC_UNIT_KB, NULL, NULL, NULL);

		DefineCustomRealVariable("d365inv.key_filter_false_positive_rate",
								 "False-positive rate the key filter is sized for.",
								 "Sets the number of hash functions; set at server start.",
								 &d365inv_key_filter_fpr, 0.01, 0.000001, 0.5,
								 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	}

	DefineCustomIntVariable("d365inv.max_retries",
							"Transient failures an invoice may have before it goes to review.",
							NULL, &d365inv_max_retries, 3, 0, 100,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.retry_base_delay",
							"Wait before the first retry; doubled for each further retry, with jitter.",
							"A longer Retry-After from D365 wins.",
							&d365inv_retry_base_ms, 1000, 1, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.retry_max_delay",
							"Longest wait between retries.",
							NULL, &d365inv_retry_max_ms, 3600 * 1000, 1, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.in_doubt_delay",
							"Wait before looking up an invoice whose fate is unknown.",
							"Gives D365 time to finish a request that timed out on our side.",
							&d365inv_in_doubt_delay_ms, 10 * 1000, 0, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.server_request_lifetime",
							"Longest time D365 may still commit a request after d365inv gave up on it.",
							"With entity_id_mode 'server', an invoice whose request timed out or was cut off is sent again only after a lookup made this long after that does not find it.  The default is twice Business Central's documented 10-minute request limit (Dataverse: 2 minutes).",
							&d365inv_server_request_lifetime_ms, 20 * 60 * 1000, 0, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.failover_lookup_window",
							"After this server took over from another (a new timeline), how long every invoice is looked up before it is sent.",
							"With entity_id_mode 'server': lines that asynchronous replication lost and that are loaded again may have been created by the old primary.",
							&d365inv_failover_lookup_window_s, 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);

	DefineCustomBoolVariable("d365inv.drop_open_invoices",
							 "Let DROP EXTENSION d365inv delete invoices that are still open.",
							 "Off: DROP EXTENSION refuses while invoices are pending, retry, in_flight or in_doubt.",
							 &d365inv_drop_open_invoices, false,
							 PGC_SUSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.naptime",
							"Longest time the worker sleeps before looking for work unasked.",
							NULL, &d365inv_naptime_ms, 10 * 1000, 10, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.http_connect_timeout",
							"Timeout for connecting to D365 or the token endpoint.",
							NULL, &d365inv_http_connect_timeout_ms, 10 * 1000, 100, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.http_timeout",
							"Timeout for a whole request, from connect to the last byte of the response.",
							"A request that times out after it was sent leaves its invoices in_doubt.",
							&d365inv_http_timeout_ms, 120 * 1000, 100, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.max_response_size",
							"Largest response accepted from D365.",
							NULL, &d365inv_max_response_kb, 64 * 1024, 64, 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);

	DefineCustomStringVariable("d365inv.ca_file",
							   "CA bundle used to verify D365's TLS certificate (empty: the system's).",
							   "Certificate verification is always on.",
							   &d365inv_ca_file, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.batch_log_retention",
							"How long rows of d365inv.batch_log are kept.",
							NULL, &d365inv_batch_log_retention_s, 30 * 86400, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.remote_key_retention",
							"How long a key seen in D365 is remembered in d365inv.remote_key.",
							NULL, &d365inv_remote_key_retention_s, 48 * 3600, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.audit_retention",
							"How long rows of d365inv.status_change (the audit trail) are kept.",
							NULL, &d365inv_audit_retention_s, 365 * 86400, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);

	DefineCustomStringVariable("d365inv.change_note",
							   "Why a status is being changed by hand; recorded in the audit trail.",
							   NULL, &d365inv_change_note, "",
							   PGC_USERSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);

	DefineCustomStringVariable("d365inv.source",
							   "Where the lines loaded into d365inv.inbox come from (a file name); fills inbox.source.",
							   "SET it before a COPY that does not load the source column.",
							   &d365inv_source, "",
							   PGC_USERSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);

	DefineCustomBoolVariable("d365inv.key_filter",
							 "Use the key filter to skip preflight lookups of keys not in D365 at the last refresh_remote_keys().",
							 NULL, &d365inv_key_filter_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomRealVariable("d365inv.duplicate_alert_threshold",
							 "Duplicate rate over the last hour above which the worker raises an alert.",
							 "Healthy upstream systems stay under 5%.",
							 &d365inv_duplicate_alert_threshold, 0.05, 0.0, 1.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.error_alert_threshold",
							"Genuine errors (invoices sent to review) in the last hour above which the worker raises an alert.",
							NULL, &d365inv_error_alert_threshold, 10, 0, INT_MAX,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.alert_interval",
							"How often the worker checks the alert conditions.",
							NULL, &d365inv_alert_interval_ms, 60 * 1000, 100, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	/*
	 * Read by SQL (d365inv.target_alerts, d365inv_submit(wait)) with
	 * current_setting(): a value is shown with its unit ("10min"), which
	 * casts to interval.
	 */
	DefineCustomIntVariable("d365inv.stall_alert_after",
							"How long a target with open invoices may go without settling one before the worker raises the blocked alert (0: never).",
							NULL, &d365inv_stall_alert_after_ms, 10 * 60 * 1000, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.queue_age_alert_after",
							"Age of a target's oldest open invoice above which the worker raises the queue_age alert (0: never).",
							NULL, &d365inv_queue_age_alert_after_ms, 3600 * 1000, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("d365inv.progress_interval",
							"How often d365inv_submit(wait) reports its progress in a NOTICE (0: never).",
							NULL, &d365inv_progress_interval_ms, 10 * 1000, 0, INT_MAX,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	MarkGUCPrefixReserved("d365inv");
}
