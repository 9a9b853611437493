"""pgcluster: a throwaway PostgreSQL 15 cluster with the d365inv worker, for
tests and benchmarks that need the worker (it serves one database, fixed at
server start, so each such test module gets a cluster of its own).

    from pgcluster import Cluster
    with Cluster({"d365inv.in_doubt_delay": "200ms"}) as pg:
        conn = pg.connect()            # autocommit, database pg.dbname
        pg.sql("SELECT 1")             # one-shot query, returns all rows
        pg.rows("SELECT ...")          # the same, rows as dicts
        pg.value("SELECT count(*) ...")
        pg.kill_worker()               # SIGKILL: the server restarts all backends
        pg.restart(mode="immediate")

Runs as the calling user (never root: postgres refuses), sockets only, in a
temporary directory that stop() removes.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import psycopg2
import psycopg2.extras

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


class Cluster:
    def __init__(self, conf=None, dbname="d365", extension=True):
        self.conf = dict(conf or {})
        self.dbname = dbname
        self.extension = extension
        self.dir = None

    # ---- lifecycle ---------------------------------------------------------

    def start(self):
        self.dir = tempfile.mkdtemp(prefix="d365inv-pg.")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        subprocess.run([os.path.join(PG_BIN, "initdb"), "-D", self.data, "-U", "postgres",
                        "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        conf = {
            "listen_addresses": "''",
            "unix_socket_directories": "'%s'" % self.dir,
            "port": "5432",
            "shared_preload_libraries": "'d365inv'",
            "d365inv.database": "'%s'" % self.dbname,
            "fsync": "off",
            "max_worker_processes": "16",
            "log_line_prefix": "'%m [%p] %b '",
        }
        for k, v in self.conf.items():
            conf[k] = v if str(v).startswith("'") or str(v).replace(".", "").isdigit() \
                else "'%s'" % v
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v))
        self._pg_ctl("start")
        admin = self.connect("postgres")
        with admin.cursor() as cur:
            cur.execute('CREATE DATABASE "%s"' % self.dbname)
        admin.close()
        if self.extension:
            self.sql("CREATE EXTENSION d365inv")
        return self

    def stop(self, mode="fast"):
        if self.dir is None:
            return
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._pg_ctl("stop", "-m", mode)

    def cleanup(self):
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def restart(self, mode="fast"):
        self._pg_ctl("stop", "-m", mode)
        self._pg_ctl("start")
        self.wait_for_worker()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def _pg_ctl(self, *args):
        subprocess.run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-l", self.log,
                        "-w", "-t", "60", *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    # ---- access ------------------------------------------------------------

    def connect(self, dbname=None, retries=100):
        for i in range(retries):
            try:
                conn = psycopg2.connect(host=self.dir, port=5432, user="postgres",
                                        dbname=dbname or self.dbname)
                conn.autocommit = True
                return conn
            except psycopg2.OperationalError:
                # the server may be restarting after a crash
                if i == retries - 1:
                    raise
                time.sleep(0.1)

    def sql(self, query, args=None, dbname=None):
        """Run one statement on a fresh connection; rows (or None)."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def rows(self, query, args=None, dbname=None, user=None):
        """One statement on a fresh connection (as postgres, or as `user`,
        which must be a LOGIN role); rows as dicts, or None."""
        if user is None:
            conn = self.connect(dbname)
        else:
            conn = psycopg2.connect(host=self.dir, port=5432, user=user,
                                    dbname=dbname or self.dbname)
            conn.autocommit = True
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(query, args)
                return [dict(r) for r in cur.fetchall()] if cur.description else None
        finally:
            conn.close()

    def value(self, query, args=None, **kw):
        """The single value of a one-row, one-column query."""
        rows = self.rows(query, args, **kw)
        assert len(rows) == 1, rows
        return next(iter(rows[0].values()))

    def server_log(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    # ---- the worker --------------------------------------------------------

    def worker_pid(self):
        rows = self.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'd365inv worker'")
        return rows[0][0] if rows else None

    def wait_for_worker(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                pid = self.worker_pid()
                if pid:
                    return pid
            except psycopg2.OperationalError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the d365inv worker did not start")

    def kill_worker(self):
        """SIGKILL the worker.  PostgreSQL then restarts every backend
        (crash recovery); the launcher starts a new worker afterwards."""
        pid = self.worker_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        return pid
