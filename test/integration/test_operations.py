"""Operating d365inv, end to end: the alerts, the adaptive batch size, the
views (duplicate_rate, batch_health, queue, review_queue), the review
workflow with its audit trail, and metrics(), each against the real worker
(pgcluster.Cluster) and the mock D365 (mockctl.MockD365) over loopback.

Every figure is exact: each test starts from empty tables, so the '1h' rows
of the views count exactly what the test loaded.  The alert test comes
first: the worker's alert state lives in its memory for the whole module.

Runs as a non-root user (PostgreSQL refuses root); needs no cluster from
test/run-tests.
"""
import datetime
import json
import math
import re
import select
import socket
import time

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

from diagnostics import failure_diagnostics  # noqa: F401 (conftest.py calls it)
from mockctl import MockD365
from pgcluster import Cluster, wait_for

ALERT_INTERVAL_S = 0.3
CONF = {
    "d365inv.in_doubt_delay": "300ms",
    # the mock commits a request as it arrives, before any latency; the
    # late-commit tests hold requests and set a longer lifetime
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "500ms",
    "d365inv.http_timeout": "3s",
    "d365inv.max_retries": 3,
    "d365inv.alert_interval": "300ms",
}
WORKER_ROLE = "postgres"        # the bootstrap superuser: initdb -U postgres
OPERATOR = "it_ops"
# the mock's injected per-operation error: {"error": {"code": "0x80040216", "message": ...}}
INJECTED_400_TEXT = "HTTP 400: An unexpected error occurred (injected fault)."
INJECTED_400_CODE = "0x80040216"
# README, "Review workflow": last_error is "HTTP 400: <D365's message> (<code>)"
INJECTED_400 = INJECTED_400_TEXT + " (" + INJECTED_400_CODE + ")"


def injected_400(text):
    """last_error (or an audit note) of the injected 400, with or without
    the code: the flows below check the message; the format of the text is
    test_review_queue_last_error_has_the_documented_format's business."""
    return text in (INJECTED_400_TEXT, INJECTED_400)


# --------------------------------------------------------------------------
# helpers (as in test_worker.py)

def q(pg, query, args=None, **kw):
    """One statement on a fresh connection; rows as dicts, or None."""
    return pg.rows(query, args, **kw)


def one(pg, query, args=None, **kw):
    return pg.value(query, args, **kw)


def lines_for(numbers, vendor="V001"):
    return [(vendor, n, "2024-01-15", "%d.25" % (100 + i)) for i, n in enumerate(numbers)]


def insert_lines(cur, lines):
    """Inbox lines (vendor, number, invoice_date, amount[, target]), one statement."""
    psycopg2.extras.execute_values(
        cur, "INSERT INTO d365inv.inbox (target, vendor_account, invoice_number, invoice_date,"
             " amount, currency) VALUES %s",
        [(l[4] if len(l) > 4 else "default", l[0], l[1], l[2], l[3], "EUR") for l in lines])


def load(pg, numbers, vendor="V001"):
    """One inbox line per invoice number (nothing is ingested here)."""
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            insert_lines(cur, lines_for(numbers, vendor))
    finally:
        conn.close()


def deliver(pg, numbers=None, lines=None, timeout=30.0):
    """Load these lines and ingest them in one transaction (so the worker
    cannot ingest them first: every line is accounted for here), then wait
    until no invoice is open.  Like d365inv_submit(wait): {status: invoices}
    of this load, plus ingest_duplicate and ingest_reject lines."""
    if lines is None:
        lines = lines_for(numbers)
    conn = pg.connect()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(max(id), 0) FROM d365inv.invoice")
            (before,) = cur.fetchone()
            insert_lines(cur, lines)
            cur.execute("SELECT queued, duplicates, rejected FROM d365inv.ingest()")
            queued, duplicates, rejected = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    assert queued + duplicates + rejected == len(lines)
    settle(pg, timeout)
    result = {r["status"]: r["n"] for r in q(
        pg, "SELECT status::text, count(*) AS n FROM d365inv.invoice WHERE id > %s GROUP BY 1", (before,))}
    assert sum(result.values()) == queued, result
    if duplicates:
        result["ingest_duplicate"] = duplicates
    if rejected:
        result["ingest_reject"] = rejected
    return result



def status_counts(pg):
    return {r["status"]: r["n"] for r in q(
        pg, "SELECT status::text, count(*) AS n FROM d365inv.invoice GROUP BY 1")}


def settle(pg, timeout=30.0):
    """Poll until no invoice is open; {status: count} of the whole table."""
    assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status < 'created'") == 0,
                    timeout=timeout), invoices(pg)
    return status_counts(pg)


def invoices(pg):
    return q(pg, "SELECT *, status::text AS status FROM d365inv.invoice ORDER BY id")


def by_number(rows):
    return {r["invoice_number"]: r for r in rows}


def batch_log(pg, kind=None):
    rows = q(pg, "SELECT * FROM d365inv.batch_log ORDER BY id")
    return [r for r in rows if kind is None or r["kind"] == kind]


COUNTERS = ("created", "duplicates", "retries", "reviews", "in_doubt", "unanswered", "not_found")


def counters(log_row):
    return {k: log_row[k] for k in COUNTERS if log_row[k]}


def ckey(vendor, number):
    return "%s|%s" % (vendor.strip().lower(), number.strip().lower())


def once(numbers, vendor="V001"):
    return {ckey(vendor, n): 1 for n in numbers}


def posts_for(mock, number):
    pat = re.compile(r'"InvoiceNumber"\s*:\s*"%s"' % re.escape(number))
    return sum(len(pat.findall(r["body"])) for r in mock.requests())


def set_target(pg, **cols):
    sets = ", ".join("%s = %%s" % k for k in cols)
    q(pg, "UPDATE d365inv.target SET %s WHERE name = 'default'" % sets, tuple(cols.values()))


def set_system(pg, **settings):
    """ALTER SYSTEM SET (value) or RESET (None) d365inv.<name>, then reload."""
    for name, value in settings.items():
        if value is None:
            q(pg, "ALTER SYSTEM RESET d365inv.%s" % name)
        else:
            q(pg, "ALTER SYSTEM SET d365inv.%s = %%s" % name, (str(value),))
    q(pg, "SELECT pg_reload_conf()")


def view(pg, name, period="1h", user=None):
    rows = q(pg, "SELECT * FROM d365inv.%s WHERE target = 'default' AND period = %%s" % name,
             (period,), user=user)
    assert len(rows) == 1, rows
    return rows[0]


def closed_port():
    """A loopback port nobody listens on: connections are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LogMark:
    """The server log from a point on."""

    def __init__(self, pg):
        self.pg = pg
        self.offset = len(pg.server_log())

    def text(self):
        return self.pg.server_log()[self.offset:]

    def count(self, needle):
        return self.text().count(needle)


class AlertListener:
    """A session that LISTENs on d365inv_alert; payloads as dicts."""

    def __init__(self, pg):
        self.conn = pg.connect()
        with self.conn.cursor() as cur:
            cur.execute("LISTEN d365inv_alert")
        self.pending = []
        self.received = []          # everything, in order

    def _pump(self, timeout):
        if select.select([self.conn], [], [], max(timeout, 0))[0]:
            self.conn.poll()
        while self.conn.notifies:
            n = self.conn.notifies.pop(0)
            assert n.channel == "d365inv_alert", n
            payload = json.loads(n.payload)
            self.pending.append(payload)
            self.received.append(payload)

    def next(self, timeout=15.0):
        """The next notification, or None after timeout seconds."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(min(left, 0.2))
        return self.pending.pop(0)

    def drain(self, seconds):
        """Every notification that arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump(min(deadline - time.monotonic(), 0.1))
        out, self.pending = self.pending, []
        return out

    def close(self):
        self.conn.close()


def strip_at(alert):
    """The payload without its timestamp (checked separately)."""
    at = alert.pop("at")
    ts = datetime.datetime.fromisoformat(at)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - ts).total_seconds()) < 120, at
    return alert


# --------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def pg():
    with Cluster(CONF) as cluster:
        cluster.wait_for_worker()
        q(cluster, "CREATE ROLE %s LOGIN IN ROLE d365inv_operator" % OPERATOR)
        yield cluster


@pytest.fixture(scope="module")
def mock_server():
    with MockD365(unique=True) as m:
        yield m


def clean(pg, mock):
    """Empty tables (so the views' '1h' rows hold only this test's load), a
    healthy mock and the default target."""
    wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 0,
             timeout=10)
    mock.reset()
    q(pg, "DELETE FROM d365inv.target WHERE name <> 'default'")
    pg.truncate("d365inv.invoice", "d365inv.batch_log", "d365inv.remote_key", "d365inv.duplicate",
                "d365inv.reject", "d365inv.inbox", "d365inv.status_change")
    set_target(pg, service_root=mock.service_root, batch_size=20, max_in_flight=4, enabled=True,
               preflight="in_doubt", write_mode="create", batch_size_mode="fixed",
               batch_size_min=5, batch_size_max=50)


@pytest.fixture
def mock(pg, mock_server):
    clean(pg, mock_server)
    yield mock_server


# --------------------------------------------------------------------------
# 1. alerts

def test_alerts_raise_once_clear_and_raise_again(pg, mock):
    listener = AlertListener(pg)
    try:
        # nothing loaded, nothing to say (the worker starts without alerts)
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        mark = LogMark(pg)
        raised_warning = 'd365inv target "default": duplicate rate 7.5% in the last hour' \
                         ' is above the threshold of 5.0%'

        # 40 lines: one repeats a key of the same load (an ingest duplicate,
        # 2.5%: healthy on its own), two are in D365 already (409): 7.5%
        mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "DR-05"},
                            {"VendorAccount": "V001", "InvoiceNumber": "DR-06"}])
        numbers = ["DR-%02d" % i for i in range(39)]
        assert deliver(pg, numbers + ["dr-07 "]) == {"created": 37, "duplicate": 2,
                                                     "ingest_duplicate": 1}

        alert = listener.next()
        assert alert is not None, "no alert within 15 s"
        assert strip_at(alert) == {"alert": "duplicate_rate", "state": "raised", "target": "default",
                                   "received": 40, "duplicates": 3, "duplicate_rate": 0.075,
                                   "threshold": 0.05}
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        assert mark.count(raised_warning) == 1, mark.text()
        assert "3 of 40 invoices received in the last hour were duplicates." in mark.text()
        # the view the worker read says the same
        dr = view(pg, "duplicate_rate")
        assert (dr["received"], dr["duplicates"], dr["duplicate_rate"], dr["healthy"]) == (40, 3, 0.075, False)

        # more duplicates while the condition holds: no second alert
        more = ["DR-%02d" % i for i in range(39, 47)] + ["DR-00", "DR-01"]
        assert deliver(pg, more) == {"created": 8, "ingest_duplicate": 2}
        assert listener.drain(6 * ALERT_INTERVAL_S) == []
        assert view(pg, "duplicate_rate")["duplicate_rate"] == 0.1      # 5 of 50
        assert mark.count("in the last hour is above the threshold") == 1

        # a higher threshold clears it ...
        set_system(pg, duplicate_alert_threshold=0.9)
        alert = listener.next()
        assert alert is not None, "no 'cleared' within 15 s"
        assert strip_at(alert) == {"alert": "duplicate_rate", "state": "cleared", "target": "default",
                                   "received": 50, "duplicates": 5, "duplicate_rate": 0.1,
                                   "threshold": 0.9}
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        assert mark.count('d365inv target "default": duplicate rate back under the threshold') == 1

        # ... and the default one raises it again
        set_system(pg, duplicate_alert_threshold=None)
        alert = listener.next()
        assert alert is not None, "no second 'raised' within 15 s"
        assert strip_at(alert) == {"alert": "duplicate_rate", "state": "raised", "target": "default",
                                   "received": 50, "duplicates": 5, "duplicate_rate": 0.1,
                                   "threshold": 0.05}
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        assert mark.count('duplicate rate 10.0% in the last hour is above the threshold of 5.0%') == 1
        assert "5 of 50 invoices received in the last hour were duplicates." in mark.text()

        # nothing received any more: healthy, cleared
        q(pg, "TRUNCATE d365inv.invoice, d365inv.duplicate, d365inv.reject, d365inv.batch_log,"
              " d365inv.remote_key")
        alert = listener.next()
        assert alert is not None, "no 'cleared' within 15 s"
        assert strip_at(alert) == {"alert": "duplicate_rate", "state": "cleared", "target": "default",
                                   "received": 0, "duplicates": 0, "duplicate_rate": None,
                                   "threshold": 0.05}

        # genuine errors: 3 invoices rejected with a 400, above a threshold of 2
        set_system(pg, error_alert_threshold=2)
        mock.configure(error_status=400, fault_next={"error": 3})
        assert deliver(pg, ["ER-%d" % i for i in range(10)]) == {"created": 7, "review": 3}
        alert = listener.next()
        assert alert is not None, "no errors alert within 15 s"
        assert strip_at(alert) == {"alert": "errors", "state": "raised", "target": "default",
                                   "errors": 3, "batches": 1, "threshold": 2}
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        assert mark.count('d365inv target "default": 3 genuine errors in the last hour,'
                          ' above the threshold of 2') == 1
        bh = view(pg, "batch_health")
        assert (bh["errors"], bh["batches"], bh["in_review"], bh["healthy"]) == (3, 1, 3, False)

        # one more rejected invoice: still the same alert, not a new one
        mock.configure(fault_next={"error": 1})
        assert deliver(pg, ["ER-10"]) == {"review": 1}
        assert listener.drain(6 * ALERT_INTERVAL_S) == []

        set_system(pg, error_alert_threshold=None)
        alert = listener.next()
        assert alert is not None, "no errors 'cleared' within 15 s"
        assert strip_at(alert) == {"alert": "errors", "state": "cleared", "target": "default",
                                   "errors": 4, "batches": 2, "threshold": 10}
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        assert mark.count('d365inv target "default": genuine errors back under the threshold') == 1

        assert [(a["alert"], a["state"]) for a in listener.received] == [
            ("duplicate_rate", "raised"), ("duplicate_rate", "cleared"), ("duplicate_rate", "raised"),
            ("duplicate_rate", "cleared"), ("errors", "raised"), ("errors", "cleared")]
        assert mark.count("in the last hour is above the threshold") == 2
        assert mark.count("genuine errors in the last hour, above the threshold") == 1
        assert "checking the alert conditions failed" not in mark.text()
    finally:
        listener.close()
        set_system(pg, duplicate_alert_threshold=None, error_alert_threshold=None)


def test_an_alert_whose_check_fails_is_sent_at_the_next_check(pg, mock):
    """The alert check is one subtransaction: when a later condition's query
    fails (here the errors alert's view is gone), the duplicate_rate alert's
    NOTIFY rolls back with it.  The worker must not remember that alert as
    raised: once the check works again, the alert goes out."""
    listener = AlertListener(pg)
    pg.sql("ALTER VIEW d365inv.batch_health RENAME TO batch_health_away")
    renamed = True
    try:
        mark = LogMark(pg)
        mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "FA-03"}])
        assert deliver(pg, ["FA-%02d" % i for i in range(10)]) == {"created": 9, "duplicate": 1}
        # the duplicate_rate condition holds (10%), the check fails each time
        assert wait_for(lambda: mark.count("d365inv: checking the alert conditions failed") >= 3,
                        timeout=15), mark.text()
        assert listener.drain(2 * ALERT_INTERVAL_S) == []

        pg.sql("ALTER VIEW d365inv.batch_health_away RENAME TO batch_health")
        renamed = False
        alert = listener.next()
        assert alert is not None, \
            "no duplicate_rate alert within 15 s of the check working again (remembered as raised)"
        assert strip_at(alert) == {"alert": "duplicate_rate", "state": "raised", "target": "default",
                                   "received": 10, "duplicates": 1, "duplicate_rate": 0.1,
                                   "threshold": 0.05}
        assert listener.drain(4 * ALERT_INTERVAL_S) == []
        # one WARNING, with the NOTIFY: none from the checks that failed
        assert mark.count("in the last hour is above the threshold") == 1, mark.text()
        assert mark.count("duplicate rate 10.0% in the last hour is above the threshold") == 1

        # and it clears as usual (the next tests start without alerts)
        q(pg, "TRUNCATE d365inv.invoice, d365inv.duplicate, d365inv.reject, d365inv.batch_log,"
              " d365inv.remote_key")
        alert = listener.next()
        assert alert is not None, "no 'cleared' within 15 s"
        assert (alert["alert"], alert["state"]) == ("duplicate_rate", "cleared")
    finally:
        if renamed:
            pg.sql("ALTER VIEW d365inv.batch_health_away RENAME TO batch_health")
        listener.close()


# --------------------------------------------------------------------------
# 2. adaptive batch size

def create_sizes(pg, since_id=0):
    return [l["batch_size"] for l in batch_log(pg, "create") if l["id"] > since_id]


def test_auto_batch_size_grows_when_clean_and_halves_on_trouble(pg, mock):
    time.sleep(1.2)     # a round in 'fixed' mode forgets any earlier auto size
    set_target(pg, batch_size_mode="auto", batch_size=20, batch_size_min=5, batch_size_max=40,
               max_in_flight=1)
    try:
        # clean rounds: + max(1, size / 4) each, up to the cap
        # (max_in_flight 1: one round is one $batch of `size` invoices)
        clean_numbers = ["AB-%03d" % i for i in range(20 + 25 + 31 + 38 + 40 + 40)]
        assert deliver(pg, clean_numbers) == {"created": 194}
        log = batch_log(pg, "create")
        assert [l["batch_size"] for l in log] == [20, 25, 31, 38, 40, 40]
        assert [l["operations"] for l in log] == [20, 25, 31, 38, 40, 40]
        assert all(counters(l) == {"created": l["operations"]} for l in log)
        bh = view(pg, "batch_health")
        assert (bh["batch_size"], bh["batch_size_mode"]) == (40, "auto")
        last_clean = log[-1]["id"]

        # duplicates, with continue-on-error, cost one operation each whatever
        # the batch size: no reason to shrink (bench/batchsize measured that
        # shrinking for them only adds requests)
        dups = ["AT-00", "AT-40"]
        mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": n} for n in dups])
        trouble_numbers = ["AT-%02d" % i for i in range(80)]
        assert deliver(pg, trouble_numbers) == {"created": 78, "duplicate": 2}
        log = [l for l in batch_log(pg, "create") if l["id"] > last_clean]
        assert [l["batch_size"] for l in log] == [40, 40]
        assert all(l["duplicates"] == 1 for l in log)
        last_dup = log[-1]["id"]

        # a whole request lost (connection dropped before D365 read it: the
        # invoices are in_doubt) is trouble that grows with the size: halved
        # per failed $batch; the invoices are looked up, then sent again
        mock.configure(fault_next={"drop_before": 3})
        dropped = ["AD-%02d" % i for i in range(70)]
        assert deliver(pg, dropped) == {"created": 70}
        log = [l for l in batch_log(pg, "create") if l["id"] > last_dup]
        assert [l["batch_size"] for l in log[:3]] == [40, 20, 10]
        assert all(l["in_doubt"] == l["operations"] for l in log[:3])
        assert log[3]["batch_size"] == 5
        last_trouble = log[-1]["id"]
        size_now = log[-1]["batch_size"]

        # clean again: grows by at least one
        grow_numbers = ["AG-%02d" % i for i in range(5 + 6 + 7 + 8 + 10)]
        assert deliver(pg, grow_numbers) == {"created": 36}
        sizes = create_sizes(pg, last_trouble)
        assert sizes[0] == min(40, size_now + max(1, size_now // 4))
        assert all(b > a for a, b in zip(sizes, sizes[1:-1]))

        assert mock.counts() == once(clean_numbers + [n for n in trouble_numbers if n not in dups]
                                     + dropped + grow_numbers)
    finally:
        set_target(pg, batch_size_mode="fixed", batch_size=20, batch_size_max=50, max_in_flight=4)
    # back to fixed: the view shows the target's size
    bh = view(pg, "batch_health")
    assert (bh["batch_size"], bh["batch_size_mode"]) == (20, "fixed")


# --------------------------------------------------------------------------
# 3. the views after a real run

def test_views_after_a_known_load(pg, mock):
    set_target(pg, batch_size=10, max_in_flight=1)
    # 30 invoices + 3 repeats + 2 malformed lines, then 5 more invoices: 40 lines received
    numbers = ["VW-%02d" % i for i in range(30)]
    lines = [("V001", n, "2024-01-15", "%d.50" % i) for i, n in enumerate(numbers)]
    lines += [("V001", "VW-01", "2024-01-15", "1"), ("v001 ", " vw-02", "2024-01-15", "2"),
              ("V001", "VW-03", "2024-01-16", "3")]
    lines += [("V001", "VW-BAD1", "2024-02-30", "1"), ("V001", "VW-BAD2", "2024-01-15", "1,000.00")]
    # D365 has two of them already (409)
    mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "VW-15"},
                        {"VendorAccount": "V001", "InvoiceNumber": "VW-25"}])
    # the first $batch is throttled (429, Retry-After 1 s); the two first
    # operations D365 then processes are rejected with a 400
    mock.configure(retry_after=1, error_status=400, fault_next={"throttle": 1, "error": 2})
    assert deliver(pg, lines=lines) == {"created": 26, "duplicate": 2, "review": 2,
                                        "ingest_duplicate": 3, "ingest_reject": 2}

    rows = by_number(invoices(pg))
    assert {n for n, r in rows.items() if r["status"] == "review"} == {"VW-10", "VW-11"}
    assert {n for n, r in rows.items() if r["status"] == "duplicate"} == {"VW-15", "VW-25"}
    # sent again, and the throttled send was not counted as an attempt
    assert all((r["attempts"], r["last_http_status"]) == (1, 201)
               for n, r in rows.items() if n < "VW-10"), "the throttled batch is sent again"

    # then one operation answered 503, retried
    mock.configure(error_status=503, fault_next={"error": 1})
    assert deliver(pg, ["VW-%02d" % i for i in range(30, 35)]) == {"created": 5}
    rows = by_number(invoices(pg))
    assert (rows["VW-30"]["attempts"], rows["VW-31"]["attempts"]) == (2, 1)

    log = batch_log(pg)
    assert [(l["http_status"], counters(l)) for l in log] == [
        (429, {"unanswered": 10}),      # throttled: not processed, no attempt counted
        (200, {"created": 7, "duplicates": 1, "reviews": 2}),
        (200, {"created": 9, "duplicates": 1}),
        (200, {"created": 10}),
        (200, {"created": 4, "retries": 1}),
        (200, {"created": 1})]
    assert [(l["throttled"], l["retry_after"]) for l in log] == [(True, 1)] + [(False, None)] * 5

    # duplicate_rate, as the operator reads it
    dr = view(pg, "duplicate_rate", user=OPERATOR)
    assert {k: dr[k] for k in ("received", "queued", "rejected", "ingest_duplicates", "d365_duplicates",
                               "duplicates", "duplicate_rate", "threshold", "healthy")} == {
        "received": 40, "queued": 35, "rejected": 2, "ingest_duplicates": 3, "d365_duplicates": 2,
        "duplicates": 5, "duplicate_rate": 5 / 40, "threshold": 0.05, "healthy": False}
    assert dr["since"] is not None
    for period in ("24h", "all"):
        other = view(pg, "duplicate_rate", period)
        assert {k: other[k] for k in ("received", "duplicates", "duplicate_rate")} == \
            {"received": 40, "duplicates": 5, "duplicate_rate": 0.125}, period
    assert view(pg, "duplicate_rate", "all")["since"] is None

    # batch_health
    bh = view(pg, "batch_health", user=OPERATOR)
    expected = {"batches": 6, "successful": 3, "success_rate": 0.5, "operations": 46, "created": 31,
                "duplicates": 2, "errors": 2, "duplicate_share": 0.5, "retries": 1, "in_doubt": 0,
                "in_review": 2, "lookups": 0, "throttled": 1, "throttle_wait_s": 1,
                "batch_size": 10, "batch_size_mode": "fixed", "healthy": True}
    assert {k: bh[k] for k in expected} == expected
    assert bh["avg_ms"] is not None and bh["p95_ms"] is not None
    assert 0 < bh["avg_ms"] <= bh["p95_ms"] <= max(l["duration_ms"] for l in log) + 1e-9
    assert view(pg, "batch_health", "24h")["healthy"] is None      # '1h' only

    # review_queue: readable errors
    rq = q(pg, "SELECT * FROM d365inv.review_queue ORDER BY id", user=OPERATOR)
    assert [(r["invoice_number"], r["attempts"], r["last_http_status"]) for r in rq] == [
        ("VW-10", 1, 400), ("VW-11", 1, 400)]
    assert all(injected_400(r["last_error"]) for r in rq), rq

    # queue: nothing waits but the review rows
    queue = q(pg, "SELECT *, status::text AS status FROM d365inv.queue", user=OPERATOR)
    assert [(r["target"], r["status"], r["invoices"], r["due"], r["next_attempt_at"], r["max_attempts"])
            for r in queue] == [("default", "review", 2, None, None, 1)]

    # waiting rows: a disabled target leaves them pending ...
    set_target(pg, enabled=False)
    load(pg, ["QP-0", "QP-1", "QP-2"])
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 3
    queue = {r["status"]: r for r in q(pg, "SELECT *, status::text AS status FROM d365inv.queue")}
    assert sorted(queue) == ["pending", "review"]
    p = queue["pending"]
    assert (p["invoices"], p["due"], p["next_attempt_at"], p["max_attempts"]) == (3, 3, None, 0)
    assert p["oldest_received_at"] is not None and p["oldest_age"] >= datetime.timedelta(0)

    # ... and a D365 that does not answer (nobody listens) turns them to retry
    set_system(pg, retry_base_delay="30s")
    try:
        time.sleep(1.5)                      # the worker reloads at the top of its loop
        set_target(pg, service_root="http://127.0.0.1:%d/data/" % closed_port(), enabled=True)
        assert wait_for(lambda: status_counts(pg).get("retry") == 3, timeout=15), invoices(pg)
        queue = {r["status"]: r for r in q(pg, "SELECT *, status::text AS status, now() AS now"
                                               " FROM d365inv.queue")}
        assert sorted(queue) == ["retry", "review"]
        r = queue["retry"]
        assert (r["invoices"], r["due"], r["max_attempts"]) == (3, 0, 1)
        wait = (r["next_attempt_at"] - r["now"]).total_seconds()
        assert 20 <= wait <= 37, wait        # 30 s +-20% jitter
        failed = batch_log(pg)[-1]
        assert (failed["http_status"], counters(failed)) == (None, {"retries": 3})
        assert "refused" in failed["error"].lower() or "connect" in failed["error"].lower(), failed["error"]
        qp = by_number(invoices(pg))["QP-0"]
        assert qp["last_error"].startswith("not sent: "), qp["last_error"]
        assert mock.counts().get(ckey("V001", "QP-0")) is None
        # metrics() tells the same
        m = parse_metrics(one(pg, "SELECT d365inv.metrics()"))
        assert metric(m, "d365inv_queue_due", target="default", status="retry") == 0
        assert metric(m, "d365inv_queue_next_attempt_timestamp_seconds", target="default", status="retry") == \
            pytest.approx(r["next_attempt_at"].timestamp(), abs=1e-5)
        assert metric(m, "d365inv_invoices", target="default", status="retry") == 3
    finally:
        set_system(pg, retry_base_delay=None)
        set_target(pg, service_root=mock.service_root)
    # due now: sent and created
    q(pg, "UPDATE d365inv.invoice SET next_attempt_at = now() WHERE status = 'retry'")
    q(pg, "SELECT d365inv.wake_worker(true)")
    assert settle(pg) == {"created": 34, "duplicate": 2, "review": 2}
    assert [r["status"] for r in q(pg, "SELECT status::text FROM d365inv.queue")] == ["review"]
    assert mock.counts() == once([n for n in numbers if n not in ("VW-10", "VW-11", "VW-15", "VW-25")]
                                 + ["VW-%02d" % i for i in range(30, 35)] + ["QP-0", "QP-1", "QP-2"])


# --------------------------------------------------------------------------
# 4. the review workflow and its audit trail

def trail(pg, invoice_id):
    """(old, new, changed_by, note) of an invoice, oldest first; the note of
    the injected 400 as "<injected 400>"."""
    return [(r["old_status"], r["new_status"], r["changed_by"],
             "<injected 400>" if r["note"] and injected_400(r["note"]) else r["note"]) for r in q(
        pg, "SELECT old_status::text, new_status::text, changed_by, note FROM d365inv.status_change"
            " WHERE invoice_id = %s ORDER BY changed_at", (invoice_id,), user=OPERATOR)]


def test_review_workflow_requeue_resolve_and_audit_trail(pg, mock):
    mock.configure(error_status=400, fault_next={"error": 5})
    numbers = ["RV-%d" % i for i in range(7)]
    assert deliver(pg, numbers) == {"created": 2, "review": 5}
    ids = {r["invoice_number"]: r["id"] for r in invoices(pg)}
    rq = q(pg, "SELECT * FROM d365inv.review_queue ORDER BY id", user=OPERATOR)
    assert [r["invoice_number"] for r in rq] == ["RV-%d" % i for i in range(5)]
    assert all(injected_400(r["last_error"]) for r in rq), rq
    (first_batch,) = batch_log(pg)

    # meanwhile somebody entered RV-2 in D365 by hand
    (seeded,) = mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "RV-2"}])

    # requeue, as an operator, in one transaction: two with a note, one without
    conn = psycopg2.connect(host=pg.dir, port=5432, user=OPERATOR, dbname=pg.dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT d365inv.requeue(%s, 'fixed upstream')", ([ids["RV-0"], ids["RV-2"]],))
            assert cur.fetchone()[0] == 2
            cur.execute("SELECT d365inv.requeue(%s)", ([ids["RV-1"]],))
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT current_setting('d365inv.change_note')")
            assert cur.fetchone()[0] == ""           # requeue() left the caller's setting alone
        conn.commit()
    finally:
        conn.close()
    assert settle(pg) == {"created": 5, "review": 2}

    rows = by_number(invoices(pg))
    for n in ("RV-0", "RV-1"):
        assert (rows[n]["status"], rows[n]["settled_by"], rows[n]["attempts"], rows[n]["last_error"]) == \
            ("created", "response", 1, None), rows[n]
    rv2 = rows["RV-2"]
    assert (rv2["status"], rv2["settled_by"], rv2["d365_id"], rv2["attempts"]) == \
        ("created", "lookup", seeded["InvoiceId"], 0)
    # looked up first, then sent only what D365 did not have
    log = batch_log(pg)
    assert log[0]["id"] == first_batch["id"]
    assert [(l["kind"], counters(l)) for l in log[1:]] == [
        ("lookup", {"created": 1, "not_found": 2}), ("create", {"created": 2})]
    assert rows["RV-0"]["batch_id"] == log[2]["id"]

    # resolve the other two by hand
    assert one(pg, "SELECT d365inv.resolve(%s, 'duplicate', 'posted by hand', d365_id => 'MANUAL-3')",
               ([ids["RV-3"]],), user=OPERATOR) == 1
    assert one(pg, "SELECT d365inv.resolve(%s, 'created', 'entered in D365 directly')",
               ([ids["RV-4"]],), user=OPERATOR) == 1
    rows = by_number(invoices(pg))
    assert (rows["RV-3"]["status"], rows["RV-3"]["settled_by"], rows["RV-3"]["d365_id"]) == \
        ("duplicate", "manual", "MANUAL-3")
    assert (rows["RV-4"]["status"], rows["RV-4"]["settled_by"], rows["RV-4"]["d365_id"]) == \
        ("created", "manual", None)
    assert rows["RV-3"]["settled_at"] is not None
    assert q(pg, "SELECT * FROM d365inv.review_queue", user=OPERATOR) == []
    # a manual duplicate counts as a D365 duplicate
    assert view(pg, "duplicate_rate")["d365_duplicates"] == 1

    # what resolve() refuses, and what it leaves alone
    for args, message in [
            (([ids["RV-5"]], "pending", "x", None), "outcome must be 'created' or 'duplicate'"),
            (([ids["RV-5"]], "created", "  ", None), "the note must say why"),
            (([ids["RV-5"], ids["RV-6"]], "created", "n", "X-1"), "one d365_id cannot belong to 2 invoices")]:
        with pytest.raises(psycopg2.errors.InvalidParameterValue) as e:
            q(pg, "SELECT d365inv.resolve(%s, %s, %s, d365_id => %s)", args, user=OPERATOR)
        assert message in e.value.pgerror
    with pytest.raises(psycopg2.errors.InvalidParameterValue):
        q(pg, "SELECT d365inv.requeue(%s, '')", ([ids["RV-5"]],), user=OPERATOR)
    conn = psycopg2.connect(host=pg.dir, port=5432, user=OPERATOR, dbname=pg.dbname)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT d365inv.resolve(%s, 'duplicate', 'too late')", ([ids["RV-5"]],))
            assert cur.fetchone()[0] == 0
        assert any("1 of 1 invoices were not in review" in n for n in conn.notices), conn.notices
    finally:
        conn.close()
    assert by_number(invoices(pg))["RV-5"]["status"] == "created"

    # the audit trail: who, and why, for every step
    sent = ("pending", "in_flight", WORKER_ROLE, None)
    rejected = ("in_flight", "review", WORKER_ROLE, "<injected 400>")
    created = ("in_flight", "created", WORKER_ROLE, None)
    assert trail(pg, ids["RV-0"]) == [
        sent, rejected, ("review", "in_doubt", OPERATOR, "fixed upstream"),
        ("in_doubt", "pending", WORKER_ROLE, "not in D365 after an unknown outcome: sending again"),
        sent, created]
    assert trail(pg, ids["RV-1"]) == [
        sent, rejected, ("review", "in_doubt", OPERATOR, "requeued by hand"),
        ("in_doubt", "pending", WORKER_ROLE, "not in D365 after an unknown outcome: sending again"),
        sent, created]
    assert trail(pg, ids["RV-2"]) == [
        sent, rejected, ("review", "in_doubt", OPERATOR, "fixed upstream"),
        ("in_doubt", "created", WORKER_ROLE, None)]
    assert trail(pg, ids["RV-3"]) == [sent, rejected, ("review", "duplicate", OPERATOR, "posted by hand")]
    assert trail(pg, ids["RV-4"]) == [sent, rejected, ("review", "created", OPERATOR, "entered in D365 directly")]
    assert trail(pg, ids["RV-5"]) == [sent, created]
    # one statement, one changed_at: the claim of the first $batch
    assert one(pg, "SELECT count(DISTINCT changed_at) FROM d365inv.status_change"
                   " WHERE new_status = 'in_flight' AND invoice_id = ANY (%s)",
               ([ids[n] for n in numbers],)) == 2

    # D365 created each key at most once; RV-2 was never POSTed again
    assert mock.counts() == once(["RV-0", "RV-1", "RV-5", "RV-6"])
    assert mock.preexisting() == {"v001|rv-2": 1}
    assert posts_for(mock, "RV-2") == 1 and posts_for(mock, "RV-3") == 1 and posts_for(mock, "RV-0") == 2


# --------------------------------------------------------------------------
# 5. metrics()

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset(labels)): value}; checks
    that every line parses and every family has one HELP and one TYPE."""
    assert text.endswith("\n")
    samples, helps, types = {}, {}, {}
    for line in text.splitlines():
        assert line, "empty line in %r" % text
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helps, line
            helps[name] = line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in ("gauge", "counter"), line
            types[name] = kind
        else:
            assert not line.startswith("#"), line
            m = SAMPLE.match(line)
            assert m, "not a sample line: %r" % line
            name, labels, value = m.groups()
            assert name in types, "sample before its TYPE: %r" % line
            key = (name, frozenset(LABEL.findall(labels or "")))
            assert key not in samples, "repeated series: %r" % line
            samples[key] = float(value)
    assert set(helps) == set(types)
    return samples


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def test_metrics_after_a_run(pg, mock):
    mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "MX-3"}])
    mock.configure(error_status=400, fault_next={"error": 1})
    numbers = ["MX-%d" % i for i in range(12)]
    # MX-5 twice, a malformed date, and a line that names no target (a
    # reject of target NULL: label target="")
    lines = [("V001", n, "2024-01-15", "%d" % i) for i, n in enumerate(numbers)]
    lines += [("V001", "MX-5", "2024-01-15", "5"), ("V001", "MX-BAD", "15/01/2024", "1"),
              ("V001", "MX-NT", "2024-01-15", "1", None)]
    assert deliver(pg, lines=lines) == {"created": 10, "duplicate": 1, "review": 1,
                                        "ingest_duplicate": 1, "ingest_reject": 2}
    # two more wait for a disabled target
    set_target(pg, enabled=False)
    load(pg, ["MW-0", "MW-1"])
    assert one(pg, "SELECT d365inv.d365inv_submit()") == 2

    # a scraper needs USAGE on the schema and EXECUTE on metrics(), nothing else
    q(pg, "DROP ROLE IF EXISTS it_scraper")
    q(pg, "CREATE ROLE it_scraper LOGIN")
    q(pg, "GRANT USAGE ON SCHEMA d365inv TO it_scraper")
    q(pg, "GRANT EXECUTE ON FUNCTION d365inv.metrics() TO it_scraper")
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            q(pg, "SELECT count(*) FROM d365inv.invoice", user="it_scraper")
        text = one(pg, "SELECT d365inv.metrics()", user="it_scraper")
    finally:
        q(pg, "DROP OWNED BY it_scraper")
        q(pg, "DROP ROLE it_scraper")
    m = parse_metrics(text)

    assert metric(m, "d365inv_worker_up") == 1
    counts = status_counts(pg)
    assert counts == {"created": 10, "duplicate": 1, "review": 1, "pending": 2}
    for status in ("pending", "in_flight", "in_doubt", "retry", "created", "duplicate", "review"):
        assert metric(m, "d365inv_invoices", target="default", status=status) == counts.get(status, 0), status
    assert metric(m, "d365inv_queue_due", target="default", status="pending") == 2
    assert metric(m, "d365inv_queue_due", target="default", status="review") is None   # not due-able
    assert metric(m, "d365inv_queue_oldest_age_seconds", target="default", status="pending") >= 0
    assert metric(m, "d365inv_queue_next_attempt_timestamp_seconds", target="default", status="pending") is None

    # the same figures as the views
    for period in ("1h", "24h", "all"):
        dr = view(pg, "duplicate_rate", period)
        bh = view(pg, "batch_health", period)
        assert metric(m, "d365inv_duplicate_rate", target="default", period=period) == dr["duplicate_rate"]
        assert metric(m, "d365inv_duplicate_rate_healthy", target="default", period=period) == int(dr["healthy"])
        assert metric(m, "d365inv_batches", target="default", period=period) == bh["batches"]
        assert metric(m, "d365inv_batch_success_ratio", target="default", period=period) == bh["success_rate"]
        assert metric(m, "d365inv_batch_duration_p95_seconds", target="default", period=period) == \
            pytest.approx(bh["p95_ms"] / 1000, rel=1e-12)
        for status, column in (("created", "created"), ("duplicate", "duplicates"), ("review", "errors"),
                               ("retry", "retries"), ("in_doubt", "in_doubt")):
            assert metric(m, "d365inv_operations", target="default", status=status, period=period) == \
                bh[column], (status, period)
    # 16 lines received (14 queued, 1 repeat, 1 malformed); the repeat and MX-3 are duplicates
    assert metric(m, "d365inv_duplicate_rate", target="default", period="1h") == 2 / 16
    assert metric(m, "d365inv_inbox_lines_total", target="default", status="queued") == 14
    assert metric(m, "d365inv_inbox_lines_total", target="default", status="duplicate") == 1
    assert metric(m, "d365inv_inbox_lines_total", target="default", status="rejected") == 1
    assert metric(m, "d365inv_inbox_lines_total", target="", status="rejected") == 1
    assert metric(m, "d365inv_duplicate_rate", target="", period="1h") == 0
    assert metric(m, "d365inv_invoices", target="", status="created") is None
    assert metric(m, "d365inv_batches", target="default", period="1h") == 1
    assert metric(m, "d365inv_operations", target="default", status="review", period="1h") == 1
    assert metric(m, "d365inv_throttled_requests", target="default", period="1h") == 0
    assert metric(m, "d365inv_duplicate_alert_threshold") == 0.05
    assert metric(m, "d365inv_error_alert_threshold") == 10
    assert metric(m, "d365inv_batch_size", target="default") == 20
    assert not any(math.isnan(v) for v in m.values())

    set_target(pg, enabled=True)
    assert settle(pg) == {"created": 12, "duplicate": 1, "review": 1}
    m = parse_metrics(one(pg, "SELECT d365inv.metrics()"))
    assert metric(m, "d365inv_invoices", target="default", status="created") == 12
    assert metric(m, "d365inv_invoices", target="default", status="pending") == 0
    assert metric(m, "d365inv_queue_due", target="default", status="pending") is None
    assert metric(m, "d365inv_batches", target="default", period="1h") == 2


# --------------------------------------------------------------------------
# 6. the text a person reads in the review queue (last: it documents a
# known difference, see the assertion message)

def test_a_failing_alert_check_does_not_stop_delivery(pg, mock):
    """Alerts are a side task: when their query fails, the worker says so in a
    WARNING and goes on delivering."""
    log_start = len(pg.server_log())
    pg.sql("ALTER VIEW d365inv.duplicate_rate RENAME TO duplicate_rate_away")
    try:
        numbers = ["AF-%02d" % i for i in range(25)]
        assert deliver(pg, numbers) == {"created": 25}
        time.sleep(1.0)     # a few alert intervals (300 ms) with the view gone
        assert deliver(pg, ["AF-25"]) == {"created": 1}
        log = pg.server_log()[log_start:]
        assert "d365inv: checking the alert conditions failed" in log
        assert pg.worker_pid() is not None
    finally:
        pg.sql("ALTER VIEW d365inv.duplicate_rate_away RENAME TO duplicate_rate")
    assert mock.counts() == once(numbers + ["AF-25"])


def test_review_queue_last_error_has_the_documented_format(pg, mock):
    """README, "Review workflow and audit trail": review_queue shows
    last_error as "HTTP 400: <D365's message> (<code>)", and a whole-request
    error is written that way (describe_body()); a per-operation error must
    read the same, code included."""
    mock.configure(error_status=400, fault_next={"error": 1})
    assert deliver(pg, ["LE-0", "LE-1"]) == {"created": 1, "review": 1}
    (row,) = q(pg, "SELECT * FROM d365inv.review_queue", user=OPERATOR)
    assert row["invoice_number"] == "LE-0"
    assert row["last_error"] == INJECTED_400, \
        "per-operation 400: the OData error code is missing from last_error"
