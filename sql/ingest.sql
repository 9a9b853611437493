-- ingest(): every inbox line ends up exactly once as a queued invoice, a
-- recorded duplicate, or a recorded reject with its reason.

-- keys compare like D365: case-insensitive, surrounding blanks ignored
SELECT d365inv.invoice_key('  INV-001 '), d365inv.invoice_key(E'inv-001\t'),
       d365inv.invoice_key('ÉCOLE-1') = d365inv.invoice_key('école-1') AS non_ascii_case;

-- the non-throwing parsers
SELECT d365inv.parse_date(v) FROM (VALUES ('2024-02-29'), ('2023-02-29'), ('2024-13-01'),
    ('2024-1-01'), (' 2024-12-31 '), ('31/12/2024'), ('0000-01-01'), ('')) AS t(v);
SELECT v, d365inv.parse_amount(v) FROM (VALUES ('100'), ('-12.345678901234567890'), ('+.5'),
    ('1.'), ('1,000.00'), ('1e5'), ('NaN'), ('.'), ('-'), ('1.2.3'), (' 42.00 '),
    (repeat('9', 41))) AS t(v);
SELECT v, d365inv.is_json_object(v) FROM (VALUES ('{}'), ('{"a": [1, 2]}'), ('[1]'), ('"x"'),
    ('{"a":'), ('{"a": "\u0000"}'), ('  {"k": null}  '), ('{} {}')) AS t(v);

-- a load with every kind of line
INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, due_date, amount,
                           currency, description, payload, source) VALUES
    ('V001', 'INV-001', '2024-01-15', '2024-02-15', '100.50', 'eur', 'first', NULL, 'a.csv'),
    ('v001 ', ' inv-001', '2024-01-15', NULL, '100.50', 'EUR', 'same key, other case', NULL, 'a.csv'),
    ('V001', 'INV-002', '2024-01-16', '', '0.01', '', NULL, '{"PurchaseOrder": "PO-1"}', 'a.csv'),
    ('V002', 'INV-001', '2024-01-17', NULL, '-5', 'USD', 'same invoice number, other vendor', NULL, 'a.csv'),
    ('', 'INV-003', '2024-01-01', NULL, '1', 'USD', 'empty vendor', NULL, 'a.csv'),
    ('V003', NULL, '2024-01-01', NULL, '1', 'USD', 'missing invoice number', NULL, 'a.csv'),
    ('V003', repeat('X', 21), '2024-01-01', NULL, '1', 'USD', 'invoice number too long', NULL, 'a.csv'),
    (repeat('V', 21), 'INV-004', '2024-01-01', NULL, '1', 'USD', 'vendor too long', NULL, 'a.csv'),
    ('V003', 'INV-005', '2024-02-30', '15.01.2024', '1', 'USD', 'bad dates', NULL, 'a.csv'),
    ('V003', 'INV-006', '', NULL, '', 'USD', 'empty date and amount', NULL, 'a.csv'),
    ('V003', 'INV-007', '2024-01-01', NULL, '1,000.00', 'EURO', 'bad amount and currency', NULL, 'a.csv'),
    ('V003', 'INV-008', '2024-01-01', NULL, '1', 'USD', 'payload is an array', '[1, 2]', 'a.csv'),
    ('V003', 'INV-009', '2024-01-01', NULL, '1', 'USD', 'payload is broken', '{"a": ', 'a.csv'),
    ('V003', 'INV-010', 'tomorrow', NULL, 'ten', 'US', 'everything wrong', 'null', 'a.csv');
INSERT INTO d365inv.inbox (target, vendor_account, invoice_number, invoice_date, amount, source)
VALUES ('elsewhere', 'V004', 'INV-011', '2024-01-01', '1', 'a.csv'),
       (NULL, 'V004', 'INV-012', '2024-01-01', '1', 'a.csv');

SELECT * FROM d365inv.ingest();
SELECT count(*) AS inbox_left FROM d365inv.inbox;

SELECT target, vendor_account, invoice_number, vendor_key, invoice_key, invoice_date, due_date,
       amount, currency, description, payload, source, status, attempts
FROM d365inv.invoice ORDER BY line_id;

SELECT d.vendor_account, d.invoice_number, d.description, i.invoice_number AS duplicate_of_invoice, d.reason
FROM d365inv.duplicate d JOIN d365inv.invoice i ON i.id = d.duplicate_of ORDER BY d.line_id;

SELECT coalesce(description, target) AS line, reason FROM d365inv.reject ORDER BY line_id;

-- a second load: repeats of staged invoices, and a repeat inside the load
INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, description) VALUES
    ('V001', 'inv-002 ', '2024-01-16', '0.01', 'resent by upstream'),
    ('V005', 'INV-100', '2024-03-01', '7', 'new'),
    ('V005', 'inv-100', '2024-03-01', '7', 'new, repeated'),
    ('V005', 'INV-100 ', '2024-03-01', '7', 'new, repeated again');
SELECT * FROM d365inv.ingest();
SELECT d.description, i.invoice_number AS duplicate_of_invoice, d.reason
FROM d365inv.duplicate d JOIN d365inv.invoice i ON i.id = d.duplicate_of
WHERE d.description LIKE 'new%' OR d.description LIKE 'resent%' ORDER BY d.line_id;

-- an empty inbox is fine
SELECT * FROM d365inv.ingest();

-- plain INSERT into the queue works, with the unique constraint as backstop
INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount)
VALUES ('V006', 'INV-200', '2024-04-01', 10);
INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount)
VALUES (' v006', 'inv-200  ', '2024-04-01', 10);
\set VERBOSITY terse
INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount, currency)
VALUES ('V006', 'INV-201', '2024-04-01', 10, 'usd');
-- (a row naming an unknown target is accepted here; the worker sends it to review)
INSERT INTO d365inv.invoice (target, vendor_account, invoice_number, invoice_date, amount)
VALUES ('nowhere', 'V006', 'INV-202', '2024-04-01', 10);
\set VERBOSITY default
-- keys: blanks at either end trimmed (ASCII ones byte by byte), length in
-- characters, not bytes
SELECT d365inv.clean_key(E'\x0B\f V1 \t\f\x0B\r\n') AS ascii_blanks,
       d365inv.invoice_key(E'\u00a0 Ab\u3000 \ufeff') AS mixed_blanks,
       d365inv.line_problems('default', true, 20, 20, repeat('ä', 20), repeat('é', 21),
                             '2024-01-15', NULL, '1', NULL, NULL) AS twenty_and_21_characters;
-- the queue's checks and the currency ingest() stores are C functions: the
-- same as the btrim(), upper() and regular expression they replace, for
-- every kind of value
SELECT count(*) AS values, count(*) FILTER (
           WHERE d365inv.not_blank(s) IS DISTINCT FROM (btrim(s, E' \t\r\n') <> '')
              OR d365inv.is_currency_code(s) IS DISTINCT FROM (s ~ '^[A-Z]{3}$')
              OR d365inv.clean_currency(s) IS DISTINCT FROM upper(nullif(btrim(s, E' \t\r\n'), ''))) AS differ
FROM unnest(ARRAY[NULL, '', ' ', E'\t\r\n ', E'\x0B', E'\f', E'\u00a0', E'\ufeff', 'a', E' a\n', 'USD',
                  'usd', 'Usd', 'US', 'USDX', 'U$D', 'U D', E'USD\n', ' USD', 'ÄBC', 'AB@', 'AB[',
                  'ABZ', 'ZZZ', 'AAA', E'AB\u0130', 'ＵＳＤ', E'\t eur \r\n', 'äbc', 'ß', 'ǆ', 'a1_z']) s;
\set VERBOSITY terse
INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount)
VALUES (E' \t\r\n', 'INV-203', '2024-04-01', 10);
INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount)
VALUES ('V006', ' ', '2024-04-01', 10);
\set VERBOSITY default

-- every line accounted for: 20 lines in, 20 lines out
SELECT (SELECT count(*) FROM d365inv.invoice WHERE line_id IS NOT NULL) AS queued,
       (SELECT count(*) FROM d365inv.duplicate) AS duplicates,
       (SELECT count(*) FROM d365inv.reject) AS rejected;

-- d365inv_submit() ingests and reports what is waiting
INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)
VALUES ('V007', 'INV-300', '2024-05-01', '3');
SELECT d365inv.d365inv_submit();
SELECT count(*) AS inbox_left FROM d365inv.inbox;

-- COPY: a CSV with a header, quoted fields, an embedded comma and a bad line
COPY d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, currency, description)
FROM STDIN (FORMAT csv, HEADER);
vendor_account,invoice_number,invoice_date,amount,currency,description
V100,"INV,1",2024-06-01,10.00,EUR,"comma, in invoice number"
V100,"INV'2",2024-06-01,20.00,EUR,quote in invoice number
V100,INV-3,2024-06-31,30.00,EUR,bad date
\.
SELECT * FROM d365inv.ingest();
SELECT invoice_number, description FROM d365inv.invoice WHERE vendor_account = 'V100' ORDER BY 1;

-- a key's first line is rejected: its first good line is queued, the next
-- good one is its duplicate; a key queued by an earlier load and repeated
-- here twice: both lines are duplicates of it
INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, description)
VALUES ('V200', 'INV-1', '2024-02-30', '1', 'bad date, first'),
       (' v200', 'inv-1 ', '2024-02-01', '2', 'first good'),
       ('V200', 'INV-1', '2024-02-01', '3', 'second good'),
       ('V100', 'inv''2', '2024-02-01', '4', 'staged before, again'),
       ('v100 ', 'INV''2', '2024-02-01', '5', 'staged before, once more');
SELECT * FROM d365inv.ingest();
SELECT i.invoice_number, i.description FROM d365inv.invoice i
WHERE i.vendor_key = 'v200';
SELECT d.description, d.reason, i.description AS duplicate_of
FROM d365inv.duplicate d JOIN d365inv.invoice i ON i.id = d.duplicate_of
WHERE d.vendor_account ILIKE '%v200%' OR d.vendor_account ILIKE '%v100%' ORDER BY d.line_id;
SELECT description, reason FROM d365inv.reject WHERE vendor_account = 'V200';
