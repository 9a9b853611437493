"""pg_dump and pg_restore keep what d365inv holds, and a restored copy of the
data posts nothing twice: invoices that were in flight (or pending) when the
dump was taken may have been sent by the server they were dumped from, so
the worker looks them up before anything is sent."""
import os
import subprocess
import time

from mockctl import MockD365
from pgcluster import Cluster, PG_BIN, wait_for

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.naptime": "200ms",
}



def load(pg, rows):
    conn = pg.connect()
    with conn.cursor() as cur:
        for r in rows:
            cur.execute("INSERT INTO d365inv.inbox (target, vendor_account, invoice_number, invoice_date,"
                        " amount) VALUES (%s, %s, %s, %s, %s)", r)
    conn.close()


def snapshot(pg):
    return {
        "targets": pg.rows("SELECT name, service_root, batch_size, entity_id_mode, created_at"
                           " FROM d365inv.target ORDER BY name"),
        "invoices": pg.rows("SELECT id, target, vendor_account, invoice_number, status::text, d365_id,"
                            " line_id FROM d365inv.invoice ORDER BY id"),
        "duplicates": pg.value("SELECT count(*) FROM d365inv.duplicate"),
        "rejects": pg.value("SELECT count(*) FROM d365inv.reject"),
        "remote_keys": pg.value("SELECT count(*) FROM d365inv.remote_key"),
        "audit": pg.value("SELECT count(*) FROM d365inv.status_change"),
        "batch_log": pg.value("SELECT count(*) FROM d365inv.batch_log"),
        # the counters are not dumped: the restore counts the rows it loads
        "tally": pg.rows("SELECT counted, target, status::text, sum(n)::int AS n FROM d365inv.tally"
                         " GROUP BY 1, 2, 3 HAVING sum(n) <> 0 ORDER BY 1, 2, 3"),
        "dup_rate": pg.rows("SELECT target, received, queued, rejected, ingest_duplicates, d365_duplicates"
                            " FROM d365inv.duplicate_rate WHERE period = 'all' ORDER BY 1"),
    }


def test_dump_and_restore_keeps_everything_and_posts_nothing_twice(tmp_path):
    with Cluster(CONF) as pg, MockD365(unique=False) as mock:
        pg.wait_for_worker()
        pg.sql("UPDATE d365inv.target SET service_root = %s, batch_size = 10", (mock.service_root,))
        pg.sql("INSERT INTO d365inv.target (name, service_root, batch_size) VALUES ('north', %s, 5)",
               (mock.service_root,))
        load(pg, [("default", "V1", "BK-%d" % i, "2024-01-15", "1") for i in range(30)] +
             [("north", "V2", "NB-%d" % i, "2024-01-15", "1") for i in range(5)] +
             [("default", "v1 ", "bk-1", "2024-01-15", "1"), ("default", "V1", "BAD", "no date", "1")])
        assert pg.rows("SELECT * FROM d365inv.d365inv_submit(wait => '20 s')") == [
            {"status": "created", "invoices": 35}, {"status": "ingest_duplicate", "invoices": 1},
            {"status": "ingest_reject", "invoices": 1}]

        # the moment of the dump: 10 invoices in flight (their requests reached
        # D365: the mock has them) and 10 pending, the worker kept out
        pg.sql("UPDATE d365inv.target SET enabled = false")
        load(pg, [("default", "V1", "FL-%d" % i, "2024-01-15", "1") for i in range(20)])
        pg.sql("SELECT d365inv.ingest()")
        mock.seed_entities([{"VendorAccount": "V1", "InvoiceNumber": "FL-%d" % i} for i in range(10)])
        pg.sql("UPDATE d365inv.invoice SET status = 'in_flight'"
               " WHERE invoice_number IN (%s)" % ", ".join("'FL-%d'" % i for i in range(10)))
        before = snapshot(pg)
        dump = str(tmp_path / "d365.dump")
        subprocess.run([os.path.join(PG_BIN, "pg_dump"), "-Fc", "-h", pg.dir, "-U", "postgres",
                        "-f", dump, pg.dbname], check=True)

        # the database is lost and restored from the dump, the worker running
        pg.sql('DROP DATABASE "%s"' % pg.dbname, dbname="postgres")
        pg.sql('CREATE DATABASE "%s"' % pg.dbname, dbname="postgres")
        subprocess.run([os.path.join(PG_BIN, "pg_restore"), "-h", pg.dir, "-U", "postgres",
                        "-d", pg.dbname, "--exit-on-error", dump], check=True)
        after = snapshot(pg)
        assert after == before
        assert {(r["counted"], r["status"]): r["n"] for r in after["tally"] if r["target"] == "default"} == {
            ("invoice", "created"): 30, ("invoice", "pending"): 10, ("invoice", "in_flight"): 10,
            ("duplicate", None): 1, ("reject", None): 1}

        pg.sql("UPDATE d365inv.target SET enabled = true")
        pg.sql("SELECT d365inv.d365inv_submit()")
        # the housekeeping (every minute) sees the dumped server's row
        assert wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice"
                                         " WHERE status < 'created'") == 0, timeout=100), \
            pg.rows("SELECT status::text, count(*) FROM d365inv.invoice GROUP BY 1")
        rows = {r["invoice_number"]: r for r in pg.rows(
            "SELECT invoice_number, status::text, settled_by FROM d365inv.invoice")}
        assert all(rows["FL-%d" % i]["status"] == "created" and rows["FL-%d" % i]["settled_by"] == "lookup"
                   for i in range(10)), rows
        assert all(rows["FL-%d" % i]["status"] == "created" for i in range(10, 20))
        counts = mock.counts()          # POSTs; the 10 seeded ones are not counted
        assert {k: v for k, v in counts.items() if v > 1} == {}
        assert len(counts) == 45 and not any(k.startswith("v1|fl-") and int(k[6:]) < 10 for k in counts)
        states = pg.rows("SELECT handled_at IS NOT NULL AS handled, promoted_at IS NOT NULL AS took_over"
                         " FROM d365inv.worker_state ORDER BY first_seen")
        assert {"handled": True, "took_over": False} in states
        assert {"handled": False, "took_over": True} in states

        # sequences came along: new lines and invoices get new numbers
        load(pg, [("default", "V1", "NEW-1", "2024-01-15", "1")])
        pg.sql("SELECT d365inv.ingest()")
        new = pg.rows("SELECT id, line_id FROM d365inv.invoice WHERE invoice_number = 'NEW-1'")[0]
        assert new["id"] > max(r["id"] for r in before["invoices"])
        assert new["line_id"] > max(r["line_id"] for r in before["invoices"])
