"""A 10,000-line invoice file with duplicates and malformed lines loads, and
every line is accounted for exactly once (queued, duplicate or reject).

Needs the throwaway cluster started by test/run-tests (PGHOST, PGPORT, PGUSER).
"""
import io
import os
import subprocess

import psycopg2
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "..", "..", "bench", "gen_invoices.py")
COLS = "vendor_account, invoice_number, invoice_date, amount, currency, description, payload"



def generate(n, *args):
    return subprocess.run(["/usr/bin/python3", GEN, str(n), *args], check=True,
                          capture_output=True, text=True).stdout


def copy_in(db, csv):
    with db.cursor() as cur:
        cur.copy_expert("COPY d365inv.inbox (%s) FROM STDIN (FORMAT csv, HEADER)" % COLS, io.StringIO(csv))
        cur.execute("SELECT * FROM d365inv.ingest()")
        return cur.fetchone()


def test_ten_thousand_lines_all_accounted_for(db, tmp_path):
    staged = tmp_path / "staged.csv"
    staged.write_text(generate(500, "--prefix", "PRE", "--dup-rate", "0", "--bad-rate", "0", "--seed", "3"))
    assert copy_in(db, staged.read_text()) == (500, 0, 0)

    csv = generate(10000, "--staged-file", str(staged), "--dup-rate", "0.05", "--bad-rate", "0.01")
    queued, duplicates, rejected = copy_in(db, csv)
    assert queued + duplicates + rejected == 10000
    assert 400 <= duplicates <= 600 and 50 <= rejected <= 150

    with db.cursor() as cur:
        # every line of the second load exactly once across the three tables
        cur.execute("""
            WITH placed AS (
                SELECT line_id FROM d365inv.invoice WHERE line_id > 500
                UNION ALL SELECT line_id FROM d365inv.duplicate
                UNION ALL SELECT line_id FROM d365inv.reject)
            SELECT count(*), count(DISTINCT line_id), min(line_id), max(line_id) FROM placed""")
        total, distinct, lo, hi = cur.fetchone()
        assert total == distinct == 10000
        assert hi - lo == 9999
        # both kinds of duplicates occur and each points at a real invoice with the same key
        cur.execute("""SELECT d.reason, count(*), count(*) FILTER (WHERE
                              d365inv.invoice_key(d.vendor_account) = i.vendor_key AND
                              d365inv.invoice_key(d.invoice_number) = i.invoice_key)
                       FROM d365inv.duplicate d JOIN d365inv.invoice i ON i.id = d.duplicate_of
                       GROUP BY 1 ORDER BY 1""")
        rows = cur.fetchall()
        assert [r[0] for r in rows] == ["already staged", "repeated in the same load"]
        assert all(r[1] == r[2] and r[1] > 0 for r in rows)
        cur.execute("SELECT count(*) FROM d365inv.duplicate WHERE duplicate_of IS NULL")
        assert cur.fetchone()[0] == 0
        # every reject says why
        cur.execute("SELECT count(*) FROM d365inv.reject WHERE reason !~ '^[a-z_]+: '")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM d365inv.inbox")
        assert cur.fetchone()[0] == 0


def test_concurrent_copy_waits_and_is_not_lost(db):
    """A COPY committed while ingest() holds the inbox is ingested next time, not lost."""
    other = psycopg2.connect(dbname=db.info.dbname)
    try:
        with db.cursor() as cur:
            cur.execute("TRUNCATE d365inv.invoice, d365inv.duplicate, d365inv.reject")
        db.autocommit = False
        with db.cursor() as cur:
            cur.copy_expert("COPY d365inv.inbox (%s) FROM STDIN (FORMAT csv, HEADER)" % COLS,
                            io.StringIO(generate(100, "--prefix", "A", "--seed", "5")))
        db.commit()
        with db.cursor() as cur:
            cur.execute("SELECT * FROM d365inv.ingest()")      # holds the inbox lock until commit
            first = cur.fetchone()
            with other.cursor() as cur2:
                cur2.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg2.errors.LockNotAvailable):
                    cur2.execute("INSERT INTO d365inv.inbox (vendor_account) VALUES ('late')")
                other.rollback()
        db.commit()
        with other.cursor() as cur2:
            cur2.execute("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
                          " VALUES ('LATE', 'L-1', '2024-01-01', '1')")
        other.commit()
        with db.cursor() as cur:
            cur.execute("SELECT * FROM d365inv.ingest()")
            assert cur.fetchone() == (1, 0, 0)
        db.commit()
        assert sum(first) == 100
    finally:
        db.autocommit = True
        other.close()
