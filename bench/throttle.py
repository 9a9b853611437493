#!/usr/bin/python3
"""The unprivileged half of bench/throttle (see there): delivery throughput
of the d365inv worker against D365's service protection limits, played by
the mock (test/mock-d365) scaled down so a window passes in seconds.

    bench/throttle.py [--window 10] [--requests 200] [--execution 40]
                      [--op-cost-ms 10] [--batch-size 20] [--in-flight-per-user 8]
                      [--users 1,2,4] [--pacing budget,off] [--windows 4]
                      [--latency-ms 0] [--pg-conf NAME=VALUE ...]

Dataverse allows each app user (client id), over a sliding 5-minute window,
6,000 requests and 1,200 s of server execution time, 52 at once.  Scaled:
a 10 s window, 200 requests, 40 s of execution time, each operation taking
10 ms of the server's time (op_cost_ms).  One app user can then deliver at
most

    ideal = min(execution / window / op cost,  requests x batch size / window)
          = min(40 s / 10 s / 10 ms,           200 x 20 / 10 s)  = 400 invoices/s

and n app users n times that.  Every request to the mock costs the measured
processing time (20 x 10 ms and a little for a $batch of 20), so the
execution budget is the one that binds, a little below 400/s.

One throwaway cluster with the worker (test/integration/pgcluster.py)
serves every run; each run gets a fresh mock (test/integration/mockctl.py)
with the limits, so its counters are the run's own.  A run (pacing P, n app
users):

  1. the 'default' target points nowhere (service_root NULL), with
     batch_size, max_in_flight = n x in-flight-per-user (at most 52),
     auth 'none', client_id 'app-1' and app users app-2 .. app-n
     (d365inv.app_user: the worker names each in X-D365inv-Client-Id), and
     its pacing and limit_window / limit_requests / limit_execution set to
     the mock's limits (when the schema has those columns);
  2. COPYs enough generated invoices for windows + 1 windows at n x the
     ideal (plus 5%) and ingests them;
  3. points the target at the mock, wakes the worker and polls until no
     invoice is open;
  4. measures, from each invoice's settled_at: the rate over whole windows
     after the first (from 1 x window to k x window, k the whole windows
     the run lasted), because the first window's budget is spent on a full
     one and any stretch of whole windows can hold at most the ideal;
     the whole run's rate is shown too, and how many invoices settled in
     each window;
  5. reads the mock's per-user counters: requests it admitted, 429s (by
     limit), execution time; 429s as a share of all requests that reached
     the mock;
  6. checks: every invoice settled, the mock created each created one exactly
     once (invoices given up on, in review after too many 429s, are counted
     and shown).  A run that stalls (no progress for 120 s) ends the benchmark.

Targets (issue #16): pacing 'budget', one app user: >= 90% of the ideal
with <= 1% of requests throttled; four app users: >= 3.6 x one user's
throughput.  Runs with pacing 'off' show what the limits cost a worker that
only reacts to 429s.  Results: a table on stdout; the same text, the raw
figures (JSON) and the server log under bench/out/.  Exit status 1 when a
check fails (not when a target is missed).
"""

import argparse
import datetime
import math
import os
import sys
import time

from benchlib import (OUT_DIR, BenchError, ClusterBench, Report, cpu_seconds, default_settings,
                      fmt_int, log, md_table, measured_by, ratio, save_results, tree_fingerprint,
                      wait_settled, write_result)
from mockctl import MockD365  # noqa: E402

POLL_S = 0.2                 # how often the end of a run is looked for
TARGET_SHARE = 0.90          # of the ideal, one app user, pacing 'budget'
TARGET_THROTTLED = 0.01      # share of requests answered 429, same run
TARGET_SCALING = 3.6         # four app users against one


class Bench(ClusterBench):
    def __init__(self, args):
        super().__init__("throttle", args.pg_conf)
        self.a = args

    def start(self):
        super().start()
        cols = {r[0] for r in self.q("SELECT column_name FROM information_schema.columns"
                                     " WHERE table_schema = 'd365inv' AND table_name = 'target'")}
        self.has_pacing = {"pacing", "limit_window", "limit_requests", "limit_execution"} <= cols
        self.has_app_users = self.q1("SELECT to_regclass('d365inv.app_user') IS NOT NULL")

    def ideal_per_user(self):
        a = self.a
        by_requests = a.requests * a.batch_size / a.window
        by_execution = a.execution / a.window / (a.op_cost_ms / 1000.0) if a.op_cost_ms else math.inf
        return min(by_requests, by_execution)

    def configure_target(self, pacing, users, max_in_flight):
        a = self.a
        self.q("UPDATE d365inv.target SET service_root = NULL, batch_size = %s, max_in_flight = %s,"
               " auth = 'none', client_id = 'app-1' WHERE name = 'default'", (a.batch_size, max_in_flight))
        if self.has_pacing:
            self.q("UPDATE d365inv.target SET pacing = %s, limit_window = %s, limit_requests = %s,"
                   " limit_execution = %s WHERE name = 'default'",
                   (pacing, a.window, a.requests, max(1, math.ceil(a.execution))))
        if self.has_app_users:
            self.q("DELETE FROM d365inv.app_user WHERE target = 'default'")
            for i in range(2, users + 1):
                self.q("INSERT INTO d365inv.app_user (target, client_id) VALUES ('default', %s)",
                       ("app-%d" % i,))

    def run(self, pacing, users):
        a = self.a
        label = "pacing %s, %d app user%s" % (pacing, users, "" if users == 1 else "s")
        ideal = users * self.ideal_per_user()
        n = int(math.ceil(ideal * a.window * (a.windows + 1) * 1.05 / a.batch_size)) * a.batch_size
        max_in_flight = min(52, users * a.in_flight_per_user)
        log("%s: %s invoices, window %g s, %d requests, %g s execution, %g ms per operation,"
            " batch_size %d, max_in_flight %d" % (label, fmt_int(n), a.window, a.requests, a.execution,
                                                  a.op_cost_ms, a.batch_size, max_in_flight))
        mock = MockD365(sp_window_s=a.window, sp_requests=a.requests, sp_execution_s=a.execution,
                        sp_concurrent=52, op_cost_ms=a.op_cost_ms, latency_ms=a.latency_ms)
        mock.start()
        try:
            self.configure_target(pacing, users, max_in_flight)
            return self._run(mock, label, pacing, users, n, ideal, max_in_flight)
        finally:
            mock.stop()
            self.q("UPDATE d365inv.target SET service_root = NULL WHERE name = 'default'")

    def _run(self, mock, label, pacing, users, n, ideal, max_in_flight):
        a = self.a
        first_id = self.load(n, "T")
        first_log = self.q1("SELECT coalesce(max(id), 0) FROM d365inv.batch_log")
        self.q("CHECKPOINT")
        worker = self.pg.worker_pid()
        cpu0 = {"worker": cpu_seconds(worker), "mock": cpu_seconds(mock.proc.pid)}
        self.q("UPDATE d365inv.target SET service_root = %s WHERE name = 'default'", (mock.service_root,))
        t0 = time.monotonic()
        db_t0 = self.q1("SELECT clock_timestamp() FROM d365inv.wake_worker(true)")
        wait_settled(self.any_open, self.stall_text(label, n, first_id), POLL_S, 5, first_check=1,
                     progress=lambda: mock.stats()["entities"], t0=t0)
        wall = time.monotonic() - t0
        cpu = {"worker_pct": 100 * (cpu_seconds(worker) - cpu0["worker"]) / wall,
               "mock_pct": 100 * (cpu_seconds(mock.proc.pid) - cpu0["mock"]) / wall}
        stats = mock.stats()
        statuses = self.verify(mock, stats, label, n, first_id)

        # when each invoice settled, seconds after the wake
        settled = sorted(r[0] for r in self.q(
            "SELECT extract(epoch FROM settled_at - %s)::float8 FROM d365inv.invoice"
            " WHERE id > %s AND status = 'created'", (db_t0, first_id)))
        elapsed = settled[-1]
        whole = int(elapsed // a.window)           # whole windows the run lasted
        per_window = [0] * (whole + 1)
        for t in settled:
            per_window[min(int(t // a.window), whole)] += 1
        if whole >= 2:
            lo, hi = a.window, whole * a.window
            steady = sum(1 for t in settled if lo <= t < hi) / (hi - lo)
        else:  # too short to leave the first window out
            lo, hi, steady = 0.0, elapsed, len(settled) / elapsed

        users_seen = stats["users"]
        sp = stats["service_protection"]
        admitted = sp["requests"]
        throttled = sum(sp["throttled"].values())
        bl = self.q("SELECT count(*), count(*) FILTER (WHERE throttled), coalesce(sum(created), 0),"
                    "       count(*) FILTER (WHERE http_status IS NULL)"
                    "  FROM d365inv.batch_log WHERE id > %s", (first_log,))[0]
        result = {
            "label": label, "pacing": pacing, "app_users": users, "invoices": n,
            "created": len(settled), "review": statuses.get("review", 0),
            "max_in_flight": max_in_flight, "seconds": elapsed, "seconds_polled": wall,
            "per_s_whole_run": len(settled) / elapsed, "per_s": steady, "measured_from_s": lo, "measured_to_s": hi,
            "ideal_per_s": ideal, "share_of_ideal": steady / ideal,
            "per_window": per_window,
            "requests_admitted": admitted, "requests_429": throttled,
            "throttled_by": sp["throttled"],
            "share_429": throttled / (admitted + throttled) if admitted + throttled else 0.0,
            "execution_ms_per_invoice": sp["execution_ms"] / max(stats["operations"]["POST"], 1),
            "mock_users": users_seen,
            "batch_log": {"requests": bl[0], "throttled": bl[1], "created": bl[2], "unanswered": bl[3]},
            "cpu": cpu,
            "pacing_applied": self.has_pacing, "app_users_configured": self.has_app_users,
        }
        # the same ideal at the execution time the mock really charged per
        # invoice (op_cost_ms plus its own overhead, which grows with load)
        charged = result["execution_ms_per_invoice"]
        if charged > 0:
            result["ideal_charged_per_s"] = users * min(a.requests * a.batch_size / a.window,
                                                        a.execution / a.window / (charged / 1000.0))
            result["share_of_ideal_charged"] = steady / result["ideal_charged_per_s"]
        log("%s: %s invoices/s over windows 2..%d (%.0f%% of %s/s), %.1f%% of %s requests throttled"
            % (label, fmt_int(steady), whole, 100 * steady / ideal, fmt_int(ideal),
               100 * result["share_429"], fmt_int(admitted + throttled)))
        return result

    def verify(self, mock, stats, label, n, first_id):
        """Every invoice settled, each 'created' one created by the mock
        exactly once.  Invoices the worker gave up on ('review': out of
        retries after 429s) are a result, not a failure; returns the
        statuses."""
        problems = []
        statuses = dict(self.q("SELECT status::text, count(*) FROM d365inv.invoice"
                               " WHERE id > %s GROUP BY 1", (first_id,)))
        created = statuses.get("created", 0)
        if set(statuses) - {"created", "review"}:
            problems.append("queue: %s; expected 'created' (or 'review')" % statuses)
        if stats["entities"] != created:
            problems.append("mock holds %d entities, the queue %d created" % (stats["entities"], created))
        counts = mock.counts()
        if len(counts) != created or set(counts.values()) - {1}:
            twice = sum(1 for v in counts.values() if v != 1)
            problems.append("mock counts: %d keys, %d created more than once; expected %d keys once"
                            % (len(counts), twice, created))
        if problems:
            raise BenchError("%s: wrong result:\n  %s" % (label, "\n  ".join(problems)))
        return statuses


# ---- the report -------------------------------------------------------------

def report_results(report, a, results):
    report("%-28s %8s %7s %7s %11s %8s %9s %9s %6s %7s" % (
        "run", "invoices", "review", "seconds", "invoices/s", "ideal/s", "% ideal", "requests", "429s",
        "% 429"))
    for r in results:
        report("%-28s %8s %7s %7.1f %11s %8s %8.1f%% %9s %6s %6.2f%%" % (
            r["label"], fmt_int(r["invoices"]), fmt_int(r["review"]), r["seconds"], fmt_int(r["per_s"]),
            fmt_int(r["ideal_per_s"]), 100 * r["share_of_ideal"],
            fmt_int(r["requests_admitted"] + r["requests_429"]), fmt_int(r["requests_429"]),
            100 * r["share_429"]))
    report("(invoices/s: created ones over whole windows after the first, as settled in")
    report("d365inv.invoice; review: invoices the worker gave up on (out of retries); requests and")
    report("429s as the mock counted them, all app users; a 429 is not processed and does not count")
    report("toward the limits)")
    report()
    report("Invoices settled per %g s window (the first one spends a fresh budget), and the whole run:"
           % a.window)
    for r in results:
        report("%-28s %s  (whole run %s/s)" % (r["label"], " ".join(fmt_int(x) for x in r["per_window"]),
                                               fmt_int(r["per_s_whole_run"])))
    report()
    report("Per app user, as the mock saw them (requests admitted, 429s by limit: requests /")
    report("execution time / concurrency, execution time charged, most requests at once):")
    for r in results:
        parts = []
        for name, u in r["mock_users"].items():
            t = u["throttled"]
            parts.append("%s %s req, 429 %d/%d/%d, %.1f s, %d at once" % (
                name, fmt_int(u["requests"]), t["requests"], t["execution"], t["concurrent"],
                u["execution_ms"] / 1000, u["max_in_progress"]))
        report("%-28s %s" % (r["label"], "; ".join(parts) or "-"))
    report()
    report("%-28s %10s %9s %9s %8s %8s %12s %10s %8s" % ("run", "in flight", "worker", "mock", "log req",
                                                        "log 429", "exec ms/inv", "ideal/s", "% ideal"))
    for r in results:
        report("%-28s %10d %8.0f%% %8.0f%% %8s %8s %12.2f %10s %7.1f%%" % (
            r["label"], r["max_in_flight"], r["cpu"]["worker_pct"], r["cpu"]["mock_pct"],
            fmt_int(r["batch_log"]["requests"]), fmt_int(r["batch_log"]["throttled"]),
            r["execution_ms_per_invoice"], fmt_int(r.get("ideal_charged_per_s", 0)),
            100 * r.get("share_of_ideal_charged", 0)))
    report("(max_in_flight of the target; CPU in % of one core; d365inv.batch_log's requests")
    report("and throttled ones; execution time the mock charged per invoice, op_cost_ms %g plus"
           % a.op_cost_ms)
    report("the mock's own time, and the ideal and share of it at that charged cost)")


def summary(results):
    by = {(r["pacing"], r["app_users"]): r for r in results}
    parts = []
    one = by.get(("budget", 1))
    if one:
        ok = one["share_of_ideal"] >= TARGET_SHARE and one["share_429"] <= TARGET_THROTTLED
        parts.append("budget, 1 user = %s/s (%.0f%% of ideal %s/s, %.2f%% 429; target >= %.0f%%, <= %.0f%%: %s)"
                     % (fmt_int(one["per_s"]), 100 * one["share_of_ideal"], fmt_int(one["ideal_per_s"]),
                        100 * one["share_429"], 100 * TARGET_SHARE, 100 * TARGET_THROTTLED,
                        "met" if ok else "NOT met"))
    four = by.get(("budget", 4))
    if four:
        text = "budget, 4 users = %s/s (%.0f%% of ideal, %.2f%% 429" % (
            fmt_int(four["per_s"]), 100 * four["share_of_ideal"], 100 * four["share_429"])
        if one:
            x = four["per_s"] / one["per_s"]
            text += "; %.2f x one user, target >= %.1f x: %s" % (x, TARGET_SCALING,
                                                                 "met" if x >= TARGET_SCALING else "NOT met")
        parts.append(text + ")")
    for users in (1, 4):
        r = by.get(("off", users))
        if r:
            parts.append("off, %d user%s = %s/s (%.0f%% of ideal, %.1f%% 429)"
                         % (users, "" if users == 1 else "s", fmt_int(r["per_s"]),
                            100 * r["share_of_ideal"], 100 * r["share_429"]))
    return "throttle: " + "; ".join(parts) if parts else None


def result_table(results, stamp, fingerprint):
    """The markdown for bench/results/throttle.md: each run's rate against
    one app user with the same pacing, measured in the same bench run."""
    one = {r["pacing"]: r for r in results if r["app_users"] == 1}
    rows = []
    for r in results:
        base = one.get(r["pacing"])
        rows.append(["`%s`" % r["pacing"], r["app_users"], fmt_int(r["per_s"]),
                     "%.1f%% of %s/s" % (100 * r["share_of_ideal"], fmt_int(r["ideal_per_s"])),
                     "the baseline" if base is r else ratio(r["per_s"], base["per_s"] if base else None),
                     "%.2f%% (%s of %s)" % (100 * r["share_429"], fmt_int(r["requests_429"]),
                                            fmt_int(r["requests_admitted"] + r["requests_429"])),
                     fmt_int(r["review"])])
    return (md_table(["pacing", "app users", "invoices/s", "of the ideal", "against one app user",
                      "requests throttled (429)", "given up (review)"], rows)
            + "\n\n" + measured_by("bench/throttle", stamp, fingerprint))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=float, default=10, help="sliding window, seconds (Dataverse: 300)")
    ap.add_argument("--requests", type=int, default=200, help="requests per app user per window (6,000)")
    ap.add_argument("--execution", type=float, default=40,
                    help="seconds of execution time per app user per window (1,200)")
    ap.add_argument("--op-cost-ms", type=float, default=10, help="server time per operation, ms")
    ap.add_argument("--latency-ms", type=float, default=0, help="the mock's latency_ms (network)")
    ap.add_argument("--batch-size", type=int, default=20, help="the target's batch_size")
    ap.add_argument("--in-flight-per-user", type=int, default=8,
                    help="max_in_flight = this x app users, at most 52")
    ap.add_argument("--users", default="1,2,4", help="app user counts to run")
    ap.add_argument("--pacing", default="budget,off", help="pacing modes to run (budget, off)")
    ap.add_argument("--windows", type=int, default=4,
                    help="whole windows to measure after the first (sets the invoices per run)")
    ap.add_argument("--pg-conf", action="append", default=[], metavar="NAME=VALUE",
                    help="extra postgresql.conf setting for the cluster (repeatable)")
    a = ap.parse_args()
    if os.geteuid() == 0:
        sys.exit("bench/throttle.py: run as an ordinary user (bench/throttle does that for root)")
    users = [int(x) for x in a.users.split(",")]
    pacings = a.pacing.split(",")
    if any(p not in ("budget", "off") for p in pacings) or any(u < 1 for u in users):
        sys.exit("bench/throttle.py: --pacing takes budget and/or off, --users positive counts")

    report = Report()
    bench = Bench(a)
    results = []
    failure = None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    fingerprint = tree_fingerprint()
    try:
        bench.start()
        bench.q("ANALYZE d365inv.invoice")
        for pacing in pacings:
            for n in users:
                results.append(bench.run(pacing, n))
                bench.q("ANALYZE d365inv.invoice")
    except BenchError as e:
        failure = str(e)
    finally:
        bench.stop(keep_log=os.path.join(OUT_DIR, "throttle-%s.server.log" % stamp))

    report()
    report("bench/throttle: d365inv worker -> mock D365 with service protection limits, %s, source %s"
           % (stamp, fingerprint))
    report("per app user: %g s window, %s requests, %g s execution time, 52 at once; %g ms per"
           " operation, batch_size %d, latency %g ms; ideal per app user %s invoices/s"
           % (a.window, fmt_int(a.requests), a.execution, a.op_cost_ms, a.batch_size, a.latency_ms,
              fmt_int(bench.ideal_per_user())))
    if not bench.has_pacing or not bench.has_app_users:
        report("NOTE: this schema has no %s: the runs could not set them"
               % " and no ".join(x for x, ok in (("pacing / limit_* columns", bench.has_pacing),
                                                 ("d365inv.app_user", bench.has_app_users)) if not ok))
    if results:
        report()
        report_results(report, a, results)
    if failure:
        report()
        report("FAILED: " + failure)
    line = summary(results)
    if line:
        report()
        report(line)
    if results and not failure:
        table_md = result_table(results, stamp, fingerprint)
        report()
        report("For docs/benchmarks.md (bench/update-docs):")
        report(table_md)
        write_result("throttle", table_md, default_settings(ap, a), stamp)

    save_results("throttle", stamp, report, {"stamp": stamp, "source_sha256_12": fingerprint,
                                             "settings": vars(a), "results": results,
                                             "failure": failure, "argv": sys.argv[1:]},
                 server_log=True)
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
