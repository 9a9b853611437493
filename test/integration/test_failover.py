"""Failover: a primary with the worker, a streaming standby (pg_basebackup -R,
pgcluster.Cluster.standby), the mock D365 on 127.0.0.1 with uniqueness OFF,
so a second POST of a key is a second entity and shows as a per-key counter
of 2 in mock.counts().

Issue "Exactly once when D365 commits late", part 3: the worker never sends
from a standby and starts on promotion; after a promotion every invoice the
old primary may have claimed is in doubt (with asynchronous replication the
claim may not have reached the standby), so nothing is posted twice.

  * test_standby_worker_idles_and_submit_says_recovery: on a standby no
    worker runs and nothing is sent; d365inv_submit() says the server is in
    recovery, d365inv_submit(wait) refuses at once instead of waiting.
  * test_failover_sync_no_double_post_none_lost: synchronous standby; the
    primary is killed (-m immediate) while batches are in flight (the mock
    processes a batch at once and answers LATENCY_MS later), the standby is
    promoted and its worker settles everything: no key created twice, every
    invoice created.
  * test_failover_async_lagging_standby_no_double_post: asynchronous
    standby whose WAL arrives ASYNC_DELAY_MS late (a WalRelay: it receives
    late, not only applies late), so the claims and outcomes of the last
    ASYNC_DELAY_MS before the kill never reach it.  No key may be created
    twice, and nothing that had reached the standby before it was sent may
    be lost.  LATE more lines are loaded near the end, within the lag, and
    the primary is killed once it has created some of them: they are
    missing on the new primary (the documented loss of asynchronous
    replication); the test reports how many, and how many of those D365
    has (created by the old primary, unknown to the new one).
  * test_async_failover_reloading_lost_lines_posts_none_twice: the README's
    advice for those lost lines is to load them again; some of them are
    already in D365 and the new primary knows nothing of them.  Loading
    them again must create none a second time (server mode with preflight
    'in_doubt' and 'always', client mode).

The failover tests run with the target's default entity ids (D365 chooses
the key: "server") and, when target.entity_id_mode exists, with client-chosen
ids ("client"), where a lookup hit with our own id must be 'created'.

FAILOVER_SETTLE_TIMEOUT (default 120 s) is how long the promoted standby's
worker gets to settle everything (in-doubt rows may be time-fenced before
they are looked up).  If the server has d365inv.server_request_lifetime, it
is set to SERVER_REQUEST_LIFETIME so the fence is short.

Runs as a non-root user; needs no cluster from test/run-tests.
"""
import os
import time
from collections import Counter

import psycopg2
import psycopg2.extras
import pytest

from mockctl import MockD365
from pgcluster import Cluster, wait_for

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.retry_max_delay": "2s",
    "d365inv.naptime": "300ms",
    "d365inv.http_timeout": "5s",
    "d365inv.max_retries": 12,
}
SETTLE_TIMEOUT = float(os.environ.get("FAILOVER_SETTLE_TIMEOUT", "120"))
SERVER_REQUEST_LIFETIME = "3s"     # only if the setting exists
N = 400                            # invoices per failover test
LATE = 40                          # async: lines loaded right before the kill
LATENCY_MS = 300                   # the mock processes a $batch, answers 300 ms later
BATCH_SIZE = 10
MAX_IN_FLIGHT = 2                  # ~65 invoices/s: the run lasts ~6 s
ASYNC_DELAY_MS = 3000              # the async standby receives WAL 3 s late
VENDOR = "V001"


# --------------------------------------------------------------------------
# helpers

def log(*args):
    print("[failover]", *args, flush=True)


def q(pg, query, args=None):
    return pg.rows(query, args)


def one(pg, query, args=None):
    return pg.value(query, args)


def load(pg, numbers, vendor=VENDOR):
    """One inbox line per invoice number, in one transaction."""
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(
                cur, "INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date,"
                     " amount, currency) VALUES %s",
                [(vendor, n, "2024-01-15", "%d.25" % (100 + i), "EUR") for i, n in enumerate(numbers)])
    finally:
        conn.close()


def ingest_all(pg, n):
    """ingest() the inbox (the worker may have done it first: it ingests
    every round, whatever the target); wait for n invoices."""
    q(pg, "SELECT * FROM d365inv.ingest()")
    assert wait_for(lambda: one(pg, "SELECT count(*) FROM d365inv.inbox") == 0
                    and one(pg, "SELECT count(*) FROM d365inv.invoice") == n, timeout=20), \
        (one(pg, "SELECT count(*) FROM d365inv.inbox"), status_counts(pg))


def ckey(vendor, number):
    """The mock's counter key: normalised like D365 compares keys."""
    return "%s|%s" % (vendor.strip().lower(), number.strip().lower())



def set_target(pg, **cols):
    sets = ", ".join("%s = %%s" % k for k in cols)
    q(pg, "UPDATE d365inv.target SET %s WHERE name = 'default'" % sets, tuple(cols.values()))


def status_counts(pg):
    return {r["status"]: r["n"] for r in q(
        pg, "SELECT status::text, count(*) AS n FROM d365inv.invoice GROUP BY 1 ORDER BY 1")}


def has_setting(pg, name):
    return one(pg, "SELECT count(*) FROM pg_settings WHERE name = %s", (name,)) == 1


def has_entity_id_mode(pg):
    return one(pg, "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'd365inv'"
                   " AND table_name = 'target' AND column_name = 'entity_id_mode'") == 1


def error_of(pg, query, args=None):
    """(message, seconds) of a statement that is expected to fail; message is
    None if it succeeded."""
    conn = pg.connect()
    t0 = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            if cur.description:
                cur.fetchall()
        return None, time.monotonic() - t0
    except psycopg2.Error as e:
        return (e.pgerror or str(e)).strip(), time.monotonic() - t0
    finally:
        conn.close()


# --------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def mock_server():
    with MockD365(unique=False, latency_ms=LATENCY_MS) as m:
        yield m


@pytest.fixture
def mock(mock_server):
    mock_server.reset()
    yield mock_server


@pytest.fixture
def primary(mock):
    """A fresh primary per test (the failover tests kill it); its cleanup
    also removes its standbys."""
    with Cluster(CONF) as pg:
        pg.wait_for_worker()
        if has_setting(pg, "d365inv.server_request_lifetime"):
            pg.sql("ALTER SYSTEM SET d365inv.server_request_lifetime = %s",
                   (SERVER_REQUEST_LIFETIME,), dbname="postgres")
            if one(pg, "SELECT context FROM pg_settings"
                       " WHERE name = 'd365inv.server_request_lifetime'") == "postmaster":
                pg.restart()
            else:
                pg.sql("SELECT pg_reload_conf()", dbname="postgres")
        set_target(pg, service_root=mock.service_root, batch_size=BATCH_SIZE,
                   max_in_flight=MAX_IN_FLIGHT, preflight="in_doubt", write_mode="create",
                   enabled=False)
        yield pg


# --------------------------------------------------------------------------
# 0. the harness itself

def test_harness_standby_streams_lags_and_promotes(primary):
    """What the failover tests rely on: a sync standby has every commit when
    it returns; a delayed one receives WAL late and loses what was held when
    the primary dies; promotion works; the promoted server starts the worker."""
    assert primary.value("SELECT count(*) FROM pg_hba_file_rules WHERE type = 'local'"
                         " AND 'replication' = ANY(database) AND auth_method = 'trust'") >= 1
    sync = primary.standby(sync=True)
    lagging = primary.standby(delay_ms=ASYNC_DELAY_MS)
    late_apply = primary.standby(apply_delay_ms=ASYNC_DELAY_MS)
    for sb in (sync, lagging, late_apply):
        assert sb.in_recovery() and sb.worker_pid() is None

    q(primary, "CREATE TABLE public.t (x int)")
    q(primary, "INSERT INTO public.t VALUES (1)")
    assert one(sync, "SELECT count(*) FROM public.t") == 1          # synchronous: already there
    t0 = time.monotonic()
    lagging.wait_replayed(timeout=20)
    took = time.monotonic() - t0
    assert took >= ASYNC_DELAY_MS / 1000 * 0.8, "replayed after %.2f s" % took
    late_apply.wait_replayed(timeout=20)

    q(primary, "INSERT INTO public.t VALUES (2)")
    lsn = primary.current_lsn()
    assert wait_for(lambda: late_apply.value("SELECT pg_last_wal_receive_lsn() >= %s::pg_lsn",
                                             (lsn,)), timeout=5)
    assert one(late_apply, "SELECT count(*) FROM public.t") == 1     # received, not applied
    primary.kill_immediate()            # row 2 was still held for the lagging standby
    for sb in (sync, lagging, late_apply):
        sb.promote()
        assert not sb.in_recovery()
    assert one(sync, "SELECT count(*) FROM public.t") == 2
    assert one(lagging, "SELECT count(*) FROM public.t") == 1, "the delayed WAL was not dropped"
    assert lagging.relay.dropped_bytes > 0
    # recovery_min_apply_delay: promotion applies all that was received
    assert one(late_apply, "SELECT count(*) FROM public.t") == 2
    for sb in (sync, lagging, late_apply):
        sb.wait_for_worker()
    q(sync, "INSERT INTO public.t VALUES (3)")      # no synchronous standby left to wait for


# --------------------------------------------------------------------------
# 1. a standby sends nothing, and says so

def test_standby_worker_idles_and_submit_says_recovery(primary, mock):
    numbers = ["SB-%03d" % i for i in range(20)]
    load(primary, numbers)
    ingest_all(primary, 20)
    # the primary's worker must not send them either: hold their row locks
    # (the claim skips locked rows), then enable the target
    holder = primary.connect()
    holder.autocommit = False
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM d365inv.invoice FOR UPDATE")
        set_target(primary, enabled=True)
        sb = primary.standby()
        sb.wait_replayed()
        assert one(sb, "SELECT count(*) FROM d365inv.invoice WHERE status = 'pending'") == 20
        assert one(sb, "SELECT enabled FROM d365inv.target WHERE name = 'default'") is True

        # a few of the worker's rounds (naptime 300 ms) with due invoices
        time.sleep(3)
        workers = q(sb, "SELECT pid, backend_type FROM pg_stat_activity"
                        " WHERE backend_type LIKE 'd365inv%%'")
        assert workers == [], "a d365inv process runs on the standby: %s" % workers
        assert mock.requests() == [], "something was sent while the invoices were only pending" \
                                      " on the standby"

        msg, _ = error_of(sb, "SELECT d365inv.d365inv_submit()")
        log("standby: d365inv_submit() ->", msg)
        assert msg is not None, "d365inv_submit() succeeded on a standby"
        assert "cannot execute LOCK TABLE during recovery" not in msg, msg
        assert "recovery" in msg, msg

        msg, took = error_of(sb, "SELECT * FROM d365inv.d365inv_submit(wait => '2 s')")
        log("standby: d365inv_submit(wait => '2 s') -> %r after %.2f s" % (msg, took))
        assert msg is not None, "d365inv_submit(wait) returned on a standby (after %.2f s)" % took
        assert took < 1.5, "d365inv_submit(wait) waited %.2f s on a standby: %s" % (took, msg)
        assert "recovery" in msg, msg
        assert mock.requests() == []
    finally:
        holder.rollback()
        holder.close()


# --------------------------------------------------------------------------
# 2. failover while batches are in flight

def run_failover(primary, mock, sb, mode, kill_at_created, late=0):
    """Load N invoices (replicated before anything is sent), enable the
    target, kill the primary -m immediate once kill_at_created are created
    and batches are in flight, promote sb and let its worker settle.
    late > 0: that many more lines are loaded on the primary just before the
    kill.  Returns what happened, for the assertions and the report."""
    if mode == "client":
        if not has_entity_id_mode(primary):
            pytest.skip("target.entity_id_mode does not exist yet (client-chosen entity ids)")
        if "client_keys" not in mock.config():
            pytest.skip("the mock has no client_keys setting yet (client-chosen primary keys)")
        mock.configure(client_keys=True)        # D365 keeps the id the body chooses
        set_target(primary, entity_id_mode="client")
    numbers = ["FO-%04d" % i for i in range(N)]
    late_numbers = ["LATE-%03d" % i for i in range(late)]
    load(primary, numbers)
    ingest_all(primary, N)
    sb.wait_replayed(timeout=30)
    assert one(sb, "SELECT count(*) FROM d365inv.invoice") == N

    set_target(primary, enabled=True)
    q(primary, "SELECT d365inv.d365inv_submit()")          # wake the worker now
    t_enable = time.monotonic()
    # the new primary must know the target is enabled
    assert wait_for(lambda: one(sb, "SELECT enabled FROM d365inv.target WHERE name = 'default'"),
                    timeout=30)

    def in_flight_now():
        c = status_counts(primary)
        return c if c.get("created", 0) >= kill_at_created and c.get("in_flight", 0) > 0 else None
    at_kill = wait_for(in_flight_now, timeout=60, interval=0.02)
    assert at_kill, "never saw %d created with batches in flight: %s" % (
        kill_at_created, status_counts(primary))
    if late:
        # lines loaded within the lag; the old primary creates some of them
        load(primary, late_numbers)
        q(primary, "SELECT d365inv.d365inv_submit()")         # ingests them, wakes the worker
        t_late = time.monotonic()

        def late_in_flight():
            c = {("late " if r["late"] else "") + r["status"]: r["n"] for r in q(
                primary, "SELECT invoice_number LIKE 'LATE-%%' AS late, status::text,"
                         " count(*) AS n FROM d365inv.invoice GROUP BY 1, 2 ORDER BY 1, 2")}
            return c if c.get("late created", 0) >= late // 4 and c.get("late in_flight", 0) > 0 \
                else None
        at_kill = wait_for(late_in_flight, timeout=20, interval=0.02)
        assert at_kill, "the old primary never created %d of the late lines: %s" % (
            late // 4, late_in_flight())
        log("%s: the kill comes %.2f s after the late lines' load" % (
            mode, time.monotonic() - t_late))
    primary.kill_immediate()
    t_kill = time.monotonic()
    mock_before = sum(mock.counts().values())
    log("%s: killed the primary %.2f s after enabling; primary had %s; mock had %d creations"
        % (mode, t_kill - t_enable, at_kill, mock_before))
    at_promotion_mock = mock.counts()

    sb.promote()
    at_promotion = status_counts(sb)
    log("%s: promoted after %.2f s; just after, the new primary has %s" % (
        mode, time.monotonic() - t_kill, at_promotion))
    sb.wait_for_worker()
    settled = wait_for(lambda: one(sb, "SELECT count(*) FROM d365inv.invoice WHERE status < 'created'")
                       + one(sb, "SELECT count(*) FROM d365inv.inbox") == 0,
                       timeout=SETTLE_TIMEOUT, interval=0.2)
    took = time.monotonic() - t_kill
    final = status_counts(sb)
    log("%s: settled=%s %.1f s after the kill: %s" % (mode, bool(settled), took, final))
    rows = q(sb, "SELECT *, status::text AS status FROM d365inv.invoice ORDER BY id")
    counts = mock.counts()
    mock_ids = {}
    for e in mock.entities():
        mock_ids.setdefault(ckey(e["VendorAccount"], e["InvoiceNumber"]), []).append(e["InvoiceId"])
    return {
        "numbers": numbers, "late_numbers": late_numbers, "at_kill": at_kill,
        "at_promotion": at_promotion, "final": final, "settled": bool(settled),
        "settle_seconds": took, "rows": rows, "counts": counts,
        "mock_at_promotion": at_promotion_mock, "mock_ids": mock_ids,
        "settled_by": dict(Counter((r["status"], r["settled_by"]) for r in rows)),
        "server_log_tail": [l for l in sb.server_log().splitlines()
                            if "d365inv" in l or "ERROR" in l or "WARNING" in l][-30:],
    }


def odd_rows(res, n=3):
    """A few rows not settled as 'created' by D365's answer: what the new
    primary recorded, and the ids D365 has for the key."""
    out = []
    for r in res["rows"]:
        if (r["status"], r["settled_by"]) != ("created", "response"):
            k = ckey(r["vendor_account"], r["invoice_number"])
            out.append({"invoice": r["invoice_number"], "status": r["status"],
                        "settled_by": r["settled_by"], "attempts": r["attempts"],
                        "entity_id": r.get("entity_id"), "d365_id": r["d365_id"],
                        "last_error": r["last_error"], "d365_has": res["mock_ids"].get(k)})
    by_kind = {}
    for o in out:
        by_kind.setdefault((o["status"], o["settled_by"]), []).append(o)
    return {"%s/%s" % k: v[:n] for k, v in by_kind.items()}


def summary(res):
    doubles = {k: c for k, c in res["counts"].items() if c > 1}
    return ("double posts: %d keys (%s...); at kill (old primary): %s; just after promotion "
            "(new primary, its worker may have started): %s; final: %s; (status, settled_by): %s; settled in %.1f s: %s; "
            "rows not created by a response, e.g.: %s"
            % (len(doubles), sorted(doubles)[:5], res["at_kill"], res["at_promotion"],
               res["final"], res["settled_by"], res["settle_seconds"], res["settled"],
               odd_rows(res)))


def report(res, label):
    doubles = {k: c for k, c in res["counts"].items() if c > 1}
    log("%s: %s" % (label, summary(res)))
    if doubles:
        log("%s: %d keys created twice or more, e.g. %s" % (
            label, len(doubles), sorted(doubles.items())[:10]))
        log("%s: the new primary's log:\n  %s" % (label, "\n  ".join(res["server_log_tail"])))
    return doubles


@pytest.mark.parametrize("mode", ["server", "client"])
def test_failover_sync_no_double_post_none_lost(primary, mock, mode):
    sb = primary.standby(sync=True)
    res = run_failover(primary, mock, sb, mode, kill_at_created=60)
    doubles = report(res, "sync/" + mode)
    msg = summary(res)
    assert res["settled"], "not settled within %.0f s: %s" % (SETTLE_TIMEOUT, msg)
    assert doubles == {}, msg
    want = {ckey(VENDOR, n) for n in res["numbers"]}
    lost = sorted(want - set(res["counts"]))
    assert lost == [], "%d invoices never created in D365, e.g. %s; %s" % (len(lost), lost[:10], msg)
    assert set(res["counts"]) == want, msg
    assert len(res["rows"]) == N, msg
    assert set(res["final"]) <= {"created", "duplicate"}, msg
    if mode == "client":
        # a lookup hit with our own id is our invoice: created, not duplicate
        assert res["final"] == {"created": N}, msg


@pytest.mark.parametrize("mode", ["server", "client"])
def test_failover_async_lagging_standby_no_double_post(primary, mock, mode):
    sb = primary.standby(delay_ms=ASYNC_DELAY_MS)
    res = run_failover(primary, mock, sb, mode, kill_at_created=N - 60, late=LATE)
    doubles = report(res, "async/" + mode)
    msg = summary(res)
    on_standby = {ckey(r["vendor_account"], r["invoice_number"]) for r in res["rows"]}
    late_keys = {ckey(VENDOR, n) for n in res["late_numbers"]}
    early_keys = {ckey(VENDOR, n) for n in res["numbers"]}
    missing = sorted((late_keys | early_keys) - on_standby)
    created_unknown = sorted(k for k in res["counts"] if k not in on_standby)
    loss = ("missing on the new primary: %d of %d lines (%d of the %d loaded within the lag, "
            "%d of the %d replicated before sending); of those, %d created in D365 by the old "
            "primary (D365 has them, the new primary does not know them)"
            % (len(missing), N + LATE, len(set(missing) & late_keys), LATE,
               len(set(missing) & early_keys), N, len(created_unknown)))
    log("async/%s: %s; WAL dropped by the relay at the kill: %d bytes"
        % (mode, loss, sb.relay.dropped_bytes))
    msg += "; " + loss
    assert res["settled"], "not settled within %.0f s: %s" % (SETTLE_TIMEOUT, msg)
    assert doubles == {}, msg
    # what had reached the standby before anything was sent is never lost
    assert set(missing) <= late_keys, msg
    assert early_keys <= set(res["counts"]), msg
    assert set(res["final"]) <= {"created", "duplicate"}, msg
    if mode == "client":
        assert res["final"].get("duplicate", 0) == 0, msg


# --------------------------------------------------------------------------
# 3. the lines an asynchronous failover lost, loaded again

@pytest.mark.parametrize("mode,preflight", [("server", "in_doubt"), ("server", "always"),
                                            ("client", "in_doubt")])
def test_async_failover_reloading_lost_lines_posts_none_twice(primary, mock, mode, preflight):
    """The README's advice for what asynchronous replication lost: load it
    again.  Some of those lines were created in D365 by the old primary
    (the kill comes after it created some of them), and the new primary has
    no trace of them (no row, no remote_key).  Loading them again must not
    create them a second time."""
    sb = primary.standby(delay_ms=ASYNC_DELAY_MS)
    res = run_failover(primary, mock, sb, mode, kill_at_created=N - 60, late=LATE)
    assert res["settled"], summary(res)
    on_standby = {ckey(r["vendor_account"], r["invoice_number"]) for r in res["rows"]}
    lost = [n for n in res["late_numbers"] if ckey(VENDOR, n) not in on_standby]
    in_d365 = [n for n in lost if ckey(VENDOR, n) in res["counts"]]
    log("async/%s/%s: %d lines lost in the failover, %d of them in D365" % (
        mode, preflight, len(lost), len(in_d365)))
    assert in_d365, "the old primary created none of the late lines: nothing to test"

    set_target(sb, preflight=preflight)
    load(sb, lost)
    q(sb, "SELECT d365inv.d365inv_submit()")
    assert wait_for(lambda: one(sb, "SELECT count(*) FROM d365inv.invoice WHERE status < 'created'")
                    + one(sb, "SELECT count(*) FROM d365inv.inbox") == 0,
                    timeout=SETTLE_TIMEOUT, interval=0.2), status_counts(sb)
    counts = mock.counts()
    twice = sorted(n for n in lost if counts.get(ckey(VENDOR, n), 0) > 1)
    reloaded = q(sb, "SELECT invoice_number, status::text AS status, settled_by, last_http_status"
                     " FROM d365inv.invoice WHERE invoice_number LIKE 'LATE-%%'")
    how = dict(Counter((r["invoice_number"] in in_d365, r["status"], r["settled_by"],
                        r["last_http_status"]) for r in reloaded))
    msg = ("%d of the %d reloaded lines (%d of them already in D365) posted twice, e.g. %s; "
           "(already in D365, status, settled_by, last HTTP status): %s"
           % (len(twice), len(lost), len(in_d365), twice[:5], how))
    log("async/%s/%s: %s" % (mode, preflight, msg))
    assert twice == [], msg
    assert all(counts.get(ckey(VENDOR, n)) == 1 for n in lost), msg
