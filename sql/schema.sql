-- The extension's objects, its defaults, and that it can be dropped,
-- re-created and installed in a second database.
CREATE EXTENSION d365inv;

SELECT c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'd365inv' AND c.relkind IN ('r', 'v')
ORDER BY 1;

SELECT enum_range(NULL::d365inv.invoice_status);

-- the default target exists, and sends nothing until a service root is set
SELECT name, service_root, entity_set, vendor_property, invoice_property, id_property,
       company, batch_size, url_form, duplicate_statuses, duplicate_codes
FROM d365inv.target;

-- inbox data columns are all text, so COPY never fails on a bad value
SELECT attname, format_type(atttypid, atttypmod)
FROM pg_attribute
WHERE attrelid = 'd365inv.inbox'::regclass AND attnum > 0 AND NOT attisdropped
ORDER BY attnum;

-- both group roles exist, operator includes loader
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'd365inv\_%' ORDER BY 1;
SELECT pg_has_role('d365inv_operator', 'd365inv_loader', 'MEMBER') AS operator_is_loader;

-- batch_size has a sane range
\set VERBOSITY terse
UPDATE d365inv.target SET batch_size = 0 WHERE name = 'default';
UPDATE d365inv.target SET batch_size = 5000 WHERE name = 'default';
-- a service root must be an http(s) URL
UPDATE d365inv.target SET service_root = 'ftp://example.com/' WHERE name = 'default';
UPDATE d365inv.target SET service_root = 'https://contoso.example.com/data/' WHERE name = 'default';
UPDATE d365inv.target SET service_root = NULL WHERE name = 'default';

\set VERBOSITY default
-- drop and re-create: roles survive and are reused
DROP EXTENSION d365inv;
SELECT count(*) AS roles_left FROM pg_roles WHERE rolname LIKE 'd365inv\_%';
CREATE EXTENSION d365inv;
SELECT count(*) AS targets FROM d365inv.target;

-- a second database in the same cluster
SELECT current_database() AS regress_db \gset
DROP DATABASE IF EXISTS d365inv_regression_second;
CREATE DATABASE d365inv_regression_second;
\c d365inv_regression_second
CREATE EXTENSION d365inv;
SELECT extname, extversion FROM pg_extension WHERE extname = 'd365inv';
\c :regress_db
DROP DATABASE d365inv_regression_second;
