#!/usr/bin/python3
"""The unprivileged half of bench/batchsize (see there): batch_size_mode
'auto' against 'fixed', with duplicates arriving in bursts and a D365 (the
mock) that charges per request.

    bench/batchsize.py [--n 20000] [--dup-rate 0.10] [--burst 50]
                       [--latency-ms 50] [--max-in-flight 4]
                       [--batch-size 20] [--batch-size-min 5] [--batch-size-max 50]
                       [--repeat 1]
                       [--scenarios fixed,auto,fixed_max,fixed_stop,auto_stop,fixed_max_stop]
                       (default: all)

Runs as an ordinary user (never root: PostgreSQL refuses) with Debian's
python3 and psycopg2.  Every run gets a throwaway cluster with the worker
(test/integration/pgcluster.py) and a mock D365 (test/integration/mockctl.py)
of its own, seeded with the same data, so the mock's counters and
d365inv.batch_log are that run's own:

  The workload: --n invoices (bench/gen_invoices.py, no repeats, no bad
  lines).  --dup-rate of them already exist in D365, created outside
  d365inv (seeded in the mock, unique keys on, a POST of one of them is
  answered 409).  ingest() numbers the invoices in key order and the worker
  claims them by id, so the duplicates are placed in that order in about
  n * dup-rate / --burst bursts of consecutive ids (lengths 0.5 to 1.5 times
  --burst) separated by clean stretches (likewise 0.5 to 1.5 times their
  mean), with a seeded random.Random: the same for every run.  The order
  and the bursts are checked in the database after ingest().

  "A server that charges per request": the mock answers every request
  latency_ms after it arrived, whatever the number of operations in it (it
  processes them while the latency runs).  The mock has no per-operation
  latency, and a $batch with failed operations costs it no more than one
  without: both are measured below, not assumed (the time of each $batch
  in batch_log, by size and with or without duplicates).

  1. the 'default' target: service_root NULL (nothing sent), preflight
     'in_doubt' (the default: D365's 409 finds the duplicates, no lookup),
     write_mode 'create', max_in_flight --max-in-flight, and the run's
     batch_size_mode / batch_size / batch_size_min / batch_size_max;
  2. the --n invoices are COPYed into the inbox and ingested;
  3. service_root is set to the mock, the worker is woken, and the run ends
     when no invoice is open.  elapsed = from the wake to the start of the
     transaction that recorded the last outcome (max(settled_at), the
     server's clock); invoices/s = n / elapsed.  Measured: batch_log (one
     row per request; the rows of one round share their xmin, since the
     worker records a round in one transaction), the mock's counters (the
     difference of /_admin/stats around the run), the invoices' status and
     settled_by, the mock's per-key creation counts.

Scenarios (--scenarios, comma-separated):
  fixed           batch_size_mode 'fixed', batch_size --batch-size (20);
  auto            'auto': starts at --batch-size, halves after a round
                  (sliding window: after an answered batch) with
                  duplicates, errors or throttling, grows by a quarter
                  after a clean one, within [--batch-size-min,
                  --batch-size-max];
  fixed_max       'fixed' at --batch-size-max (50): auto's ceiling, for
                  reference (what auto would do if it never shrank);
  *_stop          the same behind a proxy that strips Prefer:
                  odata.continue-on-error, so the mock stops each $batch at
                  its first failed operation (the rest go back to pending
                  and are sent again): the case where smaller batches waste
                  fewer operations.

The worker delivers either in rounds (claim max_in_flight * batch_size,
send, record, adapt the size once per round) or through a sliding window
(each batch claimed when sent, recorded and the size adapted when its
answer comes; used when preflight is not 'always'), depending on its
version: each run says which it saw (from batch_log: a round's requests
share one recording transaction, xmin) and the sha256 of the d365inv.so it
loaded; runs of different builds are a failure.  The rule is also
replayed in Python (simulate()) on the same invoices with bursts of other
lengths, for both delivery models: for rounds the replay must give exactly
the runs' requests and sizes (a check); for the window it is an
approximation, compared with the runs.

--repeat R runs every scenario R times (interleaved); times are reported
as the median, the request counts of every run are kept.

Results: a table on stdout, the same text and the raw figures (JSON)
under bench/out/.  Exit status 1 when a check fails.
"""

import argparse
import collections
import csv
import datetime
import hashlib
import http.client
import http.server
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import (COLS, STALL_S, BenchError, OwnCluster, Report, check_scenarios, default_settings,
                      fmt_int, gen_csv, log, md_table, measured_by, norm, ratio, save_results,
                      stats_diff, tree_fingerprint, wait_settled, write_result)
from mockctl import MockD365  # noqa: E402
from pgcluster import Cluster  # noqa: E402

POLL_S = 0.02
SEED_CHUNK = 5000

SCENARIOS = {
    "fixed": dict(mode="fixed", size="batch_size", stop=False),
    "auto": dict(mode="auto", size="batch_size", stop=False),
    "fixed_max": dict(mode="fixed", size="batch_size_max", stop=False),
    "fixed_stop": dict(mode="fixed", size="batch_size", stop=True),
    "auto_stop": dict(mode="auto", size="batch_size", stop=True),
    "fixed_max_stop": dict(mode="fixed", size="batch_size_max", stop=True),
}
DEFAULT_SCENARIOS = ",".join(SCENARIOS)


def label_of(name, args):
    spec = SCENARIOS[name]
    if spec["mode"] == "auto":
        text = "auto %d [%d, %d]" % (args.batch_size, args.batch_size_min, args.batch_size_max)
    else:
        text = "fixed %d" % getattr(args, spec["size"])
    return text + (", stop at 1st failure" if spec["stop"] else "")


# ---- the data, the same for every run ------------------------------------------

def split(total, parts, rng):
    """total as `parts` random integers, each 0.5 to 1.5 times the mean."""
    w = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    s = sum(w)
    out = [int(total * x / s) for x in w]
    for i in range(total - sum(out)):
        out[i % parts] += 1
    return out


def layout(n, n_dup, burst, seed):
    """Duplicate flags of n invoices in claim order: n_dup of them in about
    n_dup / burst bursts separated by clean stretches.  Returns (flags,
    burst lengths, gaps)."""
    rng = random.Random(seed)
    bursts = max(1, int(round(n_dup / burst))) if n_dup else 0
    lengths = split(n_dup, bursts, rng) if bursts else []
    gaps = split(n - n_dup, bursts + 1, rng)
    flags = [False] * n
    pos = 0
    for length, gap in zip(lengths, gaps):
        pos += gap
        for i in range(pos, pos + length):
            flags[i] = True
        pos += length
    return flags, runs_of(flags), gaps


class Data:
    def __init__(self, args, tmp):
        self.csv = os.path.join(tmp, "invoices.csv")
        gen_csv(self.csv, args.n, "BS", 31)
        os.chmod(self.csv, 0o644)
        with open(self.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != args.n:
            raise BenchError("gen_invoices.py wrote %d lines, not %d" % (len(rows), args.n))
        # the worker's claim order: ingest() numbers the invoices in key order
        rows.sort(key=lambda r: (norm(r["vendor_account"]), norm(r["invoice_number"])))
        self.order = [(norm(r["vendor_account"]), norm(r["invoice_number"])) for r in rows]
        if len(set(self.order)) != args.n:
            raise BenchError("gen_invoices.py repeated a key")
        n_dup = int(round(args.n * args.dup_rate))
        self.dup_flags, self.burst_lengths, self.gaps = layout(args.n, n_dup, args.burst, 32)
        self.dup_keys = {k for k, d in zip(self.order, self.dup_flags) if d}
        self.fresh_keys = set(self.order) - self.dup_keys
        # what D365 holds: entered there by hand, before d365inv sends them
        self.seed = [{
            "VendorAccount": r["vendor_account"], "InvoiceNumber": r["invoice_number"],
            "InvoiceDate": r["invoice_date"], "InvoiceAmount": float(r["amount"]),
            "CurrencyCode": r["currency"], "Description": "entered by hand in D365"}
            for r, d in zip(rows, self.dup_flags) if d]
        self.n = args.n
        self.n_dup = n_dup


def runs_of(flags):
    """Lengths of the runs of True in flags."""
    out, run = [], 0
    for f in flags:
        if f:
            run += 1
        elif run:
            out.append(run)
            run = 0
    if run:
        out.append(run)
    return out


# ---- what the rule does, replayed ----------------------------------------------

def simulate(dup_flags, mode, size, lo, hi, max_in_flight, shrink_on_duplicates=True,
             delivery="rounds"):
    """The worker with Prefer: odata.continue-on-error and no other trouble
    (src/deliver.c: deliver_round, stream_round, adapt_batch_size): every
    invoice sent is settled.  Returns (requests, their sizes).

    delivery "rounds": a round claims max_in_flight * size open invoices in
    id order, sends them in batches of size at once, and adapts the size
    once, after the round (trouble: any of its batches met a duplicate).
    Exact.

    delivery "window": a sliding window of max_in_flight requests; each
    batch claims size invoices when it is sent, and the size adapts after
    each answered batch (on that batch alone).  Answers are taken in the
    order sent (equal latency), and the worker's pause every 2 s of
    streaming (it stops claiming, lets the window drain, starts again) is
    left out: an approximation."""
    n, auto, sizes, pos = len(dup_flags), mode == "auto", [], 0
    cur = max(lo, min(hi, size)) if auto else size

    def adapt(cur, trouble):
        return max(lo, cur // 2) if trouble else min(hi, cur + max(1, cur // 4))

    if delivery == "rounds":
        while pos < n:
            take = min(max_in_flight * cur, n - pos)
            sizes.extend([cur] * ((take + cur - 1) // cur))
            trouble = shrink_on_duplicates and any(dup_flags[pos:pos + take])
            pos += take
            if auto:
                cur = adapt(cur, trouble)
        return len(sizes), sizes
    window = collections.deque()
    while pos < n or window:
        while len(window) < max_in_flight and pos < n:
            take = min(cur, n - pos)
            window.append((pos, take))
            sizes.append(cur)
            pos += take
        first, take = window.popleft()
        if auto:
            cur = adapt(cur, shrink_on_duplicates and any(dup_flags[first:first + take]))
    return len(sizes), sizes


def installed_library():
    """sha256 (first 12 hex digits) of the d365inv.so a new cluster loads."""
    try:
        libdir = subprocess.run([os.path.join(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"),
                                              "pg_config"), "--pkglibdir"],
                                capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(libdir, "d365inv.so"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- a proxy that makes the mock stop at the first failure --------------------

class StripPreferProxy:
    """Pass-through HTTP proxy that drops the Prefer header: the mock then
    behaves like a server that ignores odata.continue-on-error and stops a
    $batch at the first failed operation (as in test/integration/test_worker.py)."""

    def __init__(self, upstream_port):
        local = threading.local()

        def upstream():
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            return conn

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # the answer goes out in one write, without Nagle's delay
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                drop = ("host", "connection", "content-length", "prefer", "keep-alive")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                for attempt in (0, 1):
                    conn = upstream()
                    try:
                        conn.request(self.command, self.path, body=body if body else None,
                                     headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        break
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        local.conn = None
                        if attempt:
                            raise
                head = ["HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason)]
                head += ["%s: %s\r\n" % (k, v) for k, v in resp.getheaders()
                         if k.lower() not in ("content-length", "connection", "transfer-encoding")]
                head.append("Content-Length: %d\r\n\r\n" % len(data))
                self.wfile.write("".join(head).encode("latin-1") + data)

            do_GET = do_POST = do_PATCH = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def service_root(self, mock):
        return "http://127.0.0.1:%d%s/" % (self.port, mock.service_path)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---- one run -------------------------------------------------------------------

def fit_line(points):
    """Least squares y = a + b x; (a, b) or None."""
    if len(points) < 2:
        return None
    mx = statistics.mean(x for x, _ in points)
    my = statistics.mean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


LOG_COLS = ("id", "round", "batch_size", "operations", "invoices", "created", "duplicates",
            "retries", "reviews", "in_doubt", "unanswered", "throttled", "duration_ms",
            "http_status", "error")


class Run(OwnCluster):
    def __init__(self, name, rep, args, data):
        self.name = name
        self.rep = rep
        self.spec = SCENARIOS[name]
        self.label = label_of(name, args)
        self.args = args
        self.data = data
        self.size = getattr(args, self.spec["size"])

    def run(self):
        a, d, spec = self.args, self.data, self.spec
        r = {"scenario": self.name, "rep": self.rep, "label": self.label, "mode": spec["mode"],
             "batch_size": self.size, "stop_at_first_failure": spec["stop"]}
        log("%s (run %d): starting a cluster and the mock" % (self.label, self.rep + 1))
        r["library"] = installed_library()
        self.pg = Cluster({"log_min_messages": "info", "max_wal_size": "1GB"})
        self.pg.start()
        self.pg.wait_for_worker()
        self.conn = self.pg.connect()
        self.mock = MockD365(latency_ms=a.latency_ms, unique=True, duplicate_status=409)
        self.mock.start()
        for i in range(0, len(d.seed), SEED_CHUNK):
            self.mock.seed_entities(d.seed[i:i + SEED_CHUNK])
        if self.mock.stats()["preexisting"] != d.n_dup:
            raise BenchError("the mock holds %s seeded invoices, not %d"
                             % (self.mock.stats()["preexisting"], d.n_dup))
        service_root = self.mock.service_root
        if spec["stop"]:
            self.proxy = StripPreferProxy(self.mock.port)
            service_root = self.proxy.service_root(self.mock)

        # the target, pointing nowhere while the invoices are loaded
        self.q("UPDATE d365inv.target SET service_root = NULL, preflight = 'in_doubt', pacing = 'off',"
               " write_mode = 'create', max_in_flight = %s, batch_size_mode = %s,"
               " batch_size = %s, batch_size_min = %s, batch_size_max = %s WHERE name = 'default'",
               (a.max_in_flight, spec["mode"], self.size, a.batch_size_min, a.batch_size_max))
        self.q("COPY d365inv.inbox (%s) FROM %%s (FORMAT csv, HEADER)" % COLS, (d.csv,))
        queued, dups, rejected = self.q("SELECT * FROM d365inv.ingest()")[0]
        if (queued, dups, rejected) != (d.n, 0, 0):
            raise BenchError("ingest() queued %s, duplicates %s, rejected %s; expected %d, 0, 0"
                             % (queued, dups, rejected, d.n))
        # the claim order is the one the bursts were laid out in
        order = [(vk, ik) for vk, ik in self.q(
            "SELECT vendor_key, invoice_key FROM d365inv.invoice ORDER BY id")]
        if order != d.order:
            raise BenchError("the invoices' id order is not the key order the bursts assume")
        got = runs_of([k in d.dup_keys for k in order])
        if got != runs_of(d.dup_flags):
            raise BenchError("duplicate bursts in id order %s, planned %s" % (got, d.burst_lengths))
        self.q("CHECKPOINT")

        # the delivery
        log("%s (run %d): delivering %s invoices, %s of them already in D365 in %d bursts"
            % (self.label, self.rep + 1, fmt_int(d.n), fmt_int(d.n_dup), len(d.burst_lengths)))
        before = self.mock.stats()
        first_log = self.q1("SELECT coalesce(max(id), 0) FROM d365inv.batch_log")
        self.q("UPDATE d365inv.target SET service_root = %s WHERE name = 'default'", (service_root,))
        t0 = time.monotonic()
        db_t0 = self.q1("SELECT clock_timestamp() FROM d365inv.wake_worker(true)")
        wait_settled(lambda: self.q1("SELECT EXISTS (SELECT FROM d365inv.invoice WHERE status < 'created')"),
                     lambda open_rows: "no progress for %d s, %d invoices open; statuses %s\n%s"
                     % (STALL_S, open_rows,
                        self.q("SELECT status, count(*) FROM d365inv.invoice GROUP BY 1"),
                        self.pg.server_log()[-3000:]),
                     POLL_S, 1.0, progress=lambda: self.q1("SELECT count(*) FROM d365inv.invoice"
                                                            " WHERE status < 'created'"), t0=t0)
        r["seconds_polled"] = time.monotonic() - t0
        r["elapsed_s"] = self.q1("SELECT extract(epoch FROM max(settled_at) - %s)::float8"
                                 "  FROM d365inv.invoice", (db_t0,))
        r["invoices_per_s"] = d.n / r["elapsed_s"]
        # the worker logs its requests in the transaction that records the
        # outcomes, so every batch_log row of the run is visible by now
        r["mock"] = stats_diff(self.mock.stats(), before)
        self.collect(r, first_log)
        self.check(r)
        return r

    def collect(self, r, first_log):
        d = self.data
        rows = self.q(
            "SELECT id, xmin::text::bigint, batch_size, operations, invoices, created, duplicates,"
            "       retries, reviews, in_doubt, unanswered, throttled, duration_ms, http_status, error"
            "  FROM d365inv.batch_log WHERE id > %s AND kind = 'create' ORDER BY id", (first_log,))
        reqs = [dict(zip(LOG_COLS, row)) for row in rows]
        r["lookups"] = self.q1("SELECT count(*) FROM d365inv.batch_log WHERE id > %s AND kind <> 'create'",
                               (first_log,))
        tot = collections.Counter()
        for q in reqs:
            for k in ("operations", "invoices", "created", "duplicates", "retries", "reviews",
                      "in_doubt", "unanswered"):
                tot[k] += q[k]
            tot["throttled"] += bool(q["throttled"])
            tot["errors"] += q["error"] is not None
        r["batch_log"] = dict(tot, requests=len(reqs))
        r["error_samples"] = dict(collections.Counter(
            q["error"][:160] for q in reqs if q["error"] is not None).most_common(3))
        r["http_status"] = dict(collections.Counter(str(q["http_status"]) for q in reqs))
        sizes = [q["batch_size"] for q in reqs]
        r["sizes"] = {"min": min(sizes), "max": max(sizes), "mean": statistics.mean(sizes),
                      "ops_per_request": tot["operations"] / len(reqs)}
        r["size_histogram"] = dict(sorted(collections.Counter(sizes).items()))
        # rounds: the requests one transaction recorded
        rounds = []
        for q in reqs:
            if not rounds or rounds[-1]["xmin"] != q["round"]:
                rounds.append({"xmin": q["round"], "size": q["batch_size"], "requests": 0,
                               "operations": 0, "duplicates": 0, "max_ms": 0.0})
            cur = rounds[-1]
            cur["requests"] += 1
            cur["operations"] += q["operations"]
            cur["duplicates"] += q["duplicates"]
            cur["max_ms"] = max(cur["max_ms"], q["duration_ms"])
        r["rounds"] = len(rounds)
        # rounds record several requests at once; the sliding window each alone
        r["delivery"] = "rounds" if len(rounds) < len(reqs) else "window"
        r["round_sizes"] = [x["size"] for x in rounds]
        r["round_requests"] = [x["requests"] for x in rounds]
        r["round_duplicates"] = [x["duplicates"] for x in rounds]
        r["rounds_with_duplicates"] = sum(1 for x in rounds if x["duplicates"])
        r["shrinks"] = sum(1 for p, c in zip(rounds, rounds[1:]) if c["size"] < p["size"])
        r["grows"] = sum(1 for p, c in zip(rounds, rounds[1:]) if c["size"] > p["size"])
        r["round_period_ms"] = 1000 * r["elapsed_s"] / len(rounds)
        r["round_http_ms"] = statistics.mean(x["max_ms"] for x in rounds)
        # requests under way on average: their summed time over the elapsed time
        r["mean_in_flight"] = sum(q["duration_ms"] for q in reqs) / 1000.0 / r["elapsed_s"]
        r["batches_with_duplicates"] = sum(1 for q in reqs if q["duplicates"])
        # what a $batch costs: by size, clean or with duplicates
        by = collections.defaultdict(list)
        for q in reqs:
            by[(q["operations"], q["duplicates"] > 0)].append(q["duration_ms"])
        r["duration_by_ops"] = [{"operations": ops, "with_duplicates": dup, "requests": len(v),
                                 "mean_ms": statistics.mean(v), "median_ms": statistics.median(v)}
                                for (ops, dup), v in sorted(by.items())]
        clean = [(q["operations"], q["duration_ms"]) for q in reqs if not q["duplicates"]]
        dirty = [(q["operations"], q["duration_ms"]) for q in reqs if q["duplicates"]]
        fit = fit_line(clean)
        r["clean_fit"] = {"intercept_ms": fit[0], "per_operation_ms": fit[1]} if fit else None
        r["clean_mean_ms"] = statistics.mean(y for _, y in clean) if clean else None
        r["dup_mean_ms"] = statistics.mean(y for _, y in dirty) if dirty else None
        # batches with duplicates against clean ones of the same size
        clean_by = collections.defaultdict(list)
        for x, y in clean:
            clean_by[x].append(y)
        extra = [y - statistics.median(clean_by[x]) for x, y in dirty if len(clean_by[x]) >= 3]
        r["dup_extra_ms"] = {"compared": len(extra),
                             "median": statistics.median(extra) if extra else None,
                             "mean": statistics.mean(extra) if extra else None}
        r["requests_log"] = [[q[c] for c in ("id", "batch_size", "operations", "duplicates",
                                             "unanswered", "duration_ms")] for q in reqs]
        # the invoices' fates
        fates = {"duplicate_key": collections.Counter(), "fresh_key": collections.Counter()}
        for vk, ik, status, settled_by in self.q(
                "SELECT vendor_key, invoice_key, status::text, settled_by FROM d365inv.invoice"):
            group = "duplicate_key" if (vk, ik) in d.dup_keys else "fresh_key"
            fates[group]["%s/%s" % (status, settled_by)] += 1
        r["fates"] = {k: dict(v) for k, v in fates.items()}
        r["attempts"] = dict(self.q("SELECT attempts, count(*) FROM d365inv.invoice GROUP BY 1"))
        counts = self.mock.counts()
        r["created_keys"] = len(counts)
        r["created_twice"] = sum(1 for v in counts.values() if v != 1)
        r["dup_keys_created"] = sum(1 for vk, ik in d.dup_keys if counts.get("%s|%s" % (vk, ik), 0))
        r["fresh_not_created_once"] = sum(1 for vk, ik in d.fresh_keys
                                          if counts.get("%s|%s" % (vk, ik), 0) != 1)
        pre = self.mock.preexisting()
        r["dup_keys_preexisting_not_1"] = sum(1 for vk, ik in d.dup_keys
                                              if pre.get("%s|%s" % (vk, ik), 0) != 1)

    def check(self, r):
        d, a, spec = self.data, self.args, self.spec
        p = []
        bl, mk = r["batch_log"], r["mock"]
        n_fresh = d.n - d.n_dup
        r["requests"] = bl["requests"]
        r["mock_batches"] = mk["batches"]
        r["ops_sent"] = bl["operations"]
        r["ops_processed"] = mk["operations"]["POST"]
        r["duplicates"] = bl["duplicates"]
        r["charged_request_s"] = r["mock_batches"] * a.latency_ms / 1000.0
        if r["fates"]["duplicate_key"] != {"duplicate/response": d.n_dup}:
            p.append("the %d duplicate invoices ended %s" % (d.n_dup, r["fates"]["duplicate_key"]))
        if r["fates"]["fresh_key"] != {"created/response": n_fresh}:
            p.append("the %d fresh invoices ended %s" % (n_fresh, r["fates"]["fresh_key"]))
        if r["created_keys"] != n_fresh or r["created_twice"] or r["fresh_not_created_once"]:
            p.append("the mock created %d keys (%d more than once), %d fresh keys not exactly once"
                     % (r["created_keys"], r["created_twice"], r["fresh_not_created_once"]))
        if r["dup_keys_created"] or r["dup_keys_preexisting_not_1"]:
            p.append("duplicate keys created again: %d; not exactly once in D365: %d"
                     % (r["dup_keys_created"], r["dup_keys_preexisting_not_1"]))
        if bl["duplicates"] != d.n_dup or bl["created"] != n_fresh:
            p.append("batch_log: %d duplicates, %d created; expected %d, %d"
                     % (bl["duplicates"], bl["created"], d.n_dup, n_fresh))
        if mk["responses"].get("409", 0) != d.n_dup or mk["responses"].get("201", 0) != n_fresh:
            p.append("the mock answered %s; expected %d x 201, %d x 409"
                     % (mk["responses"], n_fresh, d.n_dup))
        if bl["requests"] != mk["batches"] or sum(mk["plain_requests"].values()) or r["lookups"]:
            p.append("batch_log has %d $batch requests and %d lookups, the mock saw %d $batch and %s plain"
                     % (bl["requests"], r["lookups"], mk["batches"], mk["plain_requests"]))
        # (stopping at the first failure, batch_log.error notes the
        # operations D365 did not run)
        if bl["retries"] or bl["reviews"] or bl["in_doubt"] or bl["throttled"] or \
                (bl["errors"] and not spec["stop"]):
            p.append("trouble other than duplicates: %d retries, %d reviews, %d in doubt, "
                     "%d throttled, %d errors %s" % (bl["retries"], bl["reviews"], bl["in_doubt"],
                                                    bl["throttled"], bl["errors"], r["error_samples"]))
        if bl["operations"] != bl["invoices"]:
            p.append("%d operations for %d invoices in batch_log" % (bl["operations"], bl["invoices"]))
        if spec["stop"]:
            # the operations after the first failure of a $batch are not run
            if bl["operations"] != mk["operations"]["POST"] + bl["unanswered"]:
                p.append("batch_log: %d operations sent, %d unanswered; the mock ran %d"
                         % (bl["operations"], bl["unanswered"], mk["operations"]["POST"]))
        else:
            if bl["unanswered"] or bl["operations"] != d.n or mk["operations"]["POST"] != d.n:
                p.append("%d operations sent (%d unanswered), the mock ran %d; expected %d, each invoice once"
                         % (bl["operations"], bl["unanswered"], mk["operations"]["POST"], d.n))
            if r["attempts"] != {1: d.n}:
                p.append("attempts %s, expected 1 for each invoice" % r["attempts"])
        s = r["sizes"]
        if spec["mode"] == "fixed" and (s["min"], s["max"]) != (self.size, self.size):
            p.append("fixed %d: batch_log.batch_size from %d to %d" % (self.size, s["min"], s["max"]))
        if spec["mode"] == "auto" and not (a.batch_size_min <= s["min"] <= s["max"] <= a.batch_size_max):
            p.append("auto: batch_log.batch_size from %d to %d, outside [%d, %d]"
                     % (s["min"], s["max"], a.batch_size_min, a.batch_size_max))
        if not spec["stop"]:
            # the rule replayed on the same bursts: exact for rounds
            sim, sim_sizes = simulate(d.dup_flags, spec["mode"], self.size, a.batch_size_min,
                                      a.batch_size_max, a.max_in_flight, delivery=r["delivery"])
            r["simulated_requests"] = sim
            if r["delivery"] == "rounds" and (sim != bl["requests"]
                                              or sim_sizes != [q[1] for q in r["requests_log"]]):
                p.append("the replay of the rule gives %d requests, the worker sent %d"
                         % (sim, bl["requests"]))
        r["problems"] = p


# ---- main ------------------------------------------------------------------------

def median_of(runs, key):
    return statistics.median(x[key] for x in runs)


def spread(values):
    lo, hi = min(values), max(values)
    return fmt_int(lo) if lo == hi else "%s-%s" % (fmt_int(lo), fmt_int(hi))


def rle(values, limit=None):
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    text = ["%d" % v if n == 1 else "%dx%d" % (v, n) for v, n in out]
    if limit and len(text) > limit:
        text = text[:limit] + ["... (%d more runs)" % (len(text) - limit)]
    return " ".join(text)


def result_table(by, stamp, fingerprint, repeat, size):
    """The markdown for bench/results/batchsize.md: each scenario against
    fixed batch_size of the same server behaviour (continue-on-error, or
    stop at the first failure), measured in the same bench run; medians
    when a scenario ran more than once."""
    rows = []
    for name, runs in by.items():
        spec = SCENARIOS[name]
        base_name = "fixed_stop" if spec["stop"] else "fixed"
        base = by.get(base_name)
        r0 = runs[0]
        req, ops, per_s = (median_of(runs, k) for k in ("requests", "ops_sent", "invoices_per_s"))
        if base is runs:
            against = ["the baseline"] * 3
        elif base:
            against = [ratio(req, median_of(base, "requests")), ratio(ops, median_of(base, "ops_sent")),
                       ratio(per_s, median_of(base, "invoices_per_s"))]
        else:
            against = ["-"] * 3
        rows.append([r0["label"], fmt_int(req), fmt_int(ops),
                     "%d/%.1f/%d" % (min(x["sizes"]["min"] for x in runs),
                                     statistics.mean(x["sizes"]["mean"] for x in runs),
                                     max(x["sizes"]["max"] for x in runs)),
                     fmt_int(per_s)] + against)
    return (md_table(["", "`$batch` requests", "operations sent", "sizes min/avg/max", "invoices/s"]
                     + ["%s against fixed %d" % (x, size) for x in ("requests", "operations", "invoices/s")],
                     rows)
            + "\n\n" + measured_by("bench/batchsize", stamp, fingerprint,
                                     "%s; a run stopping at the first failure is against fixed %d doing the same"
                                     % ("; medians of %d runs" % repeat if repeat > 1 else "", size)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="invoices to send")
    ap.add_argument("--dup-rate", type=float, default=0.10, help="share already in D365 (409)")
    ap.add_argument("--burst", type=int, default=50, help="mean length of a burst of duplicates")
    ap.add_argument("--latency-ms", type=float, default=50, help="the mock's time per request")
    ap.add_argument("--max-in-flight", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=20, help="fixed size, and auto's start")
    ap.add_argument("--batch-size-min", type=int, default=5)
    ap.add_argument("--batch-size-max", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each scenario (interleaved)")
    ap.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    args = ap.parse_args()
    names = check_scenarios(ap, args.scenarios, SCENARIOS)
    if not 0 <= args.dup_rate < 1 or args.burst < 1 or args.repeat < 1:
        ap.error("need 0 <= --dup-rate < 1, --burst >= 1, --repeat >= 1")

    report = Report()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = tempfile.mkdtemp(prefix="d365inv-bench-batchsize.")
    os.chmod(tmp, 0o755)
    results, failure = [], None
    try:
        log("generating %s invoices, %s of them already in D365 in bursts of about %d"
            % (fmt_int(args.n), fmt_int(round(args.n * args.dup_rate)), args.burst))
        data = Data(args, tmp)
        for rep in range(args.repeat):
            for name in names:
                run = Run(name, rep, args, data)
                try:
                    r = run.run()
                except BenchError as e:
                    failure = "%s: %s" % (run.label, e)
                    log(failure)
                    break
                finally:
                    run.stop()
                results.append(r)
                log("%s (run %d): %d requests, %.1f s, %s invoices/s"
                    % (r["label"], rep + 1, r["requests"], r["elapsed_s"], fmt_int(r["invoices_per_s"])))
                for p in r["problems"]:
                    log("CHECK FAILED: %s: %s" % (r["label"], p))
                    failure = failure or "%s: %s" % (r["label"], p)
            if failure and not results:
                break
    finally:
        subprocess.run(["rm", "-rf", tmp])

    by = collections.OrderedDict()
    for r in results:
        by.setdefault(r["scenario"], []).append(r)
    bl_ = data.burst_lengths
    report("bench/batchsize: %s invoices, %s (%.0f%%) already in D365 (the mock answers 409) in %d bursts "
           "of consecutive ids (%d-%d long, clean stretches of %d-%d between); the mock answers every "
           "request %g ms after it arrived, whatever its size; max_in_flight %d; each run on a fresh "
           "cluster and mock with the same data%s"
           % (fmt_int(data.n), fmt_int(data.n_dup), 100.0 * data.n_dup / data.n, len(bl_),
              min(bl_) if bl_ else 0, max(bl_) if bl_ else 0, min(data.gaps), max(data.gaps),
              args.latency_ms, args.max_in_flight,
              "; %d runs each, times are medians" % args.repeat if args.repeat > 1 else ""))
    libs = sorted({str(r["library"]) for r in results})
    deliveries = sorted({r["delivery"] for r in results})
    report("worker: d365inv.so sha256 %s; delivery: %s"
           % (", ".join(libs), ", ".join({"rounds": "rounds (claim max_in_flight x batch_size, send, "
                                                    "record, adapt once per round)",
                                          "window": "sliding window (each batch claimed when sent, "
                                                    "recorded and adapted when answered)"}[x]
                                         for x in deliveries)))
    if len(libs) > 1 or len(deliveries) > 1:
        failure = failure or "the installed worker changed during the benchmark"
        report("CHECK FAILED: the runs used different builds of the worker (d365inv.so was reinstalled "
               "during the benchmark): the figures below mix them")
    report()
    head = ("%-36s %11s %11s %13s %9s %12s %8s %7s %6s %8s"
            % ("scenario", "requests", "mock", "ops", "ops run", "size", "elapsed",
               "inv/s", "dups", "charged"))
    report(head)
    report("%-36s %11s %11s %13s %9s %12s %8s %7s %6s %8s"
           % ("", "", "$batch", "sent", "by mock", "min/avg/max", "", "", "", "req. s"))
    report("-" * len(head))
    for name, runs in by.items():
        r0 = runs[0]
        report("%-36s %11s %11s %13s %9s %12s %7.1fs %7s %6s %8s"
               % (r0["label"], spread([x["requests"] for x in runs]),
                  spread([x["mock_batches"] for x in runs]), spread([x["ops_sent"] for x in runs]),
                  spread([x["ops_processed"] for x in runs]),
                  "%d/%.1f/%d" % (min(x["sizes"]["min"] for x in runs),
                                  statistics.mean(x["sizes"]["mean"] for x in runs),
                                  max(x["sizes"]["max"] for x in runs)),
                  median_of(runs, "elapsed_s"),
                  fmt_int(median_of(runs, "invoices_per_s")), spread([x["duplicates"] for x in runs]),
                  "%.1f" % median_of(runs, "charged_request_s")))
    report()
    report("requests: $batch requests in batch_log (= mock $batch: what the mock saw); ops sent: operations "
           "in them (batch_log); ops run by mock: POSTs the mock executed; size: batch_log.batch_size per "
           "request; dups: invoices recorded duplicate; charged req. s: requests x %g ms, the server time "
           "the per-request charge adds up to." % args.latency_ms)
    report("Times are indicative (2 cores, shared machine, other tests may run); the request counts are "
           "deterministic with rounds, nearly so with the sliding window.")
    report()
    for name, runs in by.items():
        r0 = runs[0]
        report("%s%s:" % (r0["label"], " (run 1 of %d unless a range is given)" % len(runs)
                          if len(runs) > 1 else ""))
        if r0["delivery"] == "rounds":
            report("    %d rounds, period %.1f ms (longest request of a round %.1f ms), %d of them met duplicates"
                   % (r0["rounds"], statistics.mean(x["round_period_ms"] for x in runs),
                      statistics.mean(x["round_http_ms"] for x in runs), r0["rounds_with_duplicates"]))
        else:
            report("    sliding window: %.2f requests under way on average (of %d), %d of %d batches met "
                   "duplicates" % (statistics.mean(x["mean_in_flight"] for x in runs), args.max_in_flight,
                                   r0["batches_with_duplicates"], r0["requests"]))
        fit = r0["clean_fit"]
        report("    $batch time: clean %.1f ms on average%s; with duplicates %s%s"
               % (r0["clean_mean_ms"],
                  " (fit: %.1f ms + %.3f ms per operation)" % (fit["intercept_ms"], fit["per_operation_ms"])
                  if fit else "",
                  "%.1f ms on average" % r0["dup_mean_ms"] if r0["dup_mean_ms"] is not None else "-",
                  ", %+.1f ms (median) against clean ones of the same size (%d compared)"
                  % (r0["dup_extra_ms"]["median"], r0["dup_extra_ms"]["compared"])
                  if r0["dup_extra_ms"]["compared"] else ""))
        if "simulated_requests" in r0:
            report("    the rule replayed (%s model): %d requests%s"
                   % (r0["delivery"], r0["simulated_requests"],
                      " (exact)" if r0["delivery"] == "rounds" else
                      " (approximation; the runs: %s)" % spread([x["requests"] for x in runs])))
        if r0["mode"] == "auto":
            report("    sizes (requests per size): %s"
                   % ", ".join("%s: %d" % kv for kv in r0["size_histogram"].items()))
            if r0["delivery"] == "rounds":
                report("    %d shrinks, %d grows; size per round: %s"
                       % (r0["shrinks"], r0["grows"], rle(r0["round_sizes"], limit=60)))
            else:
                report("    size per request: %s" % rle([q[1] for q in r0["requests_log"]], limit=60))
        if r0["stop_at_first_failure"]:
            report("    operations sent but not run (after a failure, sent again): %s"
                   % spread([x["batch_log"]["unanswered"] for x in runs]))
    problems = [(r["label"], p) for r in results for p in r["problems"]]
    for label, p in problems:
        report("CHECK FAILED: %s: %s" % (label, p))
    if failure and not problems:
        report("FAILED: %s" % failure)
    dup_counts = {r["duplicates"] for r in results}
    if results:
        report()
        report("duplicates recorded: %s in every run (seeded: %d); mock keys created twice: %d; "
               "duplicate keys created by d365inv: %d"
               % ("/".join(str(x) for x in sorted(dup_counts)), data.n_dup,
                  sum(r["created_twice"] for r in results), sum(r["dup_keys_created"] for r in results)))
        if len(dup_counts) != 1 or dup_counts != {data.n_dup}:
            failure = failure or "duplicates recorded differ: %s" % sorted(dup_counts)
            report("CHECK FAILED: duplicates recorded differ between runs or from the seeded %d" % data.n_dup)
    # the rule replayed on bursts of other lengths, and if duplicates did
    # not shrink the size
    replay = []
    if results:
        report()
        report("The rule replayed (continue-on-error, no other trouble) on the same %s invoices and %s "
               "duplicates, in bursts of other mean lengths; $batch requests (the worker of these runs: %s):"
               % (fmt_int(data.n), fmt_int(data.n_dup), ", ".join(deliveries)))
        cols = ("fixed %d" % args.batch_size, "auto rounds", "auto window", "auto, no dup shrink",
                "fixed %d" % args.batch_size_max)
        report("    %-16s %9s %12s %12s %20s %9s" % (("mean burst",) + cols))
        for burst in sorted({1, 5, 20, 50, 100, 250, 1000, args.burst}):
            flags = layout(data.n, data.n_dup, burst, 32)[0]
            lo, hi, mif = args.batch_size_min, args.batch_size_max, args.max_in_flight
            row = {"burst": burst,
                   "fixed": simulate(flags, "fixed", args.batch_size, 0, 0, mif)[0],
                   "auto_rounds": simulate(flags, "auto", args.batch_size, lo, hi, mif)[0],
                   "auto_window": simulate(flags, "auto", args.batch_size, lo, hi, mif,
                                           delivery="window")[0],
                   "auto_nodup_rounds": simulate(flags, "auto", args.batch_size, lo, hi, mif,
                                                 shrink_on_duplicates=False)[0],
                   "auto_nodup_window": simulate(flags, "auto", args.batch_size, lo, hi, mif,
                                                 shrink_on_duplicates=False, delivery="window")[0],
                   "fixed_max": simulate(flags, "fixed", args.batch_size_max, 0, 0, mif)[0]}
            replay.append(row)
            report("    %-16s %9d %12d %12d %20s %9d"
                   % ("%d%s" % (burst, " (the runs)" if burst == args.burst else ""),
                      row["fixed"], row["auto_rounds"], row["auto_window"],
                      "%d / %d" % (row["auto_nodup_rounds"], row["auto_nodup_window"]),
                      row["fixed_max"]))
        report("    (auto, no dup shrink: the same rule with duplicates not counted as trouble, rounds / window)")
    parts = []
    for name in ("fixed", "auto", "fixed_max", "fixed_stop", "auto_stop", "fixed_max_stop"):
        if name in by:
            runs = by[name]
            text = "%s: %s requests, %s inv/s" % (
                runs[0]["label"], spread([x["requests"] for x in runs]),
                fmt_int(median_of(runs, "invoices_per_s")))
            if runs[0]["mode"] == "auto":
                text += " (sizes %d/%.1f/%d)" % (min(x["sizes"]["min"] for x in runs),
                                                 statistics.mean(x["sizes"]["mean"] for x in runs),
                                                 max(x["sizes"]["max"] for x in runs))
            if runs[0]["stop_at_first_failure"]:
                text += " (%s ops sent)" % spread([x["ops_sent"] for x in runs])
            parts.append(text)
    report()
    report("batchsize: " + "; ".join(parts) + ("" if not failure else "; FAILED"))
    if by and not failure:
        table_md = result_table(by, stamp, tree_fingerprint(), args.repeat, args.batch_size)
        report()
        report("For docs/benchmarks.md (bench/update-docs):")
        report(table_md)
        write_result("batchsize", table_md, default_settings(ap, args), stamp)

    save_results("batchsize", stamp, report,
                 {"stamp": stamp, "args": vars(args), "bursts": data.burst_lengths, "gaps": data.gaps,
                  "replay": replay or None, "results": results, "failure": failure})
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
