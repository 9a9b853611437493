"""Service protection: throttling (429) is a normal operating condition, not
a failure of an invoice.  A throttled app user waits as a whole for the
Retry-After D365 asked for, no invoice is charged an attempt, the target's
state says so, several app users share the work, and pacing keeps each
within its budget.  Also: every stall has its reason in target_state and in
the waiting invoices' last_error, and it clears once fixed.

A real cluster (pgcluster.Cluster) and the mock D365 on 127.0.0.1.
"""
import collections
import time
import uuid

import pytest

from mockctl import MockD365
from pgcluster import Cluster, wait_for

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "300ms",
    "d365inv.http_timeout": "5s",
    "d365inv.max_retries": 3,
}


@pytest.fixture(scope="module")
def pg():
    with Cluster(CONF) as cluster:
        cluster.wait_for_worker()
        yield cluster


@pytest.fixture(scope="module")
def mock_server():
    with MockD365(unique=True) as m:
        yield m


@pytest.fixture
def mock(pg, mock_server):
    wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice WHERE status < 'created'") == 0
             or pg.value("SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 0,
             timeout=10)
    mock_server.reset()
    pg.sql("DELETE FROM d365inv.target_secret")
    pg.sql("DELETE FROM d365inv.app_user")
    pg.truncate("d365inv.invoice", "d365inv.batch_log", "d365inv.remote_key", "d365inv.inbox")
    pg.sql("UPDATE d365inv.target SET service_root = %s, enabled = true, batch_size = 20,"
           " max_in_flight = 4, auth = 'none', token_url = NULL, client_id = NULL, scope = NULL,"
           " pacing = 'budget', limit_window = 300, limit_requests = 6000, limit_execution = 1200"
           " WHERE name = 'default'", (mock_server.service_root,))
    yield mock_server


def load(pg, n, prefix):
    pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
           " SELECT 'V1', %s || i, '2024-01-15', '1.00' FROM generate_series(1, %s) i", (prefix, n))
    pg.sql("SELECT d365inv.d365inv_submit()")


def statuses(pg):
    return {r["status"]: r["n"] for r in pg.rows(
        "SELECT status::text, count(*) AS n FROM d365inv.invoice GROUP BY 1")}


def settled(pg, timeout):
    return wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice WHERE status < 'created'") == 0,
                    timeout=timeout)


def state(pg):
    return pg.rows("SELECT state, blocked_by, reason, until FROM d365inv.target_state"
                   " WHERE target = 'default'")


def max_overlap(logs):
    """Most requests in flight at once, from batch_log start times and durations."""
    events = []
    for l in logs:
        start = l["started_at"].timestamp()
        events += [(start, 1), (start + l["duration_ms"] / 1000, -1)]
    cur = best = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize("scope", ["batch", "operation"])
def test_30_percent_429_costs_no_invoice(pg, mock, scope):
    """30% of requests (or operations) answered 429: everything is delivered
    once, nothing goes to review, no invoice is charged an attempt."""
    mock.configure(throttle_rate=0.3, throttle_scope=scope, retry_after=1, seed=13)
    load(pg, 500, "T30-")
    assert settled(pg, 120), statuses(pg)
    assert statuses(pg) == {"created": 500}
    assert pg.rows("SELECT max(attempts) AS a FROM d365inv.invoice") == [{"a": 1}]
    logs = pg.rows("SELECT * FROM d365inv.batch_log WHERE kind = 'create'")
    throttled = [l for l in logs if l["throttled"]]
    assert len(throttled) >= 3, "the mock should have throttled some requests"
    assert sum(l["reviews"] + l["retries"] for l in logs) == 0
    # within D365's documented limits: 6,000 requests per 5 minutes, 52 at once
    assert len(logs) < 6000 and max_overlap(logs) <= 4
    counts = mock.counts()
    assert len(counts) == 500 and set(counts.values()) == {1}


def test_a_throttled_target_says_so_and_waits_as_a_whole(pg, mock):
    mock.configure(fault_next={"throttle": 1}, retry_after=3)
    load(pg, 5, "TW-")
    assert wait_for(lambda: [r["state"] for r in state(pg)] == ["throttled"], timeout=10), state(pg)
    (s,) = state(pg)
    assert "HTTP 429" in s["reason"] and s["blocked_by"] is None and s["until"] is not None
    rows = pg.rows("SELECT status::text, attempts, last_error FROM d365inv.invoice")
    assert all(r["status"] == "pending" and r["attempts"] == 0 and
               r["last_error"].startswith("throttled by D365") for r in rows), rows
    # no request while the user waits
    sent = len(mock.requests())
    time.sleep(1.5)
    assert len(mock.requests()) == sent
    assert settled(pg, 15)
    assert statuses(pg) == {"created": 5}
    assert wait_for(lambda: [r["state"] for r in state(pg)] in (["idle"], ["delivering"]), timeout=10)
    assert pg.value("SELECT progress_at IS NOT NULL FROM d365inv.target_state") is True


def test_app_users_share_the_work(pg, mock):
    pg.sql("UPDATE d365inv.target SET client_id = 'user-1', batch_size = 5, max_in_flight = 2")
    pg.sql("INSERT INTO d365inv.app_user VALUES ('default', 'user-2'), ('default', 'user-3')")
    mock.configure(latency_ms=100)
    load(pg, 200, "AU-")
    assert settled(pg, 60)
    used = collections.Counter(r["headers"].get("X-D365inv-Client-Id") for r in mock.requests())
    assert set(used) == {"user-1", "user-2", "user-3"}, used
    # spread, not one user doing it all
    assert min(used.values()) >= len(mock.requests()) / 6, used
    logs = pg.rows("SELECT * FROM d365inv.batch_log WHERE kind = 'create'")
    assert max_overlap(logs) <= 3 * 2

    # a user removed is no longer used
    pg.sql("DELETE FROM d365inv.app_user WHERE client_id = 'user-3'")
    mock.reset()
    load(pg, 40, "AU2-")
    assert settled(pg, 30)
    assert {r["headers"].get("X-D365inv-Client-Id") for r in mock.requests()} <= {"user-1", "user-2"}


def test_pacing_keeps_each_app_user_within_its_request_budget(pg, mock):
    """With a budget of 4 requests per 2 s, never more than 4 in any 2 s,
    whatever is waiting; without pacing, as fast as it goes."""
    pg.sql("UPDATE d365inv.target SET batch_size = 5, max_in_flight = 4,"
           " limit_window = 2, limit_requests = 4")
    mock.configure(latency_ms=20)
    started = time.monotonic()
    load(pg, 60, "PC-")                      # 12 requests
    assert settled(pg, 30)
    took = time.monotonic() - started
    starts = sorted(l["started_at"].timestamp() for l in
                    pg.rows("SELECT started_at FROM d365inv.batch_log WHERE kind = 'create'"))
    assert len(starts) == 12
    worst = max(sum(1 for t in starts if s <= t < s + 2.0) for s in starts)
    assert worst <= 4, "%d requests within 2 s" % worst
    assert took >= 4.0, took
    assert mock.stats()["faults"].get("throttle", 0) == 0

    pg.sql("UPDATE d365inv.target SET pacing = 'off'")
    started = time.monotonic()
    load(pg, 60, "PO-")
    assert settled(pg, 30)
    assert time.monotonic() - started < 3.0


def test_wrong_secret_blocks_visibly_and_a_new_secret_clears_it(pg, mock):
    mock.configure(require_auth=True)
    pg.sql("UPDATE d365inv.target SET auth = 'oauth2', token_url = %s, client_id = 'test-client',"
           " scope = 'https://mock.example/.default'", (mock.token_url,))
    pg.sql("INSERT INTO d365inv.target_secret VALUES ('default', %s)", ("wrong-" + uuid.uuid4().hex,))
    load(pg, 3, "WS-")
    assert wait_for(lambda: [(r["state"], r["blocked_by"]) for r in state(pg)] == [("blocked", "auth")],
                    timeout=10), state(pg)
    (s,) = state(pg)
    assert s["reason"].startswith("authentication failed") and "HTTP 401" in s["reason"], s
    assert wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice WHERE last_error = %s",
                                     (s["reason"],)) == 3)
    assert pg.rows("SELECT DISTINCT status::text, attempts FROM d365inv.invoice") == \
        [{"status": "pending", "attempts": 0}]
    # the right secret: taken at once, not after the 30 s wait
    pg.sql("UPDATE d365inv.target_secret SET client_secret = 'test-secret'")
    assert settled(pg, 10), statuses(pg)
    assert statuses(pg) == {"created": 3}
    assert wait_for(lambda: [r["state"] for r in state(pg)] in (["idle"], ["delivering"]), timeout=10)


def test_disabled_and_unconfigured_targets_say_why(pg, mock):
    pg.sql("UPDATE d365inv.target SET enabled = false")
    load(pg, 2, "DS-")
    assert wait_for(lambda: [(r["state"], r["blocked_by"]) for r in state(pg)] == [("blocked", "disabled")],
                    timeout=10), state(pg)
    assert wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice WHERE last_error LIKE"
                                     " '%%is disabled (d365inv.target.enabled = false)%%'") == 2)
    pg.sql("UPDATE d365inv.target SET enabled = true, service_root = NULL")
    assert wait_for(lambda: [(r["state"], r["blocked_by"]) for r in state(pg)] == [("blocked", "config")],
                    timeout=10), state(pg)
    assert "has no service_root" in state(pg)[0]["reason"]
    assert wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice WHERE last_error LIKE"
                                     " '%%has no service_root%%'") == 2)
    # a slow D365: the round that delivers lasts seconds; the state says
    # delivering from its start, not blocked until its end
    mock.configure(latency_ms=1500)
    pg.sql("UPDATE d365inv.target SET service_root = %s, batch_size = 1, max_in_flight = 1",
           (mock.service_root,))
    pg.sql("SELECT d365inv.d365inv_submit()")
    assert wait_for(lambda: [r["state"] for r in state(pg)] == ["delivering"], timeout=1.2), state(pg)
    assert settled(pg, 10)
    assert statuses(pg) == {"created": 2}
    assert wait_for(lambda: [r["state"] for r in state(pg)] in (["idle"], ["delivering"]), timeout=10)


def test_preflight_always_sends_more_batches_than_fit_in_flight(pg, mock):
    """preflight 'always' sends the batches of a round through the app users'
    windows: an answer frees its place (a round of 20 batches with 2 in flight
    once waited forever for a place that never came back)."""
    pg.sql("UPDATE d365inv.target SET preflight = 'always', batch_size = 5, max_in_flight = 2")
    mock.configure(throttle_rate=0.2, retry_after=1, seed=5)
    load(pg, 100, "PA-")
    assert settled(pg, 60), statuses(pg)
    assert statuses(pg) == {"created": 100}
    assert pg.rows("SELECT max(attempts) AS a FROM d365inv.invoice") == [{"a": 1}]
    logs = pg.rows("SELECT * FROM d365inv.batch_log WHERE kind = 'create'")
    assert len(logs) >= 20 and max_overlap(logs) <= 2
    counts = mock.counts()
    assert len(counts) == 100 and set(counts.values()) == {1}


def test_an_error_mid_send_leaves_no_app_user_stuck(pg, mock):
    """An ERROR while requests are in flight (here a cancel) abandons them;
    the next round must not count them as still in flight (it once did, and
    every app user looked busy for good)."""
    pg.sql("UPDATE d365inv.target SET batch_size = 5, max_in_flight = 2")
    mock.configure(latency_ms=1500)
    load(pg, 10, "ER-")
    assert wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice WHERE status = 'in_flight'") == 10,
                    timeout=10)
    time.sleep(0.3)
    assert pg.value("SELECT pg_cancel_backend(d365inv.worker_pid())") is True
    mock.configure(latency_ms=0)
    assert settled(pg, 30), statuses(pg)
    assert statuses(pg) == {"created": 10}
    counts = mock.counts()
    assert len(counts) == 10 and set(counts.values()) == {1}


def test_a_minute_of_30_percent_429_costs_no_invoice(pg, mock):
    """Issue #13's case: for a minute, invoices keep arriving while D365
    answers 30% of the requests 429.  Everything is delivered once, nothing
    goes to review, no invoice is charged an attempt, and the request rate
    stays within D365's documented limits (6,000 requests per 5 minutes, 52
    at once)."""
    mock.configure(throttle_rate=0.3, retry_after=1, seed=29, latency_ms=20)
    started = time.monotonic()
    loads = 0
    while time.monotonic() - started < 60:
        load(pg, 50, "MIN-%02d-" % loads)
        loads += 1
        time.sleep(1)
    assert settled(pg, 120), statuses(pg)
    total = 50 * loads
    assert statuses(pg) == {"created": total}
    assert pg.rows("SELECT max(attempts) AS a FROM d365inv.invoice") == [{"a": 1}]
    logs = pg.rows("SELECT * FROM d365inv.batch_log WHERE kind = 'create'")
    throttled = sum(1 for l in logs if l["throttled"])
    assert 0.15 < throttled / len(logs) < 0.45, (throttled, len(logs))
    assert sum(l["reviews"] + l["retries"] for l in logs) == 0
    # the whole run fits in one 5-minute window
    assert len(logs) <= 6000
    assert max_overlap(logs) <= 4
    counts = mock.counts()
    assert len(counts) == total and set(counts.values()) == {1}
    print("a minute of 30%% 429: %d invoices in %d requests, %d throttled, 0 reviews"
          % (total, len(logs), throttled))
