"""Why invoices are not moving (issue #13), end to end: for each reason a
target stalls -- no service_root, disabled, a configuration error, a wrong
OAuth secret, throttling -- d365inv.target_status says so, the worker raises
its alert (WARNING and NOTIFY d365inv_alert) once and clears it once the
cause is fixed, and batch_health.healthy is false meanwhile;
d365inv_submit(wait) reports its progress in NOTICEs and says in a WARNING
when the wait ran out, and why.  Against the real worker (pgcluster.Cluster)
and the mock D365 (mockctl.MockD365).

The states only the worker can know (blocked by auth, throttled) come from
d365inv.target_state, which the worker writes.

Runs as a non-root user (PostgreSQL refuses root).
"""
import re
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from diagnostics import failure_diagnostics  # noqa: F401 (conftest.py calls it)
from mockctl import MockD365
from pgcluster import Cluster, wait_for
# helpers shared with the other operating tests
from test_operations import (AlertListener, insert_lines, lines_for, one, q, set_system, set_target, settle,
                             strip_at)

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "300ms",
    "d365inv.http_timeout": "3s",
    "d365inv.max_retries": 3,
    "d365inv.alert_interval": "300ms",
    # short, so that each stall is an alert within seconds
    "d365inv.stall_alert_after": "1s",
    "d365inv.queue_age_alert_after": "2s",
}
OPERATOR = "it_status_ops"
SECRET = "right-secret"


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
    with MockD365(unique=True, client_secret=SECRET) as m:
        yield m


def clean(pg, mock):
    """Nothing open, a healthy mock, the default target delivering to it.
    After a test that failed half-way the mock may still refuse tokens,
    throttle or answer slowly: it is healthy before the invoices that test
    left open are delivered, and reset again (its counts) after."""
    mock.reset()
    q(pg, "ALTER TABLE d365inv.target ENABLE TRIGGER target_check")
    set_target(pg, service_root=mock.service_root, enabled=True, auth="none", token_url=None,
               client_id=None, scope=None, batch_size=20, max_in_flight=4, preflight="in_doubt",
               write_mode="create", batch_size_mode="fixed")
    q(pg, "UPDATE d365inv.target SET property_map = DEFAULT WHERE name = 'default'")
    q(pg, "DELETE FROM d365inv.target_secret")
    # a worker that no longer delivers fails here, by name, not the next test
    assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice WHERE status < 'created'") == 0,
                    timeout=60), "cleanup: invoices still open after 60 s, the worker does not deliver: %r" \
        % q(pg, "SELECT status, count(*), min(last_error) FROM d365inv.invoice GROUP BY status")
    mock.reset()
    pg.truncate("d365inv.invoice", "d365inv.batch_log", "d365inv.remote_key", "d365inv.duplicate",
                "d365inv.reject", "d365inv.inbox", "d365inv.status_change")


@pytest.fixture
def mock(pg, mock_server):
    clean(pg, mock_server)
    yield mock_server
    clean(pg, mock_server)


@pytest.fixture(scope="module")
def worker_writes_state(pg, mock_server):
    """Whether the worker writes d365inv.target_state (the lead's change to
    the worker): a delivery must leave a row for its target."""
    clean(pg, mock_server)
    ingest(pg, ["PROBE-1"])
    settle(pg)
    return wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.target_state"
                                    " WHERE target = 'default'") > 0, timeout=3)


def needs_target_state(worker_writes_state):
    assert worker_writes_state, "the worker must write d365inv.target_state"


# --------------------------------------------------------------------------
# helpers

def ingest(pg, numbers, vendor="V001"):
    """Load and ingest these invoices in one transaction (open from then on)."""
    conn = pg.connect()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            insert_lines(cur, lines_for(numbers, vendor))
            cur.execute("SELECT d365inv.ingest()")
        conn.commit()
    finally:
        conn.close()


def status(pg, target="default", user=OPERATOR):
    rows = q(pg, "SELECT * FROM d365inv.target_status WHERE target = %s", (target,), user=user)
    assert len(rows) == 1, rows
    return rows[0]


def healthy(pg, target="default"):
    return one(pg, "SELECT healthy FROM d365inv.batch_health WHERE target = %s AND period = '1h'",
               (target,))


def wait_alert(listener, alert, state, timeout=15.0):
    """The next notification of this alert kind and state (others of this
    test are kept in listener.received)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = listener.next(timeout=max(deadline - time.monotonic(), 0.01))
        if n is not None and n["alert"] == alert and n["state"] == state:
            return strip_at(n)
    raise AssertionError("no %s %r within %s s; got %r" % (alert, state, timeout, listener.received))


def raised_and_cleared(listener, alert):
    """(raised, cleared) counts of one alert kind so far."""
    kinds = [(n["alert"], n["state"]) for n in listener.received]
    return kinds.count((alert, "raised")), kinds.count((alert, "cleared"))


def enable_and_settle(pg, listener):
    """Enable the default target again, let everything be delivered, and
    wait until every alert the test raised is cleared, so that no late
    "cleared" reaches the next test's listener."""
    set_target(pg, enabled=True)
    settle(pg, timeout=60)
    for alert in ("blocked", "queue_age"):
        raised, cleared = raised_and_cleared(listener, alert)
        if raised > cleared:
            wait_alert(listener, alert, "cleared", timeout=30)


def stall_and_fix(pg, mock, break_it, fix_it, expect_state, expect_reason, expect_blocked_by):
    """Break the default target, load 7 invoices, and check target_status,
    batch_health, the blocked and queue_age alerts (raised once, with the
    reason); fix it and check that everything is delivered and both alerts
    clear once."""
    listener = AlertListener(pg)
    try:
        # a stall of the fixtures' or an earlier test's may still be
        # clearing: the worker says so at its next alert check
        assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.target_alerts"
                                        " WHERE target = 'default' AND firing") == 0, timeout=30)
        listener.drain(1.5)
        del listener.received[:]
        break_it()
        ingest(pg, ["ST-%d" % i for i in range(7)])
        blocked = wait_alert(listener, "blocked", "raised")
        assert blocked["target"] == "default"
        assert blocked["open_invoices"] == 7
        assert expect_reason in blocked["reason"], blocked
        assert blocked["threshold_s"] == 1
        assert blocked["no_progress_s"] >= 1
        age = wait_alert(listener, "queue_age", "raised")
        assert age["open_invoices"] == 7 and age["threshold_s"] == 2, age
        log = pg.server_log()
        assert re.search(r'WARNING:  d365inv target "default": no progress for [0-9.]+ s(ec)? with 7 open invoices: .*'
                         + re.escape(expect_reason), log), log[-3000:]
        # the operator's view says why
        if expect_state is not None:
            st = status(pg)
            assert st["state"] == expect_state, st
            assert st["blocked_by"] == expect_blocked_by, st
            assert expect_reason in st["reason"], st
            assert st["open_invoices"] == 7 and st["blocked"] is True
            assert healthy(pg) is False
            m = one(pg, "SELECT d365inv.metrics()", user=OPERATOR)
            assert 'd365inv_target_blocked{target="default"} 1\n' in m
            assert 'd365inv_alert{target="default",alert="blocked"} 1\n' in m
            assert 'd365inv_open_invoices{target="default"} 7\n' in m
        # raised once however long it lasts
        time.sleep(1.0)
        assert raised_and_cleared(listener, "blocked") == (1, 0)

        fix_it()
        assert settle(pg, timeout=30) == {"created": 7}
        cleared = wait_alert(listener, "blocked", "cleared")
        assert cleared["open_invoices"] == 0
        wait_alert(listener, "queue_age", "cleared")
        time.sleep(1.0)
        assert raised_and_cleared(listener, "blocked") == (1, 1)
        assert raised_and_cleared(listener, "queue_age") == (1, 1)
        st = status(pg)
        assert st["state"] in ("idle", "delivering") and st["blocked"] is False, st
        assert st["open_invoices"] == 0
        assert healthy(pg) is True
        assert 'd365inv target "default": invoices moving again, or none open' in pg.server_log()
        assert mock.counts() == {"v001|st-%d" % i: 1 for i in range(7)}
    finally:
        listener.close()


# --------------------------------------------------------------------------
# the stall reasons

def test_no_service_root(pg, mock):
    root = mock.service_root
    stall_and_fix(
        pg, mock,
        lambda: set_target(pg, service_root=None),
        lambda: set_target(pg, service_root=root),
        expect_state="unconfigured", expect_blocked_by="config",
        expect_reason="no service_root: UPDATE d365inv.target SET service_root = ")


def test_disabled(pg, mock):
    stall_and_fix(
        pg, mock,
        lambda: set_target(pg, enabled=False),
        lambda: set_target(pg, enabled=True),
        expect_state="disabled", expect_blocked_by="disabled",
        expect_reason="UPDATE d365inv.target SET enabled = true WHERE name = 'default'")


def test_a_blocked_target_tells_only_the_first_invoices_in_line(pg, mock):
    """A blocked target's reason goes to the last_error of the first 1,000
    invoices in line, not to every waiting one: telling a queue of a million
    rewrote a million rows (and held the inbox meanwhile) at every change of
    reason.  target_status tells the rest."""
    listener = AlertListener(pg)
    try:
        set_target(pg, enabled=False)
        ingest(pg, ["LINE-%05d" % i for i in range(2500)])
        reason = "target \"default\" is disabled"
        assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.invoice"
                                        " WHERE starts_with(last_error, %s)", (reason,)) > 0, timeout=10)
        time.sleep(1.0)
        told, last_told, first_untold = q(pg, """
            SELECT count(*) FILTER (WHERE starts_with(last_error, %s)),
                   max(id) FILTER (WHERE starts_with(last_error, %s)),
                   min(id) FILTER (WHERE last_error IS NULL)
            FROM d365inv.invoice""", (reason, reason))[0].values()
        assert told == 1000
        assert last_told < first_untold
        assert status(pg)["open_invoices"] == 2500
        enable_and_settle(pg, listener)
    finally:
        listener.close()


def test_a_load_is_not_held_up_while_the_worker_prepares_its_round(pg, mock):
    """The worker ingests what is in the inbox at the start of a round;
    ingest() locks the inbox until commit, so that commit comes before the
    rest of the round's preparation.  Here telling the waiting invoices of a
    disabled target is made slow (2 s, by a trigger of this test's) while
    lines keep arriving: every INSERT into the inbox gets its lock within
    1 s.  Before, the worker held the inbox through the telling."""
    q(pg, """CREATE FUNCTION public.slow_telling() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT FROM told WHERE last_error LIKE '%is disabled%') THEN
                     PERFORM pg_sleep(2);
                 END IF;
                 RETURN NULL;
             END $$""")
    q(pg, "CREATE TRIGGER slow_telling AFTER UPDATE ON d365inv.invoice REFERENCING NEW TABLE AS told"
          " FOR EACH STATEMENT EXECUTE FUNCTION public.slow_telling()")
    listener = AlertListener(pg)
    try:
        set_target(pg, enabled=False)
        conn = pg.connect()
        waits = []
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '1s'")
                deadline = time.monotonic() + 12
                i = 0
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    try:
                        insert_lines(cur, lines_for(["HELD-%d" % i]))
                    except psycopg2.errors.LockNotAvailable:
                        waits.append(i)
                    i += 1
                    time.sleep(max(0.0, 0.2 - (time.monotonic() - started)))
        finally:
            conn.close()
        # the worker told the waiting invoices at least twice meanwhile
        assert one(pg, "SELECT count(*) FROM d365inv.invoice WHERE last_error LIKE '%%is disabled%%'") > 0
        assert waits == []
    finally:
        q(pg, "DROP TRIGGER slow_telling ON d365inv.invoice")
        q(pg, "DROP FUNCTION public.slow_telling()")
    try:
        enable_and_settle(pg, listener)
    finally:
        listener.close()


def test_configuration_error(pg, mock, worker_writes_state):
    """A property_map from before the target check: the worker sends
    nothing and says why in last_error (and, when it writes it, in
    target_state); the blocked alert names it."""
    def break_it():
        q(pg, "ALTER TABLE d365inv.target DISABLE TRIGGER target_check")
        q(pg, "UPDATE d365inv.target SET property_map = '{\"nonexistent_col\": \"Foo\"}' WHERE name = 'default'")

    stall_and_fix(
        pg, mock, break_it,
        lambda: q(pg, "UPDATE d365inv.target SET property_map = DEFAULT WHERE name = 'default'"),
        expect_state="blocked" if worker_writes_state else None, expect_blocked_by="config",
        expect_reason='configuration error: property_map maps "nonexistent_col", which is not a staging column')


def test_wrong_oauth_secret(pg, mock, worker_writes_state):
    needs_target_state(worker_writes_state)
    mock.configure(require_auth=True)
    listener = AlertListener(pg)
    try:
        # the secret first: a round between the two would block the target
        # for "no client secret" and the auth alert would name that instead
        q(pg, "INSERT INTO d365inv.target_secret VALUES ('default', 'wrong-secret')")
        set_target(pg, auth="oauth2", token_url=mock.token_url, client_id="test-client",
                   scope="https://mock.example/.default")
        ingest(pg, ["AU-%d" % i for i in range(5)])
        auth = wait_alert(listener, "auth", "raised")
        assert auth["blocked_by"] == "auth" and "authentication failed" in auth["reason"], auth
        assert "wrong-secret" not in str(auth)
        st = status(pg)
        assert (st["state"], st["blocked_by"], st["blocked"]) == ("blocked", "auth", True), st
        assert "authentication failed" in st["reason"]
        assert healthy(pg) is False
        assert 'd365inv_alert{target="default",alert="auth"} 1\n' in one(pg, "SELECT d365inv.metrics()")
        blocked = wait_alert(listener, "blocked", "raised")
        assert "authentication failed" in blocked["reason"]

        q(pg, "UPDATE d365inv.target_secret SET client_secret = %s WHERE target = 'default'", (SECRET,))
        q(pg, "SELECT pg_reload_conf()")        # drops cached tokens
        assert settle(pg, timeout=30) == {"created": 5}
        wait_alert(listener, "auth", "cleared")
        wait_alert(listener, "blocked", "cleared")
        assert status(pg)["blocked_by"] is None
        assert raised_and_cleared(listener, "auth") == (1, 1)
        assert "wrong-secret" not in pg.server_log()
    finally:
        listener.close()


def test_a_401_without_a_token_does_not_stop_the_target(pg, mock, worker_writes_state):
    """auth 'none' (a gateway in front of D365 holds the credentials): a 401
    has no token to refresh, and the app user sends again in the next
    round; the target says blocked by auth while every request is refused,
    and delivers once they are accepted.  Before, the "refresh the token"
    flag a 401 sets was only ever cleared by fetching a token: one 401 left
    the target's only app user aside until the worker restarted, its
    invoices pending and target_status saying idle.  (How CI lost
    test_status.py from test_wrong_oauth_secret on: that test failed
    half-way, its cleanup set auth 'none' while the mock still required a
    token, and the worker never sent to the mock again.)"""
    needs_target_state(worker_writes_state)
    mock.configure(require_auth=True)
    ingest(pg, ["NA-%d" % i for i in range(3)])
    assert wait_for(lambda: mock.stats()["auth_failures"] >= 3, timeout=15), mock.stats()
    st = status(pg)
    assert (st["state"], st["blocked_by"]) == ("blocked", "auth"), st
    # no token was sent, so none was refused: the reason says what happened
    assert st["reason"].startswith("D365 answered 401 to a request without a token (auth 'none'): "), st
    assert "401" in st["reason"][len("D365 answered 401"):], st
    assert "token refused" not in one(pg, "SELECT string_agg(coalesce(last_error, ''), ' | ')"
                                          " FROM d365inv.invoice WHERE invoice_number LIKE 'NA-%%'")
    mock.configure(require_auth=False)
    assert settle(pg, timeout=20) == {"created": 3}
    assert mock.counts() == {"v001|na-%d" % i: 1 for i in range(3)}
    assert wait_for(lambda: status(pg)["blocked_by"] is None, timeout=10), status(pg)


def test_throttled(pg, mock, worker_writes_state):
    needs_target_state(worker_writes_state)
    set_system(pg, max_retries=100)         # throttled for a while, not into review
    try:
        mock.configure(throttle_rate=1.0, retry_after=3)
        ingest(pg, ["TH-%d" % i for i in range(5)])
        assert wait_for(lambda: status(pg)["state"] == "throttled", timeout=15), status(pg)
        st = status(pg)
        assert st["blocked"] is True and st["until"] is not None, st
        assert "429" in st["reason"] or "throttled" in st["reason"], st
        assert healthy(pg) is False
        mock.configure(throttle_rate=0.0)
        assert settle(pg, timeout=30) == {"created": 5}
        assert wait_for(lambda: status(pg)["state"] in ("idle", "delivering"), timeout=10), status(pg)
        assert healthy(pg) is True
    finally:
        set_system(pg, max_retries=None)


# --------------------------------------------------------------------------
# what the operator reads: progress, and d365inv_submit(wait)

def submit(pg, wait, progress_interval="1s", user=OPERATOR):
    """d365inv_submit(wait) as the operator: ({status: invoices}, notices)."""
    conn = psycopg2.connect(host=pg.dir, port=5432, user=user, dbname=pg.dbname)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SET d365inv.progress_interval = %s", (progress_interval,))
            cur.execute("SELECT * FROM d365inv.d365inv_submit(wait => %s)", (wait,))
            result = dict(cur.fetchall())
        return result, list(conn.notices)
    finally:
        conn.close()


def load(pg, numbers):
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            insert_lines(cur, lines_for(numbers))
    finally:
        conn.close()


class HoldWorkerOff:
    """Keeps the worker's hands off what waits until release(), in a
    transaction of its own: the inbox locked as a load under way locks it
    (the worker's ingest(nowait) leaves the inbox for later) and the open
    invoices locked FOR UPDATE (the worker's claim skips locked rows).
    Readers, d365inv_submit(wait) among them, are not held up."""

    def __init__(self, pg):
        self.conn = pg.connect()
        self.conn.autocommit = False
        with self.conn.cursor() as cur:
            cur.execute("LOCK TABLE d365inv.inbox IN ROW EXCLUSIVE MODE")
            cur.execute("SELECT id FROM d365inv.invoice WHERE status < 'created' FOR UPDATE")

    def release(self):
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None


def submit_held(pg, hold, wait, progress_interval="1s"):
    """submit(), with nothing delivered before d365inv_submit(wait) has
    looked at what waits: `hold` (a HoldWorkerOff) is released once the
    call sleeps in its loop.  Without it the worker may deliver everything
    between the test's last change and the call, which then has nothing to
    wait for (and says {})."""
    out = {}

    def call():
        try:
            out["result"] = submit(pg, wait, progress_interval)
        except BaseException as e:     # raised in the test's thread below
            out["error"] = e

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        assert wait_for(lambda: not caller.is_alive() or one(
            pg, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND wait_event = 'PgSleep'"
                "   AND query LIKE '%%d365inv_submit%%'", (OPERATOR,)) > 0, timeout=15)
    finally:
        hold.release()
    caller.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_submit_wait_runs_out_with_a_warning_naming_why(pg, mock):
    set_target(pg, enabled=False)
    load(pg, ["WO-%02d" % i for i in range(30)])
    result, notices = submit(pg, "3 s", progress_interval="1s")
    # the per-status table still comes back
    assert result == {"pending": 30}
    progress = [n for n in notices if n.startswith("NOTICE:  d365inv: ")]
    warnings = [n for n in notices if n.startswith("WARNING:")]
    assert 2 <= len(progress) <= 4, notices
    assert re.match(r"NOTICE:  d365inv: 0 of 30 settled \(0\.0%\), 0\.0/s, nothing settled in the last 1\.[0-9] s; "
                    r"target \"default\" is disabled: the worker leaves it alone: "
                    r"UPDATE d365inv\.target SET enabled = true WHERE name = 'default'\n$", progress[-1]), progress
    assert len(warnings) == 1, notices
    assert warnings[0].startswith(
        "WARNING:  d365inv_submit: the wait of 00:00:03 ran out with 30 invoices still open\n"), warnings
    assert "DETAIL:  target \"default\" is disabled: the worker leaves it alone" in warnings[0], warnings
    # progress off: no NOTICE, still the WARNING
    result, notices = submit(pg, "0.5 s", progress_interval="0")
    assert result == {"pending": 30}
    assert [n.split("\n")[0] for n in notices] == [
        "WARNING:  d365inv_submit: the wait of 00:00:00.5 ran out with 30 invoices still open"], notices
    # and when everything settles in time, no WARNING
    hold = HoldWorkerOff(pg)
    set_target(pg, enabled=True)
    result, notices = submit_held(pg, hold, "30 s")
    assert result == {"created": 30}
    assert not [n for n in notices if n.startswith("WARNING:")], notices


def test_submit_wait_reports_progress_and_progress_view(pg, mock):
    # slow enough to take a few seconds: 1 request at a time, 5 per request, 150 ms each
    mock.configure(latency_ms=150)
    set_target(pg, batch_size=5, max_in_flight=1)
    n = 150
    hold = HoldWorkerOff(pg)
    load(pg, ["PR-%03d" % i for i in range(n)])
    result, notices = submit_held(pg, hold, "60 s", progress_interval="1s")
    assert result == {"created": n}
    progress = [x for x in notices if x.startswith("NOTICE:  d365inv: ")]
    assert progress, notices
    for line in progress:
        m = re.match(r"NOTICE:  d365inv: ([0-9,]+) of ([0-9,]+) settled \(([0-9.]+)%\), ([0-9.,]+)/s, "
                     r"(about [0-9.]+ (s|min) left|nothing settled in the last .*)\n$", line)
        assert m, line
        assert m.group(2) == str(n)
    settled = [int(re.search(r"d365inv: ([0-9,]+) of", x).group(1).replace(",", "")) for x in progress]
    assert settled == sorted(settled) and settled[-1] > 0, progress
    assert any("left" in x for x in progress), progress
    assert not [x for x in notices if x.startswith("WARNING:")], notices
    # the view: all of them settled within the last minute, nothing open
    row = q(pg, "SELECT * FROM d365inv.progress WHERE target = 'default'", user=OPERATOR)[0]
    assert row["open_invoices"] == 0
    assert row["settled_last_minute"] == n and row["created"] == n
    assert row["rate_per_s"] == pytest.approx(n / 60.0)
    assert row["eta"] is not None and row["eta"].total_seconds() == 0
    assert row["state"] in ("idle", "delivering")
