-- A guest in a production database: no role can crash the server, escalate
-- or stop the pipeline with what it is allowed to call or load.
TRUNCATE d365inv.invoice, d365inv.duplicate, d365inv.reject, d365inv.inbox;
CREATE ROLE regress_guest_loader LOGIN IN ROLE d365inv_loader;
CREATE ROLE regress_guest_operator LOGIN IN ROLE d365inv_operator;
INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, payload)
VALUES ('GV1', 'GI1', '2024-01-15', '10.50', '{"Qty": 2}');
SELECT queued FROM d365inv.ingest();
SELECT id AS guest_id FROM d365inv.invoice WHERE invoice_number = 'GI1' \gset

-- Every function and procedure of the schema, called by each role with NULL in each
-- argument in turn, with ordinary values, and with every argument huge.
-- The result is each call's SQLSTATE (00000 = it returned); what matters is
-- that each call returns or fails cleanly, and that the server is still up
-- for the next one.
CREATE FUNCTION pg_temp.call_everything(who text, id bigint) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    f       record;
    args    text[];
    outcome text;
    line    text;
BEGIN
    FOR f IN SELECT p.oid, p.proname, ARRAY(SELECT unnest(p.proargtypes::oid[])) AS types,
                    coalesce(p.proargnames, '{}') AS names,
                    p.oid::regprocedure::text AS signature, p.prokind
             FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'd365inv'::regnamespace AND p.prokind IN ('f', 'p')
               AND p.prorettype <> 'trigger'::regtype
             ORDER BY p.oid::regprocedure::text
    LOOP
        line := who || ' ' || f.signature || ':';
        FOR v IN 0 .. coalesce(array_length(f.types, 1), 0) + 1 LOOP
            -- v = 0: ordinary values; 1..n: NULL in argument v; n + 1: all huge
            IF v = coalesce(array_length(f.types, 1), 0) + 1 AND v = 1 THEN
                CONTINUE;       -- no arguments: nothing to make huge
            END IF;
            args := '{}';
            FOR i IN 1 .. coalesce(array_length(f.types, 1), 0) LOOP
                args := args || CASE
                    WHEN i = v THEN 'NULL::' || format_type(f.types[i], NULL)
                    -- names stay valid, so that the huge data reaches the code behind them
                    WHEN v = array_length(f.types, 1) + 1
                         AND coalesce(f.names[i], '') NOT IN ('target', 'operation', 'outcome', 'form') THEN
                        CASE format_type(f.types[i], NULL)
                            WHEN 'text' THEN 'repeat(''K'', 4000000)'
                            WHEN 'integer' THEN '2147483647'
                            WHEN 'bigint' THEN '9223372036854775807'
                            WHEN 'boolean' THEN 'true'
                            WHEN 'bigint[]' THEN 'array_fill(' || id || '::bigint, ARRAY[200000])'
                            WHEN 'bytea' THEN 'convert_to(repeat(E''--b\r\n'', 800000), ''UTF8'')'
                            WHEN 'jsonb' THEN '(SELECT jsonb_object_agg(''h'' || i, repeat(''v'', 100)) FROM generate_series(1, 40000) i)'
                            WHEN 'interval' THEN '''1000 years''::interval'
                            WHEN 'double precision' THEN '1e308'
                            WHEN 'timestamp with time zone' THEN '''-infinity''::timestamptz'
                        END
                    ELSE
                        CASE format_type(f.types[i], NULL)
                            WHEN 'text' THEN quote_literal(CASE f.names[i]
                                WHEN 'operation' THEN 'create'
                                WHEN 'outcome' THEN 'duplicate'
                                WHEN 'form' THEN 'guid'
                                WHEN 'content_type' THEN 'multipart/mixed; boundary=b'
                                ELSE 'default' END)
                            WHEN 'integer' THEN '201'
                            WHEN 'bigint' THEN '1'
                            WHEN 'boolean' THEN 'false'
                            WHEN 'bigint[]' THEN 'ARRAY[' || id || ']::bigint[]'
                            WHEN 'bytea' THEN 'convert_to(E''--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 201 Created\r\n\r\n\r\n--b--\r\n'', ''UTF8'')'
                            WHEN 'jsonb' THEN '''{}''::jsonb'
                            WHEN 'interval' THEN '''0''::interval'
                            WHEN 'double precision' THEN '42.5'
                            WHEN 'timestamp with time zone' THEN '''2024-01-15 12:00+00''::timestamptz'
                        END
                END;
            END LOOP;
            IF array_position(args, NULL) IS NOT NULL THEN
                RAISE EXCEPTION 'no test value for an argument of %', f.signature;
            END IF;
            BEGIN
                -- an aggregate over the text of every result row: the call
                -- cannot be planned away.  A procedure is CALLed (here
                -- inside a transaction: it cannot commit)
                IF f.prokind = 'p' THEN
                    EXECUTE format('CALL d365inv.%I(%s)', f.proname, array_to_string(args, ', '));
                ELSE
                    EXECUTE format('SELECT sum(length(r)) FROM (SELECT d365inv.%I(%s)::text AS r) call',
                                   f.proname, array_to_string(args, ', '));
                END IF;
                outcome := '00000';
            EXCEPTION WHEN OTHERS THEN
                outcome := SQLSTATE;
            END;
            line := line || ' ' || CASE WHEN v = 0 THEN 'values'
                                        WHEN v > array_length(f.types, 1) THEN 'huge'
                                        ELSE 'null' || v END || '=' || outcome;
        END LOOP;
        RETURN NEXT line;
    END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION pg_temp.call_everything(text, bigint) TO PUBLIC;
SET client_min_messages = error;
SELECT pg_temp.call_everything('superuser', :guest_id);
SET ROLE regress_guest_operator;
SELECT pg_temp.call_everything('operator', :guest_id);
SET ROLE regress_guest_loader;
SELECT pg_temp.call_everything('loader', :guest_id);
RESET ROLE;
RESET client_min_messages;

-- The procedure again, CALLed on its own (above it ran inside the loop's
-- transaction, which it refuses before it reads its arguments).
\set VERBOSITY sqlstate
CALL d365inv.refresh_remote_keys_by_page(NULL);
CALL d365inv.refresh_remote_keys_by_page('default', NULL);
CALL d365inv.refresh_remote_keys_by_page(repeat('K', 4000000), true);
SET ROLE regress_guest_operator;
CALL d365inv.refresh_remote_keys_by_page('default');
RESET ROLE;
\set VERBOSITY default
BEGIN;
CALL d365inv.refresh_remote_keys_by_page('default');
ROLLBACK;

-- The crashes that were: classify(NULL, ...), and build_batch()/classify()
-- returning memory SPI_finish() had freed (a large body, a long
-- duplicate_messages entry).
SET ROLE regress_guest_operator;
SELECT d365inv.classify(NULL, 200);
SELECT d365inv.classify('default', NULL);
SELECT length(body) > 100000 AS big_body_built
FROM d365inv.build_batch('default', array_fill(:guest_id::bigint, ARRAY[1000]));
SELECT length(body) FROM d365inv.build_batch('default', array_fill(:guest_id::bigint, ARRAY[20000]));
SELECT length(body) FROM d365inv.build_batch('default', array_fill(:guest_id::bigint, ARRAY[2, 2]));
RESET ROLE;
UPDATE d365inv.target SET duplicate_messages = ARRAY[repeat('long message ', 100000), 'already exists']
WHERE name = 'default';
SET ROLE regress_guest_operator;
SELECT outcome FROM d365inv.classify('default', 400,
    '{"error":{"code":"x","message":"the record already exists"}}');
RESET ROLE;
UPDATE d365inv.target SET duplicate_messages = DEFAULT WHERE name = 'default';

-- A loader writes the data columns of the inbox, never line_id or loaded_at.
SET ROLE regress_guest_loader;
INSERT INTO d365inv.inbox (line_id, vendor_account) OVERRIDING SYSTEM VALUE VALUES (1, 'V');
INSERT INTO d365inv.inbox (loaded_at, vendor_account) VALUES ('2000-01-01', 'V');
UPDATE d365inv.inbox SET line_id = 1;
RESET ROLE;
-- ... and a superuser who repeats line_ids by hand does not stop ingest():
-- every line is still accounted for exactly once.
INSERT INTO d365inv.inbox (line_id, vendor_account, invoice_number, invoice_date, amount)
OVERRIDING SYSTEM VALUE
VALUES (7, 'LV1', 'L1', '2024-01-15', '1'), (7, 'LV1', 'L2', '2024-01-15', '1'),
       (7, 'LV1', 'L1', '2024-01-15', '1'), (8, 'LV1', '', '2024-01-15', '1'),
       (8, 'LV1', 'L3', 'bad', '1');
SELECT * FROM d365inv.ingest();
SELECT count(DISTINCT line_id) AS distinct_line_ids
FROM (SELECT line_id FROM d365inv.invoice WHERE vendor_account = 'LV1'
      UNION ALL SELECT line_id FROM d365inv.duplicate WHERE vendor_account = 'LV1'
      UNION ALL SELECT line_id FROM d365inv.reject WHERE vendor_account = 'LV1') l;

-- Payloads: what the check accepts, ingest() can store (the same parser, and
-- limits well inside jsonb's), so no line can fail the load.
SELECT p AS payload, d365inv.is_json_object(p) AS accepted,
       d365inv.line_problems('default', true, 20, 20, 'V', 'I', '2024-01-15', NULL, '1', NULL, p) AS problem
FROM (VALUES ('{"Qty": 1}'), ('{"Qty": 1e200000}'), ('{"Qty": 1e-1000000}'), ('{"Qty": 0e-5000}'),
             ('{"Qty": 1e999}'), ('{"Qty": 1e1000}'), ('{"Qty": -1.5E-900}'),
             ('{"Qty": 12345678901234567890.123456789}'), ('{"a": "\u0000"}'), ('{"a": "\ud800"}'),
             ('{"a": tru}'), ('[1]'), ('"x"'), ('{"a": 1} x')) AS v (p);
SELECT d365inv.is_json_object('{"a":' || repeat('[', 63) || repeat(']', 63) || '}') AS depth_64,
       d365inv.is_json_object('{"a":' || repeat('[', 64) || repeat(']', 64) || '}') AS depth_65,
       d365inv.is_json_object(repeat('{"a":', 200000)) AS depth_200000,
       d365inv.is_json_object('{"a": "' || repeat('x', 1048576) || '"}') AS over_1mb;
INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, payload)
VALUES ('PV', 'P1', '2024-01-15', '1', '{"Qty": 1e200000}'),
       ('PV', 'P2', '2024-01-15', '1', '{"Qty": 1e-1000000}'),
       ('PV', 'P3', '2024-01-15', '1', '{"a":' || repeat('[', 100000) || repeat(']', 100000) || '}'),
       ('PV', 'P4', '2024-01-15', '1', '{"Qty": 12345678901234567890.123456789, "Big": 1e400}');
SELECT * FROM d365inv.ingest();
SELECT invoice_number, reason FROM d365inv.reject WHERE vendor_account = 'PV' ORDER BY 1;
-- numbers go out with the exact value they came in with (jsonb's numeric),
-- never through a double
SELECT substring(convert_from(b.body, 'UTF8') from '"Qty":[0-9.]+') AS qty_on_the_wire,
       length(substring(convert_from(b.body, 'UTF8') from '"Big":[0-9]+')) - 6 AS big_digits
FROM d365inv.invoice i, d365inv.build_batch('default', ARRAY[i.id]) b
WHERE i.invoice_number = 'P4';

-- Keys: blanks, byte-order marks and zero-width characters at either end are
-- trimmed; inside a key they (and control characters) reject the line.
SELECT k AS key, d365inv.clean_key(k) AS cleaned, d365inv.invoice_key(k) AS normalised,
       d365inv.line_problems('default', true, 20, 20, k, 'I', '2024-01-15', NULL, '1', NULL, NULL) AS problem
FROM (VALUES (E'\uFEFFV100'), (E'V100\u00A0'), (E' \u2003V100\u3000'), (E'\u200BV100\u200D'),
             (E'V1\u00A000'), (E'V1\u200B00'), (E'A\r\nB'), (E'I\x01'), (E'V\x7F1'),
             (E'\u2060'), ('V 100'), ('v100')) AS v (k);
-- Folding: case only, never a compatibility character onto a plain letter
-- that D365's accent-sensitive collation keeps apart.
SELECT k AS key, d365inv.invoice_key(k) AS normalised, d365inv.invoice_key(k) = d365inv.invoice_key(other) AS same_as,
       other
FROM (VALUES ('ÄBC', 'äbc'), ('ÉLAN', 'élan'), (E'\u212A1', 'k1'), (E'\u212B1', 'å1'),
             (E'\u01301', 'i1'), ('ΣΑΣ', 'σασ'), ('ДОМ', 'дом'), ('ß1', 'SS1'), ('ﬁ1', 'fi1'),
             (E'\uFF21', 'a'), ('V100', ' v100 ')) AS v (k, other);
-- A headerless Excel CSV with a byte-order mark, a trailing no-break space
-- and the clean line of the same invoice: one invoice, two duplicates, and
-- what is sent has no BOM.
COPY d365inv.inbox (vendor_account, invoice_number, invoice_date, amount) FROM STDIN (FORMAT csv);
﻿BV1,BOM-1,2024-01-15,5
BV1 ,BOM-1,2024-01-15,5
BV1,BOM-1,2024-01-15,5
\.
SELECT * FROM d365inv.ingest();
SELECT vendor_account = 'BV1' AS stored_clean, octet_length(vendor_account) AS bytes
FROM d365inv.invoice WHERE invoice_number = 'BOM-1';
SELECT count(*) AS bom_on_the_wire
FROM d365inv.invoice i, d365inv.build_batch('default', ARRAY[i.id]) b
WHERE i.invoice_number = 'BOM-1' AND position('\xefbbbf'::bytea IN b.body) > 0;

-- Target settings that end up in request lines and headers are checked.
\set VERBOSITY terse
UPDATE d365inv.target SET service_root = 'http://d365.example/data/ x' WHERE name = 'default';
UPDATE d365inv.target SET service_root = E'http://d365.example/data/\r\nX-Injected: 1' WHERE name = 'default';
UPDATE d365inv.target SET company_property = 'dataAreaId eq 1' WHERE name = 'default';
UPDATE d365inv.target SET auth = 'oauth2', token_url = 'https://login.example/t', client_id = 'c',
                          scope = 's', service_root = 'http://d365.example/data/' WHERE name = 'default';
UPDATE d365inv.target SET auth = 'oauth2', token_url = 'http://login.example/t', client_id = 'c',
                          scope = 's', service_root = 'https://d365.example/data/' WHERE name = 'default';
UPDATE d365inv.target SET auth = 'oauth2', token_url = 'http://127.0.0.1:9/t', client_id = 'c',
                          scope = 's', service_root = 'http://localhost.example.com/data/' WHERE name = 'default';
-- a test server on this machine may be plain http
UPDATE d365inv.target SET auth = 'oauth2', token_url = 'http://127.0.0.1:9/t', client_id = 'c',
                          scope = 's', service_root = 'http://localhost:8/data/' WHERE name = 'default';
UPDATE d365inv.target SET auth = 'none', token_url = NULL, client_id = NULL, scope = NULL,
                          service_root = NULL WHERE name = 'default';
\set VERBOSITY default

-- metrics(): labels only for configured targets, whatever target name a
-- loader put on its lines.
INSERT INTO d365inv.invoice (target, vendor_account, invoice_number, invoice_date, amount)
VALUES (E'evil"}\nd365inv_worker_up 1\r', 'MV', 'M1', '2024-01-15', 1);
SELECT count(*) FILTER (WHERE l LIKE '%evil%') AS evil_lines,
       count(*) FILTER (WHERE l LIKE 'd365inv_worker_up %') AS worker_up_lines,
       count(*) FILTER (WHERE l LIKE '%target="default"%') > 0 AS default_labelled
FROM regexp_split_to_table(d365inv.metrics(), E'\n') AS l;

TRUNCATE d365inv.invoice, d365inv.duplicate, d365inv.reject, d365inv.inbox;
DROP ROLE regress_guest_loader, regress_guest_operator;

-- The design card's call, as written, by an operator with the default
-- search_path; the schema's own name without the stutter.
CREATE ROLE regress_card_operator LOGIN IN ROLE d365inv_operator;
CREATE ROLE regress_card_loader LOGIN IN ROLE d365inv_loader;
SET ROLE regress_card_operator;
SHOW search_path;
SET client_min_messages = error;
SELECT d365inv_submit() >= 0 AS card_call;
SELECT d365inv.submit() >= 0 AS schema_call;
SELECT count(*) >= 0 AS card_wait_refuses_here FROM d365inv_submit(wait => '1 s');
RESET client_min_messages;
SET ROLE regress_card_loader;
SELECT d365inv_submit();
RESET ROLE;
DROP ROLE regress_card_operator, regress_card_loader;

-- A target's property_map is checked when it is written, the field named.
\set VERBOSITY terse
UPDATE d365inv.target SET property_map = '{"nonexistent_col": "Foo"}' WHERE name = 'default';
UPDATE d365inv.target SET property_map = '{"amount": 5}' WHERE name = 'default';
UPDATE d365inv.target SET property_map = '{"amount": "Invoice Amount"}' WHERE name = 'default';
INSERT INTO d365inv.target (name, property_map) VALUES ('bad', '{"vendor_account": "X"}');
UPDATE d365inv.target SET property_map = '{"amount": "InvoiceAmount", "source": "Notes"}' WHERE name = 'default';
UPDATE d365inv.target SET property_map = DEFAULT WHERE name = 'default';
\set VERBOSITY default

-- requeue() says which ids it left alone, and why
SELECT d365inv.requeue(ARRAY[-1, -2, NULL]::bigint[]) AS requeued;

-- an empty client secret (a psql variable that could not be read) is refused
\set VERBOSITY terse
INSERT INTO d365inv.target_secret VALUES ('default', '');
INSERT INTO d365inv.target_secret VALUES ('default', '  ');
\set VERBOSITY default

-- a database the worker does not serve says so instead of showing another
-- database's key filter
SELECT bits, keys_added, in_use FROM d365inv.key_filter;

-- Where a line came from: d365inv.source fills inbox.source during a COPY,
-- and load_lines numbers the lines of each load, whatever they became.
SET d365inv.source = 'invoices-2024-01.csv';
COPY d365inv.inbox (vendor_account, invoice_number, invoice_date, amount) FROM STDIN (FORMAT csv);
LL1,L-1,2024-01-15,1
LL1,L-2,not a date,1
LL1,l-1 ,2024-01-15,1
LL1,L-3,2024-01-15,1
\.
RESET d365inv.source;
SELECT * FROM d365inv.ingest();
SELECT source, line_no, outcome, invoice_number, reason
FROM d365inv.load_lines WHERE source = 'invoices-2024-01.csv' ORDER BY line_no;
