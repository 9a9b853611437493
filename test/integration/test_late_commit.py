"""Exactly once when D365 commits late, and the limits servers impose.

The mock D365 holds some $batch requests (fault "hold") longer than
d365inv.http_timeout before it sees them, then commits them although the
client gave up: the fault that made 120 invoices 150 rows on a real server.
With uniqueness off in the mock, a second create is a second entity, so the
per-key counters show every double post.

- entity_id_mode 'server': resends are time-fenced (server_request_lifetime);
- entity_id_mode 'client': deterministic ids collide on the mock's primary
  key, so resends are harmless and need no fence;
- HTTP 413 splits a batch; a relative @odata.nextLink is followed;
- refresh_remote_keys_by_page() commits page by page, so the worker is not
  held up by it, and resumes a pass that was interrupted.
"""
import threading
import time
import uuid

import psycopg2
import pytest

from mockctl import MockD365
from pgcluster import Cluster

NAMESPACE = uuid.UUID("903a952f-c780-4fa0-b3c9-f44d930299b8")   # src/entity_id.c
HOLD_MS = 3000
CONF = {
    "d365inv.in_doubt_delay": "500ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "200ms",
    "d365inv.http_timeout": "1s",
    "d365inv.max_retries": 5,
    # longer than the mock ever holds a request
    "d365inv.server_request_lifetime": "5s",
}


@pytest.fixture(scope="module")
def pg():
    with Cluster(CONF) as cluster:
        cluster.wait_for_worker()
        yield cluster


def reset(pg, mock, **target):
    pg.truncate("d365inv.invoice", "d365inv.batch_log", "d365inv.remote_key", "d365inv.duplicate",
                "d365inv.reject", "d365inv.inbox")
    cols = dict(service_root=mock.service_root, batch_size=10, max_in_flight=4, preflight="in_doubt",
                entity_id_mode="server", write_mode="create")
    cols.update(target)
    pg.sql("UPDATE d365inv.target SET %s WHERE name = 'default'" % ", ".join("%s = %%s" % k for k in cols),
           tuple(cols.values()))


def load(pg, n, prefix):
    pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
           " SELECT 'V001', %s || '-' || i, '2024-01-15', '1' FROM generate_series(1, %s) i", (prefix, n))
    pg.sql("SELECT d365inv.d365inv_submit()")


def settle(pg, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg.value("SELECT count(*) FROM d365inv.invoice WHERE status < 'created'") == 0:
            break
        time.sleep(0.2)
    return {r["status"]: r["n"] for r in pg.rows(
        "SELECT status::text, count(*) AS n FROM d365inv.invoice GROUP BY 1")}


def double_posts(mock):
    return {k: n for k, n in mock.counts().items() if n > 1}


# --------------------------------------------------------------------------
# late commits

def test_server_mode_waits_out_the_fence_and_posts_nothing_twice(pg):
    with MockD365(unique=False, hold_ms=HOLD_MS) as mock:
        reset(pg, mock)
        mock.configure(fault_next={"hold": 3})
        load(pg, 100, "LS")
        assert settle(pg) == {"created": 100}
        held = mock.wait_holds_over()
        assert held["held"] == 3 and held["abandoned"] == 3, held
        assert double_posts(mock) == {}
        assert len(mock.counts()) == 100
        rows = pg.rows("SELECT settled_by, count(*) AS n, max(attempts) AS attempts"
                       " FROM d365inv.invoice GROUP BY 1 ORDER BY 1")
        # the held batches' invoices were found by a lookup after the fence
        assert rows == [{"settled_by": "lookup", "n": 30, "attempts": 1},
                        {"settled_by": "response", "n": 70, "attempts": 1}], rows
        # a lookup before the fence left them in doubt; none was resent
        assert pg.value("SELECT count(*) FROM d365inv.batch_log WHERE kind <> 'lookup'") == 10


def test_without_the_fence_the_same_fault_posts_twice(pg):
    """The control: the test above catches the double post when the fence is off."""
    with MockD365(unique=False, hold_ms=HOLD_MS) as mock:
        reset(pg, mock)
        pg.sql("ALTER SYSTEM SET d365inv.server_request_lifetime = 0")
        pg.sql("SELECT pg_reload_conf()")
        try:
            time.sleep(0.5)
            mock.configure(fault_next={"hold": 1})
            load(pg, 10, "LX")
            settle(pg)
            mock.wait_holds_over()
            assert len(double_posts(mock)) == 10
        finally:
            pg.sql("ALTER SYSTEM RESET d365inv.server_request_lifetime")
            pg.sql("SELECT pg_reload_conf()")
            time.sleep(0.5)


def test_client_ids_make_the_resend_harmless(pg):
    with MockD365(unique=False, client_keys=True, hold_ms=HOLD_MS) as mock:
        reset(pg, mock, entity_id_mode="client")
        # a fence this long would stall server mode for 20 minutes: client ids need none
        pg.sql("ALTER SYSTEM SET d365inv.server_request_lifetime = '20min'")
        pg.sql("SELECT pg_reload_conf()")
        try:
            time.sleep(0.5)
            mock.configure(fault_next={"hold": 3})
            load(pg, 100, "LC")
            assert settle(pg, timeout=60) == {"created": 100}
            mock.wait_holds_over()
        finally:
            pg.sql("ALTER SYSTEM RESET d365inv.server_request_lifetime")
            pg.sql("SELECT pg_reload_conf()")
        assert double_posts(mock) == {}
        ids = {e["InvoiceNumber"]: e["InvoiceId"] for e in mock.entities()}
        rows = pg.rows("SELECT invoice_number, entity_id, d365_id, settled_by FROM d365inv.invoice")
        assert len(rows) == len(ids) == 100
        for r in rows:
            expected = str(uuid.uuid5(NAMESPACE, "default\x1fv001\x1f" + r["invoice_number"].lower()))
            assert r["entity_id"] == expected == ids[r["invoice_number"]] == r["d365_id"], r


def test_client_ids_tell_someone_elses_invoice_from_ours(pg):
    with MockD365(unique=True, client_keys=True) as mock:
        reset(pg, mock, entity_id_mode="client")
        mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "LO-1",
                             "InvoiceId": "0d9c1a9e-0000-4000-8000-000000000001"}])
        load(pg, 3, "LO")
        assert settle(pg) == {"created": 2, "duplicate": 1}
        row = pg.rows("SELECT status::text, settled_by, d365_id, last_error FROM d365inv.invoice"
                      " WHERE invoice_number = 'LO-1'")[0]
        assert row["status"] == "duplicate" and row["settled_by"] == "lookup"
        assert row["d365_id"] == "0d9c1a9e-0000-4000-8000-000000000001"
        assert "created by someone else" in row["last_error"]


def test_entity_id_forms():
    """UUID v5 as RFC 9562 computes it; base32 of the same SHA-1 for string keys."""
    with Cluster(CONF, dbname="ids") as pg:
        guid = pg.value("SELECT d365inv.entity_id('t', 'v1', 'i1')")
        assert guid == str(uuid.uuid5(NAMESPACE, "t\x1fv1\x1fi1"))
        s = pg.value("SELECT d365inv.entity_id('t', 'v1', 'i1', 'string', 20)")
        import base64
        import hashlib
        digest = hashlib.sha1(NAMESPACE.bytes + b"t\x1fv1\x1fi1").digest()
        assert s == base64.b32encode(digest).decode()[:20]
        assert pg.value("SELECT d365inv.entity_id('t', 'v1', 'i1', 'string', 32)") == \
            base64.b32encode(digest).decode()


# --------------------------------------------------------------------------
# limits servers impose

def test_413_splits_the_batch_without_counting_attempts(pg):
    with MockD365(max_batch_operations=3) as mock:
        reset(pg, mock, batch_size=10, max_in_flight=1)
        load(pg, 12, "SP")
        assert settle(pg) == {"created": 12}
        assert pg.value("SELECT max(attempts) FROM d365inv.invoice") == 1
        assert pg.value("SELECT splits FROM d365inv.batch_health WHERE target = 'default'"
                        " AND period = '1h'") >= 2
        assert mock.stats()["too_large"] >= 2
        assert double_posts(mock) == {}


def test_413_for_one_invoice_goes_to_review(pg):
    with MockD365(max_batch_bytes=300) as mock:
        reset(pg, mock, batch_size=4, max_in_flight=1)
        load(pg, 2, "SO")
        assert settle(pg) == {"review": 2}
        errors = [r["last_error"] for r in pg.rows("SELECT last_error FROM d365inv.invoice")]
        assert all("too large for D365 even on its own" in e for e in errors), errors
        assert mock.counts() == {}


@pytest.mark.parametrize("form", ["relative", "absolute_path"])
def test_relative_next_links_are_followed(pg, form):
    with MockD365(page_size=5, next_link_form=form) as mock:
        reset(pg, mock, preflight="always")
        mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "NL-%d" % i} for i in range(1, 13)])
        assert pg.value("SELECT d365inv.refresh_remote_keys('default')") == 12
        load(pg, 14, "NL")
        assert settle(pg) == {"duplicate": 12, "created": 2}


def test_next_link_to_another_origin_is_refused(pg):
    with MockD365(page_size=5, next_link_form="other_origin") as mock:
        reset(pg, mock)
        mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "NO-%d" % i} for i in range(1, 13)])
        with pytest.raises(Exception) as err:
            pg.value("SELECT d365inv.refresh_remote_keys('default')")
        assert "links to another host" in str(err.value)


def test_numeric_ids_read_the_same_by_lookup_and_refresh(pg):
    """An id property D365 sends as a JSON number becomes the same text
    whether a lookup or refresh_remote_keys() reads it (src/odata_page.c),
    and the text the create path would write (classify_json_number): they
    used to differ beyond 2^53 (%.0f against %.17g, and an out-of-range
    int64 cast)."""
    nums = {"num-1": (12345678901234567890, "1.2345678901234567e+19"),
            "num-2": (10 ** 21, "1e+21"),
            "num-3": (5637144576, "5637144576")}
    with MockD365() as mock:
        # no refresh yet, so the key filter rules nothing out: preflight looks them up
        reset(pg, mock, preflight="always", id_property="RecNum", keys_refreshed_at=None)
        try:
            mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": k.upper(), "RecNum": n}
                                for k, (n, _) in nums.items()])
            load(pg, 3, "NUM")
            assert settle(pg) == {"duplicate": 3}
            looked_up = {r["invoice_key"]: r["d365_id"] for r in pg.rows(
                "SELECT invoice_key, d365_id FROM d365inv.invoice")}
            pg.sql("TRUNCATE d365inv.remote_key")
            assert pg.value("SELECT d365inv.refresh_remote_keys('default')") == 3
            refreshed = {r["invoice_key"]: r["d365_id"] for r in pg.rows(
                "SELECT invoice_key, d365_id FROM d365inv.remote_key WHERE source = 'refresh'")}
            expected = {k: text for k, (_, text) in nums.items()}
            assert looked_up == expected and refreshed == expected, (looked_up, refreshed)
        finally:
            pg.sql("UPDATE d365inv.target SET id_property = DEFAULT WHERE name = 'default'")


# --------------------------------------------------------------------------
# refresh_remote_keys_by_page(): a transaction per page, resumable

class Refresh(threading.Thread):
    """One refresh statement on its own connection, in the background."""

    def __init__(self, pg, statement):
        super().__init__(daemon=True)
        self.conn = pg.connect()
        self.statement = statement
        self.error = None

    def run(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute(self.statement)
        except psycopg2.Error as e:
            self.error = e

    def finish(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "the refresh did not end"
        self.conn.close()


def seed_pages(mock, prefix, n):
    mock.seed_entities([{"VendorAccount": "V001", "InvoiceNumber": "%s-%d" % (prefix, i)}
                        for i in range(1, n + 1)])


@pytest.mark.parametrize("statement,stalls", [
    ("CALL d365inv.refresh_remote_keys_by_page('default')", False),
    # the control: the single-transaction function holds the worker up
    ("SELECT d365inv.refresh_remote_keys('default')", True)])
def test_the_worker_records_outcomes_while_a_refresh_pages_through_d365(pg, statement, stalls):
    """The refresh's keys of page 1 are the invoices the worker settles: its
    insert into remote_key of the same keys waited for the refresh's one
    transaction (all 30 pages), stalling every target."""
    with MockD365(page_size=5, latency_ms=300) as mock:
        reset(pg, mock, keys_refreshed_at=None)
        seed_pages(mock, "RW", 150)         # 30 pages of 0.3 s
        refresh = Refresh(pg, statement)
        refresh.start()
        try:
            time.sleep(1.2)                 # the first pages are read
            if not stalls:
                assert pg.value("SELECT count(*) FROM d365inv.remote_key") >= 5
            pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
                   " VALUES ('V001', 'RW-1', '2024-01-15', '1'), ('V001', 'RW-2', '2024-01-15', '1')")
            pg.sql("SELECT d365inv.d365inv_submit()")
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and pg.value(
                    "SELECT count(*) FROM d365inv.invoice WHERE status >= 'created'") < 2:
                time.sleep(0.1)
            settled = pg.value("SELECT count(*) FROM d365inv.invoice WHERE status >= 'created'")
            assert refresh.is_alive(), "the refresh ended before the check: make it longer"
            assert settled == (0 if stalls else 2)
        finally:
            refresh.finish()
        assert refresh.error is None, refresh.error
        final = settle(pg)
        if stalls:
            # a POST slower than http_timeout on a busy machine goes in_doubt
            # and a lookup then settles it as created: either is fine here
            assert sum(final.values()) == 2 and set(final) <= {"duplicate", "created"}, final
        else:
            # the refresh's committed keys settle them without a request
            assert final == {"duplicate": 2}
            assert pg.value("SELECT count(*) FROM d365inv.invoice WHERE settled_by = 'cache'") == 2
        assert pg.value("SELECT count(*) FROM d365inv.remote_key") == 150
        assert pg.value("SELECT keys_refreshed_at IS NOT NULL FROM d365inv.target WHERE name = 'default'")


def test_a_cancelled_refresh_resumes_and_claims_every_key_only_when_complete(pg):
    with MockD365(page_size=5, latency_ms=200) as mock:
        reset(pg, mock, keys_refreshed_at=None)
        seed_pages(mock, "RC", 60)          # 12 pages
        began = pg.value("SELECT clock_timestamp()")
        refresh = Refresh(pg, "CALL d365inv.refresh_remote_keys_by_page('default')")
        refresh.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pg.value("SELECT count(*) FROM d365inv.remote_key") < 15:
                time.sleep(0.05)
            refresh.conn.cancel()
        finally:
            refresh.finish()
        assert isinstance(refresh.error, psycopg2.errors.QueryCanceled), refresh.error

        # what was stored stays; nothing claims "every key" yet
        stored = pg.value("SELECT count(*) FROM d365inv.remote_key")
        assert 15 <= stored < 60
        progress = pg.rows("SELECT pages, keys, started_at FROM d365inv.remote_key_refresh")
        assert len(progress) == 1 and progress[0]["keys"] == stored == 5 * progress[0]["pages"], progress
        assert pg.value("SELECT keys_refreshed_at FROM d365inv.target WHERE name = 'default'") is None

        # inside a transaction block it cannot commit: it says so
        conn = pg.connect()
        conn.autocommit = False
        with pytest.raises(psycopg2.errors.ActiveSqlTransaction):
            conn.cursor().execute("CALL d365inv.refresh_remote_keys_by_page('default')")
        conn.close()

        # CALLed again, it goes on after the last page stored
        conn = pg.connect()
        conn.cursor().execute("CALL d365inv.refresh_remote_keys_by_page('default')")
        notices = "".join(conn.notices)
        conn.close()
        assert "resuming the pass begun at" in notices and "after page %d" % progress[0]["pages"] in notices
        keys = {r["invoice_key"] for r in pg.rows("SELECT invoice_key FROM d365inv.remote_key")}
        assert keys == {"rc-%d" % i for i in range(1, 61)}
        assert pg.value("SELECT count(*) FROM d365inv.remote_key_refresh") == 0
        # complete as of when the pass began, not when it ended
        refreshed = pg.value("SELECT keys_refreshed_at FROM d365inv.target WHERE name = 'default'")
        assert refreshed == progress[0]["started_at"] and began <= refreshed

        # restart => true reads from the first page again
        pg.sql("UPDATE d365inv.target SET keys_refreshed_at = NULL WHERE name = 'default'")
        pg.sql("DELETE FROM d365inv.remote_key")
        pg.sql("CALL d365inv.refresh_remote_keys_by_page('default', restart => true)")
        assert pg.value("SELECT count(*) FROM d365inv.remote_key") == 60
        assert pg.value("SELECT keys_refreshed_at > %s FROM d365inv.target WHERE name = 'default'",
                        (refreshed,))
