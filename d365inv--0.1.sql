-- d365inv 0.1: vendor invoice staging and exactly-once delivery to Dynamics 365.
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
    service_root        text CHECK (service_root ~ '^https?://[^/?#]+(/[^?#]*)?$'),
    entity_set          text NOT NULL DEFAULT 'VendorInvoices' CHECK (entity_set ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    vendor_property     text NOT NULL DEFAULT 'VendorAccount' CHECK (vendor_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    invoice_property    text NOT NULL DEFAULT 'InvoiceNumber' CHECK (invoice_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    id_property         text NOT NULL DEFAULT 'InvoiceId' CHECK (id_property ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    -- staging column -> entity property; a column left out is not sent
    property_map        jsonb NOT NULL DEFAULT '{"invoice_date": "InvoiceDate",
                                                "due_date": "DueDate",
                                                "amount": "InvoiceAmount",
                                                "currency": "CurrencyCode",
                                                "description": "Description"}'
                        CHECK (jsonb_typeof(property_map) = 'object'),
    company             text CHECK (company ~ '^[A-Za-z0-9_]{1,8}$'),    -- dataAreaId
    company_property    text NOT NULL DEFAULT 'dataAreaId',
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
    token_url           text CHECK (token_url ~ '^https?://[^/?#]+(/[^#]*)?$'),
    client_id           text,
    scope               text,       -- e.g. https://contoso.operations.dynamics.com/.default
    CHECK (auth = 'none' OR (token_url IS NOT NULL AND client_id IS NOT NULL AND scope IS NOT NULL)),
    -- fixed: always batch_size; auto: shrink after trouble, grow after clean batches
    batch_size_mode     text NOT NULL DEFAULT 'fixed' CHECK (batch_size_mode IN ('fixed', 'auto')),
    batch_size_min      int NOT NULL DEFAULT 5 CHECK (batch_size_min BETWEEN 1 AND 1000),
    batch_size_max      int NOT NULL DEFAULT 50 CHECK (batch_size_max BETWEEN 1 AND 1000),
    CHECK (batch_size_min <= batch_size_max),
    created_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE d365inv.target IS 'One row per Dynamics 365 destination; superuser-only to change';

INSERT INTO d365inv.target (name) VALUES ('default');

-- OAuth2 client secrets.  No grants at all: only superusers and the worker
-- read it.  Set it with psql's \set and a variable (or from a file) so the
-- secret does not land in a history file; see the README.
CREATE TABLE d365inv.target_secret (
    target          text PRIMARY KEY REFERENCES d365inv.target ON UPDATE CASCADE ON DELETE CASCADE,
    client_secret   text NOT NULL
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
    vendor_account  text NOT NULL CHECK (btrim(vendor_account, E' \t\r\n') <> ''),
    invoice_number  text NOT NULL CHECK (btrim(invoice_number, E' \t\r\n') <> ''),
    vendor_key      text COLLATE "C" GENERATED ALWAYS AS (d365inv.invoice_key(vendor_account)) STORED,
    invoice_key     text COLLATE "C" GENERATED ALWAYS AS (d365inv.invoice_key(invoice_number)) STORED,
    invoice_date    date NOT NULL,
    due_date        date,
    amount          numeric NOT NULL,
    currency        text CHECK (currency ~ '^[A-Z]{3}$'),
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
    -- how the final status was learnt: response (to our request), lookup
    -- (an existence check found it after an unknown fate), preflight (found
    -- before sending) or manual
    settled_by      text,
    batch_id        bigint,         -- d365inv.batch_log.id of the last request
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    CONSTRAINT invoice_unique_key UNIQUE (target, vendor_key, invoice_key)
);
COMMENT ON TABLE d365inv.invoice IS 'The submission queue: one row per distinct invoice key';
-- open rows only (pending, in_flight, in_doubt, retry): the worker's claim
-- query and "what is still waiting" stay cheap however long the history
CREATE INDEX invoice_open ON d365inv.invoice (target, next_attempt_at NULLS FIRST, id)
    WHERE status < 'created';

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
    SET work_mem = '256MB'      -- the line-order sort of a large load stays in memory
AS $$
DECLARE
    taken bigint;
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
    SELECT count(*) INTO taken FROM d365inv.inbox;
    IF taken = 0 THEN
        RETURN;
    END IF;

    WITH judged AS (
        SELECT l.*, d365inv.line_problems(l.target, t.name IS NOT NULL,
                                          t.vendor_max_length, t.invoice_max_length,
                                          l.vendor_account, l.invoice_number, l.invoice_date,
                                          l.due_date, l.amount, l.currency, l.payload) AS problems
        FROM d365inv.inbox l LEFT JOIN d365inv.target t ON t.name = l.target
    )
    INSERT INTO d365inv.reject
    SELECT * FROM judged WHERE problems IS NOT NULL;
    GET DIAGNOSTICS rejected = ROW_COUNT;

    WITH good AS (
        SELECT l.*
        FROM d365inv.inbox l JOIN d365inv.target t ON t.name = l.target
        WHERE d365inv.line_problems(l.target, true, t.vendor_max_length, t.invoice_max_length,
                                    l.vendor_account, l.invoice_number, l.invoice_date,
                                    l.due_date, l.amount, l.currency, l.payload) IS NULL
    ), queued AS (
        -- In key order, the unique index is filled sequentially instead of
        -- at random (several times faster for large loads).  Within a key,
        -- line order: ON CONFLICT DO NOTHING queues the first line of a key
        -- and skips its repeats, in this load as in earlier ones.
        INSERT INTO d365inv.invoice AS i (target, vendor_account, invoice_number, invoice_date,
                                          due_date, amount, currency, description, payload,
                                          source, line_id, created_at)
        SELECT target,
               btrim(vendor_account, E' \t\r\n'),
               btrim(invoice_number, E' \t\r\n'),
               d365inv.parse_date(invoice_date),
               d365inv.parse_date(due_date),
               d365inv.parse_amount(amount),
               upper(nullif(btrim(currency, E' \t\r\n'), '')),
               description,
               CASE WHEN btrim(payload, E' \t\r\n') <> '' THEN payload::jsonb END,
               source,
               line_id,
               loaded_at
        FROM good
        ORDER BY target COLLATE "C", d365inv.invoice_key(vendor_account) COLLATE "C",
                 d365inv.invoice_key(invoice_number) COLLATE "C", line_id
        ON CONFLICT ON CONSTRAINT invoice_unique_key DO NOTHING
        RETURNING i.line_id
    ), repeats AS (
        -- A repeat either matches an invoice staged before this ingest (an
        -- index probe finds it) or one queued by an earlier line of this
        -- load (filled in below, once those rows are visible).
        INSERT INTO d365inv.duplicate
        SELECT g.*, earlier.id,
               CASE WHEN earlier.id IS NULL THEN 'repeated in the same load'
                    ELSE 'already staged' END
        FROM good g
        LEFT JOIN LATERAL (
            SELECT e.id FROM d365inv.invoice e
            WHERE e.target = g.target
              AND e.vendor_key = d365inv.invoice_key(g.vendor_account)
              AND e.invoice_key = d365inv.invoice_key(g.invoice_number)
        ) earlier ON true
        WHERE NOT EXISTS (SELECT FROM queued q WHERE q.line_id = g.line_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM queued), (SELECT count(*) FROM repeats)
    INTO queued, duplicates;

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
    LANGUAGE C STRICT VOLATILE;
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
    LANGUAGE C CALLED ON NULL INPUT STABLE;
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
    source          text NOT NULL,      -- created, lookup, refresh
    seen_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, vendor_key, invoice_key)
);
COMMENT ON TABLE d365inv.remote_key IS
    'Keys known to exist in D365; the client-side key cache (d365inv.remote_key_retention)';

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
    LANGUAGE C STRICT VOLATILE;
COMMENT ON FUNCTION d365inv.refresh_remote_keys(text) IS
    'Page through the target''s entity set and remember every key in remote_key (superuser)';

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
-- the wait sees the worker's commits.
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
    inbox_done  boolean;
BEGIN
    PERFORM d365inv.check_worker(true);
    SELECT p.first_line, p.last_line INTO first_line, last_line FROM d365inv.peek_inbox(NULL) p;
    SELECT max(id) INTO last_open FROM d365inv.invoice i WHERE i.status < 'created';
    LOOP
        PERFORM d365inv.wake_worker(true);
        -- Two statements, in this order: TRUNCATE (in ingest) is not MVCC-safe,
        -- so the inbox may look empty to a snapshot that does not yet see the
        -- invoices ingest() made of it.  The second statement's snapshot does.
        inbox_done := last_line IS NULL
                      OR (SELECT p.first_line FROM d365inv.peek_inbox(last_line) p) IS NULL;
        EXIT WHEN inbox_done AND NOT EXISTS (SELECT FROM d365inv.invoice i
                              WHERE i.status < 'created'
                                AND (i.id <= last_open OR i.line_id BETWEEN first_line AND last_line));
        EXIT WHEN clock_timestamp() >= deadline;
        PERFORM pg_sleep(least(0.05, greatest(0, extract(epoch FROM deadline - clock_timestamp()))));
    END LOOP;
    RETURN QUERY
        SELECT i.status::text, count(*)
        FROM d365inv.invoice i
        WHERE i.line_id BETWEEN first_line AND last_line
           OR (i.id <= last_open AND i.updated_at >= started)
           OR (i.id <= last_open AND i.status < 'created')
        GROUP BY i.status ORDER BY i.status;
    RETURN QUERY
        SELECT 'ingest_duplicate', count(*) FROM d365inv.duplicate d
        WHERE d.line_id BETWEEN first_line AND last_line HAVING count(*) > 0;
    RETURN QUERY
        SELECT 'ingest_reject', count(*) FROM d365inv.reject r
        WHERE r.line_id BETWEEN first_line AND last_line HAVING count(*) > 0;
END
$$;
COMMENT ON FUNCTION d365inv.d365inv_submit(interval) IS
    'Wake the worker and wait up to "wait" for the inbox and open invoices to settle; per-status counts';

-- The review queue: invoices a person has to look at.
CREATE VIEW d365inv.review_queue AS
    SELECT id, target, vendor_account, invoice_number, invoice_date, amount, currency,
           attempts, last_http_status,
           coalesce(last_error, 'no error recorded') AS last_error,
           updated_at AS in_review_since, source, line_id
    FROM d365inv.invoice
    WHERE status = 'review';
COMMENT ON VIEW d365inv.review_queue IS 'Invoices waiting for a person; see requeue() and resolve()';

CREATE FUNCTION d365inv.requeue(ids bigint[]) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    -- only review rows: anything else is settled or still in the worker's hands
    UPDATE d365inv.invoice
    SET status = 'pending', attempts = 0, next_attempt_at = NULL, updated_at = now()
    WHERE id = ANY (ids) AND status = 'review';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM d365inv.wake_worker();
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
GRANT SELECT, INSERT ON d365inv.inbox TO d365inv_loader;
GRANT SELECT ON d365inv.duplicate, d365inv.reject TO d365inv_loader;
GRANT EXECUTE ON FUNCTION d365inv.ingest(boolean), d365inv.invoice_key(text), d365inv.is_json_object(text),
                          d365inv.parse_date(text), d365inv.parse_amount(text)
    TO d365inv_loader;

GRANT SELECT ON d365inv.invoice, d365inv.target TO d365inv_operator;
GRANT USAGE ON TYPE d365inv.invoice_status TO d365inv_operator;
GRANT SELECT ON d365inv.batch_log, d365inv.remote_key, d365inv.review_queue, d365inv.key_filter
    TO d365inv_operator;
GRANT EXECUTE ON FUNCTION d365inv.key_filter_status() TO d365inv_operator;
GRANT EXECUTE ON FUNCTION d365inv.d365inv_submit(), d365inv.d365inv_submit(interval),
                          d365inv.requeue(bigint[]), d365inv.worker_pid(),
                          d365inv.build_batch(text, bigint[], text),
                          d365inv.parse_batch_response(text, bytea),
                          d365inv.classify(text, int, text, jsonb)
    TO d365inv_operator;
