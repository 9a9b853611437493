-- Operating d365inv through SQL: duplicate_rate, batch_health, queue, the
-- review workflow with its audit trail (requeue(), resolve(), status_change)
-- and metrics().  A known history is written straight into the tables, at
-- fixed distances from now() that stay clear of the 1 hour and 24 hour
-- boundaries.

-- a clean slate with known ids
-- the wire tests left invoices open: say so to drop them
SET d365inv.drop_open_invoices = on;
DROP EXTENSION d365inv;
RESET d365inv.drop_open_invoices;
CREATE EXTENSION d365inv;
INSERT INTO d365inv.target (name, batch_size) VALUES ('north', 10), ('quiet', 5);
CREATE ROLE regress_ops_operator LOGIN IN ROLE d365inv_operator;
CREATE ROLE regress_ops_loader LOGIN IN ROLE d365inv_loader;
CREATE ROLE regress_ops_nobody LOGIN;
-- who made a change is shown as 'superuser' for the (variable) superuser running the test
SELECT session_user AS superuser \gset

-- The history.  default: 4 invoices received 10 minutes ago, 3 received
-- 3 hours ago, 3 received 2 days ago; north: 2 received 20 minutes ago.
INSERT INTO d365inv.invoice (id, target, vendor_account, invoice_number, invoice_date, amount,
                             status, attempts, next_attempt_at, last_http_status, last_error,
                             d365_id, settled_by, created_at, updated_at, settled_at)
SELECT id, target, vendor, number, '2024-05-01', 100, status::d365inv.invoice_status, attempts,
       now() + next_in, http, error, d365_id, settled_by,
       now() - received_ago, now() - changed_ago,
       CASE WHEN status IN ('created', 'duplicate', 'review') THEN now() - changed_ago END
FROM (VALUES
    (1, 'default', 'V1', 'A-1', 'created', 1, NULL::interval, 201, NULL, 'D-1', 'response', '10 min'::interval, '9 min'::interval),
    (2, 'default', 'V1', 'A-2', 'duplicate', 1, NULL, 409, 'HTTP 409: record already exists (0x80040237)', NULL, 'response', '10 min', '9 min'),
    (3, 'default', 'V1', 'A-3', 'pending', 0, NULL, NULL, NULL, NULL, NULL, '10 min', '10 min'),
    (4, 'default', 'V1', 'A-4', 'review', 1, NULL, 400, 'HTTP 400: Vendor account V1 is on hold (0x80040265)', NULL, NULL, '10 min', '8 min'),
    (5, 'default', 'V2', 'B-1', 'created', 1, NULL, 201, NULL, 'D-5', 'response', '3 hours', '3 hours'),
    (6, 'default', 'V2', 'B-2', 'duplicate', 0, NULL, NULL, 'already in D365 (found by preflight lookup)', 'D-6', 'preflight', '3 hours', '3 hours'),
    (7, 'default', 'V2', 'B-3', 'retry', 2, '5 min', 503, 'HTTP 503: Service Unavailable', NULL, NULL, '3 hours', '2 hours'),
    (8, 'default', 'V3', 'C-1', 'created', 1, NULL, 201, NULL, 'D-8', 'response', '2 days', '2 days'),
    (9, 'default', 'V3', 'C-2', 'created', 1, NULL, NULL, NULL, 'D-9', 'lookup', '2 days', '2 days'),
    (10, 'default', 'V3', 'C-3', 'in_doubt', 1, '-1 min', NULL, 'no complete answer: Operation timed out', NULL, NULL, '2 days', '2 days'),
    (11, 'north', 'N1', 'D-1', 'created', 1, NULL, 201, NULL, 'D-11', 'response', '20 min', '19 min'),
    (12, 'north', 'N1', 'D-2', 'review', 4, NULL, 503, 'gave up after 4 attempts: HTTP 503: Service Unavailable', NULL, NULL, '20 min', '15 min')
) AS h (id, target, vendor, number, status, attempts, next_in, http, error, d365_id, settled_by,
        received_ago, changed_ago);

-- repeats caught at ingest (one 10 minutes ago, one 2 days ago) and
-- rejects (one 3 hours ago; one 10 minutes ago that named no target)
INSERT INTO d365inv.duplicate (line_id, target, vendor_account, invoice_number, loaded_at, duplicate_of,
                               reason, ingested_at)
VALUES (101, 'default', 'v1', 'a-1 ', now() - interval '10 min', 1, 'already staged', now() - interval '10 min'),
       (102, 'default', 'V3', 'C-1', now() - interval '2 days', 8, 'repeated in the same load',
        now() - interval '2 days');
INSERT INTO d365inv.reject (line_id, target, vendor_account, invoice_number, amount, loaded_at, reason, ingested_at)
VALUES (201, 'default', 'V2', 'B-9', 'ten', now() - interval '3 hours', 'amount: not a decimal number',
        now() - interval '3 hours'),
       (202, NULL, 'V1', 'A-9', '1', now() - interval '10 min', 'target: missing', now() - interval '10 min');

-- the requests the worker sent
INSERT INTO d365inv.batch_log (target, kind, started_at, duration_ms, http_status, operations, invoices,
                               created, duplicates, retries, reviews, in_doubt, unanswered, not_found,
                               throttled, retry_after, batch_size, error)
SELECT target, kind, now() - ago, ms, http, ops, ops, created, dups, retries, reviews, in_doubt, unanswered,
       not_found, throttled, retry_after, 20, NULL
FROM (VALUES
    -- default, the last hour: one clean batch, one with a duplicate and a
    -- rejection, one throttled, one with an unanswered operation; two lookups
    ('default', 'create', '10 min'::interval, 800.0, 200, 3, 1, 1, 0, 1, 0, 0, 0, false, NULL::int),
    ('default', 'create', '15 min', 400.0, 200, 2, 2, 0, 0, 0, 0, 0, 0, false, NULL),
    ('default', 'create', '20 min', 100.0, 429, 2, 0, 0, 2, 0, 0, 0, 0, true, 30),
    ('default', 'create', '22 min', 300.0, 200, 2, 1, 1, 0, 0, 0, 0, 0, false, NULL),
    ('default', 'create', '23 min', 200.0, 200, 2, 1, 0, 0, 0, 0, 1, 0, false, NULL),
    ('default', 'lookup', '25 min', 200.0, 200, 1, 1, 0, 0, 0, 0, 0, 2, false, NULL),
    ('default', 'lookup', '30 min', 50.0, 429, 1, 0, 0, 0, 0, 1, 0, 0, true, 10),
    -- default, 3 hours ago: a clean batch and one lost on the network
    ('default', 'create', '3 hours', 600.0, 200, 3, 3, 0, 0, 0, 0, 0, 0, false, NULL),
    ('default', 'create', '3 hours 1 min', 120000.0, NULL, 2, 0, 0, 0, 0, 2, 0, 0, false, NULL),
    -- default, 2 days ago
    ('default', 'create', '2 days', 500.0, 200, 5, 5, 0, 0, 0, 0, 0, 0, false, NULL),
    -- north, 20 minutes ago: one batch, one genuine error
    ('north', 'create', '20 min', 300.0, 200, 2, 1, 0, 0, 1, 0, 0, 0, false, NULL)
) AS b (target, kind, ago, ms, http, ops, created, dups, retries, reviews, in_doubt, unanswered,
        not_found, throttled, retry_after);

--------------------------------------------------------------------------
-- duplicate_rate: received = queued + duplicates at ingest + rejects, by
-- load time; duplicates = at ingest + status 'duplicate' (any settled_by)
--------------------------------------------------------------------------
SELECT target, period, since IS NULL AS all_time, received, queued, rejected, ingest_duplicates,
       d365_duplicates, duplicates, round(duplicate_rate::numeric, 4) AS duplicate_rate, threshold, healthy
FROM d365inv.duplicate_rate;
-- the periods start where they say
SELECT DISTINCT period, date_trunc('minute', now() - since) AS length
FROM d365inv.duplicate_rate ORDER BY 1;
-- the threshold is d365inv.duplicate_alert_threshold (a server setting,
-- default 0.05); healthy: at most the threshold, or nothing received
SELECT threshold = current_setting('d365inv.duplicate_alert_threshold')::float8 AS threshold_is_setting,
       bool_and(healthy = coalesce(duplicate_rate <= threshold, true)) AS healthy_consistent
FROM d365inv.duplicate_rate GROUP BY threshold;

--------------------------------------------------------------------------
-- batch_health: lookups are not batches; success = 2xx and every
-- operation created or duplicate; errors = operations sent to review
--------------------------------------------------------------------------
SELECT target, period, batches, successful, round(success_rate::numeric, 4) AS success_rate,
       round(avg_ms::numeric, 1) AS avg_ms, round(p95_ms::numeric, 1) AS p95_ms,
       operations, created, duplicates, errors, round(duplicate_share::numeric, 4) AS duplicate_share,
       retries, in_doubt, in_review, lookups, throttled, throttle_wait_s, batch_size, healthy
FROM d365inv.batch_health;
-- healthy (last hour only): genuine errors at most d365inv.error_alert_threshold,
-- and the target not blocked (default: no service_root and invoices open)
SELECT bool_and(healthy = (errors <= current_setting('d365inv.error_alert_threshold')::int
                           AND NOT ts.blocked))
           FILTER (WHERE period = '1h') AS healthy_consistent,
       bool_and(healthy IS NULL) FILTER (WHERE period <> '1h') AS only_last_hour
FROM d365inv.batch_health JOIN d365inv.target_status ts USING (target);

--------------------------------------------------------------------------
-- queue: what is waiting, per target and status
--------------------------------------------------------------------------
SELECT target, status, invoices, due, date_trunc('minute', oldest_age) AS oldest_age,
       date_trunc('minute', longest_unchanged) AS longest_unchanged,
       oldest_received_at = now() - oldest_age AS received_at_consistent,
       next_attempt_at > now() AS next_attempt_later, max_attempts
FROM d365inv.queue;

-- the review queue shows the last error as text
SELECT id, target, invoice_number, attempts, last_http_status, last_error FROM d365inv.review_queue ORDER BY id;

--------------------------------------------------------------------------
-- metrics(): Prometheus text format (ages and next attempt times vary)
--------------------------------------------------------------------------
SELECT CASE WHEN line ~ '^d365inv_(queue_oldest_age_seconds|queue_next_attempt_timestamp_seconds|oldest_open_seconds)\{'
                AND line !~ ' 0$'
            THEN regexp_replace(line, ' [^ ]+$', ' <varies>') ELSE line END AS metrics
FROM regexp_split_to_table(d365inv.metrics(), E'\n') WITH ORDINALITY AS m (line, n)
WHERE line <> '' ORDER BY n;
-- every line is a comment or a well-formed sample, and the text ends with a newline
SELECT count(*) AS malformed_lines
FROM regexp_split_to_table(rtrim(d365inv.metrics(), E'\n'), E'\n') AS line
WHERE line !~ '^# (HELP|TYPE) d365inv_[a-z0-9_]+ .+$'
  AND line !~ '^d365inv_[a-z0-9_]+(\{[a-z]+="([^"\\]|\\.)*"(,[a-z]+="([^"\\]|\\.)*")*\})? -?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?$';
SELECT right(d365inv.metrics(), 1) = E'\n' AS ends_with_newline;
-- the age is about right: the pending invoice was loaded 10 minutes ago
SELECT split_part(line, ' ', 2)::float8 BETWEEN 600 AND 660 AS age_ok
FROM regexp_split_to_table(d365inv.metrics(), E'\n') AS line
WHERE line LIKE 'd365inv_queue_oldest_age_seconds{target="default",status="pending"} %';
-- a line naming a target that does not exist gets no series (a loader must not
-- choose what a scraper stores; see guest.sql)
INSERT INTO d365inv.reject (line_id, target, loaded_at, reason) VALUES (203, E'a"b\\c\nd', now(), 'target: unknown');
SELECT line FROM regexp_split_to_table(d365inv.metrics(), E'\n') AS line
WHERE line LIKE 'd365inv_inbox_lines_total{target="a%status="rejected"%';
DELETE FROM d365inv.reject WHERE reason = 'target: unknown';

--------------------------------------------------------------------------
-- The audit trail: every change of status, who, when, why
--------------------------------------------------------------------------
-- the worker claims and records (here: a superuser doing what it does);
-- a claim has no note, an outcome has the new last_error as its note
UPDATE d365inv.invoice SET status = 'in_flight', next_attempt_at = NULL WHERE id IN (3, 7);
UPDATE d365inv.invoice SET status = 'retry', attempts = attempts + 1, last_error = 'HTTP 429: Too Many Requests'
WHERE id = 3;
UPDATE d365inv.invoice SET status = 'created', d365_id = 'D-7', last_error = NULL, settled_by = 'response'
WHERE id = 7;
-- updates that change no status leave no trace
UPDATE d365inv.invoice SET attempts = attempts WHERE id <= 12;
SELECT invoice_id, old_status, new_status,
       CASE WHEN changed_by = :'superuser' THEN 'superuser' ELSE changed_by END AS changed_by, note
FROM d365inv.status_change ORDER BY changed_at, invoice_id;
-- one statement, one time
SELECT count(DISTINCT changed_at) AS claim_times FROM d365inv.status_change WHERE new_status = 'in_flight';

-- an operator sends a reviewed invoice again, saying why
SET SESSION AUTHORIZATION regress_ops_operator;
SELECT d365inv.requeue(ARRAY[12], 'D365 maintenance is over (INC-7)') AS requeued;
-- ... or sets the note for a plain requeue() itself
BEGIN;
SET LOCAL d365inv.change_note = 'vendor V1 is no longer on hold';
SELECT d365inv.requeue(ARRAY[4]) AS requeued;
COMMIT;
-- a note is required
SELECT d365inv.requeue(ARRAY[4], '  ');
RESET SESSION AUTHORIZATION;

-- the worker sends them; D365 refuses both
UPDATE d365inv.invoice SET status = 'in_flight' WHERE id IN (4, 12);
UPDATE d365inv.invoice SET status = 'review', attempts = attempts + 1, last_http_status = 400,
       last_error = 'HTTP 400: Invoice date 2024-05-01 is in a closed period'
WHERE id IN (4, 12);
SELECT id, last_error FROM d365inv.review_queue ORDER BY id;

-- an operator settles them by hand: one is in D365 after all, one was a duplicate
SET SESSION AUTHORIZATION regress_ops_operator;
SELECT d365inv.resolve(ARRAY[12], 'created', 'posted by hand in D365 (AP ticket 42)', 'D-12') AS resolved;
BEGIN;
SET LOCAL d365inv.change_note = 'the caller''s own note';
-- rows not in review are left alone, and said so
SELECT d365inv.resolve(ARRAY[4, 5, 999, 4], 'duplicate', 'already paid as A-4-OLD') AS resolved;
-- the caller's note is back once resolve() returns
SELECT current_setting('d365inv.change_note') AS change_note;
COMMIT;
-- what resolve() refuses
SELECT d365inv.resolve(ARRAY[4], 'deleted', 'gone');
SELECT d365inv.resolve(ARRAY[4], NULL, 'gone');
SELECT d365inv.resolve(ARRAY[4], 'created', '');
SELECT d365inv.resolve(ARRAY[4, 12], 'created', 'both', 'D-1');
SELECT d365inv.resolve(ARRAY[4], 'created', 'again') AS resolved_again;
-- the operator can read the trail, but not write it
SELECT invoice_id, old_status, new_status,
       CASE WHEN changed_by = :'superuser' THEN 'superuser' ELSE changed_by END AS changed_by, note
FROM d365inv.status_change WHERE invoice_id IN (4, 12) ORDER BY changed_at, invoice_id;
INSERT INTO d365inv.status_change VALUES (4, 'review', 'created', now(), 'me', 'forged');
UPDATE d365inv.status_change SET note = 'rewritten';
DELETE FROM d365inv.status_change;
RESET SESSION AUTHORIZATION;

SELECT id, status, settled_by, d365_id, settled_at IS NOT NULL AS settled, last_error
FROM d365inv.invoice WHERE id IN (4, 12) ORDER BY id;
SELECT count(*) AS in_review FROM d365inv.review_queue;
SELECT target, status, invoices FROM d365inv.queue;
-- manual duplicates count as duplicates
SELECT target, period, duplicates FROM d365inv.duplicate_rate WHERE target = 'default';

--------------------------------------------------------------------------
-- target_status, progress, target_alerts: why invoices are not moving.
-- No worker serves this database (d365inv.database is another), so a
-- served target with open invoices is 'stopped'; the worker's rows in
-- target_state are written here by hand.
--------------------------------------------------------------------------
SELECT d365inv.worker_pid() IS NULL AS no_worker_here;
INSERT INTO d365inv.target (name, service_root, enabled) VALUES
    ('svc', 'https://svc.example/data/', true),       -- open invoices, no worker: stopped
    ('tok', 'https://tok.example/data/', true),       -- the worker: blocked by auth
    ('slow', 'https://slow.example/data/', true),     -- the worker: throttled
    ('busy', 'https://busy.example/data/', true),     -- the worker: delivering
    ('off', 'https://off.example/data/', false),      -- disabled, an old row of the worker
    ('odd', 'https://odd.example/data/', true);       -- the worker: blocked, no reason given
INSERT INTO d365inv.app_user (target, client_id) VALUES ('slow', 'second-user'), ('off', 'x');
INSERT INTO d365inv.target_state (target, state, blocked_by, reason, since, until, app_users,
                                  app_users_throttled, progress_at) VALUES
    ('tok', 'blocked', 'auth', 'authentication failed: HTTP 401 invalid_client: AADSTS7000215: Invalid client secret provided.',
     now() - interval '7 min', now() + interval '30 s', 1, 0, now() - interval '40 min'),
    ('slow', 'throttled', NULL, 'throttled by D365 until later: HTTP 429 Too Many Requests',
     now() - interval '1 min', now() + interval '2 min', 2, 2, now() - interval '1 min'),
    ('busy', 'delivering', NULL, NULL, now() - interval '5 min', NULL, 1, 0, now() - interval '3 s'),
    ('off', 'blocked', 'auth', 'authentication failed: stale', now() - interval '1 day', now(), 5, 5, now() - interval '1 day'),
    ('odd', 'blocked', NULL, NULL, now() + interval '1 hour', NULL, 0, 0, now() + interval '1 hour');
-- open invoices: svc 10 (received 30 min ago), off 2 (2 hours ago); the others none
INSERT INTO d365inv.invoice (id, target, vendor_account, invoice_number, invoice_date, amount, status, created_at)
SELECT 100 + g, 'svc', 'S', 'S-' || g, '2024-05-01', 1, 'pending', now() - interval '30 min' FROM generate_series(1, 10) g;
INSERT INTO d365inv.invoice (id, target, vendor_account, invoice_number, invoice_date, amount, status,
                             last_error, created_at, updated_at)
VALUES (201, 'off', 'O', 'O-1', '2024-05-01', 1, 'retry', 'HTTP 503: Service Unavailable', now() - interval '2 hours', now() - interval '1 hour'),
       (202, 'off', 'O', 'O-2', '2024-05-01', 1, 'pending', NULL, now() - interval '2 hours', now() - interval '2 hours');
SELECT target, state, blocked_by,
       regexp_replace(reason, 'd365inv.database is .*', 'd365inv.database is ...') AS reason,
       since IS NOT NULL AS has_since, until IS NOT NULL AS has_until, blocked, open_invoices,
       date_trunc('minute', now() - oldest_open_at) AS oldest_open_age, app_users, app_users_throttled,
       progress_at IS NOT NULL AS has_progress
FROM d365inv.target_status;
-- the worker's since/until are shown as written
SELECT target, date_trunc('minute', now() - since) AS in_state_for,
       date_trunc('minute', until - now() + interval '1 s') AS next_try_in
FROM d365inv.target_status WHERE target IN ('tok', 'slow');
-- batch_health: healthy is false while a target is blocked or throttled
SELECT b.target, b.healthy, s.state, s.blocked
FROM d365inv.batch_health b JOIN d365inv.target_status s USING (target)
WHERE b.period = '1h' ORDER BY 1;

-- the alert conditions (stall_alert_after 10 min, queue_age_alert_after 1 h)
SELECT current_setting('d365inv.stall_alert_after') AS stall_alert_after,
       current_setting('d365inv.queue_age_alert_after') AS queue_age_alert_after;
SELECT target, alert, firing,
       regexp_replace(message, 'd365inv.database is .*', 'd365inv.database is ...') AS message
FROM d365inv.target_alerts WHERE firing ORDER BY target, alert;
SELECT target, alert, regexp_replace(detail, 'since .*', 'since ...') AS detail,
       figures - 'since' - 'until' - 'progress_at' - 'oldest_open_at' - 'reason' AS figures
FROM d365inv.target_alerts
WHERE (target, alert) IN (('tok', 'auth'), ('off', 'blocked'), ('off', 'queue_age'), ('slow', 'blocked'))
ORDER BY target, alert;
-- blocked counts from the later of the last progress and the oldest open
-- invoice: invoices that just came to a target that last moved long ago
-- are not stalled
UPDATE d365inv.target_state SET progress_at = now() - interval '3 days' WHERE target = 'tok';
INSERT INTO d365inv.invoice (id, target, vendor_account, invoice_number, invoice_date, amount, status, created_at)
VALUES (301, 'tok', 'T', 'T-1', '2024-05-01', 1, 'pending', now() - interval '1 min');
SELECT target, alert, firing FROM d365inv.target_alerts WHERE target = 'tok' ORDER BY alert;
-- ... and they are after 11 minutes
UPDATE d365inv.invoice SET created_at = now() - interval '11 min' WHERE id = 301;
SELECT target, alert, firing,
       regexp_replace(message, 'd365inv.database is .*', 'd365inv.database is ...') AS message
FROM d365inv.target_alerts WHERE target = 'tok' ORDER BY alert;
-- with a worker there, the state is the worker's (worker_pid() is NULL
-- here, so 'tok' with an open invoice reads 'stopped')
SELECT target, state, blocked_by, blocked FROM d365inv.target_status WHERE target = 'tok';
DELETE FROM d365inv.invoice WHERE id = 301;

--------------------------------------------------------------------------
-- progress: settled in the last minute (from status_change), rate, eta
--------------------------------------------------------------------------
SELECT target, state, open_invoices, settled_last_minute, rate_per_s, eta FROM d365inv.progress
WHERE target NOT IN ('default', 'north', 'quiet');
-- the worker settles 6 of svc's 10: 4 created, 1 duplicate, 1 to review
UPDATE d365inv.invoice SET status = 'in_flight' WHERE id BETWEEN 101 AND 106;
UPDATE d365inv.invoice SET status = CASE WHEN id <= 104 THEN 'created' WHEN id = 105 THEN 'duplicate'
                                         ELSE 'review' END::d365inv.invoice_status,
                           settled_at = now()
WHERE id BETWEEN 101 AND 106;
-- a person resolves the one in review: not counted twice
SELECT d365inv.resolve(ARRAY[106], 'created', 'posted by hand') AS resolved;
SELECT target, state, open_invoices, settled_last_minute, created, duplicates, reviews,
       round(rate_per_s::numeric, 3) AS rate_per_s, eta,
       regexp_replace(reason, 'd365inv.database is .*', 'd365inv.database is ...') AS reason
FROM d365inv.progress WHERE target = 'svc';
-- a target that is not blocked gets an eta: busy settles its only invoice
-- (none left: 0); while it had it open with no worker here, it was 'stopped'
INSERT INTO d365inv.invoice (id, target, vendor_account, invoice_number, invoice_date, amount, status)
VALUES (401, 'busy', 'B', 'B-1', '2024-05-01', 1, 'in_flight');
SELECT target, state, blocked, open_invoices FROM d365inv.target_status WHERE target = 'busy';
UPDATE d365inv.invoice SET status = 'created', settled_at = now() WHERE id = 401;
SELECT target, state, open_invoices, settled_last_minute, eta FROM d365inv.progress WHERE target = 'busy';
DELETE FROM d365inv.invoice WHERE id = 401;
-- changes older than a minute are not counted
UPDATE d365inv.status_change SET changed_at = changed_at - interval '61 s'
WHERE invoice_id BETWEEN 101 AND 106;
SELECT target, settled_last_minute, rate_per_s, eta FROM d365inv.progress WHERE target = 'svc';

--------------------------------------------------------------------------
-- format_duration(): what the messages say
--------------------------------------------------------------------------
SELECT s, d365inv.format_duration(s)
FROM unnest(ARRAY[NULL, 'NaN', 'Infinity', -5, 0, 0.04, 9.94, 9.96, 42.4, 89.4, 89.6, 599, 5369, 5371,
                  3 * 3600 + 5 * 60 + 20, 172799, 172800, 2 * 86400 + 4 * 3600 + 59, 1e308]::float8[]) AS s;

--------------------------------------------------------------------------
-- metrics(): the new families for these targets
--------------------------------------------------------------------------
SELECT CASE WHEN line ~ '^d365inv_oldest_open_seconds\{' AND line !~ ' 0$'
            THEN regexp_replace(line, ' [^ ]+$', ' <varies>') ELSE line END AS metrics
FROM regexp_split_to_table(d365inv.metrics(), E'\n') AS line
WHERE line ~ '^d365inv_(alert|target_blocked|open_invoices|oldest_open_seconds)\{target="(svc|tok|slow|busy|off|odd)"'
ORDER BY line COLLATE "C";

-- who may read them: operators (below); the views call format_duration()
-- and worker_pid() with the reader's privileges
SET SESSION AUTHORIZATION regress_ops_operator;
SELECT count(*) AS targets FROM d365inv.target_status;
SELECT count(*) AS targets FROM d365inv.progress;
SELECT count(*) FILTER (WHERE firing) AS firing FROM d365inv.target_alerts;
SELECT * FROM d365inv.target_state;
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION regress_ops_loader;
SELECT count(*) FROM d365inv.target_status;
SELECT count(*) FROM d365inv.progress;
SELECT count(*) FROM d365inv.target_alerts;
SELECT d365inv.format_duration(1);
RESET SESSION AUTHORIZATION;
SET SESSION AUTHORIZATION regress_ops_nobody;
SELECT count(*) FROM d365inv.target_status;
RESET SESSION AUTHORIZATION;

-- the targets go, and with them their state
DELETE FROM d365inv.invoice WHERE target IN ('svc', 'off');
DELETE FROM d365inv.target WHERE name IN ('svc', 'tok', 'slow', 'busy', 'off', 'odd');
SELECT count(*) AS target_state_rows FROM d365inv.target_state;

--------------------------------------------------------------------------
-- Privileges: operators read the views and call metrics(); nobody else
--------------------------------------------------------------------------
SET SESSION AUTHORIZATION regress_ops_operator;
SELECT count(*) > 0 AS readable FROM d365inv.duplicate_rate;
SELECT count(*) > 0 AS readable FROM d365inv.batch_health;
SELECT count(*) > 0 AS readable FROM d365inv.queue;
SELECT length(d365inv.metrics()) > 0 AS metrics;
RESET SESSION AUTHORIZATION;

SET SESSION AUTHORIZATION regress_ops_loader;
SELECT count(*) FROM d365inv.duplicate_rate;
SELECT count(*) FROM d365inv.status_change;
SELECT d365inv.metrics();
SELECT d365inv.resolve(ARRAY[4], 'created', 'x');
SELECT d365inv.requeue(ARRAY[4], 'x');
RESET SESSION AUTHORIZATION;

SELECT p.oid::regprocedure AS function
FROM pg_proc p
WHERE p.pronamespace = 'd365inv'::regnamespace
  AND (has_function_privilege('regress_ops_nobody', p.oid, 'EXECUTE')
       OR has_function_privilege('regress_ops_loader', p.oid, 'EXECUTE')
          AND p.proname IN ('metrics', 'resolve', 'requeue', 'record_status_change'));
SELECT c.relname, has_table_privilege('regress_ops_operator', c.oid, 'SELECT') AS operator_select,
       has_table_privilege('regress_ops_operator', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS operator_write,
       has_table_privilege('regress_ops_loader', c.oid, 'SELECT') AS loader_select,
       has_table_privilege('regress_ops_nobody', c.oid, 'SELECT') AS nobody_select
FROM pg_class c
WHERE c.oid IN ('d365inv.duplicate_rate'::regclass, 'd365inv.batch_health'::regclass,
                'd365inv.queue'::regclass, 'd365inv.status_change'::regclass,
                'd365inv.target_status'::regclass, 'd365inv.progress'::regclass,
                'd365inv.target_alerts'::regclass, 'd365inv.target_state'::regclass)
ORDER BY 1;

DROP ROLE regress_ops_operator, regress_ops_loader, regress_ops_nobody;
