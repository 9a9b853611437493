"""What a failed integration test leaves for whoever reads the report: a
module that imports failure_diagnostics gets it called by conftest.py's
hook (pytest_runtest_makereport) when one of its tests fails, while the
module's cluster (fixture "pg", a pgcluster.Cluster) still runs.  With
D365INV_DIAG_DIR set, the text and the whole server log are kept there;
test/run-tests prints the texts after pytest's summary."""
import os
import re

import psycopg2

DIAG_QUERIES = [
    ("the worker and whoever waits for a lock",
     "SELECT pid, backend_type, state, wait_event_type, wait_event, now() - xact_start AS xact_age,"
     "       left(query, 200) AS query FROM pg_stat_activity"
     " WHERE backend_type LIKE 'd365inv%' OR wait_event_type = 'Lock'"),
    ("target", "SELECT name, enabled, service_root IS NOT NULL AS has_root, auth, client_id, batch_size,"
               "       max_in_flight, preflight, write_mode, batch_size_mode, property_map"
               "  FROM d365inv.target"),
    ("target_state", "SELECT * FROM d365inv.target_state"),
    ("invoices by status and last_error",
     "SELECT status, count(*), min(next_attempt_at) AS next_due, max(attempts) AS attempts,"
     "       left(last_error, 200) AS last_error"
     "  FROM d365inv.invoice GROUP BY status, left(last_error, 200) ORDER BY 1"),
    ("the last requests (batch_log)",
     "SELECT id, kind, started_at, http_status, invoices, created, retries, in_doubt, throttled,"
     "       left(error, 200) AS error FROM d365inv.batch_log ORDER BY id DESC LIMIT 10"),
    ("settings", "SELECT name, setting FROM pg_settings WHERE name LIKE 'd365inv.%'"
                 " AND source NOT IN ('default', 'override')"),
]


def failure_diagnostics(item):
    """What a failed test leaves for whoever reads the report (conftest.py
    adds it): the worker's activity, the target and its state, the invoices
    by status, the last requests, what the mock received, and the end of
    the server log.  The cluster still runs: the teardown has not cleaned
    up yet."""
    pg = item.funcargs.get("pg")
    mock_server = item.funcargs.get("mock") or item.funcargs.get("mock_server")
    if pg is None or pg.dir is None:
        return None
    out = []
    try:
        conn = pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '5s'")
                for title, sql in DIAG_QUERIES:
                    try:
                        cur.execute(sql)
                        names = [d[0] for d in cur.description]
                        out.append("-- %s" % title)
                        out.extend("   " + ", ".join("%s=%r" % kv for kv in zip(names, r)) for r in cur.fetchall())
                    except psycopg2.Error as e:
                        out.append("-- %s: %s" % (title, str(e).strip()))
        finally:
            conn.close()
    except psycopg2.Error as e:
        out.append("-- no connection: %s" % str(e).strip())
    if mock_server is not None:
        try:
            out.append("-- mock config: %r" % (mock_server.config(),))
            out.append("-- mock stats: %r" % (mock_server.stats(),))
        except Exception as e:
            out.append("-- mock: %r" % (e,))
    log = pg.server_log().splitlines()
    out.append("-- server log, last 120 of %d lines" % len(log))
    out.extend(log[-120:])
    where = os.environ.get("D365INV_DIAG_DIR")
    if where:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, file_stem(item) + ".server.log"), "w") as f:
            f.write("\n".join(log) + "\n")
    return "\n".join(out)


def file_stem(item):
    """The name of a test's files in D365INV_DIAG_DIR (its node id, tamed)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)
