-- bench/history.sql: the settled history bench/history puts behind the
-- worker, straight into the tables (no inbox, no D365): psql -v n=N -v days=D.
--
--   invoice        n rows, received (created_at) evenly over the last `days`
--                  days up to now, settled 2 s later: 96% created, 4%
--                  duplicate (D365 had them), 1 in 10,000 in review
--   status_change  two rows per invoice (pending -> in_flight -> settled)
--   duplicate      5% of n lines repeating a staged key; reject 0.5% of n
--   batch_log      one $batch of 20 per 20 invoices
--   remote_key     the keys settled within d365inv.remote_key_retention's
--                  default (48 h): older ones the retention has deleted
--
-- Keys ('HV00000'/'H000000001', ...) do not collide with bench/gen_invoices.py's,
-- and the inbox's line ids continue after the history's.  Ends with
-- VACUUM ANALYZE, as autovacuum would have done long ago.
\set ON_ERROR_STOP 1
SET synchronous_commit = off;
SET maintenance_work_mem = '256MB';

CREATE TEMP TABLE h AS
    SELECT g, now() - (:days * interval '1 day') * (1 - g::float8 / :n) AS t,
           CASE WHEN g % 25 = 0 THEN 'duplicate' WHEN g % 10000 = 7 THEN 'review' ELSE 'created' END AS st
    FROM generate_series(1, :n) g;

-- in key order: the unique index fills sequentially
INSERT INTO d365inv.invoice (target, vendor_account, invoice_number, invoice_date, amount, currency,
                             description, source, line_id, status, attempts, last_http_status, d365_id,
                             settled_by, batch_id, created_at, updated_at, settled_at)
SELECT 'default', 'HV' || lpad((g / 5000)::text, 5, '0'), 'H' || lpad(g::text, 9, '0'),
       date '2026-01-01' + (g % 300), (g % 100000) / 100.0, 'EUR', 'history', 'history.csv', g,
       st::d365inv.invoice_status, 1, CASE st WHEN 'created' THEN 201 WHEN 'duplicate' THEN 409 ELSE 400 END,
       CASE WHEN st = 'created' THEN 'H-' || g END,
       CASE WHEN st = 'review' THEN NULL ELSE 'response' END, (g + 19) / 20,
       t, t + interval '2 seconds', t + interval '2 seconds'
FROM h ORDER BY g;

INSERT INTO d365inv.status_change (invoice_id, old_status, new_status, changed_at, changed_by, note)
SELECT i.id, s.old_status, s.new_status, i.created_at + s.after, 'postgres', NULL
FROM d365inv.invoice i
CROSS JOIN LATERAL (VALUES ('pending'::d365inv.invoice_status, 'in_flight'::d365inv.invoice_status,
                            interval '1 second'),
                           ('in_flight', i.status, interval '2 seconds')) AS s (old_status, new_status, after)
WHERE i.source = 'history.csv';

INSERT INTO d365inv.duplicate (line_id, loaded_at, target, vendor_account, invoice_number, invoice_date,
                               amount, currency, description, source, duplicate_of, reason, ingested_at)
SELECT :n + g, t, 'default', 'HV' || lpad((g / 5000)::text, 5, '0'), 'H' || lpad(g::text, 9, '0'),
       '2026-01-01', '1.00', 'EUR', 'history', 'history.csv', NULL, 'already staged', t
FROM h WHERE g % 20 = 3;

INSERT INTO d365inv.reject (line_id, loaded_at, target, vendor_account, invoice_number, invoice_date,
                            amount, currency, description, source, reason, ingested_at)
SELECT 2 * :n + g, t, 'default', 'HV00000', 'HX' || g, '2026-01-01', 'abc', 'EUR', 'history',
       'history.csv', 'amount: not a number', t
FROM h WHERE g % 200 = 5;

INSERT INTO d365inv.batch_log (target, kind, started_at, duration_ms, http_status, operations, invoices,
                               created, duplicates, batch_size)
SELECT 'default', 'create', t, 12.5, 200, 20, 20, 19, 1, 20
FROM h WHERE g % 20 = 0;

INSERT INTO d365inv.remote_key (target, vendor_key, invoice_key, d365_id, source, seen_at)
SELECT target, vendor_key, invoice_key, d365_id, 'created', settled_at
FROM d365inv.invoice
WHERE source = 'history.csv' AND status IN ('created', 'duplicate')
  AND settled_at >= now() - interval '48 hours'
ORDER BY target, vendor_key, invoice_key;

SELECT setval(pg_get_serial_sequence('d365inv.inbox', 'line_id'), 3 * :n);
DROP TABLE h;
VACUUM ANALYZE d365inv.invoice, d365inv.status_change, d365inv.duplicate, d365inv.reject,
               d365inv.batch_log, d365inv.remote_key;
