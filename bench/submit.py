#!/usr/bin/python3
"""The unprivileged half of bench/submit (see there): delivery throughput of
the d365inv worker against the mock D365, and the worker's memory over a
long run.

    bench/submit.py [--quick] [--n50 N] [--n1 N] [--n0 N] [--nrss N] [--warmup N]
                    [--repeat K] [--only 50,1,0,rss] [--profile auto|always|never]
                    [--pg-conf NAME=VALUE ...]

Runs as an ordinary user (never root: PostgreSQL refuses) with Debian's
python3 and psycopg2.  One throwaway cluster with the worker
(test/integration/pgcluster.py) serves every measurement; each measurement
gets a fresh mock D365 (test/integration/mockctl.py), so the mock's counters
are that measurement's own.  A measurement:

  1. points the 'default' target nowhere (service_root NULL: the worker
     sends nothing) and sets its batch_size and max_in_flight;
  2. COPYs N generated invoices (bench/gen_invoices.py, no duplicates, no
     bad lines) into d365inv.inbox and runs d365inv.ingest();
  3. sets service_root to the mock, wakes the worker
     (d365inv.wake_worker(true)) and polls until no invoice is open
     (status < 'created'); elapsed = from the wake to the start of the
     transaction that recorded the last outcome (max(settled_at), on the
     server's clock, so the poll's interval does not count);
     invoices/s = N / elapsed;
  4. checks the result: the N invoices are all 'created' with a D365 id, the
     mock created exactly N entities, each key once, with one POST each, and
     d365inv.batch_log accounts for N created and nothing retried.

Each window run (8 x 20, at 50 ms and at zero latency) alternates with a
run of the mock alone: the same mock, the same $batch bodies (made by
d365inv.build_batch()), POSTed by 8 threads with keep-alive connections that
do nothing else.  That is what the mock and the machine allow at that moment;
what the worker reaches below it is the worker's own cost.

It also reads, from batch_log, how full the worker kept its window of
max_in_flight requests and how long each request took against the mock's
latency (the two factors of "% of ideal"), the CPU used by the worker, the
whole cluster, the mock and everything else on the machine during the run,
and times the worker's claim and in_doubt statements on their own.

Results: a table on stdout; the same text, the raw figures (JSON) and the
cluster's server log under bench/out/.  Exit status 1 when a check fails.
"""

import argparse
import datetime
import os
import re
import statistics
import sys
import threading
import time

from benchlib import (CLK_TCK, OUT_DIR, ROOT, BenchError, ClusterBench, Report, fmt_int, log,
                      md_table, measured_by, proc_stat, ratio, save_results, tree_fingerprint,
                      wait_settled, write_result)
from mockctl import MockD365  # noqa: E402

TARGET_SHARE = 0.97          # of the ideal, for the 50 ms / 8 x 20 configuration (issue #15)
POLL_S = 0.1                 # how often the end of a run is looked for


def cluster_cpu(postmaster):
    """CPU seconds of the postmaster, its live children and the children it
    has reaped (their time lands in its cutime/cstime)."""
    pm = proc_stat(postmaster)
    if pm is None:
        return 0.0
    total = pm[1] + pm[2]
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st and st[0] == postmaster:
                total += st[1]
    return total


def system_cpu():
    """(busy seconds, all seconds) of the whole machine, all cores."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK_TCK, sum(v[:8]) / CLK_TCK


def memory(pid):
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem in MB."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def mappings(pid, top=6):
    """The largest resident mappings, MB by name ([heap], [anon], a file)."""
    sizes = {}
    name = None
    try:
        with open("/proc/%d/smaps" % pid) as f:
            for line in f:
                first = line.split(None, 1)[0]
                if first.endswith(":"):
                    if first == "Rss:":
                        sizes[name] = sizes.get(name, 0) + int(line.split()[1]) / 1024.0
                else:
                    parts = line.split(None, 5)
                    name = parts[5].strip() if len(parts) > 5 else "[anon]"
                    if name.startswith("/dev/zero") or name.startswith("/SYSV"):
                        name = "[shared memory]"
    except OSError:
        return {}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:top])


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


class CpuMeter:
    """CPU used by the worker, the cluster, the mock, this script and the
    rest of the machine between start() and stop()."""

    def __init__(self, postmaster, worker, mock_pid):
        self.pids = {"worker": worker, "mock": mock_pid, "bench": os.getpid()}
        self.postmaster = postmaster

    def sample(self):
        s = {k: (proc_stat(p) or (0, 0.0, 0.0))[1] for k, p in self.pids.items()}
        s["cluster"] = cluster_cpu(self.postmaster)
        s["busy"], s["all"] = system_cpu()
        s["time"] = time.monotonic()
        return s

    def start(self):
        self.before = self.sample()
        self.load_before = loadavg()

    def stop(self):
        after = self.sample()
        b = self.before
        wall = after["time"] - b["time"]
        d = {k: after[k] - b[k] for k in after}
        ours = d["cluster"] + d["mock"] + d["bench"]
        return {
            "wall_s": wall,
            "cores": round(d["all"] / wall) if wall > 0 else None,
            # percent of one core
            "worker_pct": 100 * d["worker"] / wall,
            "cluster_pct": 100 * d["cluster"] / wall,
            "mock_pct": 100 * d["mock"] / wall,
            "bench_pct": 100 * d["bench"] / wall,
            "machine_busy_pct": 100 * d["busy"] / wall,
            "others_pct": max(0.0, 100 * (d["busy"] - ours) / wall),
            "loadavg_before": self.load_before,
            "loadavg_after": loadavg(),
        }


# ---- batch_log: how full the window of requests was -------------------------

def window_from_log(rows, max_in_flight, latency_ms):
    """From batch_log rows (started_at epoch s, duration ms, invoices) of the
    run's 'create' requests: how many requests were under way on average
    (the time integral of requests in flight over the span from the first
    send to the last answer), against max_in_flight.  Whatever the worker
    does between rounds or between one answer and the next send shows up
    as a window that is not full; whatever a request costs beyond the
    mock's latency as requests longer than the latency.  Then

        invoices/s = in_flight x batch / request time
        % of ideal = (in_flight / max_in_flight) x (latency / request time)
    """
    if not rows:
        return {}
    starts = [r[0] for r in rows]
    durs = [r[1] for r in rows]
    span = max(st + d / 1000.0 for st, d, _ in rows) - min(starts)
    busy = sum(durs) / 1000.0
    in_flight = busy / span if span > 0 else 0.0
    durs_sorted = sorted(durs)
    out = {
        "requests": len(rows),
        "invoices_per_request": statistics.mean(r[2] for r in rows),
        "request_ms_mean": statistics.mean(durs),
        "request_ms_p50": durs_sorted[len(durs) // 2],
        "request_ms_p95": durs_sorted[min(len(durs) - 1, int(len(durs) * 0.95))],
        "span_s": span,
        "in_flight_mean": in_flight,
        "window_fill": in_flight / max_in_flight,
        # a slot's idle time between an answer and its next request
        "slot_idle_ms_per_request": (span * max_in_flight - busy) * 1000.0 / len(rows),
    }
    if latency_ms:
        out["latency_share"] = latency_ms / out["request_ms_mean"]
    return out


# ---- the worker's own claim and in_doubt queries, timed on their own -----------

STRING = r'"((?:[^"\\]|\\.)*)"'
STRINGS = r'((?:"(?:[^"\\]|\\.)*"\s*)+)'

# how the worker plans each statement: the claim is prepared once (a generic
# plan), the in_doubt SELECT once per round is planned for its values
QUERY_PLANS = {"in_doubt_sql": "force_custom_plan", "claim_sql": "force_generic_plan"}
# the kept plans run with sequential scans off (run_kept() in src/queue.c)
QUERY_SEQSCAN = {"in_doubt_sql": "on", "claim_sql": "off"}
# the parameters of each statement: (type, value for the probe); $2 is the limit
QUERY_PARAMS = {
    "in_doubt_sql": [("text", "'default'"), ("int", None)],
    # claim_rows(): target, limit, cursor, client ids, id form, id length
    "claim_sql": [("text", "'default'"), ("int", None), ("bigint", "0"), ("boolean", "false"),
                  ("text", "'guid'"), ("int", "20")],
}


def worker_queries():
    """The worker's statement for due in_doubt rows (select_in_doubt()) and
    its claim of new rows (claim_rows(): CLAIM_SQL() with the fresh_sql
    condition), read from src/queue.c so that they stay the worker's (C
    string literals joined); {} when they cannot be found."""
    try:
        with open(os.path.join(ROOT, "src", "queue.c")) as f:
            src = f.read()
    except OSError:
        return {}
    join = lambda text: "".join(re.findall(STRING, text))  # noqa: E731
    # string macros used inside others (#define REMOTE_KEY_OF_I "..." \ "...")
    macros = {}
    for m in re.finditer(r'#define (\w+)[ \t]*\\\n((?:.*\\\n)*.*\n)', src):
        body = m.group(2).replace("\\\n", "\n")
        if re.fullmatch(r'\s*%s\s*' % STRINGS, body):
            macros[m.group(1)] = join(body)

    def expand(text):
        for name, value in macros.items():
            text = re.sub(r'\b%s\b' % name, lambda _: '"%s"' % value.replace('"', '\\"'), text)
        return text
    out = {}
    m = re.search(r'static const char \*in_doubt_sql =\s*%s;' % STRINGS, src)
    if m:
        out["in_doubt_sql"] = join(m.group(1))
    # #define CLAIM_SQL(which) "..." \ ... " which " \ ... "...": its lines up to the last "\"
    macro = re.search(r'#define CLAIM_SQL\(which\)((?:.*\\\n)*.*\n)', src)
    fresh = re.search(r'fresh_sql = CLAIM_SQL\(\s*%s\)' % STRINGS, src)
    if macro and fresh:
        body = expand(macro.group(1).replace("\\\n", "\n"))
        before, sep, after = body.partition(" which ")
        if sep:
            out["claim_sql"] = join(before) + join(fresh.group(1)) + join(after)
    return out


def plan_shape(node):
    """'Limit > Sort > Gather > Parallel Seq Scan on invoice': the first
    child at each level; then any sequential scan elsewhere in the plan (a
    subplan's, say), as '+ Seq Scan on remote_key'."""
    def every(n):
        yield n
        for child in n.get("Plans") or []:
            yield from every(child)
    chain = []
    while node:
        chain.append(node)
        node = (node.get("Plans") or [None])[0]
    names = []
    for n in chain:
        name = n["Node Type"]
        if n.get("Parallel Aware"):
            name = "Parallel " + name
        if n.get("Index Name"):
            name += " using " + n["Index Name"]
        elif n.get("Relation Name"):
            name += " on " + n["Relation Name"]
        names.append(name)
    others = ["+ %s on %s" % (n["Node Type"], n.get("Relation Name")) for n in every(chain[0])
              if n["Node Type"].endswith("Seq Scan") and not any(n is c for c in chain)]
    return " ".join([" > ".join(names)] + others)


# ---- phase sampler: what the worker is doing, from pg_stat_activity -------

class PhaseSampler(threading.Thread):
    """Samples the worker's pg_stat_activity row (state, query, wait event)
    as fast as one connection allows.  The worker reports each of its
    transactions by name ('d365inv: claiming invoices', ...) and 'sending
    $batch requests' around the HTTP calls; 'idle' between them is C work
    outside any transaction (building requests, reading answers)."""

    def __init__(self, pg, worker_pid, interval):
        super().__init__(daemon=True)
        self.pg, self.pid, self.interval = pg, worker_pid, interval
        self.counts = {}
        self.samples = 0
        self.stop_flag = threading.Event()

    def run(self):
        conn = self.pg.connect()
        cur = conn.cursor()
        while not self.stop_flag.is_set():
            cur.execute("SELECT state, query, wait_event_type, wait_event"
                        "  FROM pg_stat_activity WHERE pid = %s", (self.pid,))
            row = cur.fetchone()
            if row:
                state, query, wtype, wev = row
                phase = (query or "").replace("d365inv: ", "") if state == "active" \
                    else "idle"
                if state == "active" and wtype and wtype != "Extension":
                    phase += " [wait %s/%s]" % (wtype, wev)
                self.counts[phase] = self.counts.get(phase, 0) + 1
                self.samples += 1
            if self.interval:
                time.sleep(self.interval)
        conn.close()

    def stop(self):
        self.stop_flag.set()
        self.join()
        return {k: v / max(self.samples, 1) for k, v in
                sorted(self.counts.items(), key=lambda kv: -kv[1])}


# ---- one measurement --------------------------------------------------------

class Bench(ClusterBench):
    def __init__(self, args, report):
        super().__init__("submit", args.pg_conf)
        self.args = args
        self.report = report

    def start(self):
        super().start()
        with open(os.path.join(self.pg.data, "postmaster.pid")) as f:
            self.postmaster = int(f.readline())

    def worker(self):
        pid = self.pg.worker_pid()
        if pid is None:
            raise BenchError("the d365inv worker is not running:\n" + self.pg.server_log()[-3000:])
        return pid

    def probe(self, limits):
        """EXPLAIN ANALYZE the worker's in_doubt and claim statements now
        (rolled back), planned the way the worker plans them; {name: (ms,
        plan)}."""
        out = {}
        for name, sql in worker_queries().items():
            params = QUERY_PARAMS[name]
            values = [v if v is not None else str(limits[name]) for _, v in params]
            try:
                self.q("BEGIN")
                self.q("SET LOCAL plan_cache_mode = %s" % QUERY_PLANS[name])
                self.q("SET LOCAL enable_seqscan = %s" % QUERY_SEQSCAN[name])
                self.q("PREPARE probe (%s) AS %s" % (", ".join(t for t, _ in params), sql))
                plan = self.q("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE probe (%s)"
                              % ", ".join(values))[0][0][0]
                out[name] = (plan["Execution Time"], plan_shape(plan["Plan"]))
            except Exception as e:  # a probe must never fail the benchmark
                out[name] = (None, "could not run: %s" % e)
            finally:
                self.q("ROLLBACK")
                self.q("DEALLOCATE ALL")
        return out

    def memory_contexts(self, pid, timeout=20):
        """The worker's palloc'd memory (pg_log_backend_memory_contexts():
        the Grand total line it writes to the server log): (total, used)
        bytes, or None."""
        with open(self.pg.log, "rb") as f:
            f.seek(0, 2)
            start = f.tell()
        self.q("SELECT pg_log_backend_memory_contexts(%s)", (pid,))
        pattern = re.compile(r"\[%d\] .*Grand total: (\d+) bytes in \d+ blocks; (\d+) free.*?(\d+) used"
                             % pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.pg.log, "rb") as f:
                f.seek(start)
                m = pattern.search(f.read().decode("utf-8", "replace"))
            if m:
                return {"total_mb": int(m.group(1)) / 1048576.0, "used_mb": int(m.group(3)) / 1048576.0}
            time.sleep(0.1)
        return None

    def worker_memory(self, pid):
        m = memory(pid)
        m["contexts"] = self.memory_contexts(pid)
        m["mappings"] = mappings(pid)
        return m

    def run(self, label, n, latency_ms, batch_size, max_in_flight, rss=False, sampler=False):
        """One measurement; returns its figures (and raises BenchError when
        the result is wrong)."""
        log("%s: %s invoices, latency %g ms, batch_size %d, max_in_flight %d"
            % (label, fmt_int(n), latency_ms, batch_size, max_in_flight))
        mock = MockD365(latency_ms=latency_ms)
        mock.start()
        try:
            return self._run(mock, label, n, latency_ms, batch_size, max_in_flight, rss, sampler)
        finally:
            mock.stop()
            self.q("UPDATE d365inv.target SET service_root = NULL WHERE name = 'default'")

    def _run(self, mock, label, n, latency_ms, batch_size, max_in_flight, rss, sampler):
        # pacing 'off': this measures the client, not D365's budget (bench/throttle does)
        self.q("UPDATE d365inv.target SET service_root = NULL, pacing = 'off', batch_size = %s, max_in_flight = %s"
               " WHERE name = 'default'", (batch_size, max_in_flight))
        first_id = self.load(n, "B")
        first_log = self.q1("SELECT coalesce(max(id), 0) FROM d365inv.batch_log")
        limits = {"claim_sql": batch_size, "in_doubt_sql": max_in_flight * 200}
        probes = {"queue full": self.probe(limits)}
        self.q("CHECKPOINT")
        worker = self.worker()
        meter = CpuMeter(self.postmaster, worker, mock.proc.pid)
        mem = {"before": self.worker_memory(worker)} if rss else None
        series = []
        marks = [("10%", 0.10), ("50%", 0.50)] if rss else []
        # the memory run is long: a light sample (every ~10 ms) costs little
        phases = PhaseSampler(self.pg, worker, 0.0005 if sampler else 0.01) \
            if (sampler or rss) else None

        self.q("UPDATE d365inv.target SET service_root = %s WHERE name = 'default'",
               (mock.service_root,))
        meter.start()
        if phases:
            phases.start()
        t0 = time.monotonic()
        db_t0 = self.q1("SELECT clock_timestamp() FROM d365inv.wake_worker(true)")

        def sample_memory(now, made):
            m = memory(worker)
            series.append({"t": round(now - t0, 2), "created": made, **m})
            while marks and made >= marks[0][1] * n:
                m["contexts"] = self.memory_contexts(worker)
                m["mappings"] = mappings(worker)
                mem[marks.pop(0)[0]] = m

        wait_settled(self.any_open, self.stall_text(label, n, first_id), POLL_S,
                     0.5 if rss else 5.0, first_check=0.5, progress=lambda: mock.stats()["entities"],
                     on_check=sample_memory if rss else None, t0=t0)
        wall = time.monotonic() - t0
        cpu = meter.stop()
        profile = phases.stop() if phases else None
        if rss:
            mem["after"] = self.worker_memory(worker)
            if self.worker() != worker:
                raise BenchError("the worker restarted during the run")
        # From the wake to the start of the transaction that recorded the
        # last outcome (settled_at is its now()): the poll's own delay
        # does not count.
        elapsed = self.q1("SELECT extract(epoch FROM max(settled_at) - %s)::float8"
                          "  FROM d365inv.invoice WHERE id > %s", (db_t0, first_id))

        self.verify(mock, label, n, first_id, first_log)
        logrows = self.q("SELECT extract(epoch FROM started_at)::float8, duration_ms, invoices"
                         "  FROM d365inv.batch_log WHERE id > %s AND kind = 'create'", (first_log,))
        window = window_from_log(logrows, max_in_flight, latency_ms)
        ideal = max_in_flight * batch_size / (latency_ms / 1000.0) if latency_ms else None
        result = {
            "label": label, "invoices": n, "latency_ms": latency_ms, "batch_size": batch_size,
            "max_in_flight": max_in_flight, "seconds": elapsed, "seconds_polled": wall,
            "per_s": n / elapsed,
            "ideal_per_s": ideal, "share_of_ideal": (n / elapsed) / ideal if ideal else None,
            "window": window, "cpu": cpu, "mock_stats": mock.stats(),
        }
        probes["queue empty"] = self.probe(limits)
        result["probes"] = probes
        if rss:
            result["memory"] = mem
            result["memory_series"] = series
        if profile is not None:
            result["phases"] = profile
        log("%s: %.2f s, %s invoices/s" % (label, elapsed, fmt_int(n / elapsed)))
        return result

    def mock_alone(self, label, n, latency_ms, batch_size, in_flight):
        """The baseline of the window: the same mock, the same $batch bodies
        (made by d365inv.build_batch(), as the worker makes them), sent by a
        client that does nothing else: in_flight threads, each with a
        keep-alive connection, POST pre-built bodies back to back.  What is
        left between this and the ideal is the mock's and the machine's, not
        the worker's."""
        import http.client
        import queue
        log("%s: %s invoices, latency %g ms, %d in flight x %d, without the worker"
            % (label, fmt_int(n), latency_ms, in_flight, batch_size))
        self.q("UPDATE d365inv.target SET service_root = NULL WHERE name = 'default'")
        first_id = self.load(n, "A")
        mock = MockD365(latency_ms=latency_ms)
        mock.start()
        try:
            # a disabled target of its own: the worker never sends for it
            self.q("INSERT INTO d365inv.target (name, service_root, enabled) VALUES ('alone', %s, false)"
                   " ON CONFLICT (name) DO UPDATE SET service_root = excluded.service_root",
                   (mock.service_root,))
            ids = [r[0] for r in self.q("SELECT id FROM d365inv.invoice WHERE id > %s ORDER BY id",
                                        (first_id,))]
            bodies = queue.Queue()
            for k in range(0, len(ids), batch_size):
                ctype, body = self.q("SELECT content_type, body FROM d365inv.build_batch('alone', %s)",
                                     (ids[k:k + batch_size],))[0]
                bodies.put((ctype, bytes(body)))
            self.q("DELETE FROM d365inv.invoice WHERE id > %s", (first_id,))
            # the worker's next run must not find their dead index entries
            self.q("VACUUM d365inv.invoice")
            path = mock.batch_url[len(mock.base_url):]
            created = []
            errors = []

            def client():
                conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=30)
                made = 0
                try:
                    while True:
                        try:
                            ctype, body = bodies.get_nowait()
                        except queue.Empty:
                            break
                        conn.request("POST", path, body, {"Content-Type": ctype, "OData-Version": "4.0",
                                                          "Accept": "application/json"})
                        answer = conn.getresponse().read()
                        made += answer.count(b"HTTP/1.1 201")
                except Exception as e:  # reported below
                    errors.append(repr(e))
                finally:
                    conn.close()
                    created.append(made)

            threads = [threading.Thread(target=client) for _ in range(in_flight)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
            if errors or sum(created) != n or mock.stats()["entities"] != n:
                raise BenchError("%s: %d created of %d, mock holds %d; errors %s"
                                 % (label, sum(created), n, mock.stats()["entities"], errors[:3]))
        finally:
            mock.stop()
        ideal = in_flight * batch_size / (latency_ms / 1000.0) if latency_ms else None
        log("%s: %.2f s, %s invoices/s" % (label, elapsed, fmt_int(n / elapsed)))
        return {"label": label, "invoices": n, "latency_ms": latency_ms, "batch_size": batch_size,
                "max_in_flight": in_flight, "seconds": elapsed, "per_s": n / elapsed,
                "ideal_per_s": ideal, "share_of_ideal": (n / elapsed) / ideal if ideal else None}

    def verify(self, mock, label, n, first_id, first_log):
        problems = []
        statuses = dict((s, c) for s, c, _ in self.q(
            "SELECT status::text, count(*), count(d365_id) FROM d365inv.invoice"
            " WHERE id > %s GROUP BY 1", (first_id,)))
        with_id = self.q1("SELECT count(*) FROM d365inv.invoice WHERE id > %s AND status = 'created'"
                          " AND d365_id IS NOT NULL AND batch_id IS NOT NULL", (first_id,))
        if statuses != {"created": n} or with_id != n:
            problems.append("queue: %s (%d with a D365 id and a batch); expected {'created': %d}"
                            % (statuses, with_id, n))
        stats = mock.stats()
        if stats["entities"] != n:
            problems.append("mock holds %d entities, expected %d" % (stats["entities"], n))
        if stats["operations"]["POST"] != n or stats["responses"] != {"201": n}:
            problems.append("mock operations %s, responses %s; expected %d POSTs, all 201"
                            % (stats["operations"], stats["responses"], n))
        counts = mock.counts()
        if len(counts) != n or set(counts.values()) != {1}:
            twice = sum(1 for v in counts.values() if v != 1)
            problems.append("mock counts: %d keys, %d created more than once; expected %d keys once"
                            % (len(counts), twice, n))
        bl = self.q("SELECT count(*), coalesce(sum(invoices), 0), coalesce(sum(created), 0),"
                    "       coalesce(sum(duplicates + retries + reviews + in_doubt + unanswered), 0),"
                    "       count(*) FILTER (WHERE kind <> 'create' OR http_status IS DISTINCT FROM 200)"
                    "  FROM d365inv.batch_log WHERE id > %s", (first_log,))[0]
        if bl[1:] != (n, n, 0, 0) or bl[0] != stats["batches"]:
            problems.append("batch_log: %d requests (mock saw %d), %d invoices, %d created,"
                            " %d not created, %d not a 200 create" % (bl[0], stats["batches"], *bl[1:]))
        if problems:
            raise BenchError("%s: wrong result:\n  %s" % (label, "\n  ".join(problems)))


# ---- the report -------------------------------------------------------------

def table(report, results):
    report("%-34s %10s %9s %11s %9s %10s  %s" % ("config", "invoices", "seconds", "invoices/s",
                                                "ideal/s", "% of ideal", "all runs, invoices/s"))
    for r in results:
        ideal = fmt_int(r["ideal_per_s"]) if r["ideal_per_s"] else "-"
        share = "%.1f%%" % (100 * r["share_of_ideal"]) if r["share_of_ideal"] else "-"
        runs = " / ".join(fmt_int(x) for x in r.get("all_per_s", [])) if len(r.get("all_per_s", [])) > 1 else ""
        report("%-34s %10s %9.2f %11s %9s %10s  %s" % (r["label"], fmt_int(r["invoices"]), r["seconds"],
                                                      fmt_int(r["per_s"]), ideal, share, runs))
    if any(len(r.get("all_per_s", [])) > 1 for r in results):
        report("(best of the runs listed; the figures below are the best run's)")


def details(report, results):
    report()
    report("Requests, from d365inv.batch_log: 'in flight' is how many were under way on average")
    report("from the first send to the last answer; '% of ideal' = in flight / max_in_flight")
    report("x latency / request time; 'slot idle' is, per request, how long its slot of the")
    report("window stood empty (the worker's SQL and C work that did not overlap a request):")
    report("%-34s %8s %7s %8s %8s %9s %7s %8s %8s" % (
        "config", "requests", "inv/req", "request", "request", "in flight", "window", "latency/",
        "slot idle"))
    report("%-34s %8s %7s %8s %8s %9s %7s %8s %8s" % ("", "", "", "mean ms", "p95 ms", "", "fill",
                                                     "request", "ms/req"))
    for r in results:
        w = r.get("window")
        if not w:
            continue
        report("%-34s %8s %7.1f %8.1f %8.1f %5.2f/%-3d %6.1f%% %8s %8.2f" % (
            r["label"], fmt_int(w["requests"]), w["invoices_per_request"], w["request_ms_mean"],
            w["request_ms_p95"], w["in_flight_mean"], r["max_in_flight"], 100 * w["window_fill"],
            "%.1f%%" % (100 * w["latency_share"]) if "latency_share" in w else "-",
            w["slot_idle_ms_per_request"]))
    report()
    report("CPU during each run, %% of one core (the machine has %s cores):"
           % next((r["cpu"]["cores"] for r in results if "cpu" in r), "?"))
    report("%-34s %7s %8s %6s %6s %8s %14s %14s" % ("config", "worker", "cluster", "mock", "bench",
                                                    "others", "load avg 1 min", "us/invoice"))
    report("%-34s %7s %8s %6s %6s %8s %14s %14s" % ("", "", "", "", "", "", "", "worker / mock"))
    for r in results:
        c = r.get("cpu")
        if not c:
            continue
        per = lambda pct: pct / 100.0 * c["wall_s"] / r["invoices"] * 1e6  # noqa: E731
        report("%-34s %6.0f%% %7.0f%% %5.0f%% %5.0f%% %7.0f%% %6.2f -> %-5.2f %6.0f / %-5.0f" % (
            r["label"], c["worker_pct"], c["cluster_pct"], c["mock_pct"], c["bench_pct"],
            c["others_pct"], c["loadavg_before"][0], c["loadavg_after"][0],
            per(c["worker_pct"]), per(c["mock_pct"])))
    report("(cluster includes the worker; mock is test/mock-d365, one Python process whose")
    report("threads share one GIL, so ~100% would mean the mock is the bottleneck, and")
    report("1e6 / (mock us/invoice) is the most it could take; 'others' is whatever else ran")
    report("on the machine meanwhile.)")


def result_table(by_key, stamp, fingerprint):
    """The markdown for bench/results/submit.md: each run against a baseline
    of the same bench run (one invoice at a time for the 50 ms window, the
    50 ms window for zero latency, zero latency for the memory run), and the
    worker's memory over the memory run against its 10% reading."""
    rows = []
    for key, label, base_keys in (
            ("50", "50 ms, 8 in flight \u00d7 20", (("50alone", "the mock alone"), ("1", "one at a time"))),
            ("50alone", "50 ms, 8 \u00d7 20, the mock alone (no worker)", ()),
            ("1", "50 ms, one invoice per POST, one at a time", ()),
            ("0", "0 ms, 8 \u00d7 20", (("0alone", "the mock alone"), ("50", "the 50 ms run"))),
            ("0alone", "0 ms, 8 \u00d7 20, the mock alone (no worker)", ()),
            ("rss", "0 ms, 8 \u00d7 20, memory run", (("0", "the 0 ms run"),))):
        r = by_key.get(key)
        if not r:
            continue
        against = ["%s %s" % (ratio(r["per_s"], by_key[b]["per_s"]), name)
                   for b, name in base_keys if b in by_key]
        rows.append([label, fmt_int(r["invoices"]), fmt_int(r["per_s"]),
                     "%.1f%% of %s/s" % (100 * r["share_of_ideal"], fmt_int(r["ideal_per_s"]))
                     if r.get("ideal_per_s") else "-",
                     "; ".join(against) or ("a baseline" if key in ("1", "50alone", "0alone") else "-")])
    text = md_table(["run", "invoices", "invoices/s", "of the ideal", "against"], rows)
    rrss = by_key.get("rss")
    if rrss and "10%" in rrss["memory"]:
        m = rrss["memory"]
        marks = [k for k in ("before", "10%", "50%", "after") if k in m]
        mem_rows = [["VmRSS"] + ["%.1f" % m[k]["VmRSS"] for k in marks]
                    + [ratio(m["after"]["VmRSS"], m["10%"]["VmRSS"])],
                    ["RssAnon (private)"] + ["%.1f" % m[k]["RssAnon"] for k in marks]
                    + [ratio(m["after"]["RssAnon"], m["10%"]["RssAnon"])]]
        if all(m[k].get("contexts") for k in marks):
            mem_rows.append(["memory contexts"] + ["%.1f" % m[k]["contexts"]["total_mb"] for k in marks]
                            + [ratio(m["after"]["contexts"]["total_mb"], m["10%"]["contexts"]["total_mb"])])
        text += "\n\n" + md_table(["worker memory, MB, over %s invoices" % fmt_int(rrss["invoices"])]
                                   + marks + ["after \u00f7 10%"], mem_rows)
    return text + "\n\n" + measured_by("bench/submit", stamp, fingerprint)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick_env = os.environ.get("SUBMIT_QUICK", "") not in ("", "0")
    ap.add_argument("--quick", action="store_true", default=quick_env,
                    help="smaller runs (also SUBMIT_QUICK=1)")
    ap.add_argument("--n50", type=int, help="invoices for 50 ms, 8 x 20 (default 20,000; quick 6,400)")
    ap.add_argument("--n1", type=int, help="invoices for one at a time (default 300; quick 100)")
    ap.add_argument("--n0", type=int, help="invoices at zero latency (default 20,000; quick 6,400)")
    ap.add_argument("--nrss", type=int, help="invoices of the memory run (default 1,000,000; quick 100,000)")
    ap.add_argument("--warmup", type=int, default=5000, help="invoices before the memory run's first reading")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="extra 50 ms run sampling what the worker does (auto: when the target is missed)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of 50 ms 8 x 20 and of zero latency; the best counts (default 3)")
    ap.add_argument("--pg-conf", action="append", default=[], metavar="NAME=VALUE",
                    help="extra postgresql.conf setting for the cluster (repeatable), e.g. jit=off")
    ap.add_argument("--only", default="50,1,0,rss",
                    help="comma-separated subset of the runs: 50 (50 ms, 8 x 20), 1 (one at a time),"
                         " 0 (zero latency), rss (memory run); default all")
    a = ap.parse_args()
    only = set(a.only.split(","))
    env = lambda k: int(os.environ[k]) if os.environ.get(k) else None  # noqa: E731
    n50 = a.n50 or env("SUBMIT_N50") or (6400 if a.quick else 20000)
    n1 = a.n1 or env("SUBMIT_N1") or (100 if a.quick else 300)
    n0 = a.n0 or env("SUBMIT_N0") or (6400 if a.quick else 20000)
    nrss = a.nrss or env("SUBMIT_NRSS") or (100000 if a.quick else 1000000)
    if os.geteuid() == 0:
        sys.exit("bench/submit.py: run as an ordinary user (bench/submit does that for root)")

    report = Report()
    bench = Bench(a, report)
    results = []
    by_key = {}
    failure = None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    fingerprint = tree_fingerprint()
    try:
        bench.start()
        # connections, plans and caches of the worker: not part of any figure
        bench.run("warm-up", 1000, 0, 20, 8)
        # statistics, as autovacuum would have gathered them on any server
        # that has run for a minute (a never-analyzed queue plans differently)
        bench.q("ANALYZE d365inv.invoice")
        for key, label, n, latency, size, flight, times in (
                ("50", "50 ms, 8 in flight x 20", n50, 50, 20, 8, a.repeat),
                ("1", "50 ms, one at a time (1 x 1)", n1, 50, 1, 1, 1),
                ("0", "0 ms, 8 in flight x 20", n0, 0, 20, 8, a.repeat)):
            if key in only:
                # best of `times`, like bench/ingest: the machine may be busy;
                # the windows alternate with the mock alone (same machine, same moment)
                runs, alone = [], []
                for _ in range(times):
                    runs.append(bench.run(label, n, latency, size, flight))
                    if size > 1:
                        alone.append(bench.mock_alone(label + ", mock alone", n, latency, size, flight))
                best = max(runs, key=lambda r: r["per_s"])
                best["all_per_s"] = [r["per_s"] for r in runs]
                best["all_runs"] = [{k: r[k] for k in ("seconds", "per_s", "window", "cpu")}
                                    for r in runs]
                by_key[key] = best
                results.append(best)
                if alone:
                    best_alone = max(alone, key=lambda r: r["per_s"])
                    best_alone["all_per_s"] = [r["per_s"] for r in alone]
                    by_key[key + "alone"] = best_alone
                    results.append(best_alone)
        if a.profile == "always" or (a.profile == "auto" and "50" in by_key
                                     and by_key["50"]["share_of_ideal"] < TARGET_SHARE):
            results.append(bench.run("50 ms, 8 x 20, sampled (profile)", n50, 50, 20, 8, sampler=True))
        if "rss" in only:
            bench.run("warm-up before the memory run", a.warmup, 0, 20, 8)
            by_key["rss"] = bench.run("0 ms, 8 x 20, memory run", nrss, 0, 20, 8, rss=True)
            results.append(by_key["rss"])
    except BenchError as e:
        failure = str(e)
    finally:
        bench.stop(keep_log=os.path.join(OUT_DIR, "submit-%s.server.log" % stamp))

    report()
    report("bench/submit: d365inv worker -> mock D365 ($batch over HTTP/1.1 on 127.0.0.1), %s,"
           " source %s%s" % (stamp, fingerprint,
                             "; postgresql.conf: " + ", ".join(a.pg_conf) if a.pg_conf else ""))
    if results:
        table(report, results)
        details(report, results)
    for prof in (r for r in results if "phases" in r):
        per_req = 1000 * prof["seconds"] / max(prof["window"].get("requests", 1), 1)
        report()
        report("Where the worker's time goes, %s: its pg_stat_activity row" % prof["label"])
        report("sampled every %s ms (the worker names each transaction it runs; 'sending $batch"
               % ("~1" if "profile" in prof["label"] else "~10"))
        report("requests' is waiting in libcurl with requests under way; 'idle' is C code")
        report("(building requests, reading answers) or waiting while the window drains; the")
        report("sampling slows the run a little):")
        report("  %6s %12s  %s" % ("share", "ms/request", "phase"))
        for phase, share in prof["phases"].items():
            if share >= 0.001:
                report("  %5.1f%% %12.2f  %s" % (100 * share, share * per_req, phase))
    probed = [r for r in results if r.get("probes")]
    if probed:
        report()
        report("The worker's SELECT of due in_doubt rows (once per round) and its claim UPDATE")
        report("(of batch_size rows, once per request), read from select_in_doubt() and")
        report("claim_rows() in src/queue.c and timed alone, planned as the worker plans them")
        report("(the claim once, generic), with EXPLAIN ANALYZE (rolled back) on the run's queue")
        report("before the wake (full) and after the run (empty):")
        report("%-34s %17s %17s" % ("", "in_doubt ms", "claim ms"))
        report("%-34s %8s %8s %8s %8s" % ("config", "full", "empty", "full", "empty"))
        shapes = {}
        for r in probed:
            p = r["probes"]
            cells = []
            for name in ("in_doubt_sql", "claim_sql"):
                for moment in ("queue full", "queue empty"):
                    ms, shape = p.get(moment, {}).get(name, (None, None))
                    cells.append("%.2f" % ms if ms is not None else "-")
                    if shape:
                        shapes.setdefault((name, shape), []).append(moment)
            report("%-34s %8s %8s %8s %8s" % (r["label"], *cells))
        report("plans seen:")
        for (name, shape), moments in shapes.items():
            report("  %-9s %s" % (name.replace("_sql", ""), shape))
    rrss = by_key.get("rss")
    if rrss:
        m = rrss["memory"]
        report()
        report("Worker memory, MB.  VmRSS includes the shared buffers the worker has touched")
        report("(RssShmem, bounded by shared_buffers); RssAnon is its private memory; 'contexts'")
        report("is what PostgreSQL's memory contexts hold (pg_log_backend_memory_contexts), the")
        report("rest of RssAnon being malloc (libcurl, cJSON, glibc's retained free memory):")
        report("%-10s %9s %8s %8s %8s %10s %10s" % ("", "invoices", "VmRSS", "RssAnon", "RssShmem",
                                                   "VmHWM", "contexts"))
        for k, share in (("before", 0), ("10%", 0.1), ("50%", 0.5), ("after", 1)):
            if k in m:
                ctx = m[k].get("contexts")
                report("%-10s %9s %8.1f %8.1f %8.1f %10.1f %10s" % (
                    k, fmt_int(share * rrss["invoices"]), m[k]["VmRSS"], m[k]["RssAnon"],
                    m[k]["RssShmem"], m[k]["VmHWM"], "%.1f" % ctx["total_mb"] if ctx else "-"))
        ratios = "after/before: VmRSS %.2f, RssAnon %.2f" % (
            m["after"]["VmRSS"] / m["before"]["VmRSS"], m["after"]["RssAnon"] / m["before"]["RssAnon"])
        if "10%" in m:
            ratios += "; after/10%%: VmRSS %.2f, RssAnon %.2f" % (
                m["after"]["VmRSS"] / m["10%"]["VmRSS"], m["after"]["RssAnon"] / m["10%"]["RssAnon"])
        report(ratios)
    if failure:
        report()
        report("FAILED: " + failure)

    parts = []
    if "50" in by_key:
        r = by_key["50"]
        parts.append("50ms/8x20 = %s/s (%.1f%% of ideal %s/s, target %.0f%%: %s%s)"
                     % (fmt_int(r["per_s"]), 100 * r["share_of_ideal"], fmt_int(r["ideal_per_s"]),
                        100 * TARGET_SHARE, "met" if r["share_of_ideal"] >= TARGET_SHARE else "NOT met",
                        "; %.1f%% of the mock alone, %s/s" % (100 * r["per_s"] / by_key["50alone"]["per_s"],
                                                             fmt_int(by_key["50alone"]["per_s"]))
                        if "50alone" in by_key else ""))
    if "1" in by_key:
        parts.append("one-at-a-time = %s/s" % fmt_int(by_key["1"]["per_s"]))
    if "0" in by_key:
        parts.append("zero-latency = %s/s%s" % (
            fmt_int(by_key["0"]["per_s"]),
            " (%.2fx the mock alone, %s/s)" % (by_key["0"]["per_s"] / by_key["0alone"]["per_s"],
                                               fmt_int(by_key["0alone"]["per_s"]))
            if "0alone" in by_key else ""))
    if rrss:
        m = rrss["memory"]
        parts.append("worker RSS %.1f MB -> %.1f MB (private %.1f MB -> %.1f MB) over %s"
                     % (m["before"]["VmRSS"], m["after"]["VmRSS"], m["before"]["RssAnon"],
                        m["after"]["RssAnon"], fmt_int(rrss["invoices"])))
    if parts:
        line = "submit: " + "; ".join(parts)
        report()
        report(line)
    if by_key and not failure:
        table_md = result_table(by_key, stamp, fingerprint)
        report()
        report("For docs/benchmarks.md (bench/update-docs):")
        report(table_md)
        official = (not a.quick and (n50, n1, n0, nrss) == (20000, 300, 20000, 1000000)
                    and a.repeat == 3 and only == {"50", "1", "0", "rss"} and not a.pg_conf)
        write_result("submit", table_md, official, stamp)

    save_results("submit", stamp, report, {"stamp": stamp, "source_sha256_12": fingerprint,
                                           "results": results, "failure": failure,
                                           "argv": sys.argv[1:]}, server_log=True)
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
