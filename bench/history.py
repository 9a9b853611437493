#!/usr/bin/python3
"""The unprivileged half of bench/history (see there): does the worker's
cost grow with the settled history?

    bench/history.py [--quick] [--history N] [--fresh N] [--days D]
                     [--repeat K] [--alert-interval MS] [--pg-conf NAME=VALUE ...]

One throwaway cluster with the worker (the Bench of bench/submit.py), with
pg_stat_statements loaded, a short d365inv.alert_interval (so the periodic
alert check runs every 5 s instead of every minute) and a short
autovacuum_naptime.  In the same run:

  1. baseline: deliver --fresh invoices (default 100,000) at zero latency,
     8 in flight x 20, on an empty history (best of --repeat);
  2. move the baseline's invoices a day back (so that both runs start with
     the same last hour but for the history's own), and put --history
     settled invoices (default 5,000,000) behind them with
     bench/history.sql (spread over the last --days days, with duplicate,
     reject, batch_log, status_change and remote_key rows in proportion);
  3. time every periodic and reporting statement on that history (EXPLAIN
     ANALYZE, rolled back; test/integration/periodic_queries.py);
  4. deliver --fresh invoices again, on the history (best of --repeat);
  5. read pg_stat_user_tables for d365inv.invoice (updates, dead tuples,
     autovacuum and autoanalyze runs) and the size of its indexes, then
     REINDEX it and compare; autovacuum must have run within
     --autovacuum-wait seconds when the dead tuples reached its threshold
     (autovacuum_vacuum_threshold + scale factor x rows).

The worker's time: pg_stat_statements (track = top: the worker's own
statements, each with the functions and views it calls) split into
periodic work (the alert check, the housekeeping) and the rest; the bench's
own sessions are not tracked.  Figures are ratios to the baseline of the
same run: delivery on the history / on an empty history (target: at least
0.90), periodic work / run time (target: at most 5%, here with the alert
check every --alert-interval ms; at the default of one minute it is that
share divided by 60 / interval).

Results: on stdout, and the same text and the raw figures (JSON) in
bench/out/.  Exit status 1 when a check fails or a target is missed.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from benchlib import OUT_DIR, ROOT, BenchError, Report, fmt_int, log
from periodic_queries import REPORTING, WHOLE_HISTORY, WORKER, explain, full_scans  # noqa: E402
from pgcluster import PG_BIN  # noqa: E402
from submit import Bench, tree_fingerprint  # noqa: E402

RATE_TARGET = 0.90          # delivery on the history / on an empty history
PERIODIC_TARGET = 0.05      # periodic work / run time

# how the worker's periodic statements read (alerts.c, worker.c housekeeping)
PERIODIC_MARKS = (
    ("alert check", ("FROM d365inv.duplicate_rate", "FROM d365inv.batch_health",
                     "FROM d365inv.target_alerts", "pg_notify('d365inv_alert'")),
    ("retention", ("DELETE FROM d365inv.batch_log", "DELETE FROM d365inv.remote_key",
                   "DELETE FROM d365inv.status_change")),
    ("housekeeping", ("does not exist in d365inv.target", "d365inv.worker_state",
                      "d365inv.compact_tally()")),
)


def kind_of(query):
    for kind, marks in PERIODIC_MARKS:
        if any(m in query for m in marks):
            return kind
    return None


class HistoryBench(Bench):
    def start(self):
        super().start()
        for conn in (self.conn, self.poll):
            with conn.cursor() as cur:
                # only the worker's statements count
                cur.execute("SET pg_stat_statements.track = 'none'")
        self.q("CREATE EXTENSION pg_stat_statements")
        self.q("CREATE EXTENSION pgstattuple")

    def worker_sql(self):
        """{kind: (calls, ms)} of the statements pg_stat_statements holds;
        kind 'delivery' is everything not periodic."""
        out = {}
        for query, calls, ms in self.q("SELECT query, calls, total_exec_time FROM pg_stat_statements"
                                       " WHERE dbid = (SELECT oid FROM pg_database"
                                       "               WHERE datname = current_database())"):
            kind = kind_of(query) or "delivery"
            c, t = out.get(kind, (0, 0.0))
            out[kind] = (c + calls, t + ms)
        return out

    def statements(self):
        return self.q("SELECT query, calls, total_exec_time FROM pg_stat_statements"
                      " ORDER BY total_exec_time DESC LIMIT 12")

    def delivery(self, label, n, repeat):
        """Best of `repeat` zero-latency runs of n invoices, with the
        worker's SQL time of that run."""
        best = None
        for _ in range(repeat):
            self.q("SELECT pg_stat_statements_reset()")
            r = self.run(label, n, 0, 20, 8)
            r["worker_sql"] = self.worker_sql()
            r["top_statements"] = self.statements()
            if best is None or r["per_s"] > best["per_s"]:
                best = r
        return best

    def age_baseline(self):
        """Move the baseline's invoices, requests and status changes a
        day back: the history run's last hour then holds what the baseline
        run's did (its own deliveries and the history's last hour), not the
        baseline's deliveries on top."""
        self.q("UPDATE d365inv.invoice SET created_at = created_at - interval '1 day',"
               " updated_at = updated_at - interval '1 day', settled_at = settled_at - interval '1 day'")
        self.q("UPDATE d365inv.batch_log SET started_at = started_at - interval '1 day'")
        self.q("UPDATE d365inv.status_change SET changed_at = changed_at - interval '1 day'")

    def fill(self, n, days):
        log("putting %s settled invoices behind the worker (bench/history.sql)" % fmt_int(n))
        t0 = time.monotonic()
        subprocess.run([os.path.join(PG_BIN, "psql"), "-qX", "-h", self.pg.dir, "-p", "5432",
                        "-U", "postgres", "-d", self.pg.dbname, "-v", "n=%d" % n, "-v", "days=%s" % days,
                        "-f", os.path.join(ROOT, "bench", "history.sql")],
                       check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - t0

    def probe_all(self):
        """{name: (ms, full scans)} of every periodic and reporting statement."""
        conn = self.pg.connect()
        out = {}
        try:
            with conn.cursor() as cur:
                cur.execute("SET pg_stat_statements.track = 'none'")
            for group in (WORKER, REPORTING, WHOLE_HISTORY):
                for name, (sql, write) in group.items():
                    runs = [explain(conn, sql, write) for _ in range(2)]
                    out[name] = (min(r[0] for r in runs), full_scans(runs[-1][1]))
        finally:
            conn.close()
        return out

    def table_stats(self):
        return self.q("SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd, n_dead_tup, n_live_tup,"
                      "       autovacuum_count, autoanalyze_count, vacuum_count,"
                      "       last_autovacuum::text, last_autoanalyze::text"
                      "  FROM pg_stat_user_tables WHERE relid = 'd365inv.invoice'::regclass")[0]

    def vacuum_threshold(self):
        """The dead tuples at which autovacuum vacuums d365inv.invoice:
        autovacuum_vacuum_threshold + autovacuum_vacuum_scale_factor x its
        rows (the table has no settings of its own)."""
        return self.q("SELECT current_setting('autovacuum_vacuum_threshold')::float8"
                      "       + current_setting('autovacuum_vacuum_scale_factor')::float8 * c.reltuples"
                      "  FROM pg_class c WHERE c.oid = 'd365inv.invoice'::regclass")[0][0]

    def index_sizes(self):
        """{index: [bytes, leaf pages, empty or deleted pages, leaf density %]}"""
        return {r[0]: list(r[1:]) for r in self.q(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid), s.leaf_pages,"
            "       s.empty_pages + s.deleted_pages, s.avg_leaf_density"
            "  FROM pg_index, pgstatindex(indexrelid) s"
            " WHERE indrelid = 'd365inv.invoice'::regclass ORDER BY 1")}


STAT_NAMES = ("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_dead_tup", "n_live_tup",
              "autovacuum_count", "autoanalyze_count", "vacuum_count", "last_autovacuum",
              "last_autoanalyze")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="500,000 invoices of history, 50,000 fresh")
    ap.add_argument("--history", type=int, help="settled invoices behind (default 5,000,000)")
    ap.add_argument("--fresh", type=int, help="invoices delivered per run (default 100,000)")
    ap.add_argument("--days", type=float, default=7, help="the history spans this many days (default 7)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best counts")
    ap.add_argument("--alert-interval", type=int, default=5000,
                    help="d365inv.alert_interval in ms during the runs (default 5000)")
    ap.add_argument("--autovacuum-wait", type=int, default=60,
                    help="seconds to wait for autovacuum after the last run (default 60)")
    ap.add_argument("--pg-conf", action="append", default=[], metavar="NAME=VALUE",
                    help="extra postgresql.conf setting (repeatable)")
    a = ap.parse_args()
    history = a.history or (500000 if a.quick else 5000000)
    fresh = a.fresh or (50000 if a.quick else 100000)
    if os.geteuid() == 0:
        sys.exit("bench/history.py: run as an ordinary user (bench/history does that for root)")
    a.pg_conf = ["shared_preload_libraries='d365inv,pg_stat_statements'",
                 "pg_stat_statements.track=top", "d365inv.alert_interval=%d" % a.alert_interval,
                 "autovacuum_naptime=1s", "log_autovacuum_min_duration=0",
                 "max_wal_size=8GB"] + a.pg_conf

    report = Report()
    bench = HistoryBench(a, report)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    res = {"history": history, "fresh": fresh, "days": a.days, "alert_interval_ms": a.alert_interval,
           "source": tree_fingerprint(), "stamp": stamp}
    failure = None
    try:
        bench.start()
        bench.run("warm-up", 1000, 0, 20, 8)
        bench.q("ANALYZE d365inv.invoice")
        res["empty"] = bench.delivery("empty history", fresh, a.repeat)
        bench.age_baseline()
        res["fill_s"] = bench.fill(history, a.days)
        res["probes"] = bench.probe_all()
        res["stats_before"] = dict(zip(STAT_NAMES, bench.table_stats()))
        res["sizes_before"] = bench.index_sizes()
        res["full"] = bench.delivery("%s invoices of history" % fmt_int(history), fresh, a.repeat)
        res["stats_after_run"] = dict(zip(STAT_NAMES, bench.table_stats()))
        res["vacuum_threshold"] = bench.vacuum_threshold()
        log("waiting up to %d s for autovacuum on d365inv.invoice" % a.autovacuum_wait)
        deadline = time.monotonic() + a.autovacuum_wait
        while time.monotonic() < deadline:
            st = dict(zip(STAT_NAMES, bench.table_stats()))
            if st["autovacuum_count"] > res["stats_after_run"]["autovacuum_count"]:
                break
            time.sleep(1)
        res["autovacuum_wait_s"] = a.autovacuum_wait - max(deadline - time.monotonic(), 0)
        res["stats_after"] = dict(zip(STAT_NAMES, bench.table_stats()))
        res["sizes_after"] = bench.index_sizes()
        bench.q("REINDEX TABLE d365inv.invoice")
        res["sizes_reindexed"] = bench.index_sizes()
    except BenchError as e:
        failure = str(e)
    finally:
        bench.stop(keep_log=os.path.join(OUT_DIR, "history-%s.server.log" % stamp))

    report()
    report("bench/history: %s settled invoices behind the worker (%g days), %s fresh per run,"
           " zero-latency mock, 8 in flight x 20; alert check every %d ms; %s, source %s"
           % (fmt_int(history), a.days, fmt_int(fresh), a.alert_interval, stamp, res["source"]))
    missed = []
    if "full" in res:
        e, f = res["empty"], res["full"]
        ratio = f["per_s"] / e["per_s"]
        report()
        report("%-28s %12s %10s %14s %14s %9s" % ("run", "invoices/s", "ratio", "periodic ms",
                                                   "worker SQL ms", "periodic"))
        for r in (e, f):
            sql = r["worker_sql"]
            periodic = sum(ms for k, (c, ms) in sql.items() if k != "delivery")
            total = sum(ms for c, ms in sql.values())
            r["periodic_ms"] = periodic
            r["periodic_share"] = periodic / (1000 * r["seconds"])
            report("%-28s %12s %10.3f %14.1f %14.1f %8.2f%%"
                   % (r["label"], fmt_int(r["per_s"]), r["per_s"] / e["per_s"], periodic, total,
                      100 * r["periodic_share"]))
        report()
        report("delivery on the history / on an empty history: %.3f (target >= %.2f)" % (ratio, RATE_TARGET))
        report("periodic work / run time on the history: %.2f%% (target <= %.0f%%; alert check every %d ms,"
               " at the default 60 s: %.3f%%)" % (100 * f["periodic_share"], 100 * PERIODIC_TARGET,
                                                  a.alert_interval,
                                                  100 * f["periodic_share"] * a.alert_interval / 60000))
        for kind, (calls, ms) in sorted(f["worker_sql"].items()):
            report("  %-14s %6d calls %10.1f ms  %8.2f ms/call" % (kind, calls, ms, ms / max(calls, 1)))
        if ratio < RATE_TARGET:
            missed.append("delivery on the history is %.3f of the empty-history rate" % ratio)
        if f["periodic_share"] > PERIODIC_TARGET:
            missed.append("periodic work is %.1f%% of the run" % (100 * f["periodic_share"]))
    if "probes" in res:
        report()
        report("Each statement once on the history (EXPLAIN ANALYZE, best of 2, rolled back):")
        report("  %-32s %10s  %s" % ("statement", "ms", "tables read whole"))
        for name, (ms, scans) in res["probes"].items():
            report("  %-32s %10.1f  %s" % (name, ms, ", ".join(scans) or "-"))
    if "stats_after" in res:
        report()
        report("d365inv.invoice in pg_stat_user_tables (the worker reports its statistics):")
        report("  %-18s %14s %14s %14s" % ("", "before the run", "after the run",
                                           "%.0f s later" % res["autovacuum_wait_s"]))
        for k in STAT_NAMES:
            report("  %-18s %14s %14s %14s" % (k, str(res["stats_before"][k])[:19],
                                               str(res["stats_after_run"][k])[:19],
                                               str(res["stats_after"][k])[:19]))
        report()
        report("Indexes of d365inv.invoice: MB before the run, after it (and autovacuum), after a")
        report("REINDEX; leaf pages in use (of them empty or deleted, reusable) and leaf density")
        report("after the run (pgstatindex):")
        report("  %-28s %8s %8s %8s %7s %16s %8s" % ("index", "before", "after", "REINDEX", "ratio",
                                                      "leaf (free)", "density"))
        tot = [0, 0, 0]
        for idx in res["sizes_after"]:
            b = res["sizes_before"].get(idx, [0])[0]
            af, leaf, free, dens = res["sizes_after"][idx]
            rx = res["sizes_reindexed"][idx][0]
            tot = [tot[0] + b, tot[1] + af, tot[2] + rx]
            report("  %-28s %8.1f %8.1f %8.1f %7.2f %16s %7.0f%%"
                   % (idx.replace("d365inv.", ""), b / 2 ** 20, af / 2 ** 20, rx / 2 ** 20,
                      af / max(rx, 8192), "%d (%d)" % (leaf, free), dens))
        report("  %-28s %8.1f %8.1f %8.1f %7.2f" % ("all", tot[0] / 2 ** 20, tot[1] / 2 ** 20,
                                                    tot[2] / 2 ** 20, tot[1] / max(tot[2], 1)))
        # autovacuum acts on the statistics the worker reports once its
        # threshold is reached; below it, it is not expected to
        ran = res["stats_after"]["autovacuum_count"] > res["stats_after_run"]["autovacuum_count"]
        # (the worker's last statistics may come in after the run)
        dead = res["stats_%s" % ("after_run" if ran else "after")]["n_dead_tup"]
        threshold = res["vacuum_threshold"]
        ran_in_run = res["stats_after_run"]["autovacuum_count"] > res["stats_before"]["autovacuum_count"]
        report()
        report("autovacuum of d365inv.invoice: %s dead tuples after the run, its threshold %s: %s%s"
               % (fmt_int(dead), fmt_int(threshold),
                  "ran within %.0f s" % res["autovacuum_wait_s"] if ran else
                  "did not run within %d s" % a.autovacuum_wait if dead > threshold else
                  "not reached, not expected to run",
                  " (it also ran during the run)" if ran_in_run else ""))
        if dead > threshold and not ran:
            missed.append("autovacuum did not run on d365inv.invoice within %d s although its"
                          " threshold was reached" % a.autovacuum_wait)
    if failure:
        report()
        report("FAILED: " + failure)
    for m in missed:
        report("target missed: " + m)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "history-%s.txt" % stamp), "w") as f:
        f.write("\n".join(report.lines) + "\n")
    with open(os.path.join(OUT_DIR, "history-%s.json" % stamp), "w") as f:
        json.dump(res, f, indent=1, default=str)
    sys.exit(1 if failure or missed else 0)


if __name__ == "__main__":
    main()
