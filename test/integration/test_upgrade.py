"""ALTER EXTENSION d365inv UPDATE from 0.1 (the script as it was released) to
0.2, with invoices in every state: nothing is lost, the worker refuses the
old schema with a clear message and carries on after the update, and an
upgraded database has the same objects as a fresh 0.2 install."""
import time

import psycopg2
import pytest

from mockctl import MockD365
from pgcluster import Cluster, wait_for

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.naptime": "200ms",
}



def objects(pg, dbname=None):
    """Every member of the extension with its definition-level identity."""
    return pg.rows("""
        SELECT pg_describe_object(classid, objid, objsubid) AS object
        FROM pg_depend WHERE refclassid = 'pg_extension'::regclass
          AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'd365inv')
          AND deptype = 'e'
        ORDER BY 1""", dbname=dbname)


def columns(pg, dbname=None):
    return pg.rows("""
        SELECT table_name, column_name, data_type, column_default, is_nullable
        FROM information_schema.columns WHERE table_schema = 'd365inv'
        ORDER BY table_name, column_name""", dbname=dbname)


def test_update_from_0_1_keeps_every_invoice_and_the_worker_carries_on():
    with Cluster(CONF, extension=False) as pg, MockD365() as mock:
        pg.sql("CREATE EXTENSION d365inv VERSION '0.1'")
        pg.sql("UPDATE d365inv.target SET service_root = %s", (mock.service_root,))
        # invoices as a 0.1 installation has them: settled, open, reviewed;
        # one key with a byte-order mark, which 0.2 trims
        pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, payload)"
               " SELECT 'V1', 'UP-' || i, '2024-01-15', '1.50', '{\"Qty\": 12345678901234567890.5}'"
               " FROM generate_series(1, 40) i")
        pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
               " VALUES (E'\\uFEFFV2', 'BOM-1', '2024-01-15', '2')")
        assert pg.rows("SELECT * FROM d365inv.ingest()") == [{"queued": 41, "duplicates": 0, "rejected": 0}]
        pg.sql("UPDATE d365inv.invoice SET status = 'created', d365_id = 'old-' || id,"
               " settled_by = 'response', settled_at = now() WHERE invoice_number IN ('UP-1', 'UP-2')")
        pg.sql("UPDATE d365inv.invoice SET status = 'review', last_error = 'HTTP 400: x'"
               " WHERE invoice_number = 'UP-3'")
        before = pg.rows("SELECT id, status::text, vendor_key, invoice_key FROM d365inv.invoice ORDER BY id")

        # the 0.2 library leaves a 0.1 schema alone, and says why
        pg.wait_for_worker()
        with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState) as err:
            pg.sql("SELECT d365inv.d365inv_submit()")
        assert "ALTER EXTENSION d365inv UPDATE" in str(err.value)
        assert wait_for(lambda: "has the extension at version 0.1: nothing is delivered" in pg.server_log())
        assert mock.counts() == {}

        pg.sql("ALTER EXTENSION d365inv UPDATE")
        assert pg.value("SELECT extversion FROM pg_extension WHERE extname = 'd365inv'") == "0.2"
        after = pg.rows("SELECT id, status::text, vendor_key, invoice_key FROM d365inv.invoice ORDER BY id")
        assert len(after) == len(before) == 41
        # the counters 0.2 adds start from the rows there are (one
        # statement: the worker may be sending them already)
        assert pg.rows("SELECT * FROM (SELECT target, status, sum(n) AS n FROM d365inv.tally"
                       "               WHERE counted = 'invoice' GROUP BY 1, 2 HAVING sum(n) <> 0) t"
                       " FULL JOIN (SELECT target, status, count(*) AS n FROM d365inv.invoice GROUP BY 1, 2) i"
                       "   USING (target, status)"
                       " WHERE t.n IS DISTINCT FROM i.n") == []
        assert pg.value("SELECT sum(n)::int FROM d365inv.tally WHERE counted = 'invoice'") == 41
        bom = [r for r in after if r["vendor_key"] != "v1"]
        assert [r["vendor_key"] for r in bom] == ["v2"]      # recomputed: no BOM in the key
        assert pg.value("SELECT vendor_account FROM d365inv.invoice WHERE invoice_number = 'BOM-1'") == "V2"

        pg.sql("SELECT d365inv.d365inv_submit()")
        assert wait_for(lambda: pg.value(
            "SELECT count(*) FROM d365inv.invoice WHERE status < 'created'") == 0, timeout=30)
        final = {r["status"]: r["n"] for r in pg.rows(
            "SELECT status::text, count(*) AS n FROM d365inv.invoice GROUP BY 1")}
        assert final == {"created": 40, "review": 1}
        assert pg.rows("SELECT queued, d365_duplicates FROM d365inv.duplicate_rate"
                       " WHERE target = 'default' AND period = 'all'") == [{"queued": 41, "d365_duplicates": 0}]
        assert 'd365inv_invoices{target="default",status="created"} 40' in pg.value("SELECT d365inv.metrics()")
        assert len(mock.counts()) == 38 and set(mock.counts().values()) == {1}
        body = "".join(r["body"] for r in mock.requests())
        assert '"Qty":12345678901234567890.5' in body
        # what 0.2 added is there and works after the update
        assert pg.value("SELECT count(*) FROM d365inv.worker_state") == 1
        assert pg.value("SELECT splits FROM d365inv.batch_health WHERE target = 'default'"
                        " AND period = '1h'") == 0
        pg.sql("CREATE ROLE regress_upgrade_loader LOGIN IN ROLE d365inv_loader")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            pg.rows("INSERT INTO d365inv.inbox (line_id, vendor_account) OVERRIDING SYSTEM VALUE"
                    " VALUES (1, 'x')", user="regress_upgrade_loader")


def test_an_updated_database_matches_a_fresh_install():
    with Cluster(CONF, extension=False) as pg:
        pg.sql("CREATE EXTENSION d365inv VERSION '0.1'")
        pg.sql("ALTER EXTENSION d365inv UPDATE TO '0.2'")
        pg.sql("CREATE DATABASE fresh")
        pg.sql("CREATE EXTENSION d365inv", dbname="fresh")
        assert objects(pg) == objects(pg, dbname="fresh")
        assert columns(pg) == columns(pg, dbname="fresh")
        acl = """SELECT c.relname, c.relacl::text, (SELECT array_agg(attname || ':' || attacl::text ORDER BY attname)
                                              FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL) AS cols
                 FROM pg_class c WHERE c.relnamespace = 'd365inv'::regnamespace ORDER BY 1"""
        assert pg.rows(acl) == pg.rows(acl, dbname="fresh")
        facl = """SELECT p.oid::regprocedure::text AS f, p.proacl::text, p.proconfig::text
                  FROM pg_proc p WHERE p.pronamespace = 'd365inv'::regnamespace ORDER BY 1"""
        assert pg.rows(facl) == pg.rows(facl, dbname="fresh")
        cons = """SELECT conrelid::regclass::text AS t, conname, pg_get_constraintdef(oid) AS def
                  FROM pg_constraint WHERE connamespace = 'd365inv'::regnamespace ORDER BY 1, 2"""
        assert pg.rows(cons) == pg.rows(cons, dbname="fresh")
        views = """SELECT viewname, definition FROM pg_views WHERE schemaname = 'd365inv' ORDER BY 1"""
        assert pg.rows(views) == pg.rows(views, dbname="fresh")


# --------------------------------------------------------------------------
# DROP EXTENSION

def test_drop_extension_refuses_while_invoices_are_open_and_leaves_no_schema():
    with Cluster(CONF) as pg:
        pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
               " VALUES ('V1', 'DR-1', '2024-01-15', '1'), ('V1', 'DR-2', '2024-01-15', '1')")
        pg.sql("SELECT d365inv.ingest()")       # no service_root: they stay pending
        with pytest.raises(psycopg2.errors.DependentObjectsStillExist) as err:
            pg.sql("DROP EXTENSION d365inv")
        assert "d365inv has 2 open invoices" in str(err.value)
        assert "d365inv.drop_open_invoices" in str(err.value)
        assert pg.value("SELECT count(*) FROM d365inv.invoice") == 2
        # a superuser who says so drops it, and the schema goes too
        conn = pg.connect()
        with conn.cursor() as cur:
            cur.execute("SET d365inv.drop_open_invoices = on")
            cur.execute("DROP EXTENSION d365inv")
        conn.close()
        assert pg.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'd365inv'") == 0
        # nothing open: no question asked; a schema with a user's table in it stays
        pg.sql("CREATE EXTENSION d365inv")
        pg.sql("CREATE TABLE d365inv.my_notes (t text)")
        pg.sql("DROP EXTENSION d365inv")
        assert pg.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'd365inv'") == 1
        pg.sql("DROP TABLE d365inv.my_notes")
        pg.sql("CREATE EXTENSION d365inv")
        pg.sql("DROP EXTENSION d365inv")
        assert pg.value("SELECT count(*) FROM pg_namespace WHERE nspname = 'd365inv'") == 0
