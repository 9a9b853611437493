-- Nothing is granted to PUBLIC; loaders load, operators operate, and only
-- superusers decide where invoices are sent.
CREATE ROLE regress_nobody LOGIN;
CREATE ROLE regress_loader LOGIN IN ROLE d365inv_loader;
CREATE ROLE regress_operator LOGIN IN ROLE d365inv_operator;

-- no PUBLIC grants on any d365inv object
SELECT count(*) AS public_table_grants
FROM information_schema.role_table_grants
WHERE table_schema = 'd365inv' AND grantee = 'PUBLIC';
SELECT count(*) AS public_function_grants
FROM information_schema.role_routine_grants
WHERE routine_schema = 'd365inv' AND grantee = 'PUBLIC';
SELECT p.proname
FROM pg_proc p
WHERE p.pronamespace = 'd365inv'::regnamespace
  AND has_function_privilege('regress_nobody', p.oid, 'EXECUTE');

-- a role without the group roles can read and change nothing
SET ROLE regress_nobody;
SELECT * FROM d365inv.invoice;
SELECT * FROM d365inv.inbox;
SELECT * FROM d365inv.target;
INSERT INTO d365inv.inbox (vendor_account) VALUES ('V1');
COPY d365inv.inbox (vendor_account) FROM STDIN;
V1
\.
SELECT * FROM d365inv.ingest();
SELECT d365inv.d365inv_submit();
UPDATE d365inv.invoice SET status = 'created';
DELETE FROM d365inv.reject;
RESET ROLE;
SELECT has_schema_privilege('regress_nobody', 'd365inv', 'USAGE') AS nobody_schema_usage;
-- even with USAGE on the schema, every table and function stays closed
GRANT USAGE ON SCHEMA d365inv TO regress_nobody;
SET ROLE regress_nobody;
SELECT count(*) FROM d365inv.invoice;
SELECT count(*) FROM d365inv.inbox;
SELECT count(*) FROM d365inv.duplicate;
SELECT count(*) FROM d365inv.reject;
SELECT count(*) FROM d365inv.target;
INSERT INTO d365inv.inbox (vendor_account) VALUES ('V1');
SELECT * FROM d365inv.ingest();
SELECT d365inv.d365inv_submit();
RESET ROLE;
REVOKE USAGE ON SCHEMA d365inv FROM regress_nobody;

-- a loader may COPY into the inbox, run ingest and read what became of its lines
SET ROLE regress_loader;
COPY d365inv.inbox (vendor_account, invoice_number, invoice_date, amount) FROM STDIN (FORMAT csv);
V900,INV-900,2024-07-01,9.00
V900,inv-900,2024-07-01,9.00
V900,INV-901,2024-07-32,9.00
\.
SELECT * FROM d365inv.ingest();
SELECT reason FROM d365inv.reject WHERE vendor_account = 'V900';
SELECT reason FROM d365inv.duplicate WHERE vendor_account = 'V900';
-- ... but not read or change the queue, submit, or touch targets
SELECT count(*) FROM d365inv.invoice;
SELECT d365inv.d365inv_submit();
UPDATE d365inv.target SET service_root = 'https://attacker.example/';
DELETE FROM d365inv.inbox;
RESET ROLE;

-- an operator may also read the queue and submit
SET ROLE regress_operator;
SELECT status, count(*) FROM d365inv.invoice WHERE vendor_account = 'V900' GROUP BY 1;
SELECT d365inv.d365inv_submit() >= 0 AS submitted;
-- ... but cannot change where invoices go, nor edit the queue by hand
UPDATE d365inv.target SET service_root = 'https://attacker.example/';
INSERT INTO d365inv.target (name, service_root) VALUES ('evil', 'https://attacker.example/');
UPDATE d365inv.invoice SET status = 'created';
-- the delivery record and the review queue are readable; secrets are not
SELECT count(*) >= 0 AS readable FROM d365inv.batch_log;
SELECT count(*) >= 0 AS readable FROM d365inv.review_queue;
-- so are the counters, which only the triggers write
SELECT count(*) >= 0 AS readable FROM d365inv.tally;
INSERT INTO d365inv.tally VALUES ('invoice', 'default', 'created', 1000);
SELECT d365inv.recount();
SELECT d365inv.requeue(ARRAY[]::bigint[]) AS requeued;
SELECT * FROM d365inv.target_secret;
INSERT INTO d365inv.target_secret VALUES ('default', 'stolen');
UPDATE d365inv.target SET token_url = 'https://attacker.example/token';
-- nor wait where no worker serves this database
SELECT * FROM d365inv.d365inv_submit(wait => '1 s');
RESET ROLE;

-- d365inv_submit(wait) refuses to run where it cannot see the worker's progress
BEGIN;
SELECT * FROM d365inv.d365inv_submit(wait => '1 s');
ROLLBACK;
SET default_transaction_isolation = 'repeatable read';
SELECT * FROM d365inv.d365inv_submit(wait => '1 s');
RESET default_transaction_isolation;

DROP ROLE regress_nobody, regress_loader, regress_operator;
