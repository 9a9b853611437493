#!/usr/bin/python3
"""The unprivileged half of bench/preflight (see there): what the bloom
filter (d365inv.key_filter) saves when preflight = 'always'.

    bench/preflight.py [--n 10000] [--existing 100] [--older 50000]
                       [--latency-ms 20] [--page-size 5000] [--small-filter-kb 64]
                       [--scenarios filter,nofilter,filter_nocache,nofilter_nocache,small_filter,
                                    filter_stale,nofilter_stale]  (default: all)

Runs as an ordinary user (never root: PostgreSQL refuses) with Debian's
python3 and psycopg2.  Every scenario gets a throwaway cluster with the
worker (test/integration/pgcluster.py) and a mock D365
(test/integration/mockctl.py) of its own, seeded with the same data, so the
mock's counters, d365inv.batch_log and the filter are that scenario's own
and the scenarios are compared on identical data:

  D365 (the mock) holds --older invoices created outside d365inv (keys
  OLD-...) and --existing of the --n invoices about to be sent (half of
  them with the invoice number in lower case: D365 compares keys
  case-insensitively, and so must the cache and the filter).

  1. the 'default' target points at the mock, preflight = 'always',
     batch_size 20, max_in_flight 4 (the defaults);
  2. d365inv.refresh_remote_keys('default') reads D365's keys into
     d365inv.remote_key (the cache) and so into the filter; its time and
     pages are reported;
  3. service_root is set to NULL (the worker sends nothing), the filter GUC
     is set (ALTER SYSTEM SET d365inv.key_filter = on|off; pg_reload_conf()),
     and the --n invoices are COPYed into the inbox and ingested;
  4. service_root is set back, the worker is woken, and the run ends when no
     invoice is open.  Measured: the mock's operations and requests (the
     difference of /_admin/stats around the run), batch_log, the invoices'
     status and settled_by, the mock's per-key creation counts.

Scenarios:
  filter            (a) filter on: the existing invoices are cache hits, the
                    fresh ones are looked up only when the filter cannot
                    rule them out (its false positives);
  nofilter          (b) filter off: every key the cache does not hold is
                    looked up;
  filter_nocache    (c) like (a), but the existing keys are deleted from
                    remote_key after the refresh.  The filter keeps them (a
                    bloom filter cannot forget; the worker rebuilds it only
                    when it starts): what happens when the retention
                    (d365inv.remote_key_retention) dropped them from the
                    cache.  The filter alone must send them to a lookup;
  nofilter_nocache  (c0) the same deletion, filter off: the baseline of (c);
  small_filter      (d) like (a) with d365inv.key_filter_size = --small-filter-kb,
                    about the filter's capacity for these keys: what false
                    positives cost;
  filter_stale      (e) filter on, but the existing invoices reach D365 only
                    after the refresh (created there by another path since):
                    neither the cache nor the filter knows them, so they are
                    POSTed and D365's unique index answers 409 (recorded as
                    duplicate, settled_by 'response').  The documented limit
                    of the filter (docs/design.md, "Limits"); the mock has a unique
                    key, as D365 should;
  nofilter_stale    (e0) the same with the filter off: preflight finds them.

Results: a table on stdout, the same text and the raw figures (JSON)
under bench/out/.  Exit status 1 when a check fails.
"""

import argparse
import collections
import csv
import datetime
import math
import os
import random
import subprocess
import sys
import tempfile
import time

from benchlib import (COLS, STALL_S, BenchError, OwnCluster, Report, check_scenarios, default_settings,
                      fmt_int, gen_csv, log, md_table, measured_by, norm, ratio, save_results,
                      stats_diff, tree_fingerprint, wait_settled, write_result)
from mockctl import MockD365  # noqa: E402
from pgcluster import Cluster  # noqa: E402

KEYS_PER_GET = 20          # LOOKUP_KEYS_PER_GET (src/batch_request.h)
TARGET_RATIO = 0.10        # the target: at most 1/10 of the GETs
POLL_S = 0.02
SEED_CHUNK = 5000

SCENARIOS = {
    "filter": dict(label="(a) filter on", filter=True),
    "nofilter": dict(label="(b) filter off", filter=False),
    "filter_nocache": dict(label="(c) filter on, existing not cached", filter=True, nocache=True),
    "nofilter_nocache": dict(label="(c0) filter off, existing not cached", filter=False, nocache=True),
    "small_filter": dict(label="(d) filter on, small filter", filter=True, small=True),
    "filter_stale": dict(label="(e) filter on, existing after refresh", filter=True, stale=True),
    "nofilter_stale": dict(label="(e0) filter off, existing after refresh", filter=False, stale=True),
}
for _s in SCENARIOS.values():
    for _k in ("nocache", "small", "stale"):
        _s.setdefault(_k, False)


class Data:
    def __init__(self, args, tmp):
        self.csv = os.path.join(tmp, "invoices.csv")
        gen_csv(self.csv, args.n, "PF", 11)
        with open(self.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != args.n:
            raise BenchError("gen_invoices.py wrote %d lines, not %d" % (len(rows), args.n))
        rng = random.Random(12)
        existing = rng.sample(rows, args.existing)
        # what D365 holds: created outside d365inv, spelt its own way
        self.existing_keys = set()
        self.seed_existing = []
        for i, r in enumerate(existing):
            number = r["invoice_number"].lower() if i % 2 else r["invoice_number"]
            self.seed_existing.append({
                "VendorAccount": r["vendor_account"], "InvoiceNumber": number,
                "InvoiceDate": r["invoice_date"], "InvoiceAmount": float(r["amount"]),
                "CurrencyCode": r["currency"], "Description": "entered by hand in D365"})
            self.existing_keys.add((norm(r["vendor_account"]), norm(r["invoice_number"])))
        self.fresh_keys = {(norm(r["vendor_account"]), norm(r["invoice_number"])) for r in rows} \
            - self.existing_keys
        self.seed_older = [{
            "VendorAccount": "V%05d" % rng.randrange(1, 5000), "InvoiceNumber": "OLD-%08d" % i,
            "InvoiceDate": "2023-%02d-%02d" % (rng.randrange(1, 13), rng.randrange(1, 29)),
            "InvoiceAmount": rng.randrange(100, 10000000) / 100.0,
            "CurrencyCode": rng.choice(["EUR", "USD", "GBP"]),
            "Description": "older invoice"} for i in range(args.older)]
        # the existing ones somewhere in the middle of the entity set's order
        half = len(self.seed_older) // 2
        self.seed = self.seed_older[:half] + self.seed_existing + self.seed_older[half:]
        self.n = args.n


# ---- one scenario --------------------------------------------------------------

class Scenario(OwnCluster):
    def __init__(self, name, args, data, tmp):
        self.name = name
        self.spec = SCENARIOS[name]
        self.args = args
        self.data = data
        self.tmp = tmp

    # ---- plumbing

    def key_filter(self):
        with self.conn.cursor() as cur:
            cur.execute("SELECT * FROM d365inv.key_filter")
            names = [d[0] for d in cur.description]
            return dict(zip(names, cur.fetchone()))

    def start(self):
        conf = {"log_min_messages": "info", "max_wal_size": "1GB"}
        if self.spec["small"]:
            conf["d365inv.key_filter_size"] = "%dkB" % self.args.small_filter_kb
        self.pg = Cluster(conf)
        self.pg.start()
        self.pg.wait_for_worker()
        self.conn = self.pg.connect()
        self.conn.notices = collections.deque(maxlen=1000000)
        # the worker fills the filter from remote_key (empty) when it starts
        deadline = time.monotonic() + 30
        while not self.key_filter()["in_use"]:
            if time.monotonic() > deadline:
                raise BenchError("the key filter is not in use 30 s after the start:\n"
                                 + self.pg.server_log()[-3000:])
            time.sleep(0.05)
        self.mock = MockD365(latency_ms=self.args.latency_ms, page_size=self.args.page_size)
        self.mock.start()

    def set_filter(self, on):
        self.q("ALTER SYSTEM SET d365inv.key_filter = %s" % ("on" if on else "off"))
        self.q("SELECT pg_reload_conf()")
        # the worker reloads its configuration at the top of its loop; the
        # SIGHUP sets its latch, so a moment is enough
        time.sleep(1.0)
        got = self.q1("SELECT current_setting('d365inv.key_filter')")
        if got != ("on" if on else "off"):
            raise BenchError("d365inv.key_filter is %s after the reload" % got)

    # ---- the run

    def run(self):
        a, d, spec = self.args, self.data, self.spec
        r = {"scenario": self.name, "label": spec["label"], "filter": spec["filter"],
             "nocache": spec["nocache"],
             "key_filter_size_kb": a.small_filter_kb if spec["small"] else None}
        log("%s: starting a cluster and the mock" % spec["label"])
        self.start()

        # D365's content
        seed = d.seed_older if spec["stale"] else d.seed
        t0 = time.monotonic()
        for i in range(0, len(seed), SEED_CHUNK):
            self.mock.seed_entities(seed[i:i + SEED_CHUNK])
        r["seed_s"] = time.monotonic() - t0
        if self.mock.stats()["preexisting"] != len(seed):
            raise BenchError("the mock holds %s seeded invoices, not %d"
                             % (self.mock.stats()["preexisting"], len(seed)))

        self.q("UPDATE d365inv.target SET service_root = %s, preflight = 'always', pacing = 'off',"
               " batch_size = 20, max_in_flight = 4, write_mode = 'create'"
               " WHERE name = 'default'", (self.mock.service_root,))

        # the refresh
        log("%s: refresh_remote_keys('default') over %s invoices in D365"
            % (spec["label"], fmt_int(len(seed))))
        before = self.mock.stats()
        self.conn.notices.clear()
        t0 = time.monotonic()
        keys = self.q1("SELECT d365inv.refresh_remote_keys('default')")
        r["refresh_s"] = time.monotonic() - t0
        moved = stats_diff(self.mock.stats(), before)
        r["refresh_keys"] = keys
        r["refresh_pages"] = moved["plain_requests"].get("GET", 0)
        r["refresh_notices"] = sum(1 for n in self.conn.notices if "refresh_remote_keys" in n)
        r["remote_key_after_refresh"] = self.q1("SELECT count(*) FROM d365inv.remote_key")
        r["filter_after_refresh"] = self.key_filter()
        if keys != len(seed) or r["remote_key_after_refresh"] != len(seed):
            raise BenchError("refresh_remote_keys() returned %s and left %s keys; D365 holds %d"
                             % (keys, r["remote_key_after_refresh"], len(seed)))
        if spec["stale"]:
            # created in D365 by another path after the refresh
            self.mock.seed_entities(d.seed_existing)

        if spec["nocache"]:
            # aged out of the cache, still in the filter (until the worker restarts)
            vk, ik = zip(*sorted(d.existing_keys))
            deleted = self.q1(
                "WITH gone AS (DELETE FROM d365inv.remote_key k USING unnest(%s::text[], %s::text[]) u(v, n)"
                " WHERE k.target = 'default' AND k.vendor_key = d365inv.invoice_key(u.v)"
                "   AND k.invoice_key = d365inv.invoice_key(u.n) RETURNING 1) SELECT count(*) FROM gone",
                (list(vk), list(ik)))
            if deleted != len(d.existing_keys):
                raise BenchError("deleted %d of the %d existing keys from remote_key"
                                 % (deleted, len(d.existing_keys)))
            r["deleted_from_cache"] = deleted

        # the load, with nothing sent yet
        self.q("UPDATE d365inv.target SET service_root = NULL WHERE name = 'default'")
        self.set_filter(spec["filter"])
        r["filter_in_use"] = self.key_filter()["in_use"]
        self.q("COPY d365inv.inbox (%s) FROM %%s (FORMAT csv, HEADER)" % COLS, (d.csv,))
        queued, dups, rejected = self.q("SELECT * FROM d365inv.ingest()")[0]
        if (queued, dups, rejected) != (d.n, 0, 0):
            raise BenchError("ingest() queued %s, duplicates %s, rejected %s; expected %d, 0, 0"
                             % (queued, dups, rejected, d.n))
        self.q("CHECKPOINT")

        # the delivery
        log("%s: delivering %s invoices (%d already in D365)"
            % (spec["label"], fmt_int(d.n), len(d.existing_keys)))
        before = self.mock.stats()
        first_log = self.q1("SELECT coalesce(max(id), 0) FROM d365inv.batch_log")
        self.q("UPDATE d365inv.target SET service_root = %s WHERE name = 'default'",
               (self.mock.service_root,))
        t0 = time.monotonic()
        self.q("SELECT d365inv.wake_worker(true)")
        wait_settled(lambda: self.q1("SELECT count(*) FROM d365inv.invoice WHERE status < 'created'"),
                     lambda open_rows: "%s: no progress for %d s, %d invoices open; statuses %s\n%s"
                     % (spec["label"], STALL_S, open_rows,
                        self.q("SELECT status, count(*) FROM d365inv.invoice GROUP BY 1"),
                        self.pg.server_log()[-3000:]),
                     POLL_S, 0, t0=t0)
        r["elapsed_s"] = time.monotonic() - t0
        r["invoices_per_s"] = d.n / r["elapsed_s"]
        # the worker logs its requests in the transaction that records the
        # outcomes, so every batch_log row of the run is visible by now
        moved = stats_diff(self.mock.stats(), before)
        r["mock"] = moved
        r["filter_after_run"] = self.key_filter()
        self.collect(r, first_log)
        self.check(r)
        return r

    def collect(self, r, first_log):
        d = self.data
        kinds = {}
        for kind, ops, n, invoices, found, not_found, retries, errors in self.q(
                "SELECT kind, sum(operations), count(*), sum(invoices), sum(duplicates),"
                "       sum(not_found), sum(retries), count(error)"
                "  FROM d365inv.batch_log WHERE id > %s GROUP BY kind", (first_log,)):
            kinds[kind] = {"requests": n, "operations": int(ops), "invoices": int(invoices),
                           "duplicates": int(found), "not_found": int(not_found),
                           "retries": int(retries), "errors": n and int(errors)}
        r["batch_log"] = kinds
        # invoices by fate, existing and fresh apart
        rows = self.q("SELECT vendor_key, invoice_key, status::text, settled_by, d365_id, attempts"
                      "  FROM d365inv.invoice")
        fates = {"existing": collections.Counter(), "fresh": collections.Counter()}
        attempts = collections.Counter()
        ids = {}
        for vk, ik, status, settled_by, d365_id, att in rows:
            group = "existing" if (vk, ik) in d.existing_keys else "fresh"
            fates[group]["%s/%s" % (status, settled_by)] += 1
            attempts[att] += 1
            if group == "existing":
                ids[(vk, ik)] = d365_id
        r["fates"] = {k: dict(v) for k, v in fates.items()}
        r["attempts"] = dict(attempts)
        # what the mock created, and the ids it gave the existing ones
        counts = self.mock.counts()
        r["created_keys"] = len(counts)
        r["created_twice"] = sum(1 for v in counts.values() if v != 1)
        r["existing_created_again"] = sum(1 for vk, ik in d.existing_keys
                                          if counts.get("%s|%s" % (vk, ik), 0) != 0)
        r["fresh_not_created"] = sum(1 for vk, ik in d.fresh_keys
                                     if counts.get("%s|%s" % (vk, ik), 0) != 1)
        pre = self.mock.preexisting()
        r["existing_preexisting_count_not_1"] = sum(
            1 for vk, ik in d.existing_keys if pre.get("%s|%s" % (vk, ik), 0) != 1)
        mock_ids = {(norm(e["VendorAccount"]), norm(e["InvoiceNumber"])): e["InvoiceId"]
                    for e in self.mock.entities()
                    if (norm(e["VendorAccount"]), norm(e["InvoiceNumber"])) in d.existing_keys}
        r["existing_wrong_id"] = sum(1 for k, v in ids.items() if v is not None and v != mock_ids.get(k))
        r["existing_without_id"] = sum(1 for v in ids.values() if v is None)

    def check(self, r):
        d, spec = self.data, self.spec
        problems = []
        n_existing, n_fresh = len(d.existing_keys), len(d.fresh_keys)
        ops = r["mock"]["operations"]
        look = r["batch_log"].get("lookup", {"requests": 0, "operations": 0, "invoices": 0,
                                             "duplicates": 0, "not_found": 0, "retries": 0,
                                             "errors": 0})
        create = r["batch_log"].get("create", {"requests": 0, "operations": 0})
        r["gets"] = ops["GET"]
        r["posts"] = ops["POST"]
        r["lookup_round_trips"] = look["requests"]
        r["keys_looked_up"] = look["invoices"]
        r["mock_batches"] = r["mock"]["batches"]
        r["mock_plain"] = sum(r["mock"]["plain_requests"].values())
        r["round_trips"] = r["mock_batches"] + r["mock_plain"]
        # how the existing invoices must end, and what it takes
        if spec["stale"]:
            settled = "response" if spec["filter"] else "preflight"
        else:
            settled = "preflight" if spec["nocache"] else "cache"
        reposted = n_existing if settled == "response" else 0
        r["existing_posted"] = r["mock"]["responses"].get("409", 0) + r["existing_created_again"]
        want = {"duplicate/%s" % settled: n_existing}
        if r["fates"]["existing"] != want:
            problems.append("the %d existing invoices ended %s, expected %s"
                            % (n_existing, r["fates"]["existing"], want))
        if r["fates"]["fresh"] != {"created/response": n_fresh}:
            problems.append("the %d fresh invoices ended %s" % (n_fresh, r["fates"]["fresh"]))
        if r["existing_created_again"] or r["existing_preexisting_count_not_1"]:
            problems.append("existing invoices created again: %d created, %d not exactly once in D365"
                            % (r["existing_created_again"], r["existing_preexisting_count_not_1"]))
        if r["created_twice"] or r["fresh_not_created"] or r["created_keys"] != n_fresh:
            problems.append("the mock created %d keys (%d more than once), %d fresh keys not once"
                            % (r["created_keys"], r["created_twice"], r["fresh_not_created"]))
        if r["posts"] != n_fresh + reposted:
            problems.append("%d POST operations for %d fresh invoices, expected %d"
                            % (r["posts"], n_fresh, n_fresh + reposted))
        if r["existing_posted"] != reposted:
            problems.append("%d existing invoices POSTed (409 already exists), expected %d"
                            % (r["existing_posted"], reposted))
        if settled != "response" and r["existing_without_id"]:
            problems.append("%d existing invoices have no d365_id" % r["existing_without_id"])
        if r["existing_wrong_id"]:
            problems.append("%d existing invoices have a d365_id other than D365's"
                            % r["existing_wrong_id"])
        # batch_log and the mock must tell the same story
        if look["operations"] != r["gets"]:
            problems.append("batch_log counts %d lookup GETs, the mock %d" % (look["operations"], r["gets"]))
        if create["operations"] != r["posts"]:
            problems.append("batch_log counts %d POSTs, the mock %d" % (create["operations"], r["posts"]))
        if look["requests"] + create["requests"] != r["mock_batches"] + r["mock"]["plain_requests"].get("GET", 0):
            problems.append("batch_log has %d requests, the mock saw %d $batch and %s plain"
                            % (look["requests"] + create["requests"], r["mock_batches"],
                               r["mock"]["plain_requests"]))
        if look["retries"] or look["errors"]:
            problems.append("lookups failed: %d retries, %d errors" % (look["retries"], look["errors"]))
        if look["duplicates"] + look["not_found"] != look["invoices"]:
            problems.append("lookups: %d found + %d not found != %d keys looked up"
                            % (look["duplicates"], look["not_found"], look["invoices"]))
        # each key looked up at most once, and the filter consulted
        uncached = n_fresh + (n_existing if spec["nocache"] or spec["stale"] else 0)
        found = n_existing if settled == "preflight" else 0
        if look["duplicates"] != found:
            problems.append("lookups found %d keys, expected %d" % (look["duplicates"], found))
        if not spec["filter"] and look["invoices"] != uncached:
            problems.append("filter off: %d keys looked up, expected each of the %d uncached keys once"
                            % (look["invoices"], uncached))
        if spec["filter"]:
            r["false_positives"] = look["invoices"] - found
            if look["invoices"] > uncached:
                problems.append("filter on: %d keys looked up, more than the %d uncached keys"
                                % (look["invoices"], uncached))
        if look["invoices"] and r["gets"] < math.ceil(look["invoices"] / KEYS_PER_GET):
            problems.append("%d GETs for %d keys: more than %d keys per GET"
                            % (r["gets"], look["invoices"], KEYS_PER_GET))
        if spec["filter"] != bool(r["filter_in_use"]):
            problems.append("key_filter.in_use is %s" % r["filter_in_use"])
        r["problems"] = problems


# ---- main -----------------------------------------------------------------------

def describe_filter(f):
    return ("%s kB, %d hash functions, %s keys (capacity %s), fill %.4f, estimated false-positive rate %.2e"
            % (fmt_int(f["size_bytes"] / 1024), f["hash_functions"], fmt_int(f["keys_added"]),
               fmt_int(f["capacity"]), f["fill"], f["estimated_false_positive_rate"]))


# what each scenario is, in the docs' table
TABLE_LABELS = {
    "filter": "filter on",
    "nofilter": "filter off",
    "filter_nocache": "filter on, the existing keys only in the filter (not in the cache)",
    "nofilter_nocache": "filter off, the existing keys not in the cache",
    "small_filter": "filter on, a %d kB filter",
    "filter_stale": "filter on, the existing invoices created in D365 after the refresh",
    "nofilter_stale": "filter off, the existing invoices created in D365 after the refresh",
}


def result_table(results, stamp, fingerprint, small_filter_kb):
    """The markdown for bench/results/preflight.md: each scenario's GETs and
    time against the run with the filter off, measured in the same bench
    run."""
    base = next((r for r in results if r["scenario"] == "nofilter"), None)
    rows = []
    for r in results:
        label = TABLE_LABELS[r["scenario"]]
        rows.append([label % small_filter_kb if "%d" in label else label,
                     fmt_int(r["gets"]), fmt_int(r["lookup_round_trips"]), fmt_int(r["round_trips"]),
                     "%.1f s" % r["elapsed_s"]]
                    + (["the baseline"] * 2 if r is base else
                       [ratio(r["gets"], base["gets"] if base else None),
                        ratio(r["elapsed_s"], base["elapsed_s"] if base else None)]))
    return (md_table(["scenario", "GET operations", "lookup `$batch`", "HTTP round trips", "time",
                      "GETs against filter off", "time against filter off"], rows)
            + "\n\n" + measured_by("bench/preflight", stamp, fingerprint))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="fresh invoices to send")
    ap.add_argument("--existing", type=int, default=100, help="of them already in D365")
    ap.add_argument("--older", type=int, default=50000, help="other invoices in D365")
    ap.add_argument("--latency-ms", type=float, default=20, help="the mock's answer time")
    ap.add_argument("--page-size", type=int, default=5000,
                    help="the mock's page size (refresh_remote_keys() asks for 5000)")
    ap.add_argument("--small-filter-kb", type=int, default=64,
                    help="d365inv.key_filter_size of the small_filter scenario")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    names = check_scenarios(ap, args.scenarios, SCENARIOS)

    report = Report()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = tempfile.mkdtemp(prefix="d365inv-bench-preflight.")
    os.chmod(tmp, 0o755)
    results, failure = [], None
    try:
        log("generating %s invoices, %d of them already in D365, and %s older D365 invoices"
            % (fmt_int(args.n), args.existing, fmt_int(args.older)))
        data = Data(args, tmp)
        for name in names:
            sc = Scenario(name, args, data, tmp)
            try:
                r = sc.run()
            except BenchError as e:
                failure = "%s: %s" % (name, e)
                log(failure)
                break
            finally:
                sc.stop()
            results.append(r)
            for p in r["problems"]:
                log("CHECK FAILED: %s: %s" % (r["label"], p))
                failure = failure or "%s: %s" % (name, p)
    finally:
        subprocess.run(["rm", "-rf", tmp])

    by = {r["scenario"]: r for r in results}
    report("bench/preflight: %s fresh invoices, %d of them already in D365, which also holds %s "
           "older invoices; preflight 'always', batch_size 20, max_in_flight 4, mock latency %g ms; "
           "each scenario on a fresh cluster and mock with the same data"
           % (fmt_int(args.n), args.existing, fmt_int(args.older), args.latency_ms))
    report()
    for r in results:
        report("%s: refresh_remote_keys: %s keys in %d page(s) (%d NOTICEs), %.2f s (D365 seeded in %.1f s)"
               % (r["label"], fmt_int(r["refresh_keys"]), r["refresh_pages"], r["refresh_notices"],
                  r["refresh_s"], r["seed_s"]))
        report("    filter after the refresh: %s" % describe_filter(r["filter_after_refresh"]))
        report("    filter after the run:     %s" % describe_filter(r["filter_after_run"]))
    report()
    head = ("%-40s %6s %8s %9s %7s %6s %9s %7s %8s  %s"
            % ("scenario", "GETs", "keys", "lookup", "round", "POSTs", "elapsed", "inv/s", "false", "existing invoices"))
    report(head)
    report("%-40s %6s %8s %9s %7s %6s %9s %7s %8s" % ("", "", "looked", "$batch", "trips", "", "", "", "pos."))
    report("-" * len(head))
    for r in results:
        ex = ", ".join("%d %s" % (v, k) for k, v in sorted(r["fates"]["existing"].items()))
        report("%-40s %6d %8d %9d %7d %6d %8.1fs %7.0f %8s  %s%s"
               % (r["label"], r["gets"], r["keys_looked_up"], r["lookup_round_trips"],
                  r["round_trips"], r["posts"], r["elapsed_s"], r["invoices_per_s"],
                  r.get("false_positives", "-"), ex,
                  "; POSTed again: %d" % r["existing_posted"]))
    report()
    report("GETs: the mock's GET operations (each ORs up to %d keys); keys looked up: batch_log.invoices "
           "of kind lookup; lookup $batch: batch_log rows of kind lookup; round trips: every HTTP request "
           "the mock saw during the run ($batch of lookups and of POSTs, plain requests); false pos.: "
           "keys looked up that D365 does not have (filter on); POSTed again: existing invoices POSTed (the mock "
           "answered 409, or created a second one)." % KEYS_PER_GET)
    report("Times are indicative (2 cores, shared machine); the GET counts are the figure that matters.")
    for r in results:
        for p in r["problems"]:
            report("CHECK FAILED: %s: %s" % (r["label"], p))
    if failure and not any(r["problems"] for r in results):
        report("FAILED: %s" % failure)
    report()
    if "filter_nocache" in by and "nofilter_nocache" in by:
        c, c0 = by["filter_nocache"], by["nofilter_nocache"]
        report("existing keys not cached: GETs with filter %d vs without %d (ratio %.3f); round trips %d vs %d"
               % (c["gets"], c0["gets"], c["gets"] / c0["gets"] if c0["gets"] else float("nan"),
                  c["round_trips"], c0["round_trips"]))
    if "filter_stale" in by and "nofilter_stale" in by:
        e, e0 = by["filter_stale"], by["nofilter_stale"]
        report("existing invoices created after the refresh: GETs with filter %d vs without %d; "
               "POSTed again (409) %d vs %d; round trips %d vs %d"
               % (e["gets"], e0["gets"], e["existing_posted"], e0["existing_posted"],
                  e["round_trips"], e0["round_trips"]))
    if "small_filter" in by and "nofilter" in by:
        s, b = by["small_filter"], by["nofilter"]
        report("small filter (%d kB): GETs %d vs %d without (ratio %.3f), %d false positives"
               % (args.small_filter_kb, s["gets"], b["gets"], s["gets"] / b["gets"] if b["gets"] else float("nan"),
                  s["false_positives"]))

    if "filter" in by and "nofilter" in by:
        a, b = by["filter"], by["nofilter"]
        ratio = a["gets"] / b["gets"] if b["gets"] else float("nan")
        report("preflight: GETs with filter %d vs without %d (ratio %.3f, target <= %.2f: %s); "
               "round trips %d vs %d; lookup round trips %d vs %d"
               % (a["gets"], b["gets"], ratio, TARGET_RATIO, "met" if ratio <= TARGET_RATIO else "NOT met",
                  a["round_trips"], b["round_trips"], a["lookup_round_trips"], b["lookup_round_trips"]))
    if results and not failure:
        table_md = result_table(results, stamp, tree_fingerprint(), args.small_filter_kb)
        report()
        report("For docs/benchmarks.md (bench/update-docs):")
        report(table_md)
        write_result("preflight", table_md, default_settings(ap, args), stamp)
    save_results("preflight", stamp, report,
                 {"stamp": stamp, "args": vars(args), "results": results, "failure": failure})
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
