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

A primary and a streaming standby (pg_basebackup -R -X stream), for failover:

    with Cluster(conf) as primary:
        sb = primary.standby(sync=True)        # streaming (and 'sync') when it returns
        sb = primary.standby(delay_ms=1500)    # async, WAL reaches it 1.5 s late
        sb.wait_replayed()                     # everything the primary has written so far
        primary.kill_immediate()               # pg_ctl stop -m immediate
        sb.promote()                           # pg_is_in_recovery() is false when it returns
        sb.wait_for_worker()

The standby is a Cluster (connect/sql/rows/value/worker_pid work on it) in a
temporary directory and Unix socket directory of its own, with the primary's
configuration (the base backup copies postgresql.conf and postgresql.auto.conf).
The primary's cleanup() cleans up its standbys too.

Runs as the calling user (never root: postgres refuses), sockets only, in a
temporary directory that stop() removes.
"""

import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psycopg2
import psycopg2.errors
import psycopg2.extras

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


class Cluster:
    def __init__(self, conf=None, dbname="d365", extension=True):
        self.conf = dict(conf or {})
        self.dbname = dbname
        self.extension = extension
        self.dir = None
        self.standbys = []

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
        for sb in self.standbys:
            sb.cleanup()
        self.standbys = []
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def restart(self, mode="fast"):
        self._pg_ctl("stop", "-m", mode)
        self._pg_ctl("start")
        self.wait_for_worker()

    def kill_immediate(self):
        """pg_ctl stop -m immediate: every process gets SIGQUIT, no shutdown
        checkpoint (crash recovery at the next start), as after a power loss
        of this server; its open connections and replication links are cut."""
        self._pg_ctl("stop", "-m", "immediate")

    def standby(self, sync=False, delay_ms=None, apply_delay_ms=None, name=None, timeout=60):
        """A new streaming standby of this (running) primary; see Standby."""
        sb = Standby(self, name or "standby%d" % (len(self.standbys) + 1), sync=sync,
                     delay_ms=delay_ms, apply_delay_ms=apply_delay_ms)
        self.standbys.append(sb)
        sb.start(timeout=timeout)
        return sb

    def in_recovery(self):
        return self.value("SELECT pg_is_in_recovery()")

    def current_lsn(self):
        """The primary's WAL flush position, what it can stream (text, e.g.
        '0/3000148'); a commit that has returned is before it."""
        return self.value("SELECT pg_current_wal_flush_lsn()::text")

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

    def truncate(self, *tables, dbname=None):
        """TRUNCATE the tables between tests.  Its exclusive locks, taken one
        table at a time, can deadlock with a worker statement that reads two
        of them; the deadlock detector then may pick the TRUNCATE: retry."""
        for attempt in range(10):
            try:
                return self.sql("TRUNCATE " + ", ".join(tables), dbname=dbname)
            except psycopg2.errors.DeadlockDetected:
                if attempt == 9:
                    raise
                time.sleep(0.2)

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


# ---- streaming replication ---------------------------------------------------

class WalRelay:
    """A byte relay on a Unix socket between a standby's walreceiver and the
    primary's socket, so the test decides when WAL reaches the standby:

      delay_ms   every byte from the primary is handed on delay_ms late: the
                 standby *receives* WAL that much behind (not only applies it
                 late, as recovery_min_apply_delay does, whose delay promotion
                 skips);
      pause()    hand nothing on until resume() (a partition that the
                 primary's walsender does not notice: it keeps sending);
      primary gone (its side of the connection closes, e.g. kill_immediate):
                 what was still held is dropped, never delivered: WAL the
                 primary had written but not yet sent.

    Bytes from the standby (feedback, replies) go through at once."""

    def __init__(self, upstream_dir, listen_dir, port=5432, delay_ms=0):
        self.upstream = os.path.join(upstream_dir, ".s.PGSQL.%d" % port)
        self.dir = listen_dir
        self.path = os.path.join(listen_dir, ".s.PGSQL.%d" % port)
        self.delay = (delay_ms or 0) / 1000.0
        self.paused = False
        self.closed = False
        self.dropped_bytes = 0          # held when the primary went away
        self.cond = threading.Condition()
        self.conns = []
        os.makedirs(listen_dir, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._accept, daemon=True, name="wal-relay")
        self.thread.start()

    def pause(self):
        with self.cond:
            self.paused = True

    def resume(self):
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            conns, self.conns = self.conns, []
        try:
            self.listener.close()
        except OSError:
            pass
        for pair in conns:
            for s in pair:
                _shut(s)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.upstream)
            except OSError:
                _shut(down)         # the primary is gone: the walreceiver retries
                _shut(up)
                continue
            with self.cond:
                if self.closed:
                    _shut(down)
                    _shut(up)
                    return
                self.conns.append((down, up))
            state = {"held": collections.deque(), "eof": False}
            for fn, args in ((self._from_primary, (up, down, state)),
                             (self._to_standby, (up, down, state)),
                             (self._from_standby, (down, up))):
                threading.Thread(target=fn, args=args, daemon=True).start()

    def _from_primary(self, up, down, state):
        while True:
            try:
                data = up.recv(65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    state["eof"] = True
                    self.dropped_bytes += sum(len(d) for _, d in state["held"])
                    state["held"].clear()
                    self.cond.notify_all()
                    return
                state["held"].append((time.monotonic() + self.delay, data))
                self.cond.notify_all()

    def _to_standby(self, up, down, state):
        held = state["held"]
        while True:
            with self.cond:
                while True:
                    if self.closed or (state["eof"] and not held):
                        break
                    if held and not self.paused:
                        wait = held[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self.cond.wait(wait)
                    else:
                        self.cond.wait(1.0)
                if self.closed or not held:
                    _shut(down)
                    _shut(up)
                    return
                _, data = held.popleft()
            try:
                down.sendall(data)
            except OSError:
                _shut(up)
                return

    @staticmethod
    def _from_standby(down, up):
        while True:
            try:
                data = down.recv(65536)
                if not data:
                    break
                up.sendall(data)
            except OSError:
                break
        _shut(up)
        _shut(down)


def _shut(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class Standby(Cluster):
    """A hot standby of `primary`, made with pg_basebackup -R -X stream into a
    temporary directory of its own, with its own Unix socket directory and the
    primary's settings (shared_preload_libraries, d365inv.*, ...: the base
    backup copies the primary's configuration files).

      sync=True         the primary's synchronous_standby_names names this
                        standby (its application_name, `name`): a commit on
                        the primary returns once the standby has flushed it
                        (synchronous_commit = on, the default)
      delay_ms=N        asynchronous, and WAL reaches the standby N ms late
                        (through a WalRelay); rows committed on the primary
                        in the last N ms before it dies never reach it
      apply_delay_ms=N  recovery_min_apply_delay: WAL arrives at once but is
                        applied N ms late; note that a promotion stops the
                        delay and applies everything received, so this makes
                        the standby's reads lag but loses nothing at failover

    Use Cluster.standby() to make one; promote() makes it a primary."""

    def __init__(self, primary, name, sync=False, delay_ms=None, apply_delay_ms=None):
        super().__init__(primary.conf, dbname=primary.dbname, extension=False)
        self.primary = primary
        self.name = name
        self.sync = sync
        self.delay_ms = delay_ms
        self.apply_delay_ms = apply_delay_ms
        self.relay = None

    def start(self, timeout=60):
        if self.sync and self.delay_ms:
            raise ValueError("a synchronous standby with a WAL delay would delay every commit")
        self.dir = tempfile.mkdtemp(prefix="d365inv-pg-%s." % self.name)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        r = subprocess.run([os.path.join(PG_BIN, "pg_basebackup"), "-D", self.data,
                            "-h", self.primary.dir, "-p", "5432", "-U", "postgres",
                            "-X", "stream", "-R", "-c", "fast", "--no-sync"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError("pg_basebackup failed: %s" % r.stdout)
        upstream = self.primary.dir
        if self.delay_ms:
            self.relay = WalRelay(self.primary.dir, os.path.join(self.dir, "relay"),
                                  delay_ms=self.delay_ms)
            upstream = self.relay.dir
        # -R wrote primary_conninfo into postgresql.auto.conf, which wins over
        # postgresql.conf: replace it there (our application_name, the relay);
        # never inherit the primary's synchronous_standby_names (after a
        # promotion every commit would wait for a standby that is not there)
        auto = os.path.join(self.data, "postgresql.auto.conf")
        with open(auto) as f:
            lines = [l for l in f if not l.split("=")[0].strip() in
                     ("primary_conninfo", "synchronous_standby_names")]
        lines.append("primary_conninfo = 'host=%s port=5432 user=postgres application_name=%s'\n"
                     % (upstream, self.name))
        with open(auto, "w") as f:
            f.writelines(lines)
        conf = {
            "unix_socket_directories": "'%s'" % self.dir,
            "hot_standby": "on",
            "wal_receiver_status_interval": "'1s'",
        }
        if self.apply_delay_ms:
            conf["recovery_min_apply_delay"] = "'%dms'" % self.apply_delay_ms
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v))
        self._pg_ctl("start")
        if self.sync:
            self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = %s",
                             ('"%s"' % self.name,), dbname="postgres")
            self.primary.sql("SELECT pg_reload_conf()", dbname="postgres")
        want = "sync" if self.sync else "async"
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.sql("SELECT state, sync_state FROM pg_stat_replication"
                                    " WHERE application_name = %s", (self.name,), dbname="postgres")
            if rows and rows[0] == ("streaming", want):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("standby %s is not streaming (%s): %s" % (
                    self.name, want, rows))
            time.sleep(0.1)
        return self

    def stop(self, mode="fast"):
        if self.dir is None:
            return
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            try:
                self._pg_ctl("stop", "-m", mode)
            except subprocess.CalledProcessError:
                self._pg_ctl("stop", "-m", "immediate")

    def cleanup(self):
        if self.relay:
            self.relay.close()
            self.relay = None
        super().cleanup()
        if self.sync and self.primary.dir and \
                os.path.exists(os.path.join(self.primary.data, "postmaster.pid")):
            # the primary goes on without a synchronous standby
            try:
                self.primary.sql("ALTER SYSTEM RESET synchronous_standby_names", dbname="postgres")
                self.primary.sql("SELECT pg_reload_conf()", dbname="postgres")
            except psycopg2.Error:
                pass

    # ---- replication state ---------------------------------------------------

    def replay_lsn(self):
        return self.value("SELECT pg_last_wal_replay_lsn()::text")

    def receive_lsn(self):
        return self.value("SELECT pg_last_wal_receive_lsn()::text")

    def wait_replayed(self, lsn=None, timeout=30):
        """Wait until the standby has replayed `lsn` (default: the primary's
        WAL insert position now)."""
        lsn = lsn or self.primary.current_lsn()
        deadline = time.monotonic() + timeout
        while True:
            if self.value("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("standby %s has not replayed %s (at %s)" % (
                    self.name, lsn, self.replay_lsn()))
            time.sleep(0.05)

    def promote(self, timeout=60):
        """pg_ctl promote; returns once pg_is_in_recovery() is false."""
        self._pg_ctl("promote")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.in_recovery():
                    return
            except psycopg2.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("standby %s still in recovery after promote" % self.name)
            time.sleep(0.05)


def wait_for(predicate, timeout=20.0, interval=0.05):
    """Poll predicate until it returns something true or timeout seconds
    pass; returns its last value (falsy on a timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
