-- The $batch wire format: build_batch(), parse_batch_response(), classify(),
-- on recorded exchanges written from the OData 4.0 spec (Part 1, 11.7) and
-- Microsoft's Dataverse / Finance and Operations Web API examples.

-- boundaries are random; show them as BOUNDARY
CREATE FUNCTION pg_temp.show(content_type text, body bytea) RETURNS text
    LANGUAGE sql
    RETURN regexp_replace(replace(convert_from(body, 'UTF8'), E'\r', '\r'),
                          substring(content_type from 'boundary=(.*)$'), 'BOUNDARY', 'g');

TRUNCATE d365inv.invoice;
INSERT INTO d365inv.invoice (id, vendor_account, invoice_number, invoice_date, due_date, amount,
                             currency, description, payload) VALUES
    (1, 'V001', 'INV-1', '2024-01-15', '2024-02-15', 1234567890.123456789, 'EUR', 'Office chairs', NULL),
    (2, 'V001', 'O''Brien & Sons #7 100%+/?', '2024-01-16', NULL, 0.10, NULL, 'Ünïcödé "quoted"',
        '{"PurchaseOrder": "PO-9", "InvoiceAmount": 999, "VendorAccount": "HIJACK"}'),
    (3, 'V002', repeat('L', 300), '2024-01-17', NULL, -5, 'USD', NULL, NULL);

-- create: independent application/http parts, Content-ID = row id, exact amounts
SELECT content_type ~ '^multipart/mixed; boundary=batch_[0-9a-f]{32}$' AS fresh_boundary,
       pg_temp.show(content_type, body)
FROM d365inv.build_batch('default', '{1,2}');
-- two builds never share a boundary
SELECT count(DISTINCT content_type) AS boundaries
FROM (SELECT content_type FROM d365inv.build_batch('default', '{1}')
      UNION ALL SELECT content_type FROM d365inv.build_batch('default', '{1}')) b;

-- lookup: keys as OData literals ('' for '), then the whole filter percent-encoded
SELECT pg_temp.show(content_type, body) FROM d365inv.build_batch('default', '{1,2}', 'lookup');
-- 25 keys: two GETs, 20 keys and 5 keys
SELECT count(*) AS gets,
       array_agg(array_length(regexp_split_to_array(g, '%20or%20'), 1)) AS keys_per_get
FROM (SELECT regexp_split_to_table(convert_from(body, 'UTF8'), 'GET ') AS g
      FROM d365inv.build_batch('default', (SELECT array_agg(1) FROM generate_series(1, 25)), 'lookup')) s
WHERE g LIKE 'VendorInvoices?%';

-- upsert: PATCH by alternate key; create-only adds If-None-Match
UPDATE d365inv.target SET company = 'usmf', service_root = 'https://contoso.example.com/data/',
                          url_form = 'absolute_path';
SELECT pg_temp.show(content_type, body) FROM d365inv.build_batch('default', '{2}', 'upsert_create_only');
UPDATE d365inv.target SET url_form = 'absolute_url';
SELECT pg_temp.show(content_type, body) FROM d365inv.build_batch('default', '{1}', 'lookup');
UPDATE d365inv.target SET company = NULL, service_root = NULL, url_form = 'relative';
-- a very long invoice number still makes one well-formed part
SELECT length(pg_temp.show(content_type, body)) > 300 AS long_ok FROM d365inv.build_batch('default', '{3}');

-- errors: unknown target, missing invoice, empty list, unknown operation
SELECT * FROM d365inv.build_batch('nowhere', '{1}');
SELECT * FROM d365inv.build_batch('default', '{1,42}');
SELECT * FROM d365inv.build_batch('default', '{}');
SELECT * FROM d365inv.build_batch('default', '{1}', 'delete');
-- a mode the CHECK constraint would refuse (dropped here) is an error, not a default
BEGIN;
ALTER TABLE d365inv.target DROP CONSTRAINT target_url_form_check;
UPDATE d365inv.target SET url_form = 'sideways';
SELECT * FROM d365inv.build_batch('default', '{1}');
ROLLBACK;

---------------------------------------------------------------------------
-- parse_batch_response
---------------------------------------------------------------------------
-- Dataverse-style response, CRLF, parts in another order than the request
SELECT content_id, http_status, headers->>'OData-EntityId' AS entity_id, body, in_changeset, position, truncated
FROM d365inv.parse_batch_response('multipart/mixed; boundary=batchresponse_1a2b',
    convert_to(replace(
'--batchresponse_1a2b
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 2

HTTP/1.1 201 Created
Content-Type: application/json; odata.metadata=minimal
OData-EntityId: https://contoso.example.com/data/VendorInvoices(''b7c2'')

{"InvoiceId":"b7c2","VendorAccount":"V001"}
--batchresponse_1a2b
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 1

HTTP/1.1 409 Conflict
Content-Type: application/json; odata.metadata=minimal

{"error":{"code":"0x80040237","message":"A record with matching key values already exists."}}
--batchresponse_1a2b--
', E'\n', E'\r\n'), 'UTF8'));

-- bare LF, quoted boundary after another parameter, lowercase headers, preamble and epilogue,
-- Content-ID only on the inner response, a 204 without body
SELECT content_id, http_status, headers, body
FROM d365inv.parse_batch_response('Multipart/Mixed; charset=utf-8; BOUNDARY="b-q_1"', convert_to(
'this preamble is ignored
--b-q_1
content-type: application/http
content-transfer-encoding: binary

HTTP/1.1 204 No Content
content-id: 7
odata-entityid: VendorInvoices(VendorAccount=''V1'',InvoiceNumber=''I1'')

--b-q_1--
and this epilogue too', 'UTF8'));

-- a changeset response is flattened; a body that mentions the boundary mid-line is kept whole
SELECT content_id, http_status, in_changeset, body
FROM d365inv.parse_batch_response('multipart/mixed; boundary=batch_x', convert_to(replace(
'--batch_x
Content-Type: multipart/mixed; boundary=changeset_y

--changeset_y
Content-Type: application/http
Content-ID: 10

HTTP/1.1 201 Created

{"note":"see --batch_x and --changeset_y"}
--changeset_y
Content-Type: application/http
Content-ID: 11

HTTP/1.1 201 Created

{}
--changeset_y--
--batch_x
Content-Type: application/http
Content-ID: 12

HTTP/1.1 500 Internal Server Error
Retry-After: 5

{"error":{"code":"","message":"boom"}}
--batch_x--
', E'\n', E'\r\n'), 'UTF8'));

-- without continue-on-error a server stops at the first failure: outer 400, one part;
-- the parser returns what is there and the worker treats the rest as not processed
SELECT content_id, http_status FROM d365inv.parse_batch_response('multipart/mixed; boundary=r',
    convert_to(E'--r\r\nContent-Type: application/http\r\nContent-ID: 3\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n{"error":{"code":"0x80040265","message":"Vendor account V9 does not exist."}}\r\n--r--\r\n', 'UTF8'));

-- truncated: inside the second part's body, and before the closing delimiter
SELECT content_id, http_status, truncated FROM d365inv.parse_batch_response('multipart/mixed; boundary=r',
    convert_to(E'--r\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\nHTTP/1.1 201 Created\r\n\r\n{}\r\n--r\r\nContent-Type: application/http\r\nContent-ID: 2\r\n\r\nHTTP/1.1 201 Created\r\n\r\n{"Invoi', 'UTF8'));
SELECT content_id, http_status, truncated FROM d365inv.parse_batch_response('multipart/mixed; boundary=r',
    convert_to(E'--r\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\nHTTP/1.1 201 Created\r\n\r\n{}\r\n', 'UTF8'));
-- cut inside the headers: nothing usable
SELECT count(*) FROM d365inv.parse_batch_response('multipart/mixed; boundary=r',
    convert_to(E'--r\r\nContent-Type: applica', 'UTF8'));
-- garbage and missing boundaries are errors
SELECT * FROM d365inv.parse_batch_response('application/json', '\x7b7d');
SELECT * FROM d365inv.parse_batch_response('multipart/mixed', '\x00');
SELECT count(*) FROM d365inv.parse_batch_response('multipart/mixed; boundary=r', '\x00ff00ff');

---------------------------------------------------------------------------
-- classify
---------------------------------------------------------------------------
-- an id is taken from an OData-EntityId or Location URL only on the
-- service root's origin
UPDATE d365inv.target SET service_root = 'https://x.example/data/' WHERE name = 'default';
SELECT s.label, c.*
FROM (VALUES
    ('201, id in body',           201, '{"InvoiceId":"5f1d-22","VendorAccount":"V1"}', NULL),
    ('204, OData-EntityId',       204, NULL, '{"OData-EntityId":"https://x.example/data/VendorInvoices(5f1d-23)"}'),
    ('204, other origin',         204, NULL, '{"OData-EntityId":"https://evil.example/data/VendorInvoices(5f1d-24)"}'),
    ('503, Retry-After huge',     503, '', '{"Retry-After":"999999999999"}'),
    ('201, relative Location',    201, '', '{"Location":"VendorInvoices(VendorAccount=''V1'',InvoiceNumber=''I%2F1'')"}'),
    ('409 conflict',              409, '{"error":{"code":"","message":"Conflict"}}', NULL),
    ('412 Dataverse duplicate',   412, '{"error":{"code":"0x80060892","message":"A record with matching key values already exists."}}', NULL),
    ('500 duplicate detection',   500, '{"error":{"code":"0x80040333","message":"A record was not created or updated because a duplicate of the current record already exists."}}', NULL),
    ('400 F&O duplicate message', 400, '{"error":{"code":"","message":"An error has occurred.","innererror":{"message":"Write failed for table row of type VendInvoiceInfoTableEntity. The record already exists.","type":"Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"}}}', NULL),
    ('500 genuine',               500, '{"error":{"code":"0x80040216","message":"An unexpected error occurred."}}', NULL),
    ('503 Retry-After seconds',   503, '', '{"Retry-After":"30"}'),
    ('429 Retry-After date',      429, '', '{"retry-after":"Fri, 31 Dec 1999 23:59:59 GMT"}'),
    ('408 timeout',               408, '', NULL),
    ('401 token expired',         401, '{"error":{"code":"","message":"Unauthorized"}}', '{"WWW-Authenticate":"Bearer"}'),
    ('400 validation',            400, '{"error":{"code":"0x80040265","message":"Vendor account V9 does not exist."}}', NULL),
    ('404 not found',             404, '', NULL),
    ('501 not implemented',       501, '', NULL),
    ('400 not JSON',              400, '<html>Bad Request</html>', NULL),
    ('400 broken JSON',           400, '{"error":{"code":"x","message":', NULL)
) AS s(label, status, body, headers),
LATERAL d365inv.classify('default', s.status, s.body, s.headers::jsonb) c;
UPDATE d365inv.target SET service_root = NULL WHERE name = 'default';

-- duplicate rules are per target
UPDATE d365inv.target SET duplicate_statuses = '{}', duplicate_codes = '{E-DUP}', duplicate_messages = '{}';
SELECT outcome FROM d365inv.classify('default', 409, NULL, NULL);
SELECT outcome FROM d365inv.classify('default', 422, '{"error":{"code":"e-dup","message":"x"}}');
UPDATE d365inv.target SET duplicate_statuses = DEFAULT, duplicate_codes = DEFAULT, duplicate_messages = DEFAULT;
SELECT * FROM d365inv.classify('default', 201, NULL, '[1]');
