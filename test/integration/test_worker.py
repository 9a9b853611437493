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
import uuid

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

from mockctl import MockD365
from pgcluster import Cluster

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "500ms",
    "d365inv.http_timeout": "3s",
    "d365inv.max_retries": 3,
}
SECRET = "s3cr3t-" + uuid.uuid4().hex      # the OAuth2 client secret of test_oauth2
WAIT = "20 s"


# --------------------------------------------------------------------------
# helpers

def q(pg, query, args=None, dbname=None, user=None):
    """One statement on a fresh connection (the SIGKILL test restarts every
    backend, so no connection is kept); rows as dicts, or None."""
    if user is None:
        conn = pg.connect(dbname)
    else:
        conn = psycopg2.connect(host=pg.dir, port=5432, user=user, dbname=dbname or pg.dbname)
        conn.autocommit = True
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(query, args)
            return [dict(r) for r in cur.fetchall()] if cur.description else None
    finally:
        conn.close()


def one(pg, query, args=None, **kw):
    rows = q(pg, query, args, **kw)
    assert len(rows) == 1, rows
    return next(iter(rows[0].values()))


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


def wait_for(predicate, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


COUNTERS = ("created", "duplicates", "retries", "reviews", "in_doubt", "unanswered", "not_found")


def counters(log_row):
    """The non-zero outcome counters of a batch_log row."""
    return {k: log_row[k] for k in COUNTERS if log_row[k]}


def set_target(pg, dbname=None, **cols):
    sets = ", ".join("%s = %%s" % k for k in cols)
    q(pg, "UPDATE d365inv.target SET %s WHERE name = 'default'" % sets, tuple(cols.values()),
      dbname=dbname)


class StripPreferProxy:
    """A pass-through HTTP proxy in front of the mock that drops the Prefer
    header: the mock then behaves like a server that ignores
    odata.continue-on-error and stops a $batch at the first failure."""

    def __init__(self, upstream_port):
        upstream = upstream_port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("prefer", "host", "connection", "content-length")}
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
                conn.request(self.command, self.path, body=body if body else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
    q(pg, "TRUNCATE d365inv.invoice, d365inv.batch_log, d365inv.remote_key, d365inv.duplicate,"
          " d365inv.reject, d365inv.inbox")
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
    assert {("v001", k["invoice_key"]): k["d365_id"] for k in keys} == \
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
    assert "1 of 5 invoices in a $batch already exist in D365" in pg.server_log()


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

    rows = invoices(pg)
    assert [(r["status"], r["attempts"]) for r in rows] == [("created", 2)] * 3
    first, second = batch_log(pg)
    assert (first["http_status"], first["throttled"], first["retry_after"]) == (429, True, 2)
    assert counters(first) == {"retries": 3} and first["error"].startswith("HTTP 429")
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
    assert [(r["status"], r["attempts"]) for r in rows] == [("created", 2), ("created", 1), ("created", 1)]
    first, second = batch_log(pg)
    assert counters(first) == {"created": 2, "retries": 1}
    assert first["throttled"] and first["retry_after"] == 2
    gap = second["started_at"].timestamp() - (first["started_at"].timestamp() + first["duration_ms"] / 1000)
    assert gap >= 2.0 - 0.02, "resent %.3f s after a Retry-After of 2 s" % gap
    assert mock.counts() == once(numbers)


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
    assert all(l["http_status"] == 200 and l["error"].startswith("HTTP 503") for l in log)
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
    mock.configure(require_auth=True, client_secret=SECRET, token_expiry=2)
    set_target(pg, auth="oauth2", token_url=mock.token_url, client_id="test-client",
               scope="https://mock.example/.default")
    q(pg, "INSERT INTO d365inv.target_secret VALUES ('default', %s)", (SECRET,))

    load(pg, ["AU-1", "AU-2"])
    assert submit(pg) == {"created": 2}
    assert mock.stats()["tokens_issued"] == 1 and mock.stats()["auth_failures"] == 0

    # the token runs out (2 s, refreshed 10% early): a new one, no 401
    time.sleep(2.1)
    load(pg, ["AU-3"])
    assert submit(pg) == {"created": 1}
    assert mock.stats()["tokens_issued"] == 2 and mock.stats()["auth_failures"] == 0

    # D365 stops accepting the cached token: 401, new token, resent for free
    mock.configure(token_expiry=3600, fault_next={"expire_token": 1})
    load(pg, ["AU-4", "AU-5"])
    assert submit(pg) == {"created": 2}
    assert mock.stats()["tokens_issued"] == 3
    assert mock.stats()["auth_failures"] >= 1

    rows = invoices(pg)
    assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [("created", 1, None)] * 5
    log = batch_log(pg)
    refused = [l for l in log if l["http_status"] == 401]
    assert len(refused) == 1 and counters(refused[0]) == {"unanswered": 2}
    assert sum(l["created"] for l in log) == 5
    assert mock.counts() == once(["AU-%d" % i for i in range(1, 6)])

    # the secret is nowhere to be seen
    assert SECRET not in pg.server_log()
    assert all(SECRET not in (l["error"] or "") for l in log)
    assert all(SECRET not in (r["last_error"] or "") for r in rows)
    activity = q(pg, "SELECT coalesce(query, '') AS query, coalesce(application_name, '') AS app"
                     " FROM pg_stat_activity")
    assert all(SECRET not in a["query"] and SECRET not in a["app"] for a in activity)


def test_oauth2_wrong_secret_is_not_logged(pg, mock):
    """A token endpoint that refuses the client: a WARNING, nothing sent, and
    the (wrong) secret is not in it.  On a second target: a refused token
    blocks its target for 30 s."""
    wrong = "wr0ng-" + uuid.uuid4().hex
    mock.configure(require_auth=True, client_secret=SECRET)
    q(pg, "INSERT INTO d365inv.target (name, service_root, auth, token_url, client_id, scope)"
          " VALUES ('badauth', %s, 'oauth2', %s, 'test-client', 'https://mock.example/.default')",
      (mock.service_root, mock.token_url))
    q(pg, "INSERT INTO d365inv.target_secret VALUES ('badauth', %s)", (wrong,))
    q(pg, "INSERT INTO d365inv.inbox (target, vendor_account, invoice_number, invoice_date, amount)"
          " VALUES ('badauth', 'V9', 'BA-1', '2024-01-15', '1')")
    q(pg, "SELECT d365inv.d365inv_submit()")
    assert wait_for(lambda: 'd365inv target "badauth": no access token' in pg.server_log(), timeout=10)
    assert wrong not in pg.server_log()
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
    with StripPreferProxy(mock.port) as proxy:
        set_target(pg, service_root="http://127.0.0.1:%d%s/" % (proxy.port, mock.service_path))
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
    assert wait_for(lambda: (pg.worker_pid() or old) != old, timeout=30)
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


def test_submit_returns_waiting_count(pg, mock):
    set_target(pg, enabled=False)
    numbers = ["WC-%d" % i for i in range(7)]
    load(pg, numbers)
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 7
    time.sleep(0.8)                          # more than a naptime: nothing is sent
    assert [r["status"] for r in invoices(pg)] == ["pending"] * 7
    assert mock.stats()["batches"] == 0
    set_target(pg, enabled=True)
    assert submit(pg) == {"created": 7}
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 0
    assert mock.counts() == once(numbers)


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
    assert submit(pg) == {"created": 3}
    return numbers


def test_drop_database_and_drop_extension_with_worker_running(pg, mock):
    first = deliver_some(pg, mock, "DD")
    old = worker_in(pg)
    assert old and old["datname"] == pg.dbname

    started = time.monotonic()
    q(pg, 'DROP DATABASE "%s"' % pg.dbname, dbname="postgres")
    assert time.monotonic() - started < 12
    assert "stopping the worker (pid %d) for DROP DATABASE" % old["pid"] in pg.server_log()
    assert wait_for(lambda: worker_in(pg) is None, timeout=5)

    q(pg, 'CREATE DATABASE "%s"' % pg.dbname, dbname="postgres")
    q(pg, "CREATE EXTENSION d365inv")
    assert wait_for(lambda: worker_in(pg) is not None, timeout=20)
    assert wait_for(lambda: one(pg, "SELECT d365inv.worker_pid()") is not None, timeout=5)
    second = deliver_some(pg, mock, "RC")

    # DROP EXTENSION while the worker runs, then CREATE it again
    pid = one(pg, "SELECT d365inv.worker_pid()")
    q(pg, "DROP EXTENSION d365inv")
    time.sleep(0.7)                          # a round with no extension
    q(pg, "CREATE EXTENSION d365inv")
    third = deliver_some(pg, mock, "RE")
    assert one(pg, "SELECT d365inv.worker_pid()") == pid     # the same worker carried on

    assert mock.counts() == once(first + second + third)
    rows = invoices(pg)
    assert [(r["invoice_number"], r["status"], r["attempts"]) for r in rows] == \
        [(n, "created", 1) for n in third]
