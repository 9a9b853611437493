-- d365inv 0.2: vendor invoice staging and exactly-once delivery to Dynamics 365.
--
-- Read top to bottom:
--   1. roles          the loader and operator group roles
--   2. targets        where invoices go (one row per D365 destination)
--   3. the inbox      the COPY entry point, all text
--   4. the queue      d365inv.invoice, typed, unique per normalised key
--   5. the record     duplicate and reject tables: every inbox line lands somewhere
--   6. ingest()       inbox -> queue | duplicate | reject, set-based
--   7. wire format    build_batch(), parse_batch_response(), classify()
--   8. delivery       batch_log, remote_key, d365inv_submit(), review_queue, requeue()
--   9. privileges     nothing for PUBLIC
--  10. operating      duplicate_rate, counters (tally), queue, status_change, resolve() (batch_health, metrics(): 17)
--  11. DROP guard      DROP EXTENSION refuses while invoices are open
--  12. the card's names d365inv_submit() as the design card writes it, d365inv.submit()
--  13. backup          what pg_dump keeps
--  14. target checks   property_map, named when a target is written
--  15. load lines      where a line came from and its number in its load
--  16. app users       more credentials per target; what the worker is doing with each target
--  17. target status   target_status, progress, target_alerts; batch_health and metrics(), which read them

\echo Use "CREATE EXTENSION d365inv" to load this file. \quit

--------------------------------------------------------------------------
-- 1. Roles.  Roles are cluster-wide and outlive the extension, so create
-- them only when absent: dropping and re-creating the extension, or
-- installing it in a second database, must work.
--------------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'd365inv_loader') THEN
        CREATE ROLE d365inv_loader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'd365inv_operator') THEN
        CREATE ROLE d365inv_operator NOLOGIN;
    END IF;
    -- an operator may do everything a loader may
    IF NOT pg_catalog.pg_has_role('d365inv_operator', 'd365inv_loader', 'MEMBER') THEN
        GRANT d365inv_loader TO d365inv_operator;
    END IF;
END
$$;

--------------------------------------------------------------------------
-- 2. Targets: one row per D365 destination.  Only superusers can change
-- them (no UPDATE grant), so only a superuser decides where data is sent.
--------------------------------------------------------------------------
CREATE TABLE d365inv.target (
    name                text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    -- e.g. https://contoso.operations.dynamics.com/data/ ; NULL: nothing is sent
    -- (no blanks or control characters: it becomes request lines and headers)
    service_root        text CHECK (service_root ~ '^https?://[^/?#[:space:][:cntrl:]]+(/[^?#[:space:][:cntrl:]]*)?$'),
    entity_set          text NOT NULL DEFAULT 'VendorInvoices' CHECK (entity_set ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    vendor_property     text NOT NULL DEFAULT 'VendorAccount' CHECK (vendor_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    invoice_property    text NOT NULL DEFAULT 'InvoiceNumber' CHECK (invoice_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    id_property         text NOT NULL DEFAULT 'InvoiceId' CHECK (id_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    -- who chooses the entity's id (id_property): 'server' (D365) or 'client':
    -- every invoice is created with a deterministic id (d365inv.entity_id()),
    -- so a second create of it collides on the primary key; the key
    -- property must accept client-chosen values (Dataverse tables do)
    entity_id_mode      text NOT NULL DEFAULT 'server' CHECK (entity_id_mode IN ('server', 'client')),
    -- the id's form: a name-based UUID for Guid keys, or base32 text of
    -- entity_id_length characters for string keys
    entity_id_form      text NOT NULL DEFAULT 'guid' CHECK (entity_id_form IN ('guid', 'string')),
    entity_id_length    int NOT NULL DEFAULT 20 CHECK (entity_id_length BETWEEN 8 AND 32),
    -- staging column -> entity property; a column left out is not sent
    property_map        jsonb NOT NULL DEFAULT '{"invoice_date": "InvoiceDate",
                                                "due_date": "DueDate",
                                                "amount": "InvoiceAmount",
                                                "currency": "CurrencyCode",
                                                "description": "Description"}'
                        CHECK (jsonb_typeof(property_map) = 'object'),
    company             text CHECK (company ~ '^[A-Za-z0-9_]{1,8}$'),    -- dataAreaId
    company_property    text NOT NULL DEFAULT 'dataAreaId' CHECK (company_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    -- D365 limits: vendor account and invoice number are 20-character fields
    vendor_max_length   int NOT NULL DEFAULT 20 CHECK (vendor_max_length BETWEEN 1 AND 1000),
    invoice_max_length  int NOT NULL DEFAULT 20 CHECK (invoice_max_length BETWEEN 1 AND 1000),
    -- operations per $batch request; the design notes found 15-20 best
    batch_size          int NOT NULL DEFAULT 20 CHECK (batch_size BETWEEN 1 AND 1000),
    -- how the request line inside a $batch part names the resource
    url_form            text NOT NULL DEFAULT 'relative'
                        CHECK (url_form IN ('relative', 'absolute_path', 'absolute_url')),
    -- how D365 says "this invoice exists already" (see classify())
    duplicate_statuses  int[] NOT NULL DEFAULT '{409,412}',
    duplicate_codes     text[] NOT NULL DEFAULT '{0x80040237,0x80060892,0x80040333}',
    duplicate_messages  text[] NOT NULL DEFAULT '{"record already exists","matching key values already exists"}',
    -- delivery
    enabled             boolean NOT NULL DEFAULT true,  -- false: the worker leaves it alone
    -- $batch requests under way at once; D365 allows 52 per user
    max_in_flight       int NOT NULL DEFAULT 4 CHECK (max_in_flight BETWEEN 1 AND 52),
    -- create: POST; upsert: PATCH by alternate key; upsert_create_only: PATCH
    -- with If-None-Match: * (412 = already exists)
    write_mode          text NOT NULL DEFAULT 'create'
                        CHECK (write_mode IN ('create', 'upsert', 'upsert_create_only')),
    -- existence lookups before POSTing: off, in_doubt (only rows whose fate
    -- is unknown; these are always looked up) or always
    preflight           text NOT NULL DEFAULT 'in_doubt'
                        CHECK (preflight IN ('off', 'in_doubt', 'always')),
    -- authentication: none (a local endpoint) or oauth2 client credentials;
    -- the secret is in d365inv.target_secret
    auth                text NOT NULL DEFAULT 'none' CHECK (auth IN ('none', 'oauth2')),
    token_url           text CHECK (token_url ~ '^https?://[^/?#[:space:][:cntrl:]]+(/[^#[:space:][:cntrl:]]*)?$'),
    client_id           text,
    scope               text,       -- e.g. https://contoso.operations.dynamics.com/.default
    CHECK (auth = 'none' OR (token_url IS NOT NULL AND client_id IS NOT NULL AND scope IS NOT NULL)),
    -- the bearer token and the client secret travel over TLS, except to a
    -- test server on this machine
    CONSTRAINT target_oauth2_https CHECK (auth = 'none' OR (
        (service_root IS NULL OR service_root ~* '^(https://|http://(localhost|127\.[0-9.]+|\[::1\])(:[0-9]+)?(/|$))')
        AND token_url ~* '^(https://|http://(localhost|127\.[0-9.]+|\[::1\])(:[0-9]+)?(/|$))')),
    -- fixed: always batch_size; auto: shrink after trouble, grow after clean batches
    batch_size_mode     text NOT NULL DEFAULT 'fixed' CHECK (batch_size_mode IN ('fixed', 'auto')),
    batch_size_min      int NOT NULL DEFAULT 5 CHECK (batch_size_min BETWEEN 1 AND 1000),
    batch_size_max      int NOT NULL DEFAULT 50 CHECK (batch_size_max BETWEEN 1 AND 1000),
    CHECK (batch_size_min <= batch_size_max),
    -- client ids are for creates; an upsert is addressed by the alternate key
    CONSTRAINT target_client_ids_create CHECK (entity_id_mode = 'server' OR write_mode = 'create'),
    -- when refresh_remote_keys() last read every key of the entity set; the
    -- key filter may only rule keys out while this is within
    -- d365inv.remote_key_retention (before, it knows only our own keys)
    keys_refreshed_at   timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- D365's service protection limits, per app user over a sliding window
    -- (documented: 6,000 requests and 1,200 s of server execution time per
    -- 5 minutes; max_in_flight stays within the 52 concurrent).  pacing
    -- 'budget': the worker paces every app user to stay inside them; 'off':
    -- it sends as fast as max_in_flight allows and only backs off on a 429.
    pacing              text NOT NULL DEFAULT 'budget' CHECK (pacing IN ('budget', 'off')),
    limit_window        int NOT NULL DEFAULT 300 CHECK (limit_window BETWEEN 1 AND 86400),     -- seconds
    limit_requests      int NOT NULL DEFAULT 6000 CHECK (limit_requests BETWEEN 1 AND 100000000),
    limit_execution     int NOT NULL DEFAULT 1200 CHECK (limit_execution BETWEEN 1 AND 100000000) -- seconds
);
COMMENT ON TABLE d365inv.target IS 'One row per Dynamics 365 destination; superuser-only to change';

-- created_at -infinity: made here and never changed (a restored 'default'
-- target takes its place, see section 13)
INSERT INTO d365inv.target (name, created_at) VALUES ('default', '-infinity');

-- OAuth2 client secrets.  No grants at all: only superusers and the worker
-- read it.  Set it with psql's \set and a variable (or from a file) so the
-- secret does not land in a history file; see the README.
CREATE TABLE d365inv.target_secret (
    target          text PRIMARY KEY REFERENCES d365inv.target ON UPDATE CASCADE ON DELETE CASCADE,
    -- an empty secret is a mistake (a psql variable that could not be read)
    client_secret   text NOT NULL CHECK (btrim(client_secret) <> '')
);
COMMENT ON TABLE d365inv.target_secret IS 'OAuth2 client secret per target; superuser only';

--------------------------------------------------------------------------
-- 3. The inbox: COPY entry point.  Every data column is text, so COPY never
-- aborts on a bad date, amount or missing value; ingest() judges each line.
-- COPY with a column list:
--   COPY d365inv.inbox (vendor_account, invoice_number, invoice_date, amount,
--                       currency, description) FROM ... (FORMAT csv, HEADER);
--------------------------------------------------------------------------
CREATE TABLE d365inv.inbox (
    -- no index: COPY into the inbox must cost little more than a plain COPY
    line_id         bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000),
    loaded_at       timestamptz NOT NULL DEFAULT now(),
    target          text DEFAULT 'default',
    vendor_account  text,
    invoice_number  text,
    invoice_date    text,
    due_date        text,
    amount          text,
    currency        text,
    description     text,
    payload         text,       -- JSON object of extra entity properties
    source          text        -- a label such as the file name
);
COMMENT ON TABLE d365inv.inbox IS 'COPY invoice files here, then run d365inv.ingest()';

--------------------------------------------------------------------------
-- 4. The queue.  Keys are compared the way D365's SQL Server collation
-- compares them: case-insensitive, surrounding blanks ignored.
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.invoice_key(text) RETURNS text
    AS 'MODULE_PATHNAME', 'd365inv_invoice_key'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.invoice_key(text) IS
    'Normalised key: how D365 compares vendor accounts and invoice numbers';

CREATE FUNCTION d365inv.clean_key(text) RETURNS text
    AS 'MODULE_PATHNAME', 'd365inv_clean_key'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.clean_key(text) IS
    'A key as it is stored and sent: blanks, byte-order marks and zero-width characters trimmed from both ends';

-- The invoice table's checks on keys and currency, in C (cheaper than
-- btrim() and a regular expression for every row ingest() queues).
CREATE FUNCTION d365inv.not_blank(text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'd365inv_not_blank'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.not_blank(text) IS
    'Whether the text has more than spaces, tabs, CR and LF: btrim(s, E'' \t\r\n'') <> ''''';

CREATE FUNCTION d365inv.is_currency_code(text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'd365inv_is_currency_code'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.is_currency_code(text) IS
    'Whether the text is three capital letters A-Z: s ~ ''^[A-Z]{3}$''';

CREATE TYPE d365inv.invoice_status AS ENUM (
    'pending',      -- waiting to be sent
    'in_flight',    -- claimed by the worker, request under way
    'in_doubt',     -- sent, fate unknown (crash, timeout): looked up, never blindly resent
    'retry',        -- transient failure, waiting for next_attempt_at
    'created',      -- D365 created it (d365_id)
    'duplicate',    -- D365 already had it
    'review'        -- needs a person: rejected by D365 or out of retries
);

CREATE TABLE d365inv.invoice (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    -- no foreign key: a per-row check would double the cost of ingest(),
    -- which rejects unknown targets itself; the worker sends a row with an
    -- unknown target to review
    target          text COLLATE "C" NOT NULL DEFAULT 'default',
    vendor_account  text NOT NULL CHECK (d365inv.not_blank(vendor_account)),
    invoice_number  text NOT NULL CHECK (d365inv.not_blank(invoice_number)),
    vendor_key      text COLLATE "C" GENERATED ALWAYS AS (d365inv.invoice_key(vendor_account)) STORED,
    invoice_key     text COLLATE "C" GENERATED ALWAYS AS (d365inv.invoice_key(invoice_number)) STORED,
    invoice_date    date NOT NULL,
    due_date        date,
    amount          numeric NOT NULL,
    currency        text CHECK (d365inv.is_currency_code(currency)),
    description     text,
    payload         jsonb CHECK (payload IS NULL OR jsonb_typeof(payload) = 'object'),
    source          text,
    line_id         bigint,         -- the inbox line it came from
    status          d365inv.invoice_status NOT NULL DEFAULT 'pending',
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_http_status int,
    last_error      text,
    d365_id         text,
    -- entity_id_mode 'client': the id the invoice is created with, stored
    -- before the first send and never changed
    entity_id       text,
    -- a lookup must be made after this moment before the invoice may be sent
    -- again: a request whose fate is unknown may still commit on the server
    -- until then (d365inv.server_request_lifetime after it was given up)
    resend_fence    timestamptz,
    -- how the final status was learnt: response (to our request), lookup
    -- (an existence check found it after an unknown fate), preflight (found
    -- before sending) or manual
    settled_by      text,
    batch_id        bigint,         -- d365inv.batch_log.id of the last request
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    -- invoice number first: nearly every comparison in the index is then
    -- decided by its first column (target is the same in most rows, and a
    -- vendor has many invoices), which makes a large ingest() a sixth faster
    CONSTRAINT invoice_unique_key UNIQUE (invoice_key, vendor_key, target)
);
COMMENT ON TABLE d365inv.invoice IS 'The submission queue: one row per distinct invoice key';
-- open rows only (pending, in_flight, in_doubt, retry): the worker's claim
-- query and "what is still waiting" stay cheap however long the history
CREATE INDEX invoice_open ON d365inv.invoice (target, next_attempt_at NULLS FIRST, id)
    WHERE status < 'created';
-- the worker looks at in_doubt rows every round: a few rows among maybe
-- millions pending, so they get an index of their own
CREATE INDEX invoice_in_doubt ON d365inv.invoice (target, next_attempt_at NULLS FIRST, id)
    WHERE status = 'in_doubt';

-- The ids of entity_id_mode 'client'.
CREATE FUNCTION d365inv.entity_id(target text, vendor_key text, invoice_key text,
                                  form text DEFAULT 'guid', length int DEFAULT 20) RETURNS text
    AS 'MODULE_PATHNAME', 'd365inv_entity_id'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.entity_id(text, text, text, text, int) IS
    'The deterministic id an invoice is created with in entity_id_mode client: UUID v5 or base32 of SHA-1(namespace, target, keys)';

-- Where this data has been delivered from: one row per server (cluster,
-- database, WAL timeline) a worker ran on.  A row of another server that
-- is not handled yet means this copy of the data took over from it: a
-- promotion, a point-in-time recovery or a restored dump.  Whatever was open
-- there may have been claimed and sent after this copy was taken, so it is
-- looked up before anything is sent (see after_takeover() in worker.c).
CREATE TABLE d365inv.worker_state (
    system_identifier bigint NOT NULL,      -- pg_control_system()
    database_oid    oid NOT NULL,
    timeline        bigint NOT NULL,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    -- this server took over from another then: for
    -- d365inv.failover_lookup_window after it every invoice is looked up
    -- before it is sent (lines lost by asynchronous replication or missing
    -- from a dump and loaded again may have been created by the old server)
    promoted_at     timestamptz,
    -- another server's row: when this one took over from it
    handled_at      timestamptz,
    PRIMARY KEY (system_identifier, database_oid, timeline)
);
COMMENT ON TABLE d365inv.worker_state IS 'The servers this data was delivered from (takeover detection)';

--------------------------------------------------------------------------
-- 5. The record: every inbox line that is not queued is kept, whole, with
-- the reason.  Nothing is dropped silently.
--------------------------------------------------------------------------
CREATE TABLE d365inv.duplicate (
    LIKE d365inv.inbox,
    duplicate_of    bigint,         -- d365inv.invoice.id
    reason          text NOT NULL,  -- 'already staged' or 'repeated in the same load'
    ingested_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX duplicate_ingested_at ON d365inv.duplicate (ingested_at);

CREATE TABLE d365inv.reject (
    LIKE d365inv.inbox,
    reason          text NOT NULL,  -- one 'field: problem' per bad field, '; '-separated
    ingested_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reject_ingested_at ON d365inv.reject (ingested_at);

--------------------------------------------------------------------------
-- 6. ingest(): inbox -> invoice | duplicate | reject, in one statement.
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.parse_date(text) RETURNS date
    AS 'MODULE_PATHNAME', 'd365inv_parse_date'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.parse_date(text) IS 'YYYY-MM-DD to date, NULL when not a valid date';

CREATE FUNCTION d365inv.parse_amount(text) RETURNS numeric
    AS 'MODULE_PATHNAME', 'd365inv_parse_amount'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.parse_amount(text) IS 'Plain decimal to exact numeric, NULL when malformed';

CREATE FUNCTION d365inv.clean_currency(text) RETURNS text
    AS 'MODULE_PATHNAME', 'd365inv_clean_currency'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION d365inv.clean_currency(text) IS
    'The currency as ingest() stores it: upper(nullif(btrim(s, E'' \t\r\n''), ''''))';

CREATE FUNCTION d365inv.is_json_object(text) RETURNS boolean
    AS 'MODULE_PATHNAME', 'd365inv_is_json_object'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Why a line cannot be queued: one 'field: problem' per bad field, or NULL.
CREATE FUNCTION d365inv.line_problems(
    target text, target_exists boolean, vendor_max_length int, invoice_max_length int,
    vendor_account text, invoice_number text, invoice_date text, due_date text,
    amount text, currency text, payload text
) RETURNS text
    AS 'MODULE_PATHNAME', 'd365inv_line_problems'
    LANGUAGE C IMMUTABLE PARALLEL SAFE;

CREATE FUNCTION d365inv.wake_worker(now boolean DEFAULT false) RETURNS void
    AS 'MODULE_PATHNAME', 'd365inv_wake_worker'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365inv.wake_worker(boolean) IS
    'Wake the worker when this transaction commits (nothing if it aborts), or now';

CREATE FUNCTION d365inv.ingest(nowait boolean DEFAULT false,
                               OUT queued bigint, OUT duplicates bigint, OUT rejected bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    -- the sorts, the window, the pass kept for the three writes and the
    -- hash of earlier invoices each spill to disk beyond this: the memory
    -- of an ingest (shared buffers included) stays under about 450 MB
    -- however large the load (more was no faster: docs/benchmarks.md)
    SET work_mem = '64MB'
AS $$
DECLARE
    taken bigint;
    distinct_ids bigint;
    earlier_join text;
BEGIN
    -- The lock makes this ingest see every committed line and no new one
    -- (a COPY that starts now waits a moment), serialises ingests so "the
    -- first line wins" holds across loads, and lets TRUNCATE empty the
    -- inbox at no cost.
    -- nowait (the worker): a COPY under way means "later", not "wait".
    queued := 0; duplicates := 0; rejected := 0;
    IF nowait THEN
        BEGIN
            LOCK TABLE d365inv.inbox IN ACCESS EXCLUSIVE MODE NOWAIT;
        EXCEPTION WHEN lock_not_available THEN
            RETURN;
        END;
    ELSE
        LOCK TABLE d365inv.inbox IN ACCESS EXCLUSIVE MODE;
    END IF;
    -- Every line is told apart by its line_id.  Loaders cannot set it; a
    -- superuser's INSERT ... OVERRIDING SYSTEM VALUE can repeat one, and
    -- such repeats get fresh ids rather than stopping every later ingest.
    -- (line_id is never NULL; counting the distinct ids sorts bare int8
    -- values in the same pass as the count: a third of the time a window
    -- over the sorted lines took, and half of what a hash would take)
    SELECT count(*), count(DISTINCT line_id) INTO taken, distinct_ids FROM d365inv.inbox;
    IF taken = 0 THEN
        RETURN;
    END IF;
    IF distinct_ids < taken THEN
        UPDATE d365inv.inbox SET line_id = DEFAULT
        WHERE ctid IN (SELECT ctid
                       FROM (SELECT ctid, row_number() OVER (PARTITION BY line_id ORDER BY ctid) AS n
                             FROM d365inv.inbox) numbered
                       WHERE n > 1);
    END IF;

    -- One pass over the inbox, then one write per destination.  keyed has
    -- every line with why it cannot be queued (problems) and, when it can,
    -- its key; in key order (the unique index is then filled in its own
    -- order: several times faster than at random), a key's lines in line
    -- order with the first one marked, so that "the first line of a key
    -- wins" holds within the load; and the invoice an earlier load queued
    -- with that key.  The key string cannot be ambiguous: a key with a
    -- control character is rejected, so \x01 separates.  Each key is
    -- computed once, for the sort and the look-up alike.  keyed is kept
    -- for the three writes with the columns they filter on first: the two
    -- small writes read only those of the lines they skip.
    --
    -- The invoices queued earlier: a load that is small next to them looks
    -- each key up in the unique index (a hash of every earlier invoice would
    -- cost what the history holds, every load); a large one hashes them.
    -- Planned per call (EXECUTE): a cached plan would keep the first choice.
    IF taken * 4 < (SELECT c.reltuples FROM pg_catalog.pg_class c
                    WHERE c.oid = 'd365inv.invoice'::pg_catalog.regclass) THEN
        earlier_join := $j$
              LEFT JOIN LATERAL (SELECT e.id FROM d365inv.invoice e
                                 WHERE j.problems IS NULL
                                   AND e.invoice_key = j.invoice_key
                                   AND e.vendor_key = j.vendor_key
                                   AND e.target = j.target
                                 LIMIT 1) earlier ON true$j$;    -- LIMIT: kept a probe
    ELSE
        earlier_join := $j$
              LEFT JOIN d365inv.invoice earlier
                     ON j.problems IS NULL
                    AND earlier.invoice_key = j.invoice_key
                    AND earlier.vendor_key = j.vendor_key
                    AND earlier.target = j.target$j$;
    END IF;
    EXECUTE format($q$
    WITH keyed AS MATERIALIZED (
        SELECT k.problems, k.earlier,
               k.key IS DISTINCT FROM lag(k.key) OVER (ORDER BY k.key, k.line_id) AS first,
               k.line_id, k.loaded_at, k.target, k.vendor_account, k.invoice_number,
               k.invoice_date, k.due_date, k.amount, k.currency, k.description, k.payload,
               k.source
        FROM (SELECT j.*,
                     CASE WHEN j.problems IS NULL THEN
                         j.invoice_key || E'\x01' || j.vendor_key || E'\x01' || j.target
                     END COLLATE "C" AS key,
                     earlier.id AS earlier
              FROM (SELECT l.*,
                           d365inv.line_problems(l.target, t.name IS NOT NULL,
                                                 t.vendor_max_length, t.invoice_max_length,
                                                 l.vendor_account, l.invoice_number, l.invoice_date,
                                                 l.due_date, l.amount, l.currency, l.payload) AS problems,
                           d365inv.invoice_key(l.invoice_number) AS invoice_key,
                           d365inv.invoice_key(l.vendor_account) AS vendor_key
                    FROM d365inv.inbox l LEFT JOIN d365inv.target t ON t.name = l.target
                    OFFSET 0) j     -- line_problems() and the keys once per line
              %s
              OFFSET 0) k   -- the key a column: the window neither computes it again nor sorts its parts
    ), rejects AS (
        INSERT INTO d365inv.reject
        SELECT line_id, loaded_at, target, vendor_account, invoice_number, invoice_date, due_date,
               amount, currency, description, payload, source, problems
        FROM keyed WHERE problems IS NOT NULL
        RETURNING 1
    ), queued AS (
        -- No ON CONFLICT: keyed already knows every key that exists (the
        -- inbox lock serialises ingests), and speculative insertion would
        -- cost a fifth of the load.  A row someone INSERTs by hand
        -- meanwhile makes this ingest fail as a whole, the lines stay in
        -- the inbox, and the next ingest() takes them.
        INSERT INTO d365inv.invoice (target, vendor_account, invoice_number, invoice_date,
                                     due_date, amount, currency, description, payload,
                                     source, line_id, created_at)
        SELECT target,
               d365inv.clean_key(vendor_account),
               d365inv.clean_key(invoice_number),
               d365inv.parse_date(invoice_date),
               d365inv.parse_date(due_date),
               d365inv.parse_amount(amount),
               d365inv.clean_currency(currency),
               description,
               CASE WHEN btrim(payload, E' \t\r\n') <> '' THEN payload::jsonb END,
               source,
               line_id,
               loaded_at
        FROM keyed WHERE problems IS NULL AND first AND earlier IS NULL
        RETURNING 1
    ), repeats AS (
        -- a repeat matches an invoice queued by an earlier load, or one
        -- queued by an earlier line of this load (filled in below, once
        -- those rows are visible)
        INSERT INTO d365inv.duplicate
        SELECT line_id, loaded_at, target, vendor_account, invoice_number, invoice_date, due_date,
               amount, currency, description, payload, source, earlier,
               CASE WHEN earlier IS NULL THEN 'repeated in the same load' ELSE 'already staged' END
        FROM keyed WHERE problems IS NULL AND (NOT first OR earlier IS NOT NULL)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM queued), (SELECT count(*) FROM repeats), (SELECT count(*) FROM rejects)
    $q$, earlier_join)
    INTO queued, duplicates, rejected;

    UPDATE d365inv.duplicate d
    SET duplicate_of = e.id
    FROM d365inv.invoice e
    WHERE d.ingested_at = now() AND d.duplicate_of IS NULL
      AND e.target = d.target
      AND e.vendor_key = d365inv.invoice_key(d.vendor_account)
      AND e.invoice_key = d365inv.invoice_key(d.invoice_number);

    -- the promise: every line is accounted for exactly once
    IF taken <> queued + duplicates + rejected THEN
        RAISE EXCEPTION 'd365inv.ingest: % inbox lines taken but % accounted for',
                        taken, queued + duplicates + rejected
              USING ERRCODE = 'internal_error';
    END IF;

    TRUNCATE d365inv.inbox;
    IF queued > 0 THEN
        PERFORM d365inv.wake_worker();
    END IF;
END
$$;
COMMENT ON FUNCTION d365inv.ingest(boolean) IS
    'Move every inbox line to invoice (queued), duplicate or reject; returns the three counts';

--------------------------------------------------------------------------
-- 7. The $batch wire format, as the worker speaks it (for debugging and tests).
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.build_batch(target text, invoice_ids bigint[], operation text DEFAULT 'create',
                                    OUT content_type text, OUT body bytea)
    AS 'MODULE_PATHNAME', 'd365inv_build_batch'
    LANGUAGE C STRICT VOLATILE
    SET search_path = pg_catalog, pg_temp;   -- runs SQL: nothing from the caller's path
COMMENT ON FUNCTION d365inv.build_batch(text, bigint[], text) IS
    'The $batch request for these invoices: operation create (POST), lookup (GET $filter), upsert or upsert_create_only (PATCH)';

CREATE FUNCTION d365inv.parse_batch_response(content_type text, body bytea)
    RETURNS TABLE (content_id text, http_status int, headers jsonb, body text,
                   in_changeset boolean, "position" int, truncated boolean)
    AS 'MODULE_PATHNAME', 'd365inv_parse_batch_response'
    LANGUAGE C STRICT IMMUTABLE;
COMMENT ON FUNCTION d365inv.parse_batch_response(text, bytea) IS
    'One row per operation response of a $batch response; WARNING when it is incomplete';

CREATE FUNCTION d365inv.classify(target text, http_status int, body text DEFAULT NULL,
                                 headers jsonb DEFAULT NULL,
                                 OUT outcome text, OUT d365_id text, OUT error_code text,
                                 OUT error_text text, OUT retry_after int)
    AS 'MODULE_PATHNAME', 'd365inv_classify'
    LANGUAGE C CALLED ON NULL INPUT STABLE
    SET search_path = pg_catalog, pg_temp;   -- runs SQL: nothing from the caller's path
COMMENT ON FUNCTION d365inv.classify(text, int, text, jsonb) IS
    'Outcome of one operation response: created, duplicate, retry, review or auth';

--------------------------------------------------------------------------
-- 8. Delivery: what the worker records, and how SQL callers drive it.
--------------------------------------------------------------------------
-- One row per request the worker sent ($batch, or a lookup page).
CREATE TABLE d365inv.batch_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target          text NOT NULL,
    kind            text NOT NULL,      -- create, upsert, upsert_create_only, lookup
    started_at      timestamptz NOT NULL,
    duration_ms     double precision NOT NULL,
    http_status     int,                -- outer status; NULL when no response arrived
    operations      int NOT NULL,       -- operations in the request
    invoices        int NOT NULL,       -- invoices it concerned
    created         int NOT NULL DEFAULT 0,
    duplicates      int NOT NULL DEFAULT 0,     -- D365 said "exists", or a lookup found it
    retries         int NOT NULL DEFAULT 0,     -- transient failure, will be sent again
    reviews         int NOT NULL DEFAULT 0,     -- sent to the review queue
    in_doubt        int NOT NULL DEFAULT 0,     -- fate unknown: will be looked up
    unanswered      int NOT NULL DEFAULT 0,     -- not processed by D365: sent again, no attempt counted
    not_found       int NOT NULL DEFAULT 0,     -- lookup: key absent, safe to send
    throttled       boolean NOT NULL DEFAULT false,     -- 429 (outer or any part)
    retry_after     int,                -- seconds D365 asked us to wait
    batch_size      int,                -- the target's batch size when sent
    error           text                -- transport error or first genuine error
);
CREATE INDEX batch_log_started_at ON d365inv.batch_log (started_at);
COMMENT ON TABLE d365inv.batch_log IS
    'One row per request sent to D365; kept for d365inv.batch_log_retention';

-- Keys known to exist in D365: created by d365inv or found by a lookup.
CREATE TABLE d365inv.remote_key (
    target          text COLLATE "C" NOT NULL,
    vendor_key      text COLLATE "C" NOT NULL,
    invoice_key     text COLLATE "C" NOT NULL,
    d365_id         text,
    -- how we know: created (our POST), response (D365 said "exists"),
    -- lookup, preflight, cache, refresh
    source          text NOT NULL,
    seen_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, vendor_key, invoice_key)
);
COMMENT ON TABLE d365inv.remote_key IS
    'Keys known to exist in D365; the client-side key cache (d365inv.remote_key_retention)';
-- the worker's retention deletes the oldest keys, a chunk at a time
CREATE INDEX remote_key_seen_at ON d365inv.remote_key (seen_at);

-- Every known key also enters the bloom filter in shared memory.
CREATE FUNCTION d365inv.key_filter_trigger() RETURNS trigger
    AS 'MODULE_PATHNAME', 'd365inv_key_filter_trigger'
    LANGUAGE C;
CREATE TRIGGER remote_key_to_filter AFTER INSERT ON d365inv.remote_key
    FOR EACH ROW EXECUTE FUNCTION d365inv.key_filter_trigger();

CREATE FUNCTION d365inv.key_filter_status(
    OUT size_bytes bigint, OUT bits bigint, OUT hash_functions int, OUT keys_added bigint,
    OUT capacity bigint, OUT bits_set bigint, OUT fill float8,
    OUT estimated_false_positive_rate float8, OUT in_use boolean)
    AS 'MODULE_PATHNAME', 'd365inv_key_filter_status'
    LANGUAGE C VOLATILE;
-- The bloom filter: how full it is, and the false-positive rate that implies.
CREATE VIEW d365inv.key_filter AS SELECT * FROM d365inv.key_filter_status();
COMMENT ON VIEW d365inv.key_filter IS
    'Bloom filter of known keys: fill and estimated false-positive rate (in_use: rebuilt and enabled)';

CREATE FUNCTION d365inv.refresh_remote_keys(target text) RETURNS bigint
    AS 'MODULE_PATHNAME', 'd365inv_refresh_remote_keys'
    LANGUAGE C STRICT VOLATILE
    SET search_path = pg_catalog, pg_temp;   -- runs SQL: nothing from the caller's path
COMMENT ON FUNCTION d365inv.refresh_remote_keys(text) IS
    'Page through the target''s entity set and remember every key in remote_key (superuser)';

-- An unfinished pass of refresh_remote_keys_by_page(): where the next CALL
-- goes on.  The row goes when the pass has read the last page; only then
-- does target.keys_refreshed_at move (see src/refresh.c).
CREATE TABLE d365inv.remote_key_refresh (
    target          text PRIMARY KEY REFERENCES d365inv.target ON UPDATE CASCADE ON DELETE CASCADE,
    first_link      text NOT NULL,          -- the entity set's first page, as the target said then
    next_link       text NOT NULL,          -- the page to read next
    started_at      timestamptz NOT NULL,   -- keys_refreshed_at once the pass completes
    pages           int NOT NULL,           -- pages stored so far
    keys            bigint NOT NULL,        -- entities stored so far
    updated_at      timestamptz NOT NULL
);
COMMENT ON TABLE d365inv.remote_key_refresh IS
    'Progress of an unfinished refresh_remote_keys_by_page() pass, per target';

CREATE PROCEDURE d365inv.refresh_remote_keys_by_page(target text, restart boolean DEFAULT false)
    AS 'MODULE_PATHNAME', 'd365inv_refresh_remote_keys_by_page'
    LANGUAGE C;     -- no SET search_path: it would forbid the commits; pinned in C instead
COMMENT ON PROCEDURE d365inv.refresh_remote_keys_by_page(text, boolean) IS
    'refresh_remote_keys() committing after every page; CALL again to resume an interrupted pass (superuser)';
REVOKE ALL ON d365inv.remote_key_refresh FROM PUBLIC;
REVOKE ALL ON PROCEDURE d365inv.refresh_remote_keys_by_page(text, boolean) FROM PUBLIC;
GRANT SELECT ON d365inv.remote_key_refresh TO d365inv_operator;

CREATE FUNCTION d365inv.worker_pid() RETURNS int
    AS 'MODULE_PATHNAME', 'd365inv_worker_pid'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365inv.worker_pid() IS
    'Process id of the worker serving this database, NULL when none is running';

-- ERROR unless a worker can serve this session: the library is preloaded
-- and the worker serves this database; for_wait also needs statements that
-- see fresh commits (not in a transaction block, not REPEATABLE READ).
CREATE FUNCTION d365inv.check_worker(for_wait boolean) RETURNS void
    AS 'MODULE_PATHNAME', 'd365inv_check_can_wait'
    LANGUAGE C VOLATILE;

CREATE FUNCTION d365inv.d365inv_submit() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM d365inv.check_worker(false);
    PERFORM d365inv.ingest();
    PERFORM d365inv.wake_worker();
    RETURN (SELECT count(*) FROM d365inv.invoice WHERE status < 'created');
END
$$;
COMMENT ON FUNCTION d365inv.d365inv_submit() IS
    'Ingest the inbox, wake the worker at commit, return how many invoices are waiting';

-- The inbox's line range, read without keeping a lock: a lock held while
-- d365inv_submit(wait) waits would keep the worker's ingest() out.
-- Rolling back the block releases the lock; the variables keep their values.
CREATE FUNCTION d365inv.peek_inbox(upto bigint, OUT first_line bigint, OUT last_line bigint)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    BEGIN
        SELECT min(line_id), max(line_id) INTO first_line, last_line
        FROM d365inv.inbox WHERE upto IS NULL OR line_id <= upto;
        RAISE SQLSTATE 'D3650';
    EXCEPTION WHEN SQLSTATE 'D3650' THEN
        NULL;
    END;
END
$$;

-- Waits for what is waiting now (inbox lines and open invoices) to settle.
-- Nothing is ingested in the caller's transaction: the worker does it, so
-- the wait sees the worker's commits.  Every d365inv.progress_interval (10 s;
-- 0: never) a NOTICE says how far it is, at what rate, and which targets
-- hold invoices back; a wait that runs out says so in a WARNING.
CREATE FUNCTION d365inv.d365inv_submit(wait interval)
    RETURNS TABLE (status text, invoices bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline    timestamptz := clock_timestamp() + wait;
    started     timestamptz := clock_timestamp();
    first_line  bigint;
    last_line   bigint;
    last_open   bigint;
    last_before bigint;         -- the last invoice when it started
    inbox_done  boolean;
    done        boolean := false;
    every       interval := coalesce(nullif(current_setting('d365inv.progress_interval', true), ''), '10s')::interval;
    total       bigint;         -- what was waiting at the start: inbox lines + open invoices
    lines_left  bigint;
    open_left   bigint;
    left_before bigint;
    told_at     timestamptz := clock_timestamp();
    rate        float8;
    held_back   text;
BEGIN
    PERFORM d365inv.check_worker(true);
    -- before the lines are looked at: every invoice made of them comes after
    SELECT max(i.id) INTO last_before FROM d365inv.invoice i;
    SELECT p.first_line, p.last_line INTO first_line, last_line FROM d365inv.peek_inbox(NULL) p;
    SELECT max(id) INTO last_open FROM d365inv.invoice i WHERE i.status < 'created';
    IF every > interval '0' THEN
        total := CASE WHEN last_line IS NULL THEN 0 ELSE (SELECT c.lines FROM d365inv.count_inbox(last_line) c) END;
        total := total + (SELECT count(*) FROM d365inv.invoice i WHERE i.status < 'created' AND i.id <= last_open);
        left_before := total;
    END IF;
    LOOP
        PERFORM d365inv.wake_worker(true);
        -- Two statements, in this order: TRUNCATE (in ingest) is not MVCC-safe,
        -- so the inbox may look empty to a snapshot that does not yet see the
        -- invoices ingest() made of it.  The second statement's snapshot does.
        inbox_done := last_line IS NULL
                      OR (SELECT p.first_line FROM d365inv.peek_inbox(last_line) p) IS NULL;
        -- the first in invoice_open's order, not NOT EXISTS: on statistics
        -- older than the last delivery that may read the settled history
        IF inbox_done AND (SELECT i.id FROM d365inv.invoice i
                           WHERE i.status < 'created'
                             AND (i.id <= last_open OR i.line_id BETWEEN first_line AND last_line)
                           ORDER BY i.target, i.next_attempt_at NULLS FIRST, i.id LIMIT 1) IS NULL THEN
            done := true;
            EXIT;
        END IF;
        EXIT WHEN clock_timestamp() >= deadline;
        IF every > interval '0' AND clock_timestamp() >= told_at + every THEN
            -- the same order: lines first, then the invoices made of them
            lines_left := CASE WHEN last_line IS NULL THEN 0
                               ELSE (SELECT c.lines FROM d365inv.count_inbox(last_line) c) END;
            SELECT count(*) INTO open_left FROM d365inv.invoice i
            WHERE i.status < 'created' AND (i.id <= last_open OR i.line_id BETWEEN first_line AND last_line);
            rate := greatest(left_before - lines_left - open_left, 0)
                    / greatest(extract(epoch FROM clock_timestamp() - told_at)::float8, 0.001);
            SELECT string_agg(format('target "%s" is %s: %s', ts.target, ts.state,
                                     coalesce(ts.reason, 'no reason given')), '; ' ORDER BY ts.target)
            INTO held_back
            FROM d365inv.target_status ts WHERE ts.blocked;
            RAISE NOTICE '%', format('d365inv: %s of %s settled (%s%%), %s/s, %s',
                to_char(greatest(total - lines_left - open_left, 0), 'FM999,999,999,990'),
                to_char(total, 'FM999,999,999,990'),
                to_char(100.0 * greatest(total - lines_left - open_left, 0) / nullif(total, 0), 'FM990.0'),
                CASE WHEN rate < 9.95 THEN to_char(rate, 'FM990.0') ELSE to_char(round(rate), 'FM999,999,999,990') END,
                CASE WHEN rate > 0 THEN 'about ' || d365inv.format_duration((lines_left + open_left) / rate) || ' left'
                     ELSE 'nothing settled in the last '
                          || d365inv.format_duration(extract(epoch FROM clock_timestamp() - told_at)::float8) END)
                || coalesce('; ' || held_back, '');
            left_before := lines_left + open_left;
            told_at := clock_timestamp();
        END IF;
        PERFORM pg_sleep(least(0.05, greatest(0, extract(epoch FROM deadline - clock_timestamp()))));
    END LOOP;
    IF NOT done THEN
        lines_left := CASE WHEN last_line IS NULL THEN 0
                           ELSE (SELECT c.lines FROM d365inv.count_inbox(last_line) c) END;
        SELECT count(*) INTO open_left FROM d365inv.invoice i
        WHERE i.status < 'created' AND (i.id <= last_open OR i.line_id BETWEEN first_line AND last_line);
        SELECT string_agg(format('target "%s" is %s: %s', ts.target, ts.state,
                                 coalesce(ts.reason, 'no reason given')), E'\n' ORDER BY ts.target)
        INTO held_back
        FROM d365inv.target_status ts WHERE ts.blocked;
        RAISE WARNING '%', format('d365inv_submit: the wait of %s ran out with %s invoices still open', wait, open_left)
                           || CASE WHEN lines_left > 0 THEN format(' and %s inbox lines not yet ingested', lines_left)
                                   ELSE '' END
            USING DETAIL = coalesce(held_back, 'No target is blocked: the worker is still delivering.'),
                  HINT = 'See d365inv.target_status and d365inv.progress; the invoices stay queued.';
    END IF;
    -- What it waited for: the invoices made of its lines and those open at
    -- its start.  Found through the primary key past last_before, the open
    -- invoices' index and the audit trail since it started, so the count
    -- costs what it waited for, not the history; planned with the values.
    RETURN QUERY EXECUTE
        $q$SELECT i.status::text, count(*)
           FROM d365inv.invoice i
           WHERE i.id = ANY (ARRAY(SELECT j.id FROM d365inv.invoice j
                                   WHERE j.id > $1 AND j.line_id BETWEEN $2 AND $3
                                   UNION ALL
                                   SELECT j.id FROM d365inv.invoice j
                                   WHERE j.status < 'created' AND j.id <= $4
                                   UNION ALL
                                   SELECT c.invoice_id FROM d365inv.status_change c
                                   WHERE c.changed_at >= $5 AND c.invoice_id <= $4))
             AND (i.line_id BETWEEN $2 AND $3
                  OR (i.id <= $4 AND (i.updated_at >= $5 OR i.status < 'created')))
           GROUP BY i.status ORDER BY i.status$q$
        USING coalesce(last_before, 0), first_line, last_line, last_open, started;
    RETURN QUERY
        SELECT 'ingest_duplicate', count(*) FROM d365inv.duplicate d
        WHERE d.line_id BETWEEN first_line AND last_line HAVING count(*) > 0;
    RETURN QUERY
        SELECT 'ingest_reject', count(*) FROM d365inv.reject r
        WHERE r.line_id BETWEEN first_line AND last_line HAVING count(*) > 0;
END
$$;
COMMENT ON FUNCTION d365inv.d365inv_submit(interval) IS
    'Wake the worker and wait up to "wait" for the inbox and open invoices to settle, with progress NOTICEs; per-status counts';

-- The review queue: invoices a person has to look at.
CREATE VIEW d365inv.review_queue AS
    SELECT id, target, vendor_account, invoice_number, invoice_date, amount, currency,
           attempts, last_http_status,
           coalesce(last_error, 'no error recorded') AS last_error,
           updated_at AS in_review_since, source, line_id
    FROM d365inv.invoice
    WHERE status = 'review';
COMMENT ON VIEW d365inv.review_queue IS 'Invoices waiting for a person; see requeue() and resolve()';

-- Which of these ids are not in review, and why: "17 (created), 23 (no such
-- invoice)", the first 20; NULL when all are.  For requeue() and resolve().
CREATE FUNCTION d365inv.not_in_review(ids bigint[], OUT skipped bigint, OUT listed text)
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT count(*), string_agg(format('%s (%s)', u.id, coalesce(i.status::text, 'no such invoice')), ', '
                                ORDER BY u.id) FILTER (WHERE u.n <= 20)
           || CASE WHEN count(*) > 20 THEN format(' and %s more', count(*) - 20) ELSE '' END
    FROM (SELECT id, row_number() OVER (ORDER BY id) AS n
          FROM (SELECT DISTINCT id FROM unnest(ids) AS id WHERE id IS NOT NULL) d) u
    LEFT JOIN d365inv.invoice i ON i.id = u.id
    WHERE i.status IS DISTINCT FROM 'review'
$$;

CREATE FUNCTION d365inv.requeue(ids bigint[]) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
    caller_note text := current_setting('d365inv.change_note', true);
    left_alone  record := d365inv.not_in_review(ids);
BEGIN
    -- the audit trail's "why", unless the caller gave one (requeue(ids, note))
    PERFORM set_config('d365inv.change_note', coalesce(nullif(caller_note, ''), 'requeued by hand'), true);
    -- Only review rows: anything else is settled or still in the worker's
    -- hands.  They go back as in_doubt, not pending: a row may be in review
    -- because its fate was never learnt, so it is looked up before it can be
    -- sent again (found: created; absent: sent).
    UPDATE d365inv.invoice
    SET status = 'in_doubt', attempts = 0, next_attempt_at = now(), updated_at = now()
    WHERE id = ANY (ids) AND status = 'review';
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM set_config('d365inv.change_note', coalesce(caller_note, ''), true);
    IF n > 0 THEN
        PERFORM d365inv.wake_worker();
    END IF;
    IF left_alone.skipped > 0 THEN
        RAISE NOTICE 'd365inv.requeue: % of the invoices were left alone (only invoices in review are sent again): %',
                     left_alone.skipped, left_alone.listed;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION d365inv.requeue(bigint[]) IS
    'Send reviewed invoices again (only rows in review); returns how many';

--------------------------------------------------------------------------
-- 9. Privileges: nothing for PUBLIC; loaders load, operators operate.
--------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA d365inv FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA d365inv FROM PUBLIC;
REVOKE ALL ON TYPE d365inv.invoice_status FROM PUBLIC;

GRANT USAGE ON SCHEMA d365inv TO d365inv_loader;
-- line_id and loaded_at are the inbox's own: a loader inserts the data columns only
GRANT SELECT ON d365inv.inbox TO d365inv_loader;
GRANT INSERT (target, vendor_account, invoice_number, invoice_date, due_date, amount, currency,
              description, payload, source)
    ON d365inv.inbox TO d365inv_loader;
GRANT SELECT ON d365inv.duplicate, d365inv.reject TO d365inv_loader;
GRANT EXECUTE ON FUNCTION d365inv.ingest(boolean), d365inv.invoice_key(text), d365inv.clean_key(text),
                          d365inv.is_json_object(text),
                          d365inv.parse_date(text), d365inv.parse_amount(text)
    TO d365inv_loader;

GRANT SELECT ON d365inv.invoice, d365inv.target, d365inv.worker_state TO d365inv_operator;
GRANT USAGE ON TYPE d365inv.invoice_status TO d365inv_operator;
GRANT SELECT ON d365inv.batch_log, d365inv.remote_key, d365inv.review_queue, d365inv.key_filter
    TO d365inv_operator;
GRANT EXECUTE ON FUNCTION d365inv.key_filter_status(), d365inv.entity_id(text, text, text, text, int)
    TO d365inv_operator;
GRANT EXECUTE ON FUNCTION d365inv.d365inv_submit(), d365inv.d365inv_submit(interval),
                          d365inv.requeue(bigint[]), d365inv.worker_pid(),
                          d365inv.build_batch(text, bigint[], text),
                          d365inv.parse_batch_response(text, bytea),
                          d365inv.classify(text, int, text, jsonb)
    TO d365inv_operator;

--------------------------------------------------------------------------
-- 10. Operating: views, audit trail, review workflow, metrics.
--------------------------------------------------------------------------
-- Definitions shared by the views below.
--
-- Periods.  Every figure is given for three periods: '1h' (the last hour),
-- '24h' (the last 24 hours) and 'all'; `since` is where the period starts
-- (NULL for 'all').  For batch_log figures 'all' means what batch_log still
-- holds (d365inv.batch_log_retention, 30 days by default).
--
-- Received.  An inbox line is received when it was loaded into the inbox
-- (inbox.loaded_at), whatever became of it: invoice.created_at (ingest()
-- copies loaded_at into it), duplicate.loaded_at and reject.loaded_at.  So
-- each line counts once, in the period it arrived in, and ingest delays do
-- not move it.  Lines still in the inbox (not ingested yet) are not counted.
--
-- Duplicates.  ingest duplicates: lines repeating a key already staged (the
-- duplicate table).  D365 duplicates: invoices received in the period whose
-- status is 'duplicate', however that was learnt (settled_by: response = D365
-- answered "already exists", preflight = a lookup found it before sending,
-- cache = d365inv.remote_key knew it, manual = a person said so with
-- resolve()).  They count in the period the invoice was received, so the
-- figure for a recent period can still grow while its invoices are sent.
-- duplicate_rate = (ingest duplicates + D365 duplicates) / received.
--
-- Batches.  A batch is a batch_log row that is not a lookup (kind <>
-- 'lookup'), counted in the period it started in.  It succeeded when its
-- outer HTTP status was 2xx and every operation ended created or duplicate:
-- no retries, reviews, in_doubt or unanswered operations.  Genuine errors are
-- the operations such batches sent to review (D365 rejected them, or they ran
-- out of retries), the same notion as d365inv.error_alert_threshold;
-- duplicates are the operations D365 answered with "already exists"
-- (409/412 or a duplicate error code).  Throttling covers every request,
-- lookups included: requests answered 429 (outer or any part), and the time
-- D365 asked us to wait (the sum of their Retry-After, in seconds).
--
-- Thresholds.  d365inv.duplicate_alert_threshold (a rate, default 0.05) and
-- d365inv.error_alert_threshold (genuine errors per hour, default 10) are
-- read with current_setting(..., true), so a missing setting means the
-- default.  healthy means the worker's alert, which fires above the
-- threshold, would not fire.

-- Invoices in review are few; this keeps the review queue, the queue view
-- and in_review cheap however long the history (the worker's updates
-- already change status, an indexed predicate column, so HOT is not lost).
CREATE INDEX invoice_review ON d365inv.invoice (target) WHERE status = 'review';

-- What the period filters read: invoices by created_at (= the line's
-- loaded_at, never changed), duplicate and reject lines by ingested_at, and
-- batch_log by started_at, each through an index; so a period costs what
-- it holds, and the worker's alert check, which reads the last hour only,
-- never reads the history.  (The settle UPDATE is not HOT anyway: it
-- changes status, the predicate of invoice_open.)
CREATE INDEX invoice_created_at ON d365inv.invoice (created_at);

-- Counters kept as rows change, so that the figures over the whole history
-- (duplicate_rate 'all', metrics()) cost what was written since the last
-- compaction, not what the history holds: invoices per target and status,
-- and lines per target that became duplicates or rejects.  Append-only:
-- every statement that adds, removes or moves counted rows adds one row per
-- key it changed, with the difference (n, negative for rows gone); no row
-- is ever updated, so writers never wait for one another here.  A key's
-- count is the sum of its rows' n.  The worker's housekeeping folds the
-- rows into one per key every minute (compact_tally()).  TRUNCATE of a
-- counted table adds the negative of what was counted for it.  Not in a
-- dump (section 13): a restore counts the rows it loads.
CREATE TABLE d365inv.tally (
    counted     text NOT NULL CHECK (counted IN ('invoice', 'duplicate', 'reject')),
    target      text COLLATE "C",           -- NULL: a reject that named no target
    status      d365inv.invoice_status,     -- invoices only
    n           bigint NOT NULL
);
COMMENT ON TABLE d365inv.tally IS
    'Counters: invoices per target and status, duplicate and reject lines per target; a count is sum(n) per key';

-- Rows added (statement level, NEW TABLE added) or removed (OLD TABLE
-- removed) by INSERT, COPY or DELETE; a duplicate or reject line moved to
-- another target (row level: rare); TRUNCATE.  An invoice's UPDATE is
-- counted by record_status_change(), which reads its transition tables
-- anyway.
CREATE FUNCTION d365inv.count_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- exact: TRUNCATE waited for every transaction that wrote the table,
        -- and a compaction keeps each key's sum
        INSERT INTO d365inv.tally (counted, target, status, n)
        SELECT t.counted, t.target, t.status, -sum(t.n)
        FROM d365inv.tally t WHERE t.counted = TG_TABLE_NAME
        GROUP BY t.counted, t.target, t.status HAVING sum(t.n) <> 0;
    ELSIF TG_LEVEL = 'ROW' THEN
        INSERT INTO d365inv.tally (counted, target, n)
        VALUES (TG_TABLE_NAME, OLD.target, -1), (TG_TABLE_NAME, NEW.target, 1);
    ELSIF TG_TABLE_NAME = 'invoice' AND TG_OP = 'INSERT' THEN
        INSERT INTO d365inv.tally (counted, target, status, n)
        SELECT 'invoice', a.target, a.status, count(*) FROM added a GROUP BY a.target, a.status;
    ELSIF TG_TABLE_NAME = 'invoice' THEN
        INSERT INTO d365inv.tally (counted, target, status, n)
        SELECT 'invoice', r.target, r.status, -count(*) FROM removed r GROUP BY r.target, r.status;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO d365inv.tally (counted, target, n)
        SELECT TG_TABLE_NAME, a.target COLLATE "C", count(*) FROM added a GROUP BY 2;
    ELSE
        INSERT INTO d365inv.tally (counted, target, n)
        SELECT TG_TABLE_NAME, r.target COLLATE "C", -count(*) FROM removed r GROUP BY 2;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER invoice_count_added AFTER INSERT ON d365inv.invoice
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER invoice_count_removed AFTER DELETE ON d365inv.invoice
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER invoice_count_truncated AFTER TRUNCATE ON d365inv.invoice
    FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER duplicate_count_added AFTER INSERT ON d365inv.duplicate
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER duplicate_count_removed AFTER DELETE ON d365inv.duplicate
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER duplicate_count_truncated AFTER TRUNCATE ON d365inv.duplicate
    FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
-- a column list and WHEN: ingest()'s UPDATE of duplicate_of costs nothing here
CREATE TRIGGER duplicate_count_moved AFTER UPDATE OF target ON d365inv.duplicate
    FOR EACH ROW WHEN (OLD.target IS DISTINCT FROM NEW.target) EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER reject_count_added AFTER INSERT ON d365inv.reject
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER reject_count_removed AFTER DELETE ON d365inv.reject
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER reject_count_truncated AFTER TRUNCATE ON d365inv.reject
    FOR EACH STATEMENT EXECUTE FUNCTION d365inv.count_rows();
CREATE TRIGGER reject_count_moved AFTER UPDATE OF target ON d365inv.reject
    FOR EACH ROW WHEN (OLD.target IS DISTINCT FROM NEW.target) EXECUTE FUNCTION d365inv.count_rows();

-- Fold the counters into one row per key (none for a key whose count is
-- 0); returns how many rows it folded.  The worker's housekeeping calls it
-- every minute.  Concurrent writers are not held up: their new rows are
-- not in this statement's snapshot and stay as they are.
CREATE FUNCTION d365inv.compact_tally() RETURNS bigint
    LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM d365inv.tally RETURNING counted, target, status, n
    ), kept AS (
        INSERT INTO d365inv.tally (counted, target, status, n)
        SELECT counted, target, status, sum(n) FROM gone
        GROUP BY counted, target, status HAVING sum(n) <> 0
    )
    SELECT count(*) FROM gone;
$$;
COMMENT ON FUNCTION d365inv.compact_tally() IS
    'Fold d365inv.tally into one row per key (the worker does it every minute); returns the rows folded';

-- Set the counters right: add to each key the difference between what the
-- tables hold and what it counts.  For a copy of the data whose counters
-- were not kept (0.1 updated to 0.2, a data-only restore with
-- --disable-triggers).  Writers of the three tables wait while it counts.
-- Returns how many keys it corrected.
CREATE FUNCTION d365inv.recount() RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    corrected   bigint;
BEGIN
    -- the counts need a snapshot taken after the lock
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'd365inv.recount() counts right only in a READ COMMITTED transaction'
              USING ERRCODE = 'invalid_transaction_state';
    END IF;
    LOCK TABLE d365inv.invoice, d365inv.duplicate, d365inv.reject IN SHARE MODE;
    WITH difference AS (
        SELECT 'invoice' AS counted, i.target COLLATE "C" AS target, i.status, count(*)::numeric AS n
        FROM d365inv.invoice i GROUP BY i.target, i.status
        UNION ALL
        SELECT 'duplicate', d.target COLLATE "C", NULL, count(*) FROM d365inv.duplicate d GROUP BY 2
        UNION ALL
        SELECT 'reject', r.target COLLATE "C", NULL, count(*) FROM d365inv.reject r GROUP BY 2
        UNION ALL
        SELECT t.counted, t.target, t.status, -sum(t.n) FROM d365inv.tally t
        GROUP BY t.counted, t.target, t.status
    ), corrections AS (
        INSERT INTO d365inv.tally (counted, target, status, n)
        SELECT counted, target, status, sum(n) FROM difference
        GROUP BY counted, target, status HAVING sum(n) <> 0
        RETURNING 1
    )
    SELECT count(*) INTO corrected FROM corrections;
    RETURN corrected;
END
$$;
COMMENT ON FUNCTION d365inv.recount() IS
    'Correct d365inv.tally to what invoice, duplicate and reject hold; returns how many keys it corrected';
REVOKE ALL ON d365inv.tally FROM PUBLIC;
REVOKE ALL ON FUNCTION d365inv.count_rows(), d365inv.compact_tally(), d365inv.recount() FROM PUBLIC;
GRANT SELECT ON d365inv.tally TO d365inv_operator;

-- The counts of duplicate_rate for lines received since `since` (NULL: all
-- of them), per target: every configured target and any other a line
-- named (a reject's target may be unknown, or NULL).  A function, so that
-- each period is planned with its own start (an index range for '1h'),
-- and duplicate_rate WHERE period = '1h' calls it for the last hour only.
-- All of them come from the counters (d365inv.tally): a target has a row
-- when it has a configuration or lines, as when they are counted.
CREATE FUNCTION d365inv.lines_received(since timestamptz)
    RETURNS TABLE (target text, queued bigint, rejected bigint, ingest_duplicates bigint,
                   d365_duplicates bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_custom_plan     -- since is a constant in every plan
AS $$
#variable_conflict use_column
BEGIN
    IF since IS NULL THEN
        RETURN QUERY
            SELECT c.target COLLATE "C", sum(c.queued)::bigint, sum(c.rejected)::bigint,
                   sum(c.ingest_duplicates)::bigint, sum(c.d365_duplicates)::bigint
            FROM (SELECT t.name AS target, 0::numeric AS queued, 0::numeric AS rejected,
                         0::numeric AS ingest_duplicates, 0::numeric AS d365_duplicates
                  FROM d365inv.target t
                  UNION ALL
                  SELECT y.target,
                         coalesce(sum(y.n) FILTER (WHERE y.counted = 'invoice'), 0),
                         coalesce(sum(y.n) FILTER (WHERE y.counted = 'reject'), 0),
                         coalesce(sum(y.n) FILTER (WHERE y.counted = 'duplicate'), 0),
                         coalesce(sum(y.n) FILTER (WHERE y.status = 'duplicate'), 0)
                  FROM d365inv.tally y
                  GROUP BY y.target
                  HAVING sum(y.n) <> 0) c       -- no lines (any more)
            GROUP BY c.target COLLATE "C";
        RETURN;
    END IF;
    RETURN QUERY
        SELECT c.target COLLATE "C", sum(c.queued)::bigint, sum(c.rejected)::bigint,
               sum(c.ingest_duplicates)::bigint, sum(c.d365_duplicates)::bigint
        FROM (SELECT t.name AS target, 0::bigint AS queued, 0::bigint AS rejected,
                     0::bigint AS ingest_duplicates, 0::bigint AS d365_duplicates
              FROM d365inv.target t
              UNION ALL
              SELECT i.target, count(*), 0, 0, count(*) FILTER (WHERE i.status = 'duplicate')
              FROM d365inv.invoice i WHERE since IS NULL OR i.created_at >= since
              GROUP BY i.target
              UNION ALL
              -- loaded_at <= ingested_at: the ingested_at condition removes
              -- nothing; it is there for the ingested_at index
              SELECT d.target, 0, 0, count(*), 0
              FROM d365inv.duplicate d
              WHERE since IS NULL OR (d.loaded_at >= since AND d.ingested_at >= since)
              GROUP BY d.target
              UNION ALL
              SELECT r.target, 0, count(*), 0, 0
              FROM d365inv.reject r
              WHERE since IS NULL OR (r.loaded_at >= since AND r.ingested_at >= since)
              GROUP BY r.target) c
        GROUP BY c.target COLLATE "C";
END
$$;
COMMENT ON FUNCTION d365inv.lines_received(timestamptz) IS
    'Per target: lines received since a moment (NULL: ever) that were queued, rejected or duplicates, and queued ones D365 had';

-- Duplicate rate per target and period.  Each period is a branch of its
-- own, so a query for one period (the worker's alert: '1h') reads that
-- period only.  A target has rows for the periods it received lines in,
-- and a configured target for every period.
CREATE VIEW d365inv.duplicate_rate AS
    WITH counted AS (
        SELECT 1 AS ord, '1h'::text AS period, now() - interval '1 hour' AS since, c.*
        FROM d365inv.lines_received(now() - interval '1 hour') c
        UNION ALL
        SELECT 2, '24h', now() - interval '24 hours', c.*
        FROM d365inv.lines_received(now() - interval '24 hours') c
        UNION ALL
        SELECT 3, 'all', NULL, c.*
        FROM d365inv.lines_received(NULL) c
    ), rated AS (
        SELECT c.*,
               c.queued + c.ingest_duplicates + c.rejected AS received,
               c.ingest_duplicates + c.d365_duplicates AS duplicates,
               (c.ingest_duplicates + c.d365_duplicates)::float8
                   / nullif(c.queued + c.ingest_duplicates + c.rejected, 0) AS duplicate_rate,
               coalesce(nullif(current_setting('d365inv.duplicate_alert_threshold', true), ''),
                        '0.05')::float8 AS threshold
        FROM counted c
    )
    SELECT target COLLATE "C" AS target, period, since, received, queued, rejected, ingest_duplicates, d365_duplicates,
           duplicates, duplicate_rate, threshold,
           coalesce(duplicate_rate <= threshold, true) AS healthy
    FROM rated
    ORDER BY target COLLATE "C" NULLS LAST, ord;
COMMENT ON VIEW d365inv.duplicate_rate IS
    'Per target and period (1h, 24h, all): lines received, duplicates caught at ingest and by D365, duplicate rate';
REVOKE ALL ON FUNCTION d365inv.lines_received(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION d365inv.lines_received(timestamptz) TO d365inv_operator;

-- batch_health is in section 17: its healthy reads target_status.


-- What is waiting, per target and status.
CREATE VIEW d365inv.queue AS
    WITH waiting AS (
        -- two partial indexes: invoice_open (status < 'created') and invoice_review
        SELECT target, status, created_at, updated_at, next_attempt_at, attempts
        FROM d365inv.invoice WHERE status < 'created'
        UNION ALL
        SELECT target, status, created_at, updated_at, next_attempt_at, attempts
        FROM d365inv.invoice WHERE status = 'review'
    )
    SELECT target, status,
           count(*) AS invoices,
           -- ready for the worker now; NULL where the worker does not pick rows up
           CASE WHEN status IN ('pending', 'retry', 'in_doubt') THEN
               count(*) FILTER (WHERE next_attempt_at IS NULL OR next_attempt_at <= now())
           END AS due,
           min(created_at) AS oldest_received_at,
           now() - min(created_at) AS oldest_age,
           now() - min(updated_at) AS longest_unchanged,
           min(next_attempt_at) AS next_attempt_at,
           max(attempts) AS max_attempts
    FROM waiting
    GROUP BY target, status
    ORDER BY target, status;
COMMENT ON VIEW d365inv.queue IS
    'Invoices waiting (pending, in_flight, in_doubt, retry, review) per target and status: age, next attempt';

-- The audit trail: one row per change of an invoice's status.
CREATE TABLE d365inv.status_change (
    invoice_id      bigint NOT NULL,
    old_status      d365inv.invoice_status NOT NULL,
    new_status      d365inv.invoice_status NOT NULL,
    changed_at      timestamptz NOT NULL,
    -- the session user: the login role of a person (also inside SECURITY
    -- DEFINER functions such as resolve()), the bootstrap superuser for the worker
    changed_by      text NOT NULL,
    -- why: d365inv.change_note when set (requeue(), resolve(), or a person's
    -- SET LOCAL), else the invoice's new last_error; NULL for claims
    -- (-> in_flight), where last_error is still the previous attempt's
    note            text
);
CREATE INDEX status_change_invoice ON d365inv.status_change (invoice_id, changed_at);
-- the worker's housekeeping deletes by age (d365inv.audit_retention)
CREATE INDEX status_change_changed_at ON d365inv.status_change (changed_at);
COMMENT ON TABLE d365inv.status_change IS
    'Audit trail: every change of an invoice''s status, who made it, when and why';

-- Statement level, with transition tables: one INSERT per UPDATE statement,
-- however many rows the worker's bulk updates change, and one for the
-- counters (d365inv.tally; exact whatever the statement changes, the id
-- included, since it sums the old rows and the new ones apart).  No nested loop: the
-- INSERT's plan is cached once it goes generic, with the row counts of the
-- statement that made it (often one row), and a nested loop over two
-- transition tables of a later bulk update (100,000 waiting invoices told
-- why they wait) is quadratic: minutes.
CREATE FUNCTION d365inv.record_status_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET enable_nestloop = off
AS $$
DECLARE
    at      timestamptz := clock_timestamp();
    why     text := nullif(current_setting('d365inv.change_note', true), '');
BEGIN
    INSERT INTO d365inv.status_change (invoice_id, old_status, new_status, changed_at, changed_by, note)
    SELECT n.id, o.status, n.status, at, session_user,
           coalesce(why, CASE WHEN n.status <> 'in_flight' THEN n.last_error END)
    FROM invoice_new n JOIN invoice_old o ON o.id = n.id
    WHERE o.status <> n.status;
    -- the counters (d365inv.tally): what the statement moved between
    -- targets and statuses, one row per key it changed
    INSERT INTO d365inv.tally (counted, target, status, n)
    SELECT 'invoice', c.target, c.status, sum(c.d)
    FROM (SELECT n.target, n.status, 1 AS d FROM invoice_new n
          UNION ALL
          SELECT o.target, o.status, -1 FROM invoice_old o) c
    GROUP BY c.target, c.status HAVING sum(c.d) <> 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER invoice_status_change AFTER UPDATE ON d365inv.invoice
    REFERENCING OLD TABLE AS invoice_old NEW TABLE AS invoice_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365inv.record_status_change();

-- requeue() with a reason for the audit trail.
CREATE FUNCTION d365inv.requeue(ids bigint[], note text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller_note text := current_setting('d365inv.change_note', true);
    n           bigint;
BEGIN
    IF coalesce(btrim(note), '') = '' THEN
        RAISE EXCEPTION 'd365inv.requeue: the note must say why the invoices are sent again'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('d365inv.change_note', note, true);
    n := d365inv.requeue(ids);
    PERFORM set_config('d365inv.change_note', coalesce(caller_note, ''), true);
    RETURN n;
END
$$;
COMMENT ON FUNCTION d365inv.requeue(bigint[], text) IS
    'Send reviewed invoices again (only rows in review), recording why in status_change; returns how many';

-- A person settles invoices in review by hand: they are in D365 after all
-- ('created', e.g. entered there directly) or D365 had them before
-- ('duplicate').  settled_by becomes 'manual'; the note goes to the audit trail.
CREATE FUNCTION d365inv.resolve(ids bigint[], outcome text, note text, d365_id text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller_note text := current_setting('d365inv.change_note', true);
    wanted      bigint;
    n           bigint;
    left_alone  record;
BEGIN
    IF outcome IS NULL OR outcome NOT IN ('created', 'duplicate') THEN
        RAISE EXCEPTION 'd365inv.resolve: outcome must be ''created'' or ''duplicate'', not %',
                        coalesce(quote_literal(outcome), 'NULL')
              USING ERRCODE = 'invalid_parameter_value',
                    HINT = 'To send the invoices again, use d365inv.requeue().';
    END IF;
    IF coalesce(btrim(note), '') = '' THEN
        RAISE EXCEPTION 'd365inv.resolve: the note must say why (it is kept in d365inv.status_change)'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT count(DISTINCT id) INTO wanted FROM unnest(ids) AS id WHERE id IS NOT NULL;
    IF resolve.d365_id IS NOT NULL AND wanted > 1 THEN
        RAISE EXCEPTION 'd365inv.resolve: one d365_id cannot belong to % invoices', wanted
              USING ERRCODE = 'invalid_parameter_value';
    END IF;

    left_alone := d365inv.not_in_review(ids);
    PERFORM set_config('d365inv.change_note', note, true);
    -- only review rows: anything else is settled or still in the worker's hands
    UPDATE d365inv.invoice i
    SET status = outcome::d365inv.invoice_status, settled_by = 'manual',
        d365_id = coalesce(resolve.d365_id, i.d365_id), next_attempt_at = NULL,
        settled_at = now(), updated_at = now()
    WHERE i.id = ANY (ids) AND i.status = 'review';
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM set_config('d365inv.change_note', coalesce(caller_note, ''), true);

    IF left_alone.skipped > 0 THEN
        RAISE NOTICE 'd365inv.resolve: % of % invoices were not in review and were left alone: %',
                     left_alone.skipped, wanted, left_alone.listed;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION d365inv.resolve(bigint[], text, text, text) IS
    'Settle invoices in review by hand as created or duplicate (settled_by manual), with a note; returns how many';

-- metrics() is in section 17: it reads target_status and target_alerts.

REVOKE ALL ON FUNCTION d365inv.record_status_change(), d365inv.requeue(bigint[], text),
                       d365inv.resolve(bigint[], text, text, text)
    FROM PUBLIC;
GRANT SELECT ON d365inv.duplicate_rate, d365inv.queue, d365inv.status_change
    TO d365inv_operator;
GRANT EXECUTE ON FUNCTION d365inv.requeue(bigint[], text), d365inv.resolve(bigint[], text, text, text)
    TO d365inv_operator;

--------------------------------------------------------------------------
-- 11. DROP EXTENSION refuses while invoices are open (they would go with
-- the queue) unless d365inv.drop_open_invoices is on; see src/lifecycle.c.
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.guard_drop() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'd365inv_guard_drop'
    LANGUAGE C
    SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION d365inv.guard_drop() FROM PUBLIC;
CREATE EVENT TRIGGER d365inv_guard_drop ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION d365inv.guard_drop();

--------------------------------------------------------------------------
-- 12. The names of the design card.  SQL callers run d365inv_submit(): a
-- function of that name in public (when the database has that schema), so
-- it works without touching anyone's search_path; d365inv.submit() is the
-- same without the stutter.  Both keep the privilege model: operators only.
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.submit() RETURNS bigint
    LANGUAGE sql SET search_path = pg_catalog, pg_temp
    AS 'SELECT d365inv.d365inv_submit()';
CREATE FUNCTION d365inv.submit(wait interval) RETURNS TABLE (status text, invoices bigint)
    LANGUAGE sql SET search_path = pg_catalog, pg_temp
    AS 'SELECT * FROM d365inv.d365inv_submit(wait)';
COMMENT ON FUNCTION d365inv.submit() IS 'd365inv_submit(): ingest, wake the worker, return how many invoices wait';
COMMENT ON FUNCTION d365inv.submit(interval) IS 'd365inv_submit(wait): wait up to "wait" for what is waiting now to settle';
REVOKE ALL ON FUNCTION d365inv.submit(), d365inv.submit(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION d365inv.submit(), d365inv.submit(interval) TO d365inv_operator;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'public') THEN
        CREATE FUNCTION public.d365inv_submit() RETURNS bigint
            LANGUAGE sql SET search_path = pg_catalog, pg_temp
            AS 'SELECT d365inv.d365inv_submit()';
        CREATE FUNCTION public.d365inv_submit(wait interval) RETURNS TABLE (status text, invoices bigint)
            LANGUAGE sql SET search_path = pg_catalog, pg_temp
            AS 'SELECT * FROM d365inv.d365inv_submit(wait)';
        COMMENT ON FUNCTION public.d365inv_submit() IS 'd365inv: ingest, wake the worker, return how many invoices wait';
        COMMENT ON FUNCTION public.d365inv_submit(interval) IS 'd365inv: wait up to "wait" for what is waiting now to settle';
        REVOKE ALL ON FUNCTION public.d365inv_submit(), public.d365inv_submit(interval) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION public.d365inv_submit(), public.d365inv_submit(interval) TO d365inv_operator;
    END IF;
END
$$;

--------------------------------------------------------------------------
-- 13. Backup: pg_dump keeps what d365inv holds.  Not the client secrets:
-- insert them again after a restore (the worker says which are missing).
-- The 'default' target CREATE EXTENSION makes (created_at -infinity) gives
-- way to the restored one.  Not the counters (d365inv.tally): the rows a
-- restore loads into invoice, duplicate and reject are counted as they
-- come (a restore with --disable-triggers: SELECT d365inv.recount()).
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.target_restore() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- a restored row replaces the untouched one CREATE EXTENSION made
        DELETE FROM d365inv.target t
        WHERE t.name = NEW.name AND t.created_at = '-infinity'
          AND NOT EXISTS (SELECT FROM d365inv.target_secret s WHERE s.target = t.name);
    ELSIF OLD.created_at = '-infinity' AND NEW.created_at = '-infinity' THEN
        NEW.created_at := now();        -- changed: it is the DBA's now
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION d365inv.target_restore() FROM PUBLIC;
CREATE TRIGGER target_restore BEFORE INSERT OR UPDATE ON d365inv.target
    FOR EACH ROW EXECUTE FUNCTION d365inv.target_restore();

SELECT pg_catalog.pg_extension_config_dump('d365inv.target', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.invoice', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.duplicate', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.reject', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.batch_log', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.remote_key', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.status_change', '');
SELECT pg_catalog.pg_extension_config_dump('d365inv.worker_state', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('d365inv.inbox', 'line_id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('d365inv.invoice', 'id'), '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('d365inv.batch_log', 'id'), '');

--------------------------------------------------------------------------
-- 14. A target is checked when it is written, with a message that names the
-- field: what CHECK constraints cannot say (property_map's keys and values).
--------------------------------------------------------------------------
CREATE FUNCTION d365inv.target_check() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m record;
BEGIN
    FOR m IN SELECT key, value FROM jsonb_each(NEW.property_map) LOOP
        IF m.key NOT IN ('invoice_date', 'due_date', 'amount', 'currency', 'description', 'source') THEN
            RAISE EXCEPTION 'd365inv target "%": property_map maps "%", which is not a staging column',
                            NEW.name, m.key
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Map invoice_date, due_date, amount, currency, description or source.';
        END IF;
        IF jsonb_typeof(m.value) <> 'string' OR (m.value #>> '{}') !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
            RAISE EXCEPTION 'd365inv target "%": property_map maps "%" to %, which is not an OData property name',
                            NEW.name, m.key, m.value
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Values are entity property names such as "InvoiceAmount".';
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION d365inv.target_check() FROM PUBLIC;
CREATE TRIGGER target_check BEFORE INSERT OR UPDATE ON d365inv.target
    FOR EACH ROW EXECUTE FUNCTION d365inv.target_check();

--------------------------------------------------------------------------
-- 15. Where a line came from: SET d365inv.source = 'file.csv' before a COPY
-- fills inbox.source; load_lines numbers every line within its load (the
-- lines loaded in one transaction), whatever it became.
--------------------------------------------------------------------------
ALTER TABLE d365inv.inbox ALTER COLUMN source SET DEFAULT nullif(current_setting('d365inv.source', true), '');
CREATE VIEW d365inv.load_lines AS
    SELECT l.loaded_at, l.source,
           row_number() OVER (PARTITION BY l.loaded_at ORDER BY l.line_id) AS line_no,
           l.line_id, l.outcome, l.target, l.vendor_account, l.invoice_number, l.invoice_id, l.reason
    FROM (SELECT i.created_at AS loaded_at, i.source, i.line_id, 'queued' AS outcome, i.target::text,
                 i.vendor_account, i.invoice_number, i.id AS invoice_id, NULL::text AS reason
          FROM d365inv.invoice i WHERE i.line_id IS NOT NULL
          UNION ALL
          SELECT d.loaded_at, d.source, d.line_id, 'duplicate', d.target, d.vendor_account,
                 d.invoice_number, d.duplicate_of, d.reason
          FROM d365inv.duplicate d
          UNION ALL
          SELECT r.loaded_at, r.source, r.line_id, 'reject', r.target, r.vendor_account,
                 r.invoice_number, NULL, r.reason
          FROM d365inv.reject r) l;
COMMENT ON VIEW d365inv.load_lines IS
    'Every ingested line: its load (loaded_at, source), its number in that load, and what it became';
REVOKE ALL ON d365inv.load_lines FROM PUBLIC;
GRANT SELECT ON d365inv.load_lines TO d365inv_loader;

--------------------------------------------------------------------------
-- 16. App users and target state.
--
-- D365 enforces its service protection limits per app user (client id), so
-- a target that needs more than one user's budget gets more users here; the
-- worker spreads its batches over all of them, each with its own token and
-- budget.  The target's own client_id (and target_secret) is the first.
-- With auth 'none' (a local endpoint) the worker names the user in an
-- X-D365inv-Client-Id header.
--------------------------------------------------------------------------
CREATE TABLE d365inv.app_user (
    target          text NOT NULL REFERENCES d365inv.target ON UPDATE CASCADE ON DELETE CASCADE,
    client_id       text NOT NULL CHECK (client_id ~ '^[!-~]{1,200}$'),
    PRIMARY KEY (target, client_id)
);
COMMENT ON TABLE d365inv.app_user IS
    'More app users for a target, each with its own service protection budget (the target''s client_id is the first)';
SELECT pg_catalog.pg_extension_config_dump('d365inv.app_user', '');
-- their OAuth2 secrets: superuser-only and not dumped, like target_secret
CREATE TABLE d365inv.app_user_secret (
    target          text NOT NULL,
    client_id       text NOT NULL,
    client_secret   text NOT NULL CHECK (btrim(client_secret) <> ''),
    PRIMARY KEY (target, client_id),
    FOREIGN KEY (target, client_id) REFERENCES d365inv.app_user ON UPDATE CASCADE ON DELETE CASCADE
);
COMMENT ON TABLE d365inv.app_user_secret IS 'OAuth2 client secret per app user; superuser only';

-- What the worker is doing with each target, and why not: written by the
-- worker when it changes (read it through d365inv.target_status).
-- Runtime state, not dumped: a restored database starts without it.
CREATE TABLE d365inv.target_state (
    target          text PRIMARY KEY REFERENCES d365inv.target ON UPDATE CASCADE ON DELETE CASCADE,
    -- delivering: sending; idle: nothing due; throttled: every app user
    -- waits for D365 (Retry-After); blocked: cannot send (blocked_by, reason)
    state           text NOT NULL CHECK (state IN ('delivering', 'idle', 'throttled', 'blocked')),
    blocked_by      text CHECK (blocked_by IN ('auth', 'config', 'disabled', 'error')),
    reason          text,
    since           timestamptz NOT NULL DEFAULT now(),     -- in this state, for this reason
    until           timestamptz,                            -- throttled or blocked: next try
    app_users       int NOT NULL DEFAULT 1,
    app_users_throttled int NOT NULL DEFAULT 0,
    progress_at     timestamptz,        -- the worker last settled an invoice of this target
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE d365inv.target_state IS
    'What the worker is doing with each target and why it waits; written by the worker';
REVOKE ALL ON d365inv.app_user, d365inv.app_user_secret, d365inv.target_state FROM PUBLIC;
GRANT SELECT ON d365inv.app_user TO d365inv_operator;

--------------------------------------------------------------------------
-- 17. Target status, progress.  Why invoices are not moving and how fast
-- they move: target_status (what the worker is doing with each target, or
-- why it is not), progress, and target_alerts, the conditions of the
-- worker's alerts auth, blocked and queue_age (alerts.c).  batch_health and
-- metrics() read them, so they are defined here too.
--------------------------------------------------------------------------

-- A length of time as a person reads it: "0.4 s", "42 s", "12 min",
-- "3 h 5 min", "2 days 4 h".  For messages, not for arithmetic.
CREATE FUNCTION d365inv.format_duration(seconds float8) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN seconds IS NULL OR seconds IN ('NaN', 'Infinity', '-Infinity') THEN NULL
        WHEN seconds < 0 THEN '-' || d365inv.format_duration(-seconds)
        WHEN seconds < 9.95 THEN to_char(seconds, 'FM0.0') || ' s'
        WHEN seconds < 89.5 THEN round(seconds) || ' s'
        WHEN seconds < 89.5 * 60 THEN round(seconds / 60) || ' min'
        WHEN seconds < 48 * 3600 THEN floor(seconds / 3600) || ' h'
             || coalesce(' ' || nullif(floor(mod(seconds::numeric, 3600) / 60), 0) || ' min', '')
        ELSE floor(seconds / 86400) || ' days'
             || coalesce(' ' || nullif(floor(mod(seconds::numeric, 86400) / 3600), 0) || ' h', '')
    END
$$;
COMMENT ON FUNCTION d365inv.format_duration(float8) IS
    'Seconds as a person reads them: 42 s, 12 min, 3 h 5 min, 2 days 4 h';

-- How many inbox lines up to "upto" (all: NULL) there are, read without
-- keeping a lock, like peek_inbox() (for d365inv_submit(wait)'s progress).
CREATE FUNCTION d365inv.count_inbox(upto bigint, OUT lines bigint)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    BEGIN
        SELECT count(*) INTO lines FROM d365inv.inbox WHERE upto IS NULL OR line_id <= upto;
        RAISE SQLSTATE 'D3650';
    EXCEPTION WHEN SQLSTATE 'D3650' THEN
        NULL;
    END;
END
$$;

-- One row per target: what the worker is doing with it, or why not.  The
-- worker writes target_state for the targets it serves; the states it
-- cannot report are derived here: disabled (enabled = false), unconfigured
-- (no service_root) and stopped (no worker serves this database while the
-- target has open invoices).  blocked: its open invoices cannot move now
-- (batch_health.healthy, d365inv_target_blocked and d365inv_submit(wait)
-- read it).  Only open invoices are counted: the partial index
-- invoice_open (status < 'created') holds exactly those rows, so this costs
-- what is waiting, never the settled history.
CREATE VIEW d365inv.target_status AS
    WITH open AS (
        SELECT i.target, count(*) AS n, min(i.created_at) AS oldest
        FROM d365inv.invoice i
        WHERE i.status < 'created'
        GROUP BY i.target
    ), worker AS (
        SELECT d365inv.worker_pid() AS pid,
               current_setting('d365inv.database', true) AS served
    ), st AS (
        SELECT t.name, t.enabled, t.service_root, w.served, coalesce(o.n, 0) AS open_invoices,
               o.oldest AS oldest_open_at, s.*,
               CASE WHEN NOT t.enabled THEN 'disabled'
                    WHEN t.service_root IS NULL THEN 'unconfigured'
                    WHEN w.pid IS NULL AND o.n > 0 THEN 'stopped'
               END AS derived,
               1 + (SELECT count(*) FROM d365inv.app_user a WHERE a.target = t.name) AS configured_users
        FROM d365inv.target t
        CROSS JOIN worker w
        LEFT JOIN open o ON o.target = t.name COLLATE "C"
        LEFT JOIN d365inv.target_state s ON s.target = t.name
    ), ss AS (
        SELECT st.*, coalesce(st.derived, st.state, 'idle') AS shown FROM st
    )
    SELECT name AS target,
           shown AS state,
           CASE derived WHEN 'disabled' THEN 'disabled' WHEN 'unconfigured' THEN 'config'
                        WHEN 'stopped' THEN NULL ELSE blocked_by END AS blocked_by,
           CASE derived
               WHEN 'disabled' THEN
                   format('the worker leaves it alone: UPDATE d365inv.target SET enabled = true WHERE name = %L', name)
               WHEN 'unconfigured' THEN
                   format('no service_root: UPDATE d365inv.target SET service_root = %L WHERE name = %L',
                          'https://<host>/data/', name)
               WHEN 'stopped' THEN
                   CASE WHEN served IS NULL
                        THEN 'no d365inv worker: the library is not in shared_preload_libraries'
                        WHEN served <> current_database()
                        THEN format('no d365inv worker serves this database: d365inv.database is %L', served)
                        ELSE 'no d365inv worker is running in this database (see the server log)'
                   END
               ELSE reason
           END AS reason,
           CASE WHEN derived IS NULL THEN since END AS since,
           CASE WHEN derived IS NULL THEN until END AS until,
           shown IN ('blocked', 'throttled')
               OR (shown IN ('stopped', 'disabled', 'unconfigured') AND open_invoices > 0) AS blocked,
           open_invoices,
           oldest_open_at,
           CASE WHEN derived IS NULL THEN coalesce(app_users, configured_users)
                ELSE configured_users END AS app_users,
           CASE WHEN derived IS NULL THEN coalesce(app_users_throttled, 0) ELSE 0 END AS app_users_throttled,
           progress_at
    FROM ss
    ORDER BY name;
COMMENT ON VIEW d365inv.target_status IS
    'Per target: what the worker is doing (delivering, idle, throttled, blocked) or why not (disabled, unconfigured, stopped), why, open invoices, last progress';

-- How fast each target's invoices move: settled (created, duplicate or
-- review) in the last minute, the rate, and when what is open would be
-- done at that rate (eta; NULL when nothing moved or the target is blocked).  The last minute is
-- read from status_change, which is indexed on changed_at (invoice.settled_at
-- is not indexed, and an index over the whole history is not needed for
-- it): a window costs what it holds; each change finds its invoice's target
-- by primary key.  old_status < 'created': a resolve() of an invoice in
-- review was counted when it went to review.
CREATE VIEW d365inv.progress AS
    WITH settled AS (
        SELECT i.target, count(*) AS n,
               count(*) FILTER (WHERE c.new_status = 'created') AS created,
               count(*) FILTER (WHERE c.new_status = 'duplicate') AS duplicates,
               count(*) FILTER (WHERE c.new_status = 'review') AS reviews
        FROM d365inv.status_change c
        JOIN d365inv.invoice i ON i.id = c.invoice_id
        WHERE c.changed_at >= now() - interval '1 minute'
          AND c.new_status >= 'created' AND c.old_status < 'created'
        GROUP BY i.target
    )
    SELECT ts.target, ts.state, ts.open_invoices,
           coalesce(s.n, 0) AS settled_last_minute,
           coalesce(s.created, 0) AS created,
           coalesce(s.duplicates, 0) AS duplicates,
           coalesce(s.reviews, 0) AS reviews,
           coalesce(s.n, 0) / 60.0::float8 AS rate_per_s,
           -- at the last minute's rate; NULL when nothing moved, or the
           -- target is blocked (its rate says nothing about when it moves again)
           CASE WHEN s.n > 0 AND NOT ts.blocked
                THEN make_interval(secs => ceil(ts.open_invoices * 60.0 / s.n)::float8) END AS eta,
           ts.reason
    FROM d365inv.target_status ts
    LEFT JOIN settled s ON s.target = ts.target COLLATE "C"
    ORDER BY ts.target;
COMMENT ON VIEW d365inv.progress IS
    'Per target: open invoices, invoices settled in the last minute, rate per second, time left at that rate, state and reason';

-- The conditions of the worker's alerts auth, blocked and queue_age, one
-- row per target and alert (alerts.c reads it; metrics() exports firing):
--   auth       the worker cannot get a token (target_state.blocked_by = 'auth')
--   blocked    open invoices and no progress for d365inv.stall_alert_after:
--              nothing settled since the later of the last progress and
--              the oldest open invoice's arrival (an old progress_at must not
--              make invoices that just came look stalled)
--   queue_age  the oldest open invoice is older than d365inv.queue_age_alert_after
-- A setting of 0 turns its alert off.  The message names why: the
-- target's reason, else the last error of its open invoices.  figures is
-- the payload of NOTIFY d365inv_alert (never a key "state": the payload's
-- own says raised or cleared).
CREATE VIEW d365inv.target_alerts AS
    WITH s AS (
        SELECT ts.*,
               extract(epoch FROM now() - greatest(ts.progress_at, ts.oldest_open_at))::float8 AS still_s,
               extract(epoch FROM now() - ts.oldest_open_at)::float8 AS age_s,
               extract(epoch FROM coalesce(nullif(current_setting('d365inv.stall_alert_after', true), ''),
                                           '10min')::interval)::float8 AS stall_after_s,
               extract(epoch FROM coalesce(nullif(current_setting('d365inv.queue_age_alert_after', true), ''),
                                           '1h')::interval)::float8 AS age_after_s,
               coalesce(ts.reason,
                        (SELECT 'last error: ' || i.last_error
                         FROM d365inv.invoice i
                         WHERE i.target = ts.target COLLATE "C" AND i.status < 'created'
                           AND i.last_error IS NOT NULL
                         ORDER BY i.updated_at DESC LIMIT 1)) AS why
        FROM d365inv.target_status ts
    )
    SELECT target, 'auth' AS alert,
           coalesce(blocked_by = 'auth', false) AS firing,
           jsonb_build_object('target_state', state, 'blocked_by', blocked_by, 'reason', reason,
                              'open_invoices', open_invoices, 'since', since, 'until', until) AS figures,
           format('d365inv target "%s": %s', target, coalesce(reason, 'authentication failed')) AS message,
           format('%s open invoices wait%s%s.', open_invoices, ', since ' || since, '; next try ' || until) AS detail
    FROM s
    UNION ALL
    SELECT target, 'blocked',
           open_invoices > 0 AND stall_after_s > 0 AND still_s > stall_after_s,
           jsonb_build_object('target_state', state, 'reason', why, 'open_invoices', open_invoices,
                              'no_progress_s', round(still_s), 'threshold_s', stall_after_s,
                              'progress_at', progress_at),
           format('d365inv target "%s": no progress for %s with %s open invoices', target,
                  d365inv.format_duration(still_s), open_invoices) || coalesce(': ' || why, ''),
           format('%s; %s; d365inv.stall_alert_after is %s.',
                  coalesce('The worker last settled an invoice of the target '
                           || d365inv.format_duration(extract(epoch FROM now() - progress_at)::float8) || ' ago',
                           'The worker has not settled an invoice of the target yet'),
                  coalesce('the oldest open invoice was received ' || d365inv.format_duration(age_s) || ' ago',
                           'no invoice is open'),
                  d365inv.format_duration(stall_after_s))
    FROM s
    UNION ALL
    SELECT target, 'queue_age',
           open_invoices > 0 AND age_after_s > 0 AND age_s > age_after_s,
           jsonb_build_object('target_state', state, 'reason', why, 'open_invoices', open_invoices,
                              'oldest_open_at', oldest_open_at, 'oldest_age_s', round(age_s),
                              'threshold_s', age_after_s),
           format('d365inv target "%s": the oldest open invoice was received %s ago, more than d365inv.queue_age_alert_after (%s)',
                  target, d365inv.format_duration(age_s), d365inv.format_duration(age_after_s)),
           format('%s open invoices; the target is %s', open_invoices, state) || coalesce(': ' || why, '') || '.'
    FROM s;
COMMENT ON VIEW d365inv.target_alerts IS
    'Per target and alert (auth, blocked, queue_age): whether the worker''s alert condition holds, its message and figures';

REVOKE ALL ON d365inv.target_status, d365inv.progress, d365inv.target_alerts FROM PUBLIC;
REVOKE ALL ON FUNCTION d365inv.format_duration(float8), d365inv.count_inbox(bigint) FROM PUBLIC;
GRANT SELECT ON d365inv.target_status, d365inv.progress, d365inv.target_alerts TO d365inv_operator;
-- the views call it with the reader's privileges
GRANT EXECUTE ON FUNCTION d365inv.format_duration(float8) TO d365inv_operator;

-- The batch_log figures of batch_health for requests started since `since`
-- (NULL: all batch_log holds), per target: every configured target, any
-- other that sent, and any with invoices in review.  A function for the
-- reason lines_received() is one: each period planned with its own start.
CREATE FUNCTION d365inv.batches_since(since timestamptz)
    RETURNS TABLE (target text, batches bigint, successful bigint, avg_ms float8, p95_ms float8,
                   operations bigint, created bigint, duplicates bigint, errors bigint,
                   retries bigint, in_doubt bigint, lookups bigint, throttled bigint,
                   throttle_wait_s bigint, splits bigint)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_custom_plan     -- since is a constant in every plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
        WITH logged AS (
            SELECT l.target COLLATE "C" AS target,
                   count(*) FILTER (WHERE l.kind <> 'lookup') AS batches,
                   count(*) FILTER (WHERE l.kind <> 'lookup' AND l.http_status BETWEEN 200 AND 299
                                      AND l.retries = 0 AND l.reviews = 0 AND l.in_doubt = 0
                                      AND l.unanswered = 0) AS successful,
                   avg(l.duration_ms) FILTER (WHERE l.kind <> 'lookup') AS avg_ms,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY l.duration_ms)
                       FILTER (WHERE l.kind <> 'lookup') AS p95_ms,
                   coalesce(sum(l.operations) FILTER (WHERE l.kind <> 'lookup'), 0) AS operations,
                   coalesce(sum(l.created) FILTER (WHERE l.kind <> 'lookup'), 0) AS created,
                   coalesce(sum(l.duplicates) FILTER (WHERE l.kind <> 'lookup'), 0) AS duplicates,
                   coalesce(sum(l.reviews) FILTER (WHERE l.kind <> 'lookup'), 0) AS errors,
                   coalesce(sum(l.retries) FILTER (WHERE l.kind <> 'lookup'), 0) AS retries,
                   coalesce(sum(l.in_doubt) FILTER (WHERE l.kind <> 'lookup'), 0) AS in_doubt,
                   count(*) FILTER (WHERE l.kind = 'lookup') AS lookups,
                   count(*) FILTER (WHERE l.throttled) AS throttled,
                   coalesce(sum(l.retry_after) FILTER (WHERE l.throttled), 0) AS throttle_wait_s,
                   count(*) FILTER (WHERE l.kind <> 'lookup' AND l.http_status = 413) AS splits
            FROM d365inv.batch_log l
            WHERE since IS NULL OR l.started_at >= since
            GROUP BY 1
        ), targets AS (
            SELECT t.name COLLATE "C" AS target FROM d365inv.target t
            UNION SELECT g.target FROM logged g
            -- invoice_review holds exactly these rows
            UNION SELECT i.target FROM d365inv.invoice i WHERE i.status = 'review'
        )
        SELECT t.target, g.batches, g.successful, g.avg_ms, g.p95_ms, g.operations, g.created,
               g.duplicates, g.errors, g.retries, g.in_doubt, g.lookups, g.throttled,
               g.throttle_wait_s, g.splits
        FROM targets t LEFT JOIN logged g ON g.target = t.target;
END
$$;
COMMENT ON FUNCTION d365inv.batches_since(timestamptz) IS
    'Per target: the batch_log figures of batch_health for requests started since a moment (NULL: all batch_log holds)';
REVOKE ALL ON FUNCTION d365inv.batches_since(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION d365inv.batches_since(timestamptz) TO d365inv_operator;

-- Batch health per target and period.  (Defined here, not in section 10:
-- healthy reads target_status.)  Each period is a branch of its own, so a
-- query for one period (the worker's alert: '1h') reads that period only.
CREATE VIEW d365inv.batch_health AS
    WITH logged AS (
        SELECT 1 AS ord, '1h'::text AS period, now() - interval '1 hour' AS since, b.*
        FROM d365inv.batches_since(now() - interval '1 hour') b
        UNION ALL
        SELECT 2, '24h', now() - interval '24 hours', b.*
        FROM d365inv.batches_since(now() - interval '24 hours') b
        UNION ALL
        SELECT 3, 'all', NULL, b.*
        FROM d365inv.batches_since(NULL) b
    ), in_review AS (
        SELECT i.target COLLATE "C" AS target, count(*) AS n
        FROM d365inv.invoice i WHERE i.status = 'review'
        GROUP BY 1
    )
    SELECT l.target COLLATE "C" AS target, l.period, l.since,
           coalesce(l.batches, 0) AS batches,
           coalesce(l.successful, 0) AS successful,
           l.successful::float8 / nullif(l.batches, 0) AS success_rate,
           l.avg_ms, l.p95_ms,
           coalesce(l.operations, 0) AS operations,
           coalesce(l.created, 0) AS created,
           coalesce(l.duplicates, 0) AS duplicates,
           coalesce(l.errors, 0) AS errors,
           l.duplicates::float8 / nullif(l.duplicates + l.errors, 0) AS duplicate_share,
           coalesce(l.retries, 0) AS retries,
           coalesce(l.in_doubt, 0) AS in_doubt,
           coalesce(r.n, 0) AS in_review,
           coalesce(l.lookups, 0) AS lookups,
           coalesce(l.throttled, 0) AS throttled,
           coalesce(l.throttle_wait_s, 0) AS throttle_wait_s,
           -- $batch requests refused as too large (HTTP 413) and sent again in halves
           coalesce(l.splits, 0) AS splits,
           -- auto mode: the size the worker used last
           CASE WHEN tg.batch_size_mode = 'auto' THEN
               coalesce((SELECT bl.batch_size FROM d365inv.batch_log bl
                         WHERE bl.target = l.target AND bl.kind <> 'lookup'
                         ORDER BY bl.id DESC LIMIT 1), tg.batch_size)
               ELSE tg.batch_size END AS batch_size,
           tg.batch_size_mode,
           -- '1h' only: genuine errors within the threshold, and the
           -- target's invoices can move (target_status.blocked: blocked or
           -- throttled, or stopped, disabled or unconfigured with invoices open)
           CASE WHEN l.period = '1h' THEN
               coalesce(l.errors, 0) <= coalesce(nullif(current_setting('d365inv.error_alert_threshold', true), ''),
                                                 '10')::bigint
               AND NOT coalesce(ts.blocked, false)
           END AS healthy
    FROM logged l
    LEFT JOIN in_review r ON r.target = l.target COLLATE "C"
    LEFT JOIN d365inv.target tg ON tg.name = l.target
    LEFT JOIN d365inv.target_status ts ON ts.target = l.target
    ORDER BY l.target COLLATE "C", l.ord;
COMMENT ON VIEW d365inv.batch_health IS
    'Per target and period (1h, 24h, all): batches, success rate, time per batch, duplicates versus genuine errors, throttling; healthy: few errors and not blocked';
REVOKE ALL ON d365inv.batch_health FROM PUBLIC;
GRANT SELECT ON d365inv.batch_health TO d365inv_operator;

-- The key figures in the Prometheus text exposition format (version 0.0.4).
-- (Defined here, not in section 10: it reads target_status and target_alerts.)
-- SECURITY DEFINER: a scraper role needs only USAGE on the schema and
-- EXECUTE on this function, no access to the tables.
CREATE FUNCTION d365inv.metrics() RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET extra_float_digits = 1      -- shortest exact numbers, whatever the caller's setting
AS $$
    WITH family (ord, name, type, help) AS (
        VALUES
        (1, 'd365inv_worker_up', 'gauge', '1 when a d365inv worker serves this database'),
        (2, 'd365inv_invoices', 'gauge', 'Invoices per target and status'),
        (3, 'd365inv_queue_due', 'gauge', 'Waiting invoices the worker may take up now'),
        (4, 'd365inv_queue_oldest_age_seconds', 'gauge', 'Time since the oldest waiting invoice was loaded'),
        (5, 'd365inv_queue_next_attempt_timestamp_seconds', 'gauge', 'Earliest scheduled attempt (Unix time)'),
        (6, 'd365inv_inbox_lines_total', 'counter', 'Inbox lines ingested, by what they became: queued, duplicate (at ingest) or rejected'),
        (7, 'd365inv_duplicate_rate', 'gauge', 'Duplicates (at ingest and in D365) per line received in the period'),
        (8, 'd365inv_duplicate_rate_healthy', 'gauge', '1 when the duplicate rate is at most d365inv.duplicate_alert_threshold'),
        (9, 'd365inv_duplicate_alert_threshold', 'gauge', 'd365inv.duplicate_alert_threshold'),
        (10, 'd365inv_batches', 'gauge', '$batch requests sent in the period'),
        (11, 'd365inv_batch_success_ratio', 'gauge', 'Share of $batch requests whose operations all ended created or duplicate'),
        (12, 'd365inv_batch_duration_avg_seconds', 'gauge', 'Average time per $batch request'),
        (13, 'd365inv_batch_duration_p95_seconds', 'gauge', '95th percentile of the time per $batch request'),
        (14, 'd365inv_operations', 'gauge', 'Operations of $batch requests in the period by outcome (review = genuine error)'),
        (15, 'd365inv_throttled_requests', 'gauge', 'Requests D365 answered with 429 in the period'),
        (16, 'd365inv_throttle_wait_seconds', 'gauge', 'Retry-After D365 asked for on throttled requests in the period'),
        (17, 'd365inv_error_alert_threshold', 'gauge', 'd365inv.error_alert_threshold: genuine errors per hour'),
        (18, 'd365inv_batch_size', 'gauge', 'The target''s batch size'),
        (19, 'd365inv_alert', 'gauge', '1 while the condition of the worker''s alert holds (duplicate_rate, errors, auth, blocked, queue_age)'),
        (20, 'd365inv_target_blocked', 'gauge', '1 while the target''s open invoices cannot move (see d365inv.target_status)'),
        (21, 'd365inv_open_invoices', 'gauge', 'Open invoices (pending, in_flight, in_doubt, retry)'),
        (22, 'd365inv_oldest_open_seconds', 'gauge', 'Time since the oldest open invoice was loaded; 0 when none is open')
    ), targets AS (
        SELECT name COLLATE "C" AS target FROM d365inv.target
    ), by_status AS (
        -- the counters, not a count of the history
        SELECT t.target COLLATE "C" AS target, t.status, sum(t.n)::bigint AS n
        FROM d365inv.tally t WHERE t.counted = 'invoice'
        GROUP BY 1, 2 HAVING sum(t.n) <> 0
    ), dr AS (
        SELECT coalesce(target, '') AS target, period, queued, ingest_duplicates, rejected,
               duplicate_rate, healthy
        FROM d365inv.duplicate_rate
    ), bh AS (SELECT * FROM d365inv.batch_health
    ), q AS (SELECT * FROM d365inv.queue
    ), ts AS (SELECT * FROM d365inv.target_status
    ), sample0 (family, target, status, period, value) AS (
        -- target NULL: a figure without a target label; lines that named no
        -- target are target="" (which Prometheus treats as no label)
        SELECT 'd365inv_worker_up', NULL, NULL, NULL,
               CASE WHEN d365inv.worker_pid() IS NULL THEN 0 ELSE 1 END::float8
        UNION ALL
        -- every status of every configured target, zeros included, so that
        -- alerts see a series; plus whatever other target has invoices
        SELECT 'd365inv_invoices', k.target, s.status::text, NULL, coalesce(b.n, 0)
        FROM (SELECT target FROM targets UNION SELECT target FROM by_status) k
        CROSS JOIN unnest(enum_range(NULL::d365inv.invoice_status)) AS s (status)
        LEFT JOIN by_status b ON b.target = k.target AND b.status = s.status
        UNION ALL
        SELECT 'd365inv_queue_due', target, status::text, NULL, due FROM q
        UNION ALL
        SELECT 'd365inv_queue_oldest_age_seconds', target, status::text, NULL,
               extract(epoch FROM oldest_age)::float8 FROM q
        UNION ALL
        SELECT 'd365inv_queue_next_attempt_timestamp_seconds', target, status::text, NULL,
               extract(epoch FROM next_attempt_at)::float8 FROM q
        UNION ALL
        SELECT 'd365inv_inbox_lines_total', target, s.status, NULL, s.n
        FROM dr CROSS JOIN LATERAL (VALUES ('queued', dr.queued), ('duplicate', dr.ingest_duplicates),
                                           ('rejected', dr.rejected)) AS s (status, n)
        WHERE dr.period = 'all'
        UNION ALL
        SELECT 'd365inv_duplicate_rate', target, NULL, period, duplicate_rate FROM dr
        UNION ALL
        SELECT 'd365inv_duplicate_rate_healthy', target, NULL, period, healthy::int FROM dr
        UNION ALL
        SELECT 'd365inv_duplicate_alert_threshold', NULL, NULL, NULL,
               coalesce(nullif(current_setting('d365inv.duplicate_alert_threshold', true), ''), '0.05')::float8
        UNION ALL
        SELECT 'd365inv_batches', target, NULL, period, batches FROM bh
        UNION ALL
        SELECT 'd365inv_batch_success_ratio', target, NULL, period, success_rate FROM bh
        UNION ALL
        SELECT 'd365inv_batch_duration_avg_seconds', target, NULL, period, avg_ms / 1000 FROM bh
        UNION ALL
        SELECT 'd365inv_batch_duration_p95_seconds', target, NULL, period, p95_ms / 1000 FROM bh
        UNION ALL
        SELECT 'd365inv_operations', target, s.status, period, s.n
        FROM bh CROSS JOIN LATERAL (VALUES ('created', bh.created), ('duplicate', bh.duplicates),
                                           ('review', bh.errors), ('retry', bh.retries),
                                           ('in_doubt', bh.in_doubt)) AS s (status, n)
        UNION ALL
        SELECT 'd365inv_throttled_requests', target, NULL, period, throttled FROM bh
        UNION ALL
        SELECT 'd365inv_throttle_wait_seconds', target, NULL, period, throttle_wait_s FROM bh
        UNION ALL
        SELECT 'd365inv_error_alert_threshold', NULL, NULL, NULL,
               coalesce(nullif(current_setting('d365inv.error_alert_threshold', true), ''), '10')::float8
        UNION ALL
        SELECT 'd365inv_batch_size', target, NULL, NULL, min(batch_size) FROM bh
        WHERE batch_size IS NOT NULL GROUP BY target
    ), sample (family, target, status, period, alert, value) AS (
        SELECT s.family, s.target, s.status, s.period, NULL, s.value FROM sample0 s
        UNION ALL
        -- the worker's alert conditions, as it checks them (alerts.c)
        SELECT 'd365inv_alert', target, NULL, NULL, 'duplicate_rate', (NOT healthy)::int FROM dr
        WHERE period = '1h' AND target <> ''
        UNION ALL
        SELECT 'd365inv_alert', target, NULL, NULL, 'errors',
               (errors > coalesce(nullif(current_setting('d365inv.error_alert_threshold', true), ''),
                                  '10')::bigint)::int
        FROM bh WHERE period = '1h'
        UNION ALL
        SELECT 'd365inv_alert', target, NULL, NULL, alert, firing::int FROM d365inv.target_alerts
        UNION ALL
        SELECT 'd365inv_target_blocked', target, NULL, NULL, NULL, blocked::int FROM ts
        UNION ALL
        SELECT 'd365inv_open_invoices', target, NULL, NULL, NULL, open_invoices FROM ts
        UNION ALL
        SELECT 'd365inv_oldest_open_seconds', target, NULL, NULL, NULL,
               coalesce(extract(epoch FROM now() - oldest_open_at)::float8, 0) FROM ts
    ), line AS (
        -- Labels only for configured targets (and "" for lines that named
        -- none): a loader names any target it likes in the inbox, and must
        -- not choose what a scraper reads nor how many series it stores.  Target names are plain by their CHECK;
        -- the values are escaped all the same (\ " newline, and CR).
        SELECT s.family,
               s.family
               || coalesce('{' || nullif(concat_ws(',',
                      'target="' || replace(replace(replace(replace(s.target, '\', '\\'), '"', '\"'),
                                                    E'\n', '\n'), E'\r', '\r') || '"',
                      'status="' || s.status || '"',
                      'period="' || s.period || '"',
                      'alert="' || s.alert || '"'), '') || '}', '')
               || ' ' || s.value::float8::text AS text
        FROM sample s
        WHERE s.value IS NOT NULL
          AND (s.target IS NULL OR s.target = '' OR s.target IN (SELECT target FROM targets))
    )
    SELECT string_agg(
               '# HELP ' || f.name || ' ' || f.help || E'\n'
               || '# TYPE ' || f.name || ' ' || f.type || E'\n'
               || coalesce((SELECT string_agg(l.text || E'\n', '' ORDER BY l.text COLLATE "C")
                            FROM line l WHERE l.family = f.name), ''),
               '' ORDER BY f.ord)
    FROM family f;
$$;
COMMENT ON FUNCTION d365inv.metrics() IS
    'Key figures in the Prometheus text format: queue, duplicate rate, batch health, throttling, target status, alerts';
REVOKE ALL ON FUNCTION d365inv.metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION d365inv.metrics() TO d365inv_operator;
