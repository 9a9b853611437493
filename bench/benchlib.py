#!/usr/bin/python3
"""benchlib: what the Python benchmarks (bench/submit.py, bench/throttle.py,
bench/preflight.py, bench/batchsize.py) share: paths, the report that is
printed and kept for bench/out/, generating and loading invoices, the
throwaway cluster (one for a whole benchmark, or one per run with its mock)
with its query helpers, waiting for the worker to settle a load, CPU
readings, small helpers around the mock's counters, and the markdown table
of a benchmark's figures that bench/update-docs puts into docs/benchmarks.md.

Importing it also puts test/integration on sys.path, so a benchmark can
`from pgcluster import Cluster` and `from mockctl import MockD365`.

As a command, for benchmarks written in shell (see bench/lib.sh):

    bench/benchlib.py result NAME < table.md     # writes bench/results/NAME.md
"""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "test", "integration"))

PYTHON = "/usr/bin/python3"
GEN = os.path.join(HERE, "gen_invoices.py")
OUT_DIR = os.path.join(HERE, "out")
RESULTS_DIR = os.path.join(HERE, "results")
# the inbox columns bench/gen_invoices.py writes, in its order
COLS = "vendor_account, invoice_number, invoice_date, amount, currency, description, payload"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STALL_S = 120                # no progress for this long: the run has failed


class BenchError(RuntimeError):
    """A check of a benchmark's own result failed: its figures are void."""


class Report:
    """Lines printed as they come and kept for bench/out/."""

    def __init__(self):
        self.lines = []

    def __call__(self, text=""):
        print(text, flush=True)
        self.lines.append(text)


def log(msg):
    print("==> " + msg, file=sys.stderr, flush=True)


def fmt_int(n):
    return "{:,}".format(int(round(n)))


def norm(s):
    """The key collation of D365, of the mock and of d365inv.invoice_key():
    blanks trimmed, case ignored (generated keys are ASCII)."""
    return s.strip().lower()


def stats_diff(after, before):
    """The counters of the mock's /_admin/stats that moved between two reads."""
    def sub(a, b):
        if isinstance(a, dict):
            return {k: sub(a[k], b.get(k, 0) if isinstance(b, dict) else 0) for k in a}
        return a - b
    keys = ("batches", "operations", "responses", "batch_responses", "plain_requests")
    return {k: sub(after.get(k, {}), before.get(k, {})) for k in keys}


def tree_fingerprint():
    """sha256 of src/*.[ch] and the extension scripts: which code was measured
    (the tree may not be committed yet)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "*.[ch]")) +
                       glob.glob(os.path.join(ROOT, "*.sql"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def proc_stat(pid):
    """(ppid, own cpu seconds, waited-for children's cpu seconds) or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15, cutime/cstime 16/17
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return ppid, own, children


def cpu_seconds(pid):
    """CPU seconds a process has used so far (0.0 when it is gone)."""
    return (proc_stat(pid) or (0, 0.0, 0.0))[1]


def gen_csv(path, n, prefix, seed):
    """bench/gen_invoices.py: n fresh invoices (no repeats, no bad lines) into path."""
    with open(path, "w") as f:
        subprocess.run([PYTHON, GEN, str(n), "--dup-rate", "0", "--bad-rate", "0",
                        "--prefix", prefix, "--seed", str(seed)], stdout=f, check=True)


def check_scenarios(ap, text, known):
    """The scenario names of a comma-separated --scenarios, each one known."""
    names = [s for s in text.split(",") if s]
    for s in names:
        if s not in known:
            ap.error("unknown scenario %r (known: %s)" % (s, ", ".join(known)))
    return names


def save_results(name, stamp, report, payload, server_log=False):
    """The report's text and the raw figures (JSON) as bench/out/NAME-STAMP.txt
    and .json."""
    os.makedirs(OUT_DIR, exist_ok=True)
    base = os.path.join(OUT_DIR, "%s-%s" % (name, stamp))
    with open(base + ".txt", "w") as f:
        f.write("\n".join(report.lines) + "\n")
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=str)
    log("results in %s.txt%s" % (os.path.relpath(base, ROOT),
                                  ", .json and .server.log" if server_log else " and .json"))


def ratio(x, base):
    """x / base as '0.40\u00d7', '4.9\u00d7' or '155\u00d7' ('-' without a baseline)."""
    if not base or x is None:
        return "-"
    r = x / base
    return "%.*f\u00d7" % (0 if r >= 100 else 1 if r >= 10 else 2, r)


def measured_by(bench, stamp, fingerprint, extra=""):
    """The line under a results table: which run of which code."""
    return ("_Measured by `%s` on %s-%s-%s %s:%s (source %s, %d cores)%s; each baseline was measured in "
            "the same run._" % (bench, stamp[:4], stamp[4:6], stamp[6:8], stamp[9:11], stamp[11:13],
                                        fingerprint, os.cpu_count() or 0, extra))


def md_table(header, rows):
    """A markdown table: header cells, then rows of cells (str() of each)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_result(name, text, official=True, stamp=None):
    """The markdown of a benchmark's figures (a table and a line saying what
    was measured) as bench/results/NAME.md, which bench/update-docs copies
    between the <!-- bench:NAME --> markers of docs/benchmarks.md.  A run
    with other than the default settings (official false) writes
    bench/out/NAME-STAMP.md instead and leaves the documented figures alone.
    Returns the path written."""
    text = text.strip("\n") + "\n"
    if official:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        path = os.path.join(RESULTS_DIR, name + ".md")
    else:
        os.makedirs(OUT_DIR, exist_ok=True)
        path = os.path.join(OUT_DIR, "%s-%s.md" % (name, stamp or "table"))
    with open(path, "w") as f:
        f.write(text)
    log("table in %s%s" % (os.path.relpath(path, ROOT),
                           "" if official else " (not the default settings: bench/results/%s.md is left alone)"
                           % name))
    return path


def default_settings(ap, args, ignore=()):
    """Were the options those of a run without any (apart from `ignore`)?"""
    defaults = vars(ap.parse_args([]))
    return all(v == defaults.get(k) for k, v in vars(args).items() if k not in ignore)


def wait_settled(is_open, stalled, poll_s, check_every, first_check=0.0, progress=None,
                 on_check=None, t0=None):
    """Wait until is_open() is falsy, polling every poll_s seconds.  Every
    check_every seconds (the first check first_check seconds after t0) read
    progress() (default: the value is_open() returned) and call
    on_check(now, value); a value unchanged for STALL_S seconds raises
    BenchError(stalled(value))."""
    t0 = time.monotonic() if t0 is None else t0
    last_value, last_progress, next_check = None, t0, t0 + first_check
    while True:
        time.sleep(poll_s)
        still = is_open()
        if not still:
            return
        now = time.monotonic()
        if now >= next_check:
            next_check = now + check_every
            value = progress() if progress else still
            if on_check:
                on_check(now, value)
            if value != last_value:
                last_value, last_progress = value, now
            elif now - last_progress > STALL_S:
                raise BenchError(stalled(value))


class Sql:
    """q() and q1() on self.conn."""

    def q(self, sql, args=None):
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None

    def q1(self, sql, args=None):
        return self.q(sql, args)[0][0]


class OwnCluster(Sql):
    """A run with a throwaway cluster and a mock of its own (bench/preflight.py,
    bench/batchsize.py), and maybe a proxy in front of the mock: stop()
    closes and removes whatever was started."""

    pg = conn = mock = proxy = None

    def stop(self):
        if self.conn is not None:
            self.conn.close()
        if self.proxy is not None:
            self.proxy.stop()
        if self.mock is not None:
            self.mock.stop()
        if self.pg is not None:
            self.pg.cleanup()


class ClusterBench(Sql):
    """One throwaway cluster with the worker for all the runs of a benchmark
    (bench/submit.py, bench/throttle.py): a connection for the benchmark's
    SQL, one for the end-of-run poll, and a scratch directory for the
    generated files."""

    def __init__(self, name, pg_conf):
        self.tmp = tempfile.mkdtemp(prefix="d365inv-bench-%s." % name)
        self.pg_conf = pg_conf
        self.seq = 0
        self.pg = None
        self.conn = None

    def start(self):
        log("starting a throwaway PostgreSQL 15 cluster with the d365inv worker")
        conf = {"max_wal_size": "4GB", "log_min_messages": "info"}
        for item in self.pg_conf:
            key, _, value = item.partition("=")
            conf[key.strip()] = value.strip()
        from pgcluster import Cluster  # here: the rest of benchlib needs no psycopg2
        self.pg = Cluster(conf)
        self.pg.start()
        self.pg.wait_for_worker()
        self.conn = self.pg.connect()
        # the end-of-run poll must stay an index probe, whatever the statistics say
        self.poll = self.pg.connect()
        with self.poll.cursor() as cur:
            cur.execute("SET enable_seqscan = off")

    def stop(self, keep_log=None):
        if self.conn is not None:
            self.conn.close()
            self.poll.close()
        if self.pg is not None:
            self.pg.stop()
            if keep_log and self.pg.dir:
                os.makedirs(os.path.dirname(keep_log), exist_ok=True)
                subprocess.run(["cp", self.pg.log, keep_log])
                os.chmod(keep_log, 0o644)
            self.pg.cleanup()
        subprocess.run(["rm", "-rf", self.tmp])

    def any_open(self):
        """Is any invoice still open?  (On the poll connection.)"""
        with self.poll.cursor() as cur:
            cur.execute("SELECT EXISTS (SELECT FROM d365inv.invoice WHERE status < 'created')")
            return cur.fetchone()[0]

    def load(self, n, letter):
        """COPY n fresh invoices (keys LETTER<seq>...) into the inbox and
        ingest them; returns the highest invoice id before them."""
        self.seq += 1
        path = os.path.join(self.tmp, "load%d.csv" % self.seq)
        gen_csv(path, n, "%s%02d" % (letter, self.seq), self.seq)
        first = self.q1("SELECT coalesce(max(id), 0) FROM d365inv.invoice")
        self.q("COPY d365inv.inbox (%s) FROM %%s (FORMAT csv, HEADER)" % COLS, (path,))
        queued, dups, rejected = self.q("SELECT * FROM d365inv.ingest()")[0]
        os.unlink(path)
        if (queued, dups, rejected) != (n, 0, 0):
            raise BenchError("ingest() queued %s, duplicates %s, rejected %s; expected %d, 0, 0"
                             % (queued, dups, rejected, n))
        return first

    def stall_text(self, label, n, first_id):
        """What a run that stopped moving says: created so far, the statuses
        of its invoices and the end of the server log."""
        return lambda made: ("%s: no progress for %d s at %d of %d created; statuses %s\n%s"
                             % (label, STALL_S, made, n,
                                self.q("SELECT status, count(*) FROM d365inv.invoice"
                                       " WHERE id > %s GROUP BY 1", (first_id,)),
                                self.pg.server_log()[-3000:]))


def main(argv):
    if len(argv) == 3 and argv[1] == "result" and re.match(r"^[a-z0-9_-]+$", argv[2]):
        write_result(argv[2], sys.stdin.read())
        return 0
    print("usage: bench/benchlib.py result NAME < table.md   (writes bench/results/NAME.md)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
