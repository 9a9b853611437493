"""The background worker end to end: a throwaway cluster with d365inv preloaded
(pgcluster.Cluster), the mock D365 (mockctl.MockD365) on 127.0.0.1, invoices
loaded through the inbox and delivered by the worker.

Every delivery test checks the invoice rows (status, attempts, errors), the
worker's batch_log, and the mock's per-key creation counters, which is what
proves "created exactly once".

Runs as a non-root user (PostgreSQL refuses root); needs no cluster from
test/run-tests.
"""
import http.client
import http.server
import json
import re
import threading
import time
import urllib.parse
import uuid

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

from diagnostics import failure_diagnostics  # noqa: F401 (conftest.py calls it)
from mockctl import MockD365
from pgcluster import Cluster, wait_for

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    # the mock commits a request as it arrives, before any latency; the
    # late-commit tests hold requests and set a longer lifetime
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "500ms",
    "d365inv.http_timeout": "3s",
    "d365inv.max_retries": 3,
}
SECRET = "s3cr3t-" + uuid.uuid4().hex      # the OAuth2 client secret of the oauth2 tests
WAIT = "20 s"


# --------------------------------------------------------------------------
# helpers

def q(pg, query, args=None, **kw):
    """One statement on a fresh connection; rows as dicts, or None."""
    return pg.rows(query, args, **kw)


def one(pg, query, args=None, **kw):
    return pg.value(query, args, **kw)


def load(pg, numbers, vendor="V001", dbname=None):
    """Put one inbox line per invoice number (nothing is ingested here)."""
    conn = pg.connect(dbname)
    try:
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(
                cur, "INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date,"
                     " amount, currency) VALUES %s",
                [(vendor, n, "2024-01-15", "%d.25" % (100 + i), "EUR") for i, n in enumerate(numbers)])
    finally:
        conn.close()


def submit(pg, wait=WAIT, dbname=None):
    """d365inv_submit(wait) -> {status: invoices}."""
    return {r["status"]: r["invoices"] for r in
            q(pg, "SELECT * FROM d365inv.d365inv_submit(wait => %s::interval)", (wait,), dbname=dbname)}


def settle(pg, timeout=20.0, dbname=None):
    """Poll until no invoice is open (pending, in_flight, in_doubt, retry);
    {status: count} of the whole table.  For waits that submit(wait) cannot
    cover: it reports only what was open when it started, and a requeued
    row may be delivered before it starts."""
    assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status < 'created'",
                                dbname=dbname) == 0, timeout=timeout), invoices(pg, dbname)
    return {r["status"]: r["n"] for r in q(
        pg, "SELECT status::text, count(*) AS n FROM d365inv.invoice GROUP BY 1", dbname=dbname)}


def invoices(pg, dbname=None):
    return q(pg, "SELECT *, status::text AS status FROM d365inv.invoice ORDER BY id", dbname=dbname)


def by_number(rows):
    return {r["invoice_number"]: r for r in rows}


def batch_log(pg, kind=None, dbname=None):
    rows = q(pg, "SELECT * FROM d365inv.batch_log ORDER BY id", dbname=dbname)
    return [r for r in rows if kind is None or r["kind"] == kind]


def ckey(vendor, number):
    """The mock's counter key: normalised like D365 compares keys."""
    return "%s|%s" % (vendor.strip().lower(), number.strip().lower())


def once(numbers, vendor="V001"):
    return {ckey(vendor, n): 1 for n in numbers}


def posts_for(mock, number):
    """How many POST parts for this invoice number reached the mock (every
    raw $batch request is logged; an entity body is the only place where
    the number appears as a JSON property)."""
    pat = re.compile(r'"InvoiceNumber"\s*:\s*"%s"' % re.escape(number))
    return sum(len(pat.findall(r["body"])) for r in mock.requests())


def mock_ids(mock):
    return {ckey(e["VendorAccount"], e["InvoiceNumber"]): e["InvoiceId"] for e in mock.entities()}


def assert_ids_match_mock(rows, mock):
    """Every created row carries the id D365 gave *that* key."""
    ids = mock_ids(mock)
    for r in rows:
        if r["status"] == "created":
            assert r["d365_id"] == ids[ckey(r["vendor_account"], r["invoice_number"])], r


def safe_worker_pid(pg):
    """The worker's pid, None while the server restarts after a crash."""
    try:
        return pg.worker_pid()
    except psycopg2.Error:
        return None



COUNTERS = ("created", "duplicates", "retries", "reviews", "in_doubt", "unanswered", "not_found")


def counters(log_row):
    """The non-zero outcome counters of a batch_log row."""
    return {k: log_row[k] for k in COUNTERS if log_row[k]}


def set_target(pg, dbname=None, **cols):
    sets = ", ".join("%s = %%s" % k for k in cols)
    q(pg, "UPDATE d365inv.target SET %s WHERE name = 'default'" % sets, tuple(cols.values()),
      dbname=dbname)


class Proxy:
    """A pass-through HTTP proxy in front of the mock, for answers the mock
    cannot give itself:
      strip_prefer=True  drops the Prefer header, so the mock behaves like a
                         server that ignores odata.continue-on-error and stops
                         a $batch at the first failure;
      replace(status, body, after=True)
                         answers the next $batch with this status and body
                         instead of the mock's answer, after forwarding it
                         (processed) or without forwarding it (after=False);
      token_echo=True    refuses every token request with an OAuth error
                         whose error_description echoes the request body
                         (client secret included), like a careless server."""

    def __init__(self, upstream_port, strip_prefer=False, token_echo=False):
        proxy = self
        self.strip_prefer = strip_prefer
        self.token_echo = token_echo
        self.replacement = None
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, headers, data):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if proxy.token_echo and self.path.endswith("/oauth2/token"):
                    return self.reply(401, [("Content-Type", "application/json")], json.dumps(
                        {"error": "invalid_client",
                         "error_description": "bad credentials in " + body.decode()}).encode())
                replacement = None
                if self.path.endswith("/$batch"):
                    with proxy.lock:
                        replacement, proxy.replacement = proxy.replacement, None
                if replacement and not replacement[3]:
                    return self.reply(*replacement[:3])
                drop = ("host", "connection", "content-length") + (("prefer",) if proxy.strip_prefer else ())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                conn.request(self.command, self.path, body=body if body else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if replacement:
                    return self.reply(*replacement[:3])
                self.reply(resp.status, resp.getheaders(), data)

            do_GET = do_POST = do_PATCH = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def replace(self, status, body=b"", content_type="text/html", after=True):
        with self.lock:
            self.replacement = (status, [("Content-Type", content_type)], body, after)

    def service_root(self, mock):
        return "http://127.0.0.1:%d%s/" % (self.port, mock.service_path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def pg():
    with Cluster(CONF) as cluster:
        cluster.wait_for_worker()
        yield cluster


@pytest.fixture(scope="module")
def mock_server():
    with MockD365(unique=True) as m:
        yield m


def clean(pg, mock):
    """Back to an empty queue, a healthy mock and the default target."""
    # a batch left in flight by a failed test would record into the next one
    wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 0,
             timeout=10)
    mock.reset()
    q(pg, "DELETE FROM d365inv.target_secret")
    q(pg, "DELETE FROM d365inv.target WHERE name <> 'default'")
    pg.truncate("d365inv.invoice", "d365inv.batch_log", "d365inv.remote_key", "d365inv.duplicate",
                "d365inv.reject", "d365inv.inbox")
    set_target(pg, service_root=mock.service_root, batch_size=20, max_in_flight=4, enabled=True,
               auth="none", token_url=None, client_id=None, scope=None, preflight="in_doubt",
               write_mode="create", url_form="relative", company=None)


@pytest.fixture
def mock(pg, mock_server):
    clean(pg, mock_server)
    yield mock_server


# --------------------------------------------------------------------------
# 1. happy path

def test_happy_path_45_invoices_in_three_batches(pg, mock):
    numbers = ["HP-%03d" % i for i in range(45)]
    load(pg, numbers)
    assert submit(pg) == {"created": 45}

    rows = invoices(pg)
    assert len(rows) == 45
    for r in rows:
        assert (r["status"], r["settled_by"], r["attempts"], r["last_http_status"], r["last_error"]) == \
            ("created", "response", 1, 201, None), r
        assert r["d365_id"] and r["settled_at"] is not None and r["next_attempt_at"] is None
    assert_ids_match_mock(rows, mock)

    log = batch_log(pg)
    assert sorted((l["kind"], l["http_status"], l["operations"], l["invoices"], l["batch_size"])
                  for l in log) == [("create", 200, 5, 5, 20), ("create", 200, 20, 20, 20),
                                    ("create", 200, 20, 20, 20)]
    assert sorted(counters(l)["created"] for l in log) == [5, 20, 20]
    assert all(counters(l) == {"created": l["operations"]} and l["error"] is None
               and not l["throttled"] for l in log)
    # every row points at the request that carried it, 20 + 20 + 5
    per_batch = {}
    for r in rows:
        per_batch[r["batch_id"]] = per_batch.get(r["batch_id"], 0) + 1
    assert per_batch == {l["id"]: l["operations"] for l in log}

    assert mock.stats()["batches"] == 3
    assert mock.stats()["operations"]["POST"] == 45
    assert mock.counts() == once(numbers)
    keys = q(pg, "SELECT vendor_key, invoice_key, d365_id, source FROM d365inv.remote_key")
    assert len(keys) == 45 and {k["source"] for k in keys} == {"created"}
    assert {(k["vendor_key"], k["invoice_key"]): k["d365_id"] for k in keys} == \
        {("v001", r["invoice_number"].lower()): r["d365_id"] for r in rows}


# --------------------------------------------------------------------------
# 2. duplicates

@pytest.mark.parametrize("status,code", [
    (409, "0x80040237"),            # Dataverse duplicate key
    (412, "0x80060892"),            # alternate key exists
    (500, "0x80040333"),            # Dataverse duplicate detection rule, as a 500
    (400, ""),                      # Finance and Operations: a 400 with "...already exists"
], ids=["409", "412", "500-0x80040333", "fo-400-message"])
def test_duplicate_is_recorded_and_never_resent(pg, mock, status, code):
    mock.configure(duplicate_status=status, duplicate_code=code)
    mock.seed_entities([{"VendorAccount": "v002", "InvoiceNumber": "dup-2"}])
    numbers = ["DUP-%d" % i for i in range(5)]
    load(pg, numbers, vendor="V002")
    assert submit(pg) == {"created": 4, "duplicate": 1}

    rows = by_number(invoices(pg))
    dup = rows.pop("DUP-2")
    assert (dup["status"], dup["settled_by"], dup["attempts"], dup["last_http_status"]) == \
        ("duplicate", "response", 1, status)
    assert dup["last_error"].startswith("HTTP %d: " % status) and "already exists" in dup["last_error"]
    assert dup["settled_at"] is not None
    assert all(r["status"] == "created" and r["attempts"] == 1 for r in rows.values())

    (log,) = batch_log(pg)
    assert counters(log) == {"created": 4, "duplicates": 1}
    assert log["http_status"] == 200 and log["error"] is None

    # one POST, and none later
    time.sleep(1.2)
    assert posts_for(mock, "DUP-2") == 1
    assert mock.stats()["batches"] == 1
    assert mock.counts() == once([n for n in numbers if n != "DUP-2"], "V002")
    assert mock.preexisting() == {"v002|dup-2": 1}
    # D365 has the key: the cache knows it too
    assert one(pg, "SELECT count(*) FROM d365inv.remote_key WHERE invoice_key = 'dup-2'") == 1
    # the warning names the invoice and the batch_log row
    assert ('1 of 5 invoices in $batch %d already exist in D365: V002 / DUP-2 (invoice %d)'
            % (log["id"], dup["id"])) in pg.server_log()


# --------------------------------------------------------------------------
# 3. transient failures, then success

def test_operation_500_is_retried_then_created(pg, mock):
    mock.configure(fault_next={"error": 2})      # the first two operations answer 500
    numbers = ["R5-%d" % i for i in range(5)]
    load(pg, numbers)
    assert submit(pg) == {"created": 5}

    rows = invoices(pg)
    assert [r["status"] for r in rows] == ["created"] * 5
    assert [r["attempts"] for r in rows] == [2, 2, 1, 1, 1]
    assert all(r["last_error"] is None and r["last_http_status"] == 201 for r in rows)
    first, *later = batch_log(pg)
    assert counters(first) == {"created": 3, "retries": 2} and first["http_status"] == 200
    assert first["error"].startswith("HTTP 500: ") and "injected fault" in first["error"]
    # each retried row has its own jittered due time: one or two requests
    assert [counters(l) for l in later] in ([{"created": 2}], [{"created": 1}, {"created": 1}])
    assert mock.stats()["operations"]["POST"] == 7
    assert mock.counts() == once(numbers)


def test_429_retry_after_is_honoured(pg, mock):
    mock.configure(fault_next={"throttle": 1}, retry_after=2)   # whole $batch: 429, Retry-After: 2
    numbers = ["TH-%d" % i for i in range(3)]
    load(pg, numbers)
    assert submit(pg) == {"created": 3}

    # throttling is not a failure: the throttled send is not counted as an attempt
    rows = invoices(pg)
    assert [(r["status"], r["attempts"]) for r in rows] == [("created", 1)] * 3
    first, second = batch_log(pg)
    assert (first["http_status"], first["throttled"], first["retry_after"]) == (429, True, 2)
    assert counters(first) == {"unanswered": 3} and "HTTP 429" in first["error"]
    assert counters(second) == {"created": 3}
    first_end = first["started_at"].timestamp() + first["duration_ms"] / 1000
    gap = second["started_at"].timestamp() - first_end
    assert gap >= 2.0 - 0.02, "resent %.3f s after a Retry-After of 2 s" % gap
    assert gap < 4.0, "Retry-After 2 s, but waited %.3f s" % gap
    assert mock.counts() == once(numbers)


def test_operation_429_retry_after_is_honoured(pg, mock):
    mock.configure(throttle_scope="operation", fault_next={"throttle": 1}, retry_after=2)
    numbers = ["TO-%d" % i for i in range(3)]
    load(pg, numbers)
    assert submit(pg) == {"created": 3}
    rows = invoices(pg)
    assert [(r["status"], r["attempts"]) for r in rows] == [("created", 1)] * 3
    first, second = batch_log(pg)
    assert counters(first) == {"created": 2, "unanswered": 1}
    assert first["throttled"] and first["retry_after"] == 2
    gap = second["started_at"].timestamp() - (first["started_at"].timestamp() + first["duration_ms"] / 1000)
    assert gap >= 2.0 - 0.02, "resent %.3f s after a Retry-After of 2 s" % gap
    assert mock.counts() == once(numbers)


def in_flight_changes(pg):
    """Each change from in_flight, as (invoice_number, new status, note),
    grouped by status_change.changed_at in order: the audit trigger runs
    once per statement, so one group is one statement."""
    groups = {}
    for r in q(pg, "SELECT s.changed_at, i.invoice_number, s.new_status::text AS status, s.note"
                   "  FROM d365inv.status_change s JOIN d365inv.invoice i ON i.id = s.invoice_id"
                   " WHERE s.old_status = 'in_flight' ORDER BY s.changed_at, i.invoice_number"):
        groups.setdefault(r["changed_at"], []).append((r["invoice_number"], r["status"], r["note"]))
    return list(groups.values())


def test_mixed_answer_is_recorded_by_one_statement(pg, mock):
    # one $batch answer: a 400 (review), a 429 for one operation (pending, not
    # counted), a duplicate and three created
    mock.configure(error_status=400, throttle_scope="operation", retry_after=1,
                   fault_next={"error": 1, "throttle": 1})
    mock.seed_entities([{"VendorAccount": "v001", "InvoiceNumber": "mx-5"}])
    numbers = ["MX-%d" % i for i in range(6)]
    load(pg, numbers)
    assert submit(pg) == {"created": 4, "duplicate": 1, "review": 1}

    first, second = batch_log(pg)
    assert counters(first) == {"created": 3, "duplicates": 1, "reviews": 1, "unanswered": 1}
    assert counters(second) == {"created": 1}
    # the whole first answer in one statement, every row with its own outcome
    recorded = in_flight_changes(pg)
    assert [[(n, s) for n, s, _ in g] for g in recorded] == [
        [("MX-0", "review"), ("MX-1", "pending"), ("MX-2", "created"), ("MX-3", "created"),
         ("MX-4", "created"), ("MX-5", "duplicate")],
        [("MX-1", "created")]]
    rows = by_number(invoices(pg))
    got = {n: (r["status"], r["attempts"], r["last_http_status"], r["settled_by"], r["batch_id"])
           for n, r in rows.items()}
    assert got == {"MX-0": ("review", 1, 400, None, first["id"]),
                   "MX-1": ("created", 1, 201, "response", second["id"]),
                   "MX-2": ("created", 1, 201, "response", first["id"]),
                   "MX-3": ("created", 1, 201, "response", first["id"]),
                   "MX-4": ("created", 1, 201, "response", first["id"]),
                   "MX-5": ("duplicate", 1, 409, "response", first["id"])}
    assert "injected fault" in rows["MX-0"]["last_error"]
    assert all(rows[n]["d365_id"] for n in ("MX-1", "MX-2", "MX-3", "MX-4"))
    assert {r["invoice_key"] for r in q(pg, "SELECT invoice_key FROM d365inv.remote_key")} == \
        {"mx-1", "mx-2", "mx-3", "mx-4", "mx-5"}
    assert mock.counts() == once(["MX-1", "MX-2", "MX-3", "MX-4"])


def test_batch_claimed_ahead_goes_back_unsent_when_throttled(pg, mock):
    # While a request is under way the worker claims the next batch (its rows
    # in_flight, committed).  The request is throttled for longer than the
    # round: the batch claimed ahead was never sent, so it goes back to
    # pending, not counted and not in_doubt (nothing to look up), and goes
    # out after the wait like the throttled one.
    set_target(pg, max_in_flight=1, batch_size=5)
    mock.configure(latency_ms=300, fault_next={"throttle": 1}, retry_after=3)
    numbers = ["CA-%d" % i for i in range(10)]
    load(pg, numbers)
    assert submit(pg, wait="30 s") == {"created": 10}

    assert [(r["status"], r["attempts"]) for r in invoices(pg)] == [("created", 1)] * 10
    throttled, *rest = batch_log(pg)
    assert throttled["throttled"] and counters(throttled) == {"unanswered": 5}
    assert sorted(counters(r)["created"] for r in rest) == [5, 5]
    recorded = in_flight_changes(pg)
    assert [(n, s) for n, s, _ in recorded[0]] == [("CA-%d" % i, "pending") for i in range(5)]
    assert [(n, s, note) for n, s, note in recorded[1]] == \
        [("CA-%d" % i, "pending", "not sent: every app user is throttled or blocked; sent in a later round")
         for i in range(5, 10)]
    assert all(s == "created" for g in recorded[2:] for _, s, _ in g)
    assert one(pg, "SELECT count(*) FROM d365inv.status_change WHERE new_status = 'in_doubt'") == 0
    # nothing went out before the wait D365 asked for was over
    first_end = throttled["started_at"].timestamp() + throttled["duration_ms"] / 1000
    assert min(r["started_at"].timestamp() for r in rest) >= first_end + 3.0 - 0.02
    assert mock.counts() == once(numbers)


def test_a_change_to_the_target_ends_the_window_and_puts_back_what_was_claimed_ahead(pg, mock):
    # The window claims a batch ahead for each of its places and runs for
    # seconds.  Disabling the target (any change to its row) ends it at the
    # worker's next look (every 0.5 s): the batches claimed ahead go back to
    # pending unsent, not counted, saying why, and nothing more goes out.
    set_target(pg, max_in_flight=2, batch_size=1)
    mock.configure(latency_ms=400)
    numbers = ["WE-%02d" % i for i in range(40)]
    load(pg, numbers)
    one(pg, "SELECT d365inv.d365inv_submit()")
    assert wait_for(lambda: len(mock.counts()) >= 2, timeout=20), mock.counts()
    changed_at = one(pg, "UPDATE d365inv.target SET enabled = false WHERE name = 'default'"
                         " RETURNING clock_timestamp()")
    assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 0,
                    timeout=10)
    sent = len(mock.counts())
    time.sleep(2)
    assert len(mock.counts()) == sent
    # the last request went out before the worker's next look (0.5 s) and an
    # answer (0.4 s), with room for a busy machine: not at the window's end (5 s)
    last = one(pg, "SELECT max(started_at) FROM d365inv.batch_log")
    assert (last - changed_at).total_seconds() < 2.0, (last, changed_at)
    rows = invoices(pg)
    assert sorted(r["status"] for r in rows) == ["created"] * sent + ["pending"] * (40 - sent)
    assert all(r["attempts"] == 0 for r in rows if r["status"] == "pending")
    # what was claimed ahead then (if anything) went back saying why
    notes = {r["note"] for r in q(pg, "SELECT note FROM d365inv.status_change"
                                      " WHERE old_status = 'in_flight' AND new_status = 'pending'"
                                      "   AND changed_at >= %s", (changed_at,))}
    assert notes <= {"not sent: the target's settings changed; sent in the next round"}, notes
    set_target(pg, enabled=True)
    mock.configure(latency_ms=0)
    one(pg, "SELECT d365inv.d365inv_submit()")
    assert settle(pg) == {"created": 40}
    assert mock.counts() == once(numbers)


def test_nothing_is_sent_before_its_claim_is_committed(pg, mock):
    # While it records outcomes and claims, the window fills the places that
    # come free with batches claimed by earlier transactions; what a
    # transaction claims goes out only once it has committed.  Commits are
    # held here (synchronous_standby_names names a standby that never comes):
    # whatever reached the mock was claimed by a committed transaction, so a
    # reader sees it in_flight or settled, never pending.
    set_target(pg, max_in_flight=4, batch_size=5)
    # quick answers and slow statements: places come free, and the batches
    # claimed ahead run out, between the claims of one transaction
    q(pg, "CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql"
          " SET search_path = pg_catalog AS $$ BEGIN PERFORM pg_sleep(0.03); RETURN NULL; END $$")
    q(pg, "CREATE TRIGGER slow_down AFTER UPDATE ON d365inv.invoice"
          " FOR EACH STATEMENT EXECUTE FUNCTION public.slow_down()")
    numbers = ["SC-%03d" % i for i in range(400)]
    load(pg, numbers)
    one(pg, "SELECT d365inv.d365inv_submit()")
    assert wait_for(lambda: len(mock.counts()) >= 20, timeout=20), mock.counts()
    try:
        q(pg, "ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        q(pg, "SELECT pg_reload_conf()")
        assert wait_for(lambda: one(pg, "SELECT wait_event FROM pg_stat_activity"
                                        " WHERE backend_type = 'd365inv worker'") == "SyncRep", timeout=10)
        time.sleep(1)       # the answers under way come in; nothing may go out unclaimed
        counts = mock.counts()
        status = {r["invoice_number"]: r["status"] for r in invoices(pg)}
        received = [n for n in numbers if ckey("V001", n) in counts]
        assert 20 <= len(received) < len(numbers)
        assert [n for n in received if status[n] == "pending"] == []
    finally:
        q(pg, "ALTER SYSTEM RESET synchronous_standby_names")
        q(pg, "SELECT pg_reload_conf()")
        q(pg, "DROP TRIGGER slow_down ON d365inv.invoice")
        q(pg, "DROP FUNCTION public.slow_down()")
    assert settle(pg, timeout=60) == {"created": 400}
    assert mock.counts() == once(numbers)


def test_a_request_started_between_statements_goes_out_at_once(pg, mock):
    # The window starts requests where a statement may follow before libcurl
    # is driven again: between the statements of its record/claim
    # transaction (a pump), and in its main loop, where the next request may
    # need a claim first (while the window grows to more places).  A started
    # request must reach D365 then, not after that statement.  Every UPDATE
    # of invoice takes 30 ms here and answers 300 ms, which come in at
    # different times: a request that waited would reach the mock 30 ms
    # after it was made (run after the test above, with 4 places: 10 of 80
    # requests did before the fix, none over 7 ms after it).  A new
    # connection's first request is not measured (the mock tells connections
    # apart by the client's port): its connect takes more than one turn of
    # libcurl.
    mock.configure(latency_ms=300)
    set_target(pg, max_in_flight=8, batch_size=2)
    load(pg, ["WARM-%d" % i for i in range(16)])
    one(pg, "SELECT d365inv.d365inv_submit()")
    assert settle(pg, timeout=30) == {"created": 16}
    q(pg, "CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql"
          " SET search_path = pg_catalog AS $$ BEGIN PERFORM pg_sleep(0.03); RETURN NULL; END $$")
    q(pg, "CREATE TRIGGER slow_down AFTER UPDATE ON d365inv.invoice"
          " FOR EACH STATEMENT EXECUTE FUNCTION public.slow_down()")
    numbers = ["GO-%03d" % i for i in range(160)]
    try:
        load(pg, numbers)
        one(pg, "SELECT d365inv.d365inv_submit()")
        assert settle(pg, timeout=60) == {"created": 176}
    finally:
        q(pg, "DROP TRIGGER slow_down ON d365inv.invoice")
        q(pg, "DROP FUNCTION public.slow_down()")
    made = {r["invoice_number"]: r["t"] for r in q(
        pg, "SELECT i.invoice_number, extract(epoch FROM l.started_at)::float8 AS t"
            "  FROM d365inv.invoice i JOIN d365inv.batch_log l ON l.id = i.batch_id")}
    waited = {}
    connections = set()
    for r in mock.requests():
        sent = [n for n in numbers if '"%s"' % n in r["body"]]
        if sent and r["peer"] in connections:
            waited[sent[0]] = r["time"] - made[sent[0]]
        connections.add(r["peer"])
    assert len(waited) >= 60, waited
    late = {n: round(w, 3) for n, w in waited.items() if w > 0.02}
    assert late == {}, late


def seq_scans(pg):
    return {r["relname"]: r["seq_scan"] for r in q(
        pg, "SELECT relname, seq_scan FROM pg_stat_user_tables"
            " WHERE schemaname = 'd365inv' AND relname IN ('invoice', 'remote_key')")}


def test_claims_read_no_table_whole_on_a_long_queue(pg, mock):
    # The claim's plan is kept, generic, and "LIMIT $2" is planned as a tenth
    # of the queue: written as joins, every claim hashed all of invoice and
    # remote_key (bench/submit's queue of a million: 2 requests a second).
    # Counted on pg_stat_user_tables while the worker claims 100 batches from
    # a queue of 30,000 behind 30,000 keys it knows, statistics up to date.
    set_target(pg, service_root=None)
    q(pg, "INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount)"
          " SELECT 'V001', 'LQ-' || i, '2024-01-15', 1 FROM generate_series(1, 30000) i")
    q(pg, "INSERT INTO d365inv.remote_key (target, vendor_key, invoice_key, source)"
          " SELECT 'default', 'v001', 'old-' || i, 'lookup' FROM generate_series(1, 30000) i")
    q(pg, "ANALYZE d365inv.invoice, d365inv.remote_key")
    time.sleep(1.5)         # the statistics of the statements so far are in
    before = seq_scans(pg)
    set_target(pg, service_root=mock.service_root, batch_size=20, max_in_flight=4)
    one(pg, "SELECT d365inv.d365inv_submit()")
    # (the test reads neither table meanwhile: only the worker's scans count)
    assert wait_for(lambda: len(mock.counts()) >= 2000, timeout=60)
    set_target(pg, enabled=False)
    time.sleep(3)           # the window ends, the worker reports its statistics
    after = seq_scans(pg)
    claims = one(pg, "SELECT count(*) FROM d365inv.batch_log")
    assert claims >= 100
    # none per claim (before: one of each table per claim); the test's own
    # d365inv_submit() and the worker's round statements may read a few
    scans = {t: after[t] - before[t] for t in after}
    assert scans["remote_key"] == 0 and scans["invoice"] <= 10, (claims, scans)


# --------------------------------------------------------------------------
# 4. out of retries -> review -> requeue

def test_retry_exhaustion_goes_to_review_then_requeue(pg, mock):
    mock.configure(error_rate=1.0, error_status=503)
    numbers = ["EX-%d" % i for i in range(3)]
    load(pg, numbers)
    assert submit(pg) == {"review": 3}

    rows = invoices(pg)
    for r in rows:
        assert (r["status"], r["attempts"], r["last_http_status"]) == ("review", 4, 503), r
        assert r["last_error"].startswith("gave up after 4 attempts: HTTP 503: "), r["last_error"]
    log = batch_log(pg)
    assert counters(log[0]) == {"retries": 3}
    assert sum(l["retries"] for l in log) == 9 and sum(l["reviews"] for l in log) == 3
    assert sum(l["operations"] for l in log) == 12
    assert all(l["http_status"] == 200 and "HTTP 503: " in l["error"] for l in log)
    assert all(set(counters(l)) <= {"retries", "reviews"} for l in log)
    assert mock.stats()["operations"]["POST"] == 12 and mock.counts() == {}

    queue = q(pg, "SELECT * FROM d365inv.review_queue ORDER BY id")
    assert [r["id"] for r in queue] == [r["id"] for r in rows]
    assert [r["last_error"] for r in queue] == [r["last_error"] for r in rows]
    assert all(r["attempts"] == 4 and r["last_http_status"] == 503 for r in queue)

    mock.configure(error_rate=0.0)
    ids = [r["id"] for r in rows]
    assert one(pg, "SELECT d365inv.requeue(%s)", (ids,)) == 3
    assert settle(pg) == {"created": 3}
    rows = invoices(pg)
    assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [("created", 1, None)] * 3
    assert q(pg, "SELECT * FROM d365inv.review_queue") == []
    assert mock.counts() == once(numbers)
    # requeue touches review rows only
    assert one(pg, "SELECT d365inv.requeue(%s)", (ids,)) == 0


# --------------------------------------------------------------------------
# 5. a 4xx for one operation

def test_400_for_one_operation_goes_to_review_others_created(pg, mock):
    mock.configure(error_status=400, fault_next={"error": 1})   # first operation: 400
    numbers = ["VA-%d" % i for i in range(4)]
    load(pg, numbers)
    assert submit(pg) == {"created": 3, "review": 1}

    rows = invoices(pg)
    bad = rows[0]
    assert (bad["invoice_number"], bad["status"], bad["attempts"], bad["last_http_status"]) == \
        ("VA-0", "review", 1, 400)
    assert bad["last_error"].startswith("HTTP 400: ") and "injected fault" in bad["last_error"]
    assert [r["status"] for r in rows[1:]] == ["created"] * 3
    (log,) = batch_log(pg)
    assert counters(log) == {"created": 3, "reviews": 1} and log["error"].startswith("HTTP 400")
    assert [r["id"] for r in q(pg, "SELECT id FROM d365inv.review_queue")] == [bad["id"]]
    time.sleep(1.2)
    assert posts_for(mock, "VA-0") == 1
    assert mock.counts() == once(numbers[1:])


# --------------------------------------------------------------------------
# 6. OAuth2

def test_oauth2_token_refresh_and_secret_never_leaks(pg, mock):
    mock.configure(require_auth=True, client_secret=SECRET)
    set_target(pg, auth="oauth2", token_url=mock.token_url, client_id="test-client",
               scope="https://mock.example/.default")
    q(pg, "INSERT INTO d365inv.target_secret VALUES ('default', %s)", (SECRET,))

    load(pg, ["AU-1", "AU-2"])
    assert submit(pg) == {"created": 2}
    assert mock.stats()["tokens_issued"] == 1 and mock.stats()["auth_failures"] == 0

    # D365 stops accepting the cached token: 401, new token, resent for free
    mock.configure(fault_next={"expire_token": 1})
    load(pg, ["AU-3", "AU-4"])
    assert submit(pg) == {"created": 2}
    assert mock.stats()["tokens_issued"] == 2 and mock.stats()["auth_failures"] == 1
    refused = [l for l in batch_log(pg) if l["http_status"] == 401]
    assert len(refused) == 1 and counters(refused[0]) == {"unanswered": 2}
    assert "Bearer token" in refused[0]["error"]

    # a short-lived token (2 s, refreshed 10% early) is renewed before D365
    # refuses it: no 401.  A reload drops the cached 1 h token.
    mock.configure(token_expiry=2)
    q(pg, "SELECT pg_reload_conf()")
    assert mock.wait_for(lambda m: m.stats()["tokens_issued"] == 3, timeout=5)
    time.sleep(2.1)
    load(pg, ["AU-5"])
    assert submit(pg) == {"created": 1}
    assert mock.stats()["tokens_issued"] >= 4 and mock.stats()["auth_failures"] == 1

    rows = invoices(pg)
    assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [("created", 1, None)] * 5
    log = batch_log(pg)
    assert sum(l["created"] for l in log) == 5 and len(log) == 4
    assert mock.counts() == once(["AU-%d" % i for i in range(1, 6)])

    # the secret, and the tokens, are nowhere to be seen
    tokens = {r["headers"].get("Authorization", "")[7:] for r in mock.requests()} - {""}
    assert len(tokens) == 3
    server_log = pg.server_log()
    assert SECRET not in server_log and not any(t in server_log for t in tokens)
    assert all(not any(t in (l["error"] or "") for t in tokens) for l in log)
    assert all(SECRET not in (l["error"] or "") for l in log)
    assert all(SECRET not in (r["last_error"] or "") for r in rows)
    activity = q(pg, "SELECT coalesce(query, '') AS query, coalesce(application_name, '') AS app"
                     " FROM pg_stat_activity")
    assert all(SECRET not in a["query"] and SECRET not in a["app"] for a in activity)


@pytest.mark.parametrize("echo", [False, True], ids=["refused", "refused-echoing-the-request"])
def test_oauth2_refused_token_does_not_leak_secret(pg, mock, echo):
    """A token endpoint that refuses the client: a WARNING, nothing sent, and
    the secret is not in it, even when the endpoint echoes the request form
    back in its error_description.  On a second target, since a refused
    token blocks its target for 30 s."""
    wrong = "wr0ng+/=&%-" + uuid.uuid4().hex          # characters the form must escape
    mock.configure(require_auth=True, client_secret=SECRET)
    with Proxy(mock.port, token_echo=True) as proxy:
        token_url = proxy.service_root(mock).split("/api/")[0] + "/oauth2/token" if echo else mock.token_url
        name = "badauth%d" % echo
        q(pg, "INSERT INTO d365inv.target (name, service_root, auth, token_url, client_id, scope)"
              " VALUES (%s, %s, 'oauth2', %s, 'test-client', 'https://mock.example/.default')",
          (name, mock.service_root, token_url))
        q(pg, "INSERT INTO d365inv.target_secret VALUES (%s, %s)", (name, wrong))
        q(pg, "INSERT INTO d365inv.inbox (target, vendor_account, invoice_number, invoice_date, amount)"
              " VALUES (%s, 'V9', 'BA-1', '2024-01-15', '1')", (name,))
        q(pg, "SELECT d365inv.d365inv_submit()")
        warning = 'd365inv target "%s": no access token' % name
        assert wait_for(lambda: warning in pg.server_log(), timeout=10)
    line = next(l for l in pg.server_log().splitlines() if warning in l)
    assert "invalid_client" in line
    if echo:
        assert "bad credentials in" in line and "client_id=test-client" in line
    encoded = urllib.parse.quote_plus(wrong)
    for form in (wrong, encoded, encoded.lower(), wrong[:12], encoded[:12]):
        assert form not in pg.server_log(), form
    assert mock.stats()["batches"] == 0 and mock.counts() == {}
    assert [r["status"] for r in invoices(pg)] == ["pending"]
    assert batch_log(pg) == []


# --------------------------------------------------------------------------
# 7. dropped connections

@pytest.mark.parametrize("drop_mode", ["close", "reset"])
def test_drop_after_processing_is_looked_up_not_resent(pg, mock, drop_mode):
    mock.configure(drop_mode=drop_mode, fault_next={"drop_after": 1})
    numbers = ["DA-%d" % i for i in range(6)]
    load(pg, numbers)
    assert submit(pg) == {"created": 6}

    rows = invoices(pg)
    for r in rows:
        assert (r["status"], r["settled_by"], r["attempts"]) == ("created", "lookup", 1), r
    assert_ids_match_mock(rows, mock)
    creates, lookups = batch_log(pg, "create"), batch_log(pg, "lookup")
    assert len(creates) == 1 and creates[0]["http_status"] is None
    assert counters(creates[0]) == {"in_doubt": 6} and creates[0]["error"]
    assert len(lookups) == 1 and counters(lookups[0]) == {"created": 6}
    assert lookups[0]["started_at"].timestamp() - creates[0]["started_at"].timestamp() >= 0.3
    assert posts_for(mock, "DA-0") == 1 and mock.stats()["operations"]["POST"] == 6
    assert mock.counts() == once(numbers)
    keys = q(pg, "SELECT source FROM d365inv.remote_key")
    assert len(keys) == 6 and {k["source"] for k in keys} == {"lookup"}


def test_drop_before_processing_is_looked_up_then_resent(pg, mock):
    mock.configure(fault_next={"drop_before": 1})
    numbers = ["DB-%d" % i for i in range(6)]
    load(pg, numbers)
    assert submit(pg) == {"created": 6}

    rows = invoices(pg)
    for r in rows:
        # in_doubt counted the first send, the resend the second
        assert (r["status"], r["settled_by"], r["attempts"], r["last_error"]) == \
            ("created", "response", 2, None), r
    assert_ids_match_mock(rows, mock)
    log = batch_log(pg)
    assert [(l["kind"], counters(l)) for l in log] == [
        ("create", {"in_doubt": 6}), ("lookup", {"not_found": 6}), ("create", {"created": 6})]
    assert log[0]["http_status"] is None
    assert mock.counts() == once(numbers)


HOSTILE = ["O'Brien & Sons", "#7 100%+/?", "a'' or ''1''=''1", "x') or ('1'='1",
           "spaced  out", "\u00dcn\u00efc\u00f6d\u00e9-\u03a9", "L" * 20, "lower-case"]


def test_lookup_finds_hostile_keys_across_pages(pg, mock):
    """An in_doubt lookup of keys that quote, encode and fold case badly, 20
    keys per GET, with D365 answering 3 entities per page (nextLink paging)."""
    set_target(pg, batch_size=50)
    mock.configure(page_size=3, fault_next={"drop_after": 1})
    # D365 has another vendor's invoice with the same number, and a near miss
    mock.seed_entities([{"VendorAccount": "V'8", "InvoiceNumber": "PG-01"},
                        {"VendorAccount": "V'7&", "InvoiceNumber": "PG-01x"}])
    numbers = HOSTILE + ["PG-%02d" % i for i in range(22)]        # 30 keys: two GETs
    load(pg, numbers, vendor="V'7&")
    assert submit(pg) == {"created": 30}

    rows = invoices(pg)
    for r in rows:
        assert (r["status"], r["settled_by"], r["attempts"]) == ("created", "lookup", 1), r
    assert_ids_match_mock(rows, mock)
    (create,) = batch_log(pg, "create")
    assert counters(create) == {"in_doubt": 30}
    lookups = batch_log(pg, "lookup")
    assert sum(l["created"] for l in lookups) == 30 and sum(l["not_found"] for l in lookups) == 0
    assert all(l["error"] is None for l in lookups)
    assert len(lookups) > 1                  # the $batch and the next pages
    assert mock.stats()["plain_requests"].get("GET", 0) >= 8
    assert mock.counts() == once(numbers, vendor="V'7&")


def test_review_after_failed_lookups_then_requeue_never_creates_twice(pg, mock):
    """A row whose fate is unknown and whose lookups all failed goes to review
    ("never a blind resend").  Sending it again with requeue() once D365 is
    healthy must not create it a second time, also where D365 has no unique
    key (mock unique=False)."""
    mock.configure(unique=False, fault_next={"drop_after": 1})
    numbers = ["UF-%d" % i for i in range(3)]
    load(pg, numbers)
    q(pg, "SELECT d365inv.d365inv_submit()")
    # the $batch was processed, its answer lost; now every lookup fails
    assert mock.wait_for(lambda m: m.stats()["faults"].get("drop_after") == 1, timeout=10, interval=0.005)
    mock.configure(error_rate=1.0)
    assert submit(pg) == {"review": 3}
    rows = invoices(pg)
    for r in rows:
        assert (r["status"], r["attempts"]) == ("review", 4), r
        assert r["last_error"].startswith("fate unknown and the lookup failed: "), r
    assert mock.stats()["operations"]["POST"] == 3            # never resent blindly so far
    assert mock.counts() == once(numbers)

    mock.configure(error_rate=0.0)
    assert one(pg, "SELECT d365inv.requeue(%s)", ([r["id"] for r in rows],)) == 3
    settle(pg)
    rows = invoices(pg)
    assert mock.counts() == once(numbers), "requeue() resent invoices D365 already had"
    assert [r["status"] for r in rows] == ["created"] * 3
    assert_ids_match_mock(rows, mock)


@pytest.mark.parametrize("status,body,ctype,after,outcome", [
    (502, b"<html>Bad Gateway</html>", "text/html", True, "in_doubt"),
    (200, b'{"value": []}', "application/json", True, "in_doubt"),
    (503, b"<html>Service Unavailable</html>", "text/html", False, "retry"),
    (400, b'{"error":{"code":"0x80048d19","message":"malformed $batch"}}', "application/json",
     False, "review"),
], ids=["502-after", "200-json-after", "503-before", "400-before"])
def test_answer_for_the_whole_request(pg, mock, status, body, ctype, after, outcome):
    with Proxy(mock.port) as proxy:
        set_target(pg, service_root=proxy.service_root(mock))
        proxy.replace(status, body, ctype, after=after)
        numbers = ["WR-%d" % i for i in range(4)]
        load(pg, numbers)
        result = submit(pg)

    rows = invoices(pg)
    log = batch_log(pg)
    assert log[0]["kind"] == "create" and log[0]["http_status"] == status
    assert log[0]["error"].startswith("HTTP %d" % status), log[0]["error"]
    if outcome == "in_doubt":
        assert result == {"created": 4}
        assert counters(log[0]) == {"in_doubt": 4}
        assert [(l["kind"], counters(l)) for l in log[1:]] == [("lookup", {"created": 4})]
        assert [(r["status"], r["settled_by"], r["attempts"]) for r in rows] == [("created", "lookup", 1)] * 4
    elif outcome == "retry":
        assert result == {"created": 4}
        assert counters(log[0]) == {"retries": 4}
        # each row's retry is jittered on its own: they may go in several requests
        assert all(l["kind"] == "create" and set(counters(l)) == {"created"} for l in log[1:])
        assert sum(l["created"] for l in log[1:]) == 4
        assert [(r["status"], r["settled_by"], r["attempts"]) for r in rows] == [("created", "response", 2)] * 4
    else:
        assert result == {"review": 4}
        assert counters(log[0]) == {"reviews": 4} and len(log) == 1
        assert [(r["status"], r["attempts"], r["last_http_status"]) for r in rows] == [("review", 1, status)] * 4
        assert all("malformed $batch" in r["last_error"] for r in rows)
    assert_ids_match_mock(rows, mock)
    assert mock.stats()["operations"]["POST"] == (4 if outcome != "review" else 0)
    assert mock.counts() == (once(numbers) if outcome != "review" else {})


def test_company_target_lookup_does_not_confuse_companies(pg, mock):
    """With a company, a lookup must not take another company's invoice with
    the same keys for ours (that would lose ours)."""
    set_target(pg, company="usmf")
    mock.seed_entities([{"dataAreaId": "dat", "VendorAccount": "V001", "InvoiceNumber": "CO-1"}])
    mock.configure(fault_next={"drop_before": 1})
    load(pg, ["CO-1", "CO-2"])
    assert submit(pg) == {"created": 2}

    rows = invoices(pg)
    assert [(r["status"], r["settled_by"], r["attempts"]) for r in rows] == [("created", "response", 2)] * 2
    log = batch_log(pg)
    assert [(l["kind"], counters(l)) for l in log] == [
        ("create", {"in_doubt": 2}), ("lookup", {"not_found": 2}), ("create", {"created": 2})]
    ours = {e["InvoiceNumber"]: e["InvoiceId"] for e in mock.entities() if e.get("dataAreaId") == "usmf"}
    assert {r["invoice_number"]: r["d365_id"] for r in rows} == ours
    lookup_request = [r for r in mock.requests() if "GET " in r["body"]]
    assert len(lookup_request) == 1 and "cross-company=true" in lookup_request[0]["body"]
    assert mock.counts() == {"usmf|v001|co-1": 1, "usmf|v001|co-2": 1}
    assert mock.preexisting() == {"dat|v001|co-1": 1}


def test_response_over_max_response_size_is_in_doubt(pg, mock):
    q(pg, "ALTER SYSTEM SET d365inv.max_response_size = '64kB'")
    q(pg, "SELECT pg_reload_conf()")
    try:
        time.sleep(0.3)                      # the worker reloads at the top of its loop
        set_target(pg, batch_size=200)
        numbers = ["MX-%03d" % i for i in range(200)]   # ~120 kB of answer
        load(pg, numbers)
        assert submit(pg) == {"created": 200}
    finally:
        q(pg, "ALTER SYSTEM RESET d365inv.max_response_size")
        q(pg, "SELECT pg_reload_conf()")
    rows = invoices(pg)
    assert all((r["status"], r["settled_by"], r["attempts"]) == ("created", "lookup", 1) for r in rows)
    assert_ids_match_mock(rows, mock)
    (create,) = batch_log(pg, "create")
    assert counters(create) == {"in_doubt": 200} and create["http_status"] is None
    assert "exceeds" in create["error"] or "size" in create["error"], create["error"]
    assert sum(l["created"] for l in batch_log(pg, "lookup")) == 200
    assert mock.counts() == once(numbers)


def test_upsert_modes(pg, mock):
    set_target(pg, write_mode="upsert")
    load(pg, ["UP-0", "UP-1", "UP-2"])
    assert submit(pg) == {"created": 3}
    rows = invoices(pg)
    assert [(r["status"], r["settled_by"], r["attempts"]) for r in rows] == [("created", "response", 1)] * 3
    assert_ids_match_mock(rows, mock)       # 204: the id comes from OData-EntityId
    assert [l["kind"] for l in batch_log(pg)] == ["upsert"]
    assert mock.stats()["operations"]["PATCH"] == 3

    set_target(pg, write_mode="upsert_create_only")
    mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "UC-1"}])
    load(pg, ["UC-0", "UC-1"])
    assert submit(pg) == {"created": 1, "duplicate": 1}
    rows = by_number(invoices(pg))
    assert (rows["UC-1"]["status"], rows["UC-1"]["last_http_status"]) == ("duplicate", 412)
    assert rows["UC-0"]["status"] == "created"
    assert batch_log(pg)[-1]["kind"] == "upsert_create_only"
    assert mock.counts() == once(["UP-0", "UP-1", "UP-2", "UC-0"])


def test_known_key_is_a_duplicate_without_a_request(pg, mock):
    """remote_key remembers what D365 has: an invoice staged again after its
    first row was purged is a duplicate at once (settled_by 'cache')."""
    load(pg, ["KC-1"])
    assert submit(pg) == {"created": 1}
    first = invoices(pg)[0]
    q(pg, "DELETE FROM d365inv.invoice")
    load(pg, ["KC-1"])
    assert submit(pg) == {"duplicate": 1}
    again = invoices(pg)[0]
    assert (again["status"], again["settled_by"], again["d365_id"]) == ("duplicate", "cache", first["d365_id"])
    assert len(batch_log(pg)) == 1 and posts_for(mock, "KC-1") == 1

    # preflight off: no cache, the POST goes out and D365 says duplicate
    set_target(pg, preflight="off")
    q(pg, "DELETE FROM d365inv.invoice")
    load(pg, ["KC-1"])
    assert submit(pg) == {"duplicate": 1}
    again = invoices(pg)[0]
    assert (again["settled_by"], again["last_http_status"]) == ("response", 409)
    assert posts_for(mock, "KC-1") == 2
    assert mock.counts() == once(["KC-1"])


# --------------------------------------------------------------------------
# 8. broken answers

@pytest.mark.parametrize("fault", ["truncate", "garble", "slow_body"])
def test_broken_answer_is_in_doubt_then_found(pg, mock, fault):
    # slow: 5 s for the body, beyond d365inv.http_timeout (3 s)
    mock.configure(slow_body_ms=5000, slow_body_chunks=10, fault_next={fault: 1})
    numbers = ["BR-%d" % i for i in range(6)]
    load(pg, numbers)
    assert submit(pg) == {"created": 6}

    rows = invoices(pg)
    for r in rows:
        assert (r["status"], r["settled_by"], r["attempts"]) == ("created", "lookup", 1), r
    assert_ids_match_mock(rows, mock)
    creates, lookups = batch_log(pg, "create"), batch_log(pg, "lookup")
    assert len(creates) == 1 and counters(creates[0]) == {"in_doubt": 6} and creates[0]["error"]
    assert len(lookups) == 1 and counters(lookups[0]) == {"created": 6}
    if fault == "garble":
        assert creates[0]["http_status"] == 200
    if fault == "slow_body":
        assert creates[0]["duration_ms"] >= 2900
    assert mock.stats()["operations"]["POST"] == 6
    assert mock.counts() == once(numbers)


# --------------------------------------------------------------------------
# 9. answers in another order / without Content-ID

@pytest.mark.parametrize("fault", ["reorder", "drop_content_id"])
def test_answers_out_of_order_or_without_content_id(pg, mock, fault):
    mock.configure(fault_next={fault: 1})
    numbers = ["OR-%d" % i for i in range(7)]
    load(pg, numbers)
    assert submit(pg) == {"created": 7}
    rows = invoices(pg)
    assert all((r["status"], r["settled_by"], r["attempts"]) == ("created", "response", 1) for r in rows)
    assert len({r["d365_id"] for r in rows}) == 7
    assert_ids_match_mock(rows, mock)
    (log,) = batch_log(pg)
    assert counters(log) == {"created": 7}
    assert mock.stats()["faults"] == {fault: 1}
    assert mock.counts() == once(numbers)


# --------------------------------------------------------------------------
# 10. a server that stops at the first failure

def test_stop_at_first_failure_unanswered_go_back_to_pending(pg, mock):
    mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "SF-2"}])
    with Proxy(mock.port, strip_prefer=True) as proxy:
        set_target(pg, service_root=proxy.service_root(mock))
        numbers = ["SF-%d" % i for i in range(6)]
        load(pg, numbers)
        assert submit(pg) == {"created": 5, "duplicate": 1}

    rows = by_number(invoices(pg))
    assert rows["SF-2"]["status"] == "duplicate" and rows["SF-2"]["attempts"] == 1
    for n in ("SF-0", "SF-1", "SF-3", "SF-4", "SF-5"):
        # SF-3..5 were not processed the first time: no attempt counted for that
        assert (rows[n]["status"], rows[n]["attempts"], rows[n]["settled_by"]) == \
            ("created", 1, "response"), rows[n]
    log = batch_log(pg)
    assert len(log) == 2
    assert log[0]["http_status"] == 400
    assert counters(log[0]) == {"created": 2, "duplicates": 1, "unanswered": 3}
    assert counters(log[1]) == {"created": 3} and log[1]["operations"] == 3
    assert "Prefer" not in json.dumps(mock.requests()[0]["headers"])     # the proxy did its job
    assert posts_for(mock, "SF-3") == 2 and posts_for(mock, "SF-2") == 1
    assert mock.counts() == once([n for n in numbers if n != "SF-2"])


# --------------------------------------------------------------------------
# 11. SIGKILL of the worker with a batch in flight

def test_sigkill_with_batch_in_flight(pg, mock):
    mock.configure(latency_ms=1500)          # processed at once, answered 1.5 s later
    numbers = ["KI-%03d" % i for i in range(45)]
    load(pg, numbers)
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 45
    assert mock.wait_for(lambda m: m.stats()["batches"] >= 3, timeout=10)
    assert one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 45
    log_before = len(pg.server_log())
    old = pg.kill_worker()
    assert old
    # crash recovery restarts everything; the launcher starts a new worker
    assert wait_for(lambda: (safe_worker_pid(pg) or old) != old, timeout=30)
    assert submit(pg) == {"created": 45}

    log_text = pg.server_log()[log_before:]
    assert "terminated by signal 9" in log_text
    assert "45 invoices were in flight when the worker stopped" in log_text
    rows = invoices(pg)
    for r in rows:
        assert (r["status"], r["settled_by"]) == ("created", "lookup"), r
    assert_ids_match_mock(rows, mock)
    assert batch_log(pg, "create") == []     # the killed round recorded nothing, and nothing was resent
    assert sum(l["created"] for l in batch_log(pg, "lookup")) == 45
    assert mock.stats()["operations"]["POST"] == 45
    assert mock.counts() == once(numbers)
    # each invoice was sent once, like after a dropped connection (attempts 1
    # there): the send that the crash interrupted must count
    assert [r["attempts"] for r in rows] == [1] * 45


# --------------------------------------------------------------------------
# 12. the SQL surface

def test_submit_wait_refused_in_transaction_block(pg, mock):
    conn = pg.connect()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT * FROM d365inv.d365inv_submit(wait => '1 s')")
        assert e.value.pgcode == "25001"
        assert "transaction block" in e.value.pgerror
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_submit_wait_refused_under_snapshot_isolation(pg, mock, isolation):
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SET default_transaction_isolation = %s", (isolation,))
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT * FROM d365inv.d365inv_submit(wait => '1 s')")
        assert e.value.pgcode == "25001"
        assert "READ COMMITTED" in e.value.pgerror
    finally:
        conn.close()


def submit_held(pg, before=None, wait=WAIT):
    """submit(wait) with nothing delivered before d365inv_submit(wait) has
    looked at what waits (else the worker may deliver it all between the
    test's last change and the call, which then says {}): the inbox locked
    as a load under way locks it (the worker's ingest(nowait) leaves it) and
    the open invoices FOR UPDATE (the worker's claim skips them), released
    once the call sleeps in its loop; before() runs while they are held."""
    hold = pg.connect()
    hold.autocommit = False
    out = {}
    try:
        with hold.cursor() as cur:
            cur.execute("LOCK TABLE d365inv.inbox IN ROW EXCLUSIVE MODE")
            cur.execute("SELECT id FROM d365inv.invoice WHERE status < 'created' FOR UPDATE")
        if before:
            before()

        def call():
            try:
                out["result"] = submit(pg, wait)
            except BaseException as e:     # raised below
                out["error"] = e

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        assert wait_for(lambda: not caller.is_alive() or one(
            pg, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                "   AND query LIKE '%%d365inv_submit(wait%%'") > 0, timeout=15)
    finally:
        hold.rollback()
        hold.close()
    caller.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_submit_returns_waiting_count(pg, mock):
    set_target(pg, enabled=False)
    numbers = ["WC-%d" % i for i in range(7)]
    load(pg, numbers)
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 7
    started = time.monotonic()
    assert submit(pg, wait="1 s") == {"pending": 7}      # gives up after the interval
    assert time.monotonic() - started >= 1.0
    assert [r["status"] for r in invoices(pg)] == ["pending"] * 7
    assert mock.stats()["batches"] == 0
    assert submit_held(pg, before=lambda: set_target(pg, enabled=True)) == {"created": 7}
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 0
    assert mock.counts() == once(numbers)

    # submit(wait) accounts for the lines it did not queue too
    def load_more():
        load(pg, ["WC-7", " wc-7 ", "WC-0"])
        q(pg, "INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
              " VALUES ('V001', 'WC-8', '2024-02-30', '1')")
    assert submit_held(pg, before=load_more) == {"created": 1, "ingest_duplicate": 2, "ingest_reject": 1}
    assert mock.counts() == once(numbers + ["WC-7"])


def test_operator_role(pg, mock):
    q(pg, "DROP ROLE IF EXISTS it_operator")
    q(pg, "CREATE ROLE it_operator LOGIN IN ROLE d365inv_operator")
    try:
        q(pg, "INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
              " VALUES ('V001', 'OP-1', '2024-01-15', '5')", user="it_operator")
        assert one(pg, "SELECT d365inv.d365inv_submit()", user="it_operator") == 1
        assert wait_for(lambda: one(pg, "SELECT status::text FROM d365inv.invoice") == "created", timeout=10)
        assert {r["status"]: r["invoices"] for r in q(
            pg, "SELECT * FROM d365inv.d365inv_submit(wait => '5 s')", user="it_operator")} == {}

        # requeue: the operator sends a reviewed invoice again
        mock.configure(error_status=400, fault_next={"error": 1})
        q(pg, "INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
              " VALUES ('V001', 'OP-2', '2024-01-15', '5')", user="it_operator")
        assert submit(pg) == {"review": 1}
        rid = one(pg, "SELECT id FROM d365inv.review_queue", user="it_operator")
        assert one(pg, "SELECT d365inv.requeue(%s)", ([rid],), user="it_operator") == 1
        assert settle(pg) == {"created": 2}
        assert mock.counts() == once(["OP-1", "OP-2"])

        assert one(pg, "SELECT d365inv.worker_pid()", user="it_operator") == pg.worker_pid()
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            q(pg, "SELECT * FROM d365inv.target_secret", user="it_operator")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            q(pg, "UPDATE d365inv.target SET service_root = 'http://127.0.0.1:1/'", user="it_operator")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            q(pg, "UPDATE d365inv.invoice SET status = 'pending'", user="it_operator")
    finally:
        q(pg, "DROP OWNED BY it_operator")
        q(pg, "DROP ROLE it_operator")


def test_worker_pid(pg, mock):
    pid = one(pg, "SELECT d365inv.worker_pid()")
    assert pid is not None and pid == pg.worker_pid()
    # another database is not served: no pid there
    q(pg, "DROP DATABASE IF EXISTS other_db", dbname="postgres")
    q(pg, "CREATE DATABASE other_db", dbname="postgres")
    try:
        q(pg, "CREATE EXTENSION d365inv", dbname="other_db")
        assert one(pg, "SELECT d365inv.worker_pid()", dbname="other_db") is None
        with pytest.raises(psycopg2.Error) as e:
            q(pg, "SELECT * FROM d365inv.d365inv_submit(wait => '1 s')", dbname="other_db")
        assert "serves database" in e.value.pgerror
    finally:
        q(pg, "DROP DATABASE other_db", dbname="postgres")


def test_key_filter_rebuild_keeps_a_key_committed_during_it(pg, mock):
    """A remote_key insert whose trigger set its bits before a rebuild
    cleared the filter, and whose transaction commits only after the
    rebuild began, must be in the rebuilt filter: else, once in use, the
    filter calls that key "certainly absent".  The rebuild (at the worker's
    start) waits for such a transaction and then reads the table."""
    ins = ("INSERT INTO d365inv.remote_key (target, vendor_key, invoice_key, source)"
           " VALUES ('default', 'race-v', %s, 'refresh')")
    q(pg, ins, ("race-committed",))
    rebuilt = lambda: len(re.findall(r"key filter rebuilt from", pg.server_log()))
    before = rebuilt()
    conn = pg.connect()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(ins, ("race-open",))      # its trigger has set the bits
        old = pg.worker_pid()
        q(pg, "SELECT pg_terminate_backend(%s)", (old,))

        def rebuilding():
            pid = pg.worker_pid()
            if pid is None or pid == old:
                return False
            waits = one(pg, "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (pid,))
            return waits > 0 or rebuilt() > before
        # the new worker is waiting for this transaction (or, wrongly, done)
        assert wait_for(rebuilding, timeout=30)
        conn.commit()
    finally:
        conn.close()
    assert wait_for(lambda: rebuilt() > before, timeout=20)
    log = pg.server_log()
    assert log.rstrip().split("key filter rebuilt from ")[-1].startswith("2 known keys"), log[-2000:]
    f = q(pg, "SELECT * FROM d365inv.key_filter")[0]
    assert f["in_use"] and f["keys_added"] == 2, f


# --------------------------------------------------------------------------
# 13. DROP DATABASE / DROP EXTENSION with the worker running (last: they
# replace the database)

def worker_in(pg):
    rows = q(pg, "SELECT pid, datname FROM pg_stat_activity WHERE backend_type = 'd365inv worker'",
             dbname="postgres")
    return rows[0] if rows else None


def deliver_some(pg, mock, prefix):
    set_target(pg, service_root=mock.service_root)
    numbers = ["%s-%d" % (prefix, i) for i in range(3)]
    load(pg, numbers)
    # submit(wait) counts what is open when it looks: a worker that has just
    # started may have delivered all three by then ({})
    assert submit(pg) in ({"created": 3}, {})
    assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE invoice_number = ANY (%s)"
                                    " AND status = 'created'", (numbers,)) == 3, timeout=20), invoices(pg)
    assert all(mock.counts().get(ckey("V001", n)) == 1 for n in numbers), mock.counts()
    return numbers


def test_kept_plans_follow_changes_to_the_tables(pg, mock):
    # the worker prepares its claim and outcome statements once; tables that
    # change under them (a column, an index, as an upgrade or a DBA may add)
    # are planned for again, in the same worker, and nothing is sent twice
    first = deliver_some(pg, mock, "KP")
    pid = one(pg, "SELECT d365inv.worker_pid()")
    log_before = len(pg.server_log())
    q(pg, "ALTER TABLE d365inv.invoice ADD COLUMN kept_plan_probe int")
    q(pg, "CREATE INDEX invoice_kept_plan_probe ON d365inv.invoice (kept_plan_probe)")
    q(pg, "ALTER TABLE d365inv.remote_key ADD COLUMN kept_plan_probe int")
    q(pg, "ALTER TABLE d365inv.batch_log ADD COLUMN kept_plan_probe int")
    try:
        second = deliver_some(pg, mock, "KQ")
    finally:
        for table in ("invoice", "remote_key", "batch_log"):
            q(pg, "ALTER TABLE d365inv.%s DROP COLUMN kept_plan_probe" % table)
    third = deliver_some(pg, mock, "KR")
    assert one(pg, "SELECT d365inv.worker_pid()") == pid
    assert "ERROR" not in pg.server_log()[log_before:]
    assert mock.counts() == once(first + second + third)
    assert [(r["status"], r["attempts"]) for r in invoices(pg)] == [("created", 1)] * 9


def test_alter_database_rename_stops_the_worker(pg, mock):
    """ALTER DATABASE RENAME of the served database refuses to run while
    anyone is connected: the worker is stopped for it (and waited for on a
    condition variable, not by polling), and starts again once the name is
    back."""
    assert wait_for(lambda: worker_in(pg) is not None, timeout=20)
    old = worker_in(pg)
    away = pg.dbname + "_away"
    started = time.monotonic()
    q(pg, 'ALTER DATABASE "%s" RENAME TO "%s"' % (pg.dbname, away), dbname="postgres")
    took = time.monotonic() - started
    try:
        assert "stopping the worker (pid %d) for ALTER DATABASE RENAME" % old["pid"] in pg.server_log()
        assert took < 5, took
    finally:
        q(pg, 'ALTER DATABASE "%s" RENAME TO "%s"' % (away, pg.dbname), dbname="postgres")
    assert wait_for(lambda: worker_in(pg) is not None, timeout=20)
    assert worker_in(pg)["pid"] != old["pid"]
    deliver_some(pg, mock, "RN")


def test_drop_database_and_drop_extension_with_worker_running(pg, mock):
    first = deliver_some(pg, mock, "DD")
    old = worker_in(pg)
    assert old and old["datname"] == pg.dbname

    # DROP DATABASE while the worker waits for D365's answer
    mock.configure(latency_ms=2500)
    load(pg, ["DF-1", "DF-2"])
    q(pg, "SELECT d365inv.d365inv_submit()")
    assert mock.wait_for(lambda m: m.stats()["batches"] >= 2, timeout=10)
    assert one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 2
    started = time.monotonic()
    q(pg, 'DROP DATABASE "%s"' % pg.dbname, dbname="postgres")
    assert time.monotonic() - started < 5
    mock.configure(latency_ms=0)
    assert "stopping the worker (pid %d) for DROP DATABASE" % old["pid"] in pg.server_log()
    assert wait_for(lambda: worker_in(pg) is None, timeout=5)

    q(pg, 'CREATE DATABASE "%s"' % pg.dbname, dbname="postgres")
    q(pg, "CREATE EXTENSION d365inv")
    assert wait_for(lambda: worker_in(pg) is not None, timeout=20)
    assert wait_for(lambda: one(pg, "SELECT d365inv.worker_pid()") is not None, timeout=5)
    second = deliver_some(pg, mock, "RC")

    # DROP EXTENSION while the worker waits for D365's answer, then CREATE it
    # again.  The two invoices are in flight: the DROP must be told to drop
    # them; the worker is stopped for the statement and starts again.
    pid = one(pg, "SELECT d365inv.worker_pid()")
    mock.configure(latency_ms=1500)
    load(pg, ["XF-1", "XF-2"])
    q(pg, "SELECT d365inv.d365inv_submit()")
    assert mock.wait_for(lambda m: m.stats()["batches"] >= 4, timeout=10)
    started = time.monotonic()
    conn = pg.connect()
    with conn.cursor() as cur:
        cur.execute("SET d365inv.drop_open_invoices = on")
        cur.execute("DROP EXTENSION d365inv")
    conn.close()
    assert time.monotonic() - started < 2
    mock.configure(latency_ms=0)
    time.sleep(2.0)                          # the answer arrives, with nowhere to record it
    q(pg, "CREATE EXTENSION d365inv")
    third = deliver_some(pg, mock, "RE")
    assert one(pg, "SELECT d365inv.worker_pid()") not in (None, pid)   # a new worker carried on

    assert mock.counts() == once(first + ["DF-1", "DF-2"] + second + ["XF-1", "XF-2"] + third)
    assert batch_log(pg) and all(l["created"] == 3 for l in batch_log(pg))
    rows = invoices(pg)
    assert [(r["invoice_number"], r["status"], r["attempts"]) for r in rows] == \
        [(n, "created", 1) for n in third]
