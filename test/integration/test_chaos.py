"""Chaos test: "no invoice is posted twice and none is lost", under crashes
and network faults.

One throwaway cluster with the worker (pgcluster.Cluster) and one mock D365
(mockctl.MockD365) with uniqueness OFF, so that a second POST of a key is a
second entity and shows in the mock's per-key creation counter.  Nothing is
reset between rounds: the history (invoices, remote_key, batch_log, the
mock's entities) accumulates, as it does in production.

Each round (seeded; CHAOS_SEED replays a run, CHAOS_ROUNDS sets how many):

  * target settings drawn at random (batch size, requests in flight,
    preflight mode, fixed or auto batch size);
  * sometimes a few of the round's keys are created in the mock "outside
    d365inv" first (D365-side duplicates); the round then relies either on
    preflight 'always' lookups or on d365inv.refresh_remote_keys() (the key
    cache) to find them;
  * 60-150 inbox lines loaded in one transaction (COPY or INSERT): fresh
    keys, ~10% repeats of the round's keys in other case / with blanks, a
    few repeats of keys staged by earlier rounds, a few malformed lines;
    ingested by ingest(), d365inv_submit() or the worker itself, or
    driven by d365inv_submit(wait) in a thread while the chaos runs;
  * 1-4 chaos events at random moments: SIGKILL of the worker, an
    immediate stop/start of the cluster, a query cancel or a
    pg_terminate_backend of the worker, while batches are in flight (the
    mock answers with latency, having processed the batch first),
    connections dropped after (or before) the mock processed the batch,
    truncated and garbled answers, answers slower than d365inv.http_timeout
    (slow body, or latency), 5xx and 429 storms (Retry-After), rarely a
    few permanent 400 errors, answer modifiers (reordered parts, parts
    without Content-ID), and late commits (the mock holds a $batch longer
    than d365inv.http_timeout before it sees it, then commits it after the
    client gave up);
  * the target's entity_id_mode drawn at random: 'server' (resends wait for
    the fence, d365inv.server_request_lifetime) or 'client' (deterministic
    ids: a resend and the late original collide on the mock's primary key);
  * heal the mock and wait for every invoice to settle.

Invariants after every round (all violations are collected, with evidence,
and the test fails at the end; a round that does not settle stops the run):

  * nothing stuck: no invoice below 'created', the inbox empty;
  * every loaded line is in exactly one of invoice, duplicate, reject, the
    one the load's model says (first line of a key wins; repeats of keys
    staged before are 'already staged'), and ingest() / d365inv_submit(wait)
    counts agree with it;
  * the mock created every key of a 'created' invoice exactly once, with the
    id the invoice row records; every key the mock created belongs to a
    'created' invoice (a 'review' or 'duplicate' row that D365 has is a
    future double post or a lie);
  * a key created outside d365inv ends 'duplicate' and is never created by
    d365inv (or 'created' by a lookup, when a crash left its fate unknown:
    a lookup cannot tell who created what it finds); a 'duplicate' row
    always has a key D365 really had (otherwise the invoice is lost);
  * 'review' only in rounds with injected permanent errors, at most as many
    as injected, and never created in the mock;
  * the server log shows no crash other than our SIGKILLs, no PANIC/TRAP;
  * at the end: total creations in the mock == distinct created keys ==
    invoices in status 'created'.

test_preflight_always_finds_keys_created_outside is the deterministic core
of the D365-side duplicates: preflight 'always' must look up a key D365 has
but d365inv never saw.

The key filter (d365inv.key_filter) is left at its default, on.  It may
only rule keys out while refresh_remote_keys() has read all of D365's keys;
keys created outside after that refresh are the documented gap (measured by
bench/preflight), so rounds that create keys outside without a refresh clear
target.keys_refreshed_at first.

CHAOS_KEY_FILTER=off runs the chaos rounds without it (ALTER SYSTEM).
CHAOS_EVIDENCE names the JSON file the evidence of violations goes to
(default: $TMPDIR/d365inv-chaos-<seed>.json); CHAOS_SETTLE_TIMEOUT the wait
for a round to settle (60 s).

Runs as a non-root user; needs no cluster from test/run-tests.
"""
import csv
import io
import json
import os
import random
import re
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from urllib.parse import unquote

import psycopg2
import psycopg2.extras
import pytest

from mockctl import MockD365
from pgcluster import Cluster, wait_for

SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2 ** 31))
ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "20"))
KEY_FILTER = os.environ.get("CHAOS_KEY_FILTER", "on")
SETTLE_TIMEOUT = float(os.environ.get("CHAOS_SETTLE_TIMEOUT", "60"))
EVIDENCE_PATH = os.environ.get("CHAOS_EVIDENCE") or os.path.join(
    tempfile.gettempdir(), "d365inv-chaos-%d.json" % SEED)
MAX_RETRIES = 12
HTTP_TIMEOUT_MS = 2000
HOLD_MS = HTTP_TIMEOUT_MS + 1500

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    # the mock commits a request as it arrives, before any latency, except
    # in a late_commit event: it holds it HOLD_MS, longer than the timeout
    "d365inv.server_request_lifetime": "%dms" % (HTTP_TIMEOUT_MS + 3000),
    "d365inv.retry_base_delay": "100ms",
    "d365inv.retry_max_delay": "2s",
    "d365inv.naptime": "300ms",
    "d365inv.http_timeout": "2s",
    "d365inv.max_retries": MAX_RETRIES,
}

# everything a round may turn on, and its healthy value
HEALTHY = {
    "latency_ms": 0, "latency_order": "process_first",
    "error_rate": 0.0, "error_status": 500,
    "throttle_rate": 0.0, "throttle_scope": "batch", "retry_after": 1,
    "retry_after_format": "seconds",
    "drop_before_rate": 0.0, "drop_after_rate": 0.0, "truncate_rate": 0.0,
    "garble_rate": 0.0, "slow_body_rate": 0.0, "slow_body_ms": 1000,
    "reorder_rate": 0.0, "reorder_mode": "reverse", "drop_content_id_rate": 0.0,
    "hold_ms": HOLD_MS,
}
# ways the worker stops mid-round: SIGKILL (crash restart of every backend),
# immediate shutdown and start, query cancel (an ERROR in the round), and
# pg_terminate_backend (the launcher starts a new worker within 5 s)
CRASHES = ("kill", "restart", "cancel", "terminate")
ONE_SHOTS = ("drop_after", "drop_before", "truncate", "garble", "slow_body", "error", "hold")
BLANKS = " \t\r\n"


# --------------------------------------------------------------------------
# helpers

def log(*args):
    print("[chaos]", *args, flush=True)


def q(pg, query, args=None, retry=True):
    """One statement on a fresh connection; rows as dicts (or None).  Reads
    are retried while the server restarts after a crash."""
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = pg.connect()
            try:
                with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                    cur.execute(query, args)
                    return [dict(r) for r in cur.fetchall()] if cur.description else None
            finally:
                conn.close()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            if not retry or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def norm(s):
    """d365inv.invoice_key() for ASCII: blanks trimmed, lower case."""
    return s.strip(BLANKS).lower()


def key_of(vendor, number):
    return "%s|%s" % (norm(vendor), norm(number))



def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------
# one round's plan

class Line:
    __slots__ = ("tag", "vendor", "number", "date", "amount", "currency", "payload",
                 "bad", "key", "line_id", "placed")

    def __init__(self, tag, vendor, number, bad=None, date="2024-03-15", amount="100.00",
                 currency="EUR", payload=None):
        self.tag, self.vendor, self.number, self.bad = tag, vendor, number, bad
        self.date, self.amount, self.currency, self.payload = date, amount, currency, payload
        self.key = None if bad else key_of(vendor, number)
        self.line_id = None
        self.placed = []


def variant(rng, text):
    """The same key as D365 and d365inv compare it: other case, blanks."""
    choice = rng.randrange(4)
    if choice == 0:
        text = text.swapcase()
    elif choice == 1:
        text = text.lower()
    elif choice == 2:
        text = text.upper()
    pad = rng.choice(["", " ", "  ", "\t", " \t"])
    return rng.choice([pad + text, text + pad, pad + text + pad])


def invoice_number(rng, rnd, i):
    if rng.random() < 0.06:         # hostile characters for the $filter lookups
        return ("Q'%d-%d&/%%+?#" % (rnd, i))[:20]
    return "R%02d-%03d-%s" % (rnd, i, rng.choice(["a", "B", "cD", "x9", "Zz"]))


def make_lines(rng, rnd, staged_keys):
    """The round's inbox lines, shuffled; their keys, and the fresh keys."""
    vendors = ["V%02d" % v for v in range(1, 13)] + ["Acme-GmbH", "o'brien"]
    fresh = []
    for i in range(rng.randint(55, 130)):
        fresh.append((rng.choice(vendors), invoice_number(rng, rnd, i)))
    lines = []
    for v, n in fresh:
        lines.append(Line(None, v, n, amount="%d.%02d" % (rng.randint(1, 99999), rng.randint(0, 99))))
    # ~10% repeats of this load's keys, other spelling
    for _ in range(max(3, len(fresh) // 10)):
        v, n = rng.choice(fresh)
        lines.append(Line(None, variant(rng, v), variant(rng, n), amount="1.00"))
    # repeats of keys staged by earlier rounds
    if staged_keys:
        for v, n in rng.sample(staged_keys, min(len(staged_keys), rng.randint(1, 4))):
            lines.append(Line(None, variant(rng, v), variant(rng, n)))
    # malformed lines: each one a reject
    bad_kinds = [
        dict(date="2024-02-30"), dict(amount="1,000.00"), dict(number="   "),
        dict(vendor="V" * 21), dict(currency="EURO"), dict(payload="[1]"), dict(date=""),
        dict(amount="1e5"),
    ]
    for j in range(rng.randint(1, 4)):
        bad = dict(rng.choice(bad_kinds))
        kind = dict(bad)
        v = kind.pop("vendor", rng.choice(vendors))
        n = kind.pop("number", "BAD-%02d-%d" % (rnd, j))
        lines.append(Line(None, v, n, bad=bad, **kind))
    rng.shuffle(lines)
    for j, line in enumerate(lines):
        line.tag = "chaos:%d:%d" % (rnd, j)
    return lines, fresh


def make_plan(rng, rnd):
    plan = {
        "round": rnd,
        "batch_size": rng.choice([5, 10, 20, 20, 25]),
        "max_in_flight": rng.choice([1, 2, 4, 4]),
        "batch_size_mode": "auto" if rng.random() < 0.15 else "fixed",
        "load": rng.choice(["copy", "insert"]),
        "ingest": rng.choice(["ingest", "submit", "worker", "submit_wait"]),
        "outside": None,
        "events": [],
    }
    if rng.random() < 0.5:
        plan["outside"] = {"mode": "preflight" if rng.random() < 0.7 else "refresh",
                           "n": rng.randint(2, 6)}
    if plan["outside"] and plan["outside"]["mode"] == "preflight":
        plan["preflight"] = "always"
    else:
        plan["preflight"] = rng.choice(["in_doubt", "in_doubt", "always", "off"])
        if plan["outside"]:                       # the cache needs preflight on
            plan["preflight"] = rng.choice(["in_doubt", "always"])

    kinds = ["kill", "restart", "cancel", "terminate", "drop_after", "drop_before", "truncate",
             "garble", "slow_timeout", "latency_timeout", "error_storm", "throttle_storm",
             "permanent", "modifier", "late_commit"]
    weights = [4, 3, 2, 1, 4, 2, 3, 2, 2, 2, 3, 3, 1, 1, 4]
    n = rng.choice([1, 2, 2, 3, 3, 4])
    chosen = []
    while len(chosen) < n:
        k = rng.choices(kinds, weights)[0]
        if k in chosen and k in ("permanent", "modifier", "latency_timeout"):
            continue
        # one error_status per round: a permanent 400 and a 5xx storm exclude each other
        if (k == "permanent" and "error_storm" in chosen) or (k == "error_storm" and "permanent" in chosen):
            continue
        chosen.append(k)
    if plan["ingest"] == "submit_wait" and any(k in ("kill", "restart") for k in chosen):
        plan["ingest"] = "submit"       # a crash would cut the waiting session
    # a slow mock in some rounds: deliveries last long enough for the events
    # to meet batches in flight
    plan["latency_ms"] = rng.choice([0, 0, 100, 250, 400])
    for k in chosen:
        ev = {"kind": k, "at": round(rng.uniform(0.0, 1.2), 2)}
        if k in CRASHES:
            ev["latency_ms"] = rng.randint(200, 900)       # so a batch is in flight
        elif k in ("drop_after", "drop_before", "truncate", "garble", "slow_timeout", "late_commit"):
            ev["n"] = rng.randint(1, 3)
            ev["preload"] = rng.random() < 0.6
            ev["at"] = round(rng.uniform(0.0, 0.6), 2)
            if k in ("drop_after", "drop_before"):
                ev["drop_mode"] = rng.choice(["close", "reset"])
        elif k == "latency_timeout":
            ev["duration"] = round(rng.uniform(0.8, 2.5), 2)
        elif k == "error_storm":
            ev["duration"] = round(rng.uniform(1.0, 3.0), 2)
            ev["rate"] = round(rng.uniform(0.3, 0.8), 2)
            ev["status"] = rng.choice([500, 502, 503, 504])
        elif k == "throttle_storm":
            ev["duration"] = round(rng.uniform(1.0, 3.0), 2)
            ev["rate"] = round(rng.uniform(0.5, 1.0), 2)
            ev["scope"] = rng.choice(["batch", "operation"])
            ev["format"] = rng.choice(["seconds", "http-date"])
        elif k == "permanent":
            ev["n"] = rng.randint(1, 3)
            ev["preload"] = True
        elif k == "modifier":
            ev["which"] = rng.choice(["reorder", "drop_content_id"])
            ev["preload"] = True
        plan["events"].append(ev)
    plan["events"].sort(key=lambda e: (not e.get("preload", False), e["at"]))
    # client: deterministic ids, a late original and its resend collide on the
    # mock's primary key; server: resends wait for the fence
    plan["entity_id_mode"] = rng.choice(["server", "client"])
    return plan


# --------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def mock():
    with MockD365(unique=False, client_keys=True, seed=SEED % 100000, **HEALTHY) as m:
        yield m


@pytest.fixture(scope="module")
def pg(mock):
    with Cluster(CONF) as cluster:
        cluster.wait_for_worker()
        q(cluster, "UPDATE d365inv.target SET service_root = %s WHERE name = 'default'",
          (mock.service_root,))
        yield cluster


def set_target(pg, **cols):
    sets = ", ".join("%s = %%s" % k for k in cols)
    q(pg, "UPDATE d365inv.target SET %s WHERE name = 'default'" % sets, tuple(cols.values()))


# --------------------------------------------------------------------------
# 1. preflight 'always' finds keys created outside d365inv (deterministic)

def test_preflight_always_finds_keys_created_outside(pg, mock):
    """The smallest form of the chaos test's D365-side duplicates: with
    preflight 'always' a key that D365 has (created by another path, never
    seen by d365inv) must be looked up before it is POSTed.  The mock has
    uniqueness off, so a POST would create it a second time."""
    set_target(pg, preflight="always", batch_size=20, max_in_flight=4, batch_size_mode="fixed")
    mock.seed_entities([{"VendorAccount": "OUT-V", "InvoiceNumber": " outside-%d " % i} for i in range(3)])
    conn = pg.connect()
    with conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur, "INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
                 " VALUES %s", [("out-v", "OUTSIDE-%d" % i, "2024-01-15", "10") for i in range(5)])
    conn.close()
    q(pg, "SELECT d365inv.d365inv_submit()")
    assert wait_for(lambda: q(pg, "SELECT count(*) AS n FROM d365inv.invoice"
                                  " WHERE vendor_key = 'out-v' AND status < 'created'")[0]["n"] == 0,
                    timeout=20)
    rows = q(pg, "SELECT invoice_number, status::text, settled_by, last_error FROM d365inv.invoice"
                 " WHERE vendor_key = 'out-v' ORDER BY invoice_number")
    lookups = q(pg, "SELECT count(*) AS n FROM d365inv.batch_log WHERE kind = 'lookup'")[0]["n"]
    counts = {k: v for k, v in mock.counts().items() if k.startswith("out-v|")}
    filt = q(pg, "SELECT * FROM d365inv.key_filter")[0]
    evidence = "rows=%s; mock creations=%s; lookup requests=%d; key_filter=%s" % (
        rows, counts, lookups, filt)
    assert counts == {"out-v|outside-3": 1, "out-v|outside-4": 1}, "double post: " + evidence
    assert [(r["invoice_number"], r["status"]) for r in rows] == [
        ("OUTSIDE-0", "duplicate"), ("OUTSIDE-1", "duplicate"), ("OUTSIDE-2", "duplicate"),
        ("OUTSIDE-3", "created"), ("OUTSIDE-4", "created")], evidence


# --------------------------------------------------------------------------
# 2. the chaos rounds

class Chaos:
    def __init__(self, pg, mock):
        self.pg, self.mock = pg, mock
        self.violations = []        # (round, kind, message, evidence)
        self.reported = set()       # keys already reported, so later rounds don't repeat them
        self.staged = []            # (vendor, number) of keys queued in earlier rounds
        self.outside = {}           # key -> round: created in the mock outside d365inv
        self.kills = 0
        self.round_times = []
        self.info = []              # notable but not a broken promise
        self.fired = Counter()      # faults the mock injected, by kind

    # ---- reporting ---------------------------------------------------------

    def violate(self, rnd, kind, message, keys=(), rows=None):
        evidence = self.evidence(rnd, keys, rows)
        self.violations.append({"round": rnd, "kind": kind, "message": message,
                                "keys": sorted(keys), "evidence": evidence})
        self.reported.update(keys)
        log("VIOLATION round %d: %s: %s" % (rnd, kind, message))

    def evidence(self, rnd, keys, rows=None):
        ev = {"seed": SEED, "round": rnd, "plan": self.plan}
        try:
            keys = sorted(keys)[:20]
            if keys:
                ev["rows"] = jsonable(q(self.pg, """
                    SELECT *, status::text AS status FROM d365inv.invoice
                    WHERE vendor_key || '|' || invoice_key = ANY (%s) ORDER BY id""", (keys,)))
                batch_ids = sorted({r["batch_id"] for r in ev["rows"] if r["batch_id"]})
                ev["batch_log_of_rows"] = jsonable(q(self.pg, "SELECT * FROM d365inv.batch_log"
                                                              " WHERE id = ANY (%s)", (batch_ids,)))
                ev["mock_entities"] = [e for e in self.mock.entities()
                                       if key_of(e["VendorAccount"], e["InvoiceNumber"]) in keys]
                ev["mock_requests"] = self.mock_requests_for(keys)
            if rows is not None:
                ev["other_rows"] = jsonable(rows[:50])
            ev["batch_log_this_round"] = jsonable(q(self.pg, """
                SELECT id, kind, started_at, round(duration_ms) AS ms, http_status, operations,
                       created, duplicates, retries, reviews, in_doubt, unanswered, not_found,
                       throttled, error
                FROM d365inv.batch_log WHERE started_at >= %s ORDER BY id""", (self.round_start_ts,)))
            ev["server_log"] = self.log_excerpt()
            ev["mock_stats"] = self.mock.stats()
        except Exception:           # evidence must never hide the violation
            ev["evidence_error"] = traceback.format_exc()
        return ev

    def mock_requests_for(self, keys):
        """The mock keeps its last 200 $batch requests: the parts that name
        one of these keys (POST bodies, or GET $filter URLs)."""
        numbers = {k.split("|", 1)[1] for k in keys}
        out = []
        for req in self.mock.requests():
            text = unquote(unquote(req["body"])).lower()
            hits = sorted(n for n in numbers if n in text or n.replace("'", "''") in text)
            if hits:
                kinds = Counter(m.group(1) for m in re.finditer(r"^(POST|GET|PATCH) ", req["body"], re.M))
                out.append({"time": req["time"], "parts": dict(kinds), "names": hits})
        return out

    def log_excerpt(self, n=80):
        text = self.pg.server_log()[self.round_log_offset:]
        lines = [l for l in text.splitlines()
                 if "d365inv" in l or "ERROR" in l or "WARNING" in l or "terminated" in l
                 or "PANIC" in l or "TRAP" in l or "database system" in l]
        return lines[-n:]

    # ---- chaos actions ------------------------------------------------------

    def configure(self, **settings):
        self.mock.configure(**settings)

    def heal(self, keep_error_status=False):
        healthy = dict(HEALTHY)
        if keep_error_status:
            healthy.pop("error_status")
        self.configure(**healthy)

    def crash(self, kind):
        if kind == "kill":
            pid = self.pg.kill_worker()
            if pid:
                self.kills += 1
                log("  SIGKILL worker %d" % pid)
                # the postmaster restarts every backend, the launcher the worker
                wait_for(lambda: self.worker_pid_not(pid), timeout=60, interval=0.05)
            else:
                log("  SIGKILL: no worker running")
        elif kind == "restart":
            log("  immediate stop/start")
            self.pg.restart(mode="immediate")
        else:
            pid = self.pg.worker_pid()
            if pid is None:
                log("  %s: no worker running" % kind)
                return
            fn = "pg_cancel_backend" if kind == "cancel" else "pg_terminate_backend"
            ok = q(self.pg, "SELECT %s(%%s) AS ok" % fn, (pid,))[0]["ok"]
            log("  %s(%d): %s" % (fn, pid, ok))
            if kind == "terminate":
                wait_for(lambda: self.worker_pid_not(pid), timeout=60, interval=0.05)

    def worker_pid_not(self, pid):
        try:
            p = self.pg.worker_pid()
            return p is not None and p != pid
        except psycopg2.Error:
            return False

    def timeline(self, plan, t0):
        """Run the round's non-preload events at their offsets from t0."""
        actions = []
        for ev in plan["events"]:
            if ev.get("preload"):
                continue
            k = ev["kind"]
            if k in CRASHES:
                actions.append((ev["at"], lambda k=k: self.crash(k), k))
            elif k in ("drop_after", "drop_before", "truncate", "garble", "slow_timeout", "late_commit"):
                actions.append((ev["at"], lambda ev=ev: self.one_shot(ev), k))
            elif k == "latency_timeout":
                actions.append((ev["at"], lambda: self.configure(latency_ms=HTTP_TIMEOUT_MS + 600),
                                "latency on"))
                actions.append((ev["at"] + ev["duration"], lambda: self.configure(latency_ms=self.base_latency),
                                "latency off"))
            elif k == "error_storm":
                actions.append((ev["at"], lambda ev=ev: self.configure(error_rate=ev["rate"],
                                                                        error_status=ev["status"]),
                                "error storm on"))
                actions.append((ev["at"] + ev["duration"], lambda: self.configure(error_rate=0.0),
                                "error storm off"))
            elif k == "throttle_storm":
                actions.append((ev["at"], lambda ev=ev: self.configure(
                    throttle_rate=ev["rate"], throttle_scope=ev["scope"], retry_after=1,
                    retry_after_format=ev["format"]), "throttle storm on"))
                actions.append((ev["at"] + ev["duration"], lambda: self.configure(throttle_rate=0.0),
                                "throttle storm off"))
        actions.sort(key=lambda a: a[0])
        for at, fn, what in actions:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            log("  t+%.2fs %s" % (time.monotonic() - t0, what))
            fn()

    def one_shot(self, ev):
        k = ev["kind"]
        if k == "slow_timeout":
            # the whole answer takes longer than d365inv.http_timeout, after processing
            self.configure(slow_body_ms=HTTP_TIMEOUT_MS + 1500, fault_next={"slow_body": ev["n"]})
        elif k == "late_commit":
            # held HOLD_MS before the mock sees it, committed after the client gave up
            self.configure(fault_next={"hold": ev["n"]})
        else:
            extra = {"drop_mode": ev["drop_mode"]} if "drop_mode" in ev else {}
            self.configure(fault_next={k: ev["n"]}, **extra)

    def preload(self, plan):
        for ev in plan["events"]:
            if not ev.get("preload"):
                continue
            k = ev["kind"]
            if k == "permanent":
                # a 400 is no transient failure: those invoices go to review
                self.configure(error_status=400, fault_next={"error": ev["n"]})
            elif k == "modifier":
                self.configure(**{ev["which"] + "_rate": 0.5})
            else:
                self.one_shot(ev)

    # ---- loading -----------------------------------------------------------

    def load(self, plan, lines):
        conn = self.pg.connect()
        try:
            with conn.cursor() as cur:
                cols = "(vendor_account, invoice_number, invoice_date, amount, currency, payload, source)"
                rows = [(l.vendor, l.number, l.date, l.amount, l.currency, l.payload, l.tag)
                        for l in lines]
                if plan["load"] == "copy":
                    buf = io.StringIO()
                    w = csv.writer(buf, lineterminator="\n")
                    for r in rows:
                        w.writerow(["" if v is None else v for v in r])
                    buf.seek(0)
                    # an empty unquoted field is NULL, as from a file
                    cur.copy_expert("COPY d365inv.inbox %s FROM STDIN (FORMAT csv)" % cols, buf)
                else:
                    psycopg2.extras.execute_values(cur, "INSERT INTO d365inv.inbox %s VALUES %%s" % cols,
                                                   rows, page_size=1000)
        finally:
            conn.close()

    # ---- one round ---------------------------------------------------------

    def run_round(self, rnd):
        rng = random.Random("%d:%d" % (SEED, rnd))
        t_round = time.monotonic()
        self.round_start_ts = q(self.pg, "SELECT clock_timestamp() AS t")[0]["t"]
        self.round_log_offset = len(self.pg.server_log())
        lines, fresh = make_lines(rng, rnd, self.staged)
        plan = make_plan(rng, rnd)
        self.plan = plan
        log("round %d: %d lines, %s" % (rnd, len(lines), json.dumps(plan, sort_keys=True)))

        set_target(self.pg, batch_size=plan["batch_size"], max_in_flight=plan["max_in_flight"],
                   batch_size_mode=plan["batch_size_mode"], preflight=plan["preflight"],
                   batch_size_min=5, batch_size_max=25, entity_id_mode=plan["entity_id_mode"])

        # D365-side duplicates: created in the mock by "another path"
        outside = {}
        if plan["outside"]:
            distinct = sorted({key_of(v, n): (v, n) for v, n in fresh}.items())
            for k, (v, n) in rng.sample(distinct, min(plan["outside"]["n"], len(distinct))):
                outside[k] = (v, n)
            self.mock.seed_entities([{"VendorAccount": variant(rng, v), "InvoiceNumber": variant(rng, n),
                                      "Description": "created outside d365inv"}
                                     for v, n in outside.values()])
            for k in outside:
                self.outside[k] = rnd
            if plan["outside"]["mode"] == "refresh":
                q(self.pg, "SELECT d365inv.refresh_remote_keys('default')")
            else:
                # Keys created outside since the last refresh: the key filter
                # only rules keys out while a refresh covers D365 (docs/design.md,
                # "Limits"), so this round models "no refresh yet" and
                # preflight 'always' must look every key up.
                q(self.pg, "UPDATE d365inv.target SET keys_refreshed_at = NULL WHERE name = 'default'")

        crash = [e for e in plan["events"] if e["kind"] in CRASHES]
        self.base_latency = max([e["latency_ms"] for e in crash], default=plan["latency_ms"])
        faults_before = Counter(self.mock.stats()["faults"])
        self.configure(latency_ms=self.base_latency)
        self.preload(plan)

        # load and ingest
        holder = None
        if plan["ingest"] == "submit_wait":
            # keep the worker's ingest(nowait) out until d365inv_submit(wait)
            # has seen the lines in the inbox (a COPY is not blocked by this)
            holder = self.pg.connect()
            holder.autocommit = False
            holder.cursor().execute("LOCK TABLE d365inv.inbox IN ACCESS SHARE MODE")
        self.load(plan, lines)
        ingest_result, submit_result = None, {}
        waiter = None
        if plan["ingest"] == "ingest":
            ingest_result = q(self.pg, "SELECT * FROM d365inv.ingest()", retry=False)[0]
        elif plan["ingest"] == "submit":
            q(self.pg, "SELECT d365inv.d365inv_submit()", retry=False)
        elif plan["ingest"] == "submit_wait":
            def wait():
                try:
                    conn = self.pg.connect()
                    with conn.cursor() as cur:
                        cur.execute("SELECT clock_timestamp()")
                        submit_result["started"] = cur.fetchone()[0]
                        cur.execute("SELECT * FROM d365inv.d365inv_submit(wait => %s::interval)",
                                    ("%d s" % SETTLE_TIMEOUT,))
                        submit_result["rows"] = dict(cur.fetchall())
                    conn.close()
                except Exception as e:
                    submit_result["error"] = repr(e)
            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            time.sleep(0.3)
            holder.rollback()
            holder.close()

        self.timeline(plan, time.monotonic())
        permanent = [e for e in plan["events"] if e["kind"] == "permanent"]
        self.heal(keep_error_status=bool(permanent))

        settled = self.settle(rnd)
        if waiter is not None:
            waiter.join(timeout=SETTLE_TIMEOUT + 10)
        fired = Counter(self.mock.stats()["faults"])
        fired.subtract(faults_before)
        fired = {k: v for k, v in fired.items() if v}
        self.fired.update(fired)
        log("  faults fired: %s" % fired)
        # one-shot faults that found no traffic, and the 400 of "permanent"
        self.configure(fault_next={k: 0 for k in ONE_SHOTS}, **HEALTHY)
        if not settled:
            return False

        self.check_round(rnd, plan, lines, outside, ingest_result, submit_result, permanent)
        self.check_log(rnd, plan)
        for v, n in fresh:
            self.staged.append((v, n))
        elapsed = time.monotonic() - t_round
        self.round_times.append(elapsed)
        log("round %d settled in %.1fs" % (rnd, elapsed))
        return True

    def settle(self, rnd):
        def open_count():
            r = q(self.pg, "SELECT (SELECT count(*) FROM d365inv.invoice WHERE status < 'created') AS open,"
                           "       (SELECT count(*) FROM d365inv.inbox) AS inbox")[0]
            return r["open"] + r["inbox"] == 0
        if wait_for(open_count, timeout=SETTLE_TIMEOUT, interval=0.2):
            return True
        stuck = q(self.pg, "SELECT *, status::text AS status FROM d365inv.invoice"
                           " WHERE status < 'created' ORDER BY id")
        inbox = q(self.pg, "SELECT count(*) AS n FROM d365inv.inbox")[0]["n"]
        keys = {"%s|%s" % (r["vendor_key"], r["invoice_key"]) for r in stuck}
        self.violate(rnd, "stuck", "%d invoices still open (%s) and %d inbox lines after %ds" % (
            len(stuck), dict(Counter(r["status"] for r in stuck)), inbox, SETTLE_TIMEOUT),
            keys=keys, rows=stuck)
        return False

    # ---- invariants ----------------------------------------------------------

    def check_round(self, rnd, plan, lines, outside, ingest_result, submit_result, permanent):
        tags = [l.tag for l in lines]
        by_tag = {l.tag: l for l in lines}
        # where did every line go?
        for table in ("invoice", "duplicate", "reject"):
            extra = {"invoice": ", id AS ref, NULL AS reason",
                     "duplicate": ", duplicate_of AS ref, reason",
                     "reject": ", NULL::bigint AS ref, reason"}[table]
            for r in q(self.pg, "SELECT source, line_id%s FROM d365inv.%s WHERE source = ANY (%%s)"
                       % (extra, table), (tags,)):
                l = by_tag[r["source"]]
                l.placed.append((table, r["ref"], r["reason"]))
                l.line_id = r["line_id"]
        problems = []
        for l in lines:
            if len(l.placed) != 1:
                problems.append("line %s (%r, %r) placed %s" % (l.tag, l.vendor, l.number, l.placed or "nowhere"))
        if problems:
            self.violate(rnd, "line accounting", "; ".join(problems[:10]))
            return

        # the model: rejects; first line of a new key queued; repeats duplicates
        staged_before = {key_of(v, n) for v, n in self.staged}
        first = {}
        for l in sorted((l for l in lines if not l.bad), key=lambda l: l.line_id):
            first.setdefault(l.key, l)
        inv_ids = {}
        for r in q(self.pg, "SELECT id, vendor_key || '|' || invoice_key AS k FROM d365inv.invoice"
                            " WHERE vendor_key || '|' || invoice_key = ANY (%s)",
                   (list({l.key for l in lines if l.key}),)):
            inv_ids[r["k"]] = r["id"]
        for l in lines:
            table, ref, reason = l.placed[0]
            if l.bad:
                want = ("reject",)
            elif l.key in staged_before:
                want = ("duplicate", inv_ids.get(l.key), "already staged")
            elif first[l.key] is l:
                want = ("invoice",)
            else:
                want = ("duplicate", inv_ids.get(l.key), "repeated in the same load")
            got = (table,) if table in ("invoice", "reject") else (table, ref, reason)
            if got != want:
                problems.append("line %s (%r, %r, bad=%s) went to %s, expected %s"
                                % (l.tag, l.vendor, l.number, l.bad, got, want))
        if problems:
            self.violate(rnd, "ingest model", "; ".join(problems[:10]))

        placed = Counter(l.placed[0][0] for l in lines)
        if ingest_result is not None:
            got = (ingest_result["queued"], ingest_result["duplicates"], ingest_result["rejected"])
            want = (placed["invoice"], placed["duplicate"], placed["reject"])
            if got != want and got != (0, 0, 0):        # (0, 0, 0): the worker ingested first
                self.violate(rnd, "ingest counts", "ingest() said %s, the tables hold %s" % (got, want))

        # statuses of this round's invoices
        rows = q(self.pg, "SELECT *, status::text AS status, vendor_key || '|' || invoice_key AS k"
                          " FROM d365inv.invoice WHERE source = ANY (%s) ORDER BY id", (tags,))
        statuses = Counter(r["status"] for r in rows)
        settled_by = Counter("%s/%s" % (r["status"], r["settled_by"]) for r in rows)
        log("  statuses %s; settled_by %s; lines %s" % (dict(statuses), dict(settled_by), dict(placed)))

        if submit_result.get("started"):
            # the worker may have ingested the load before d365inv_submit(wait)
            # looked at the inbox: it then waits for what was open, and counts that
            ingested = q(self.pg, "SELECT min(ingested_at) AS t FROM d365inv.reject WHERE source = ANY (%s)",
                         (tags,))[0]["t"]
            if ingested is not None and ingested < submit_result["started"]:
                self.info.append("round %d: the worker ingested before d365inv_submit(wait) started;"
                                 " its counts were not compared" % rnd)
                submit_result = {}
        if submit_result:
            submit_result.pop("started", None)
            want = dict(statuses)
            if placed["duplicate"]:
                want["ingest_duplicate"] = placed["duplicate"]
            if placed["reject"]:
                want["ingest_reject"] = placed["reject"]
            if submit_result.get("rows") != want:
                self.violate(rnd, "submit(wait) counts",
                             "d365inv_submit(wait) returned %s, the round's lines are %s"
                             % (submit_result, want))

        counts = self.mock.counts()
        preexisting = self.mock.preexisting()
        entities = defaultdict(list)
        for e in self.mock.entities():
            entities[key_of(e["VendorAccount"], e["InvoiceNumber"])].append(e["InvoiceId"])

        reviews = []
        for r in rows:
            k, st = r["k"], r["status"]
            if k in self.reported:
                continue
            n = counts.get(k, 0)
            if n > 1:
                self.violate(rnd, "double post", "%s (%s) was created %d times by d365inv; row %s"
                             % (k, r["invoice_number"], n, st), keys={k})
            elif k in outside:
                if st == "created" and r["settled_by"] == "lookup" and n == 0:
                    # its fate was unknown (a crash during the preflight lookup, a
                    # request that never arrived) and the lookup found D365's
                    # record: created or not by us, D365 has it once
                    self.info.append("round %d: outside key %s settled created/lookup" % (rnd, k))
                elif st != "duplicate" or n != 0:
                    self.violate(rnd, "outside key posted" if n else "outside key not duplicate",
                                 "%s exists in D365 (created outside d365inv, round %d, preflight %s, "
                                 "mode %s) but the row is %s/%s and d365inv created it %d more time(s)"
                                 % (k, rnd, plan["preflight"], plan["outside"]["mode"], st,
                                    r["settled_by"], n), keys={k})
            elif st == "created":
                if n != 1 and not (n == 0 and r["settled_by"] == "lookup" and k in preexisting):
                    self.violate(rnd, "lost", "%s is 'created' (settled_by %s, d365_id %s) but D365 "
                                 "does not have it" % (k, r["settled_by"], r["d365_id"]), keys={k})
                elif r["d365_id"] not in entities[k]:
                    self.violate(rnd, "wrong d365_id", "%s: row says d365_id %s, D365's id is %s"
                                 % (k, r["d365_id"], entities[k]), keys={k})
            elif st == "duplicate":
                self.violate(rnd, "false duplicate" if k not in preexisting else "duplicate created by us",
                             "%s is 'duplicate' (%s) but was not created outside d365inv; D365 has it "
                             "%d time(s)" % (k, r["last_error"], n + preexisting.get(k, 0)), keys={k})
            elif st == "review":
                reviews.append(r)
                if n:
                    self.violate(rnd, "review but created", "%s is in review (%s) but D365 has it: "
                                 "a requeue would post it twice" % (k, r["last_error"]), keys={k})
        allowed = sum(e["n"] for e in permanent)
        if reviews and (len(reviews) > allowed
                        or any(r["last_http_status"] != 400 for r in reviews)):
            self.violate(rnd, "unexpected review",
                         "%d invoices in review, %d permanent errors injected: %s"
                         % (len(reviews), allowed,
                            [(r["k"], r["attempts"], r["last_http_status"], r["last_error"]) for r in reviews]),
                         keys={r["k"] for r in reviews})

        # the mock side: every key d365inv created belongs to a 'created' invoice
        created_keys = {r["k"] for r in q(self.pg, "SELECT vendor_key || '|' || invoice_key AS k"
                                                   " FROM d365inv.invoice WHERE status = 'created'")}
        for k, n in counts.items():
            if k in self.reported:
                continue
            if n > 1:
                self.violate(rnd, "double post", "the mock created %s %d times" % (k, n), keys={k})
            elif k not in created_keys:
                self.violate(rnd, "created but not recorded",
                             "D365 has %s (created by d365inv) but no invoice says 'created'" % k, keys={k})
        for k, n in preexisting.items():
            if n != 1 and k not in self.reported:
                self.violate(rnd, "mock seeding", "%s seeded %d times" % (k, n), keys={k})
        stats = self.mock.stats()
        if stats["internal_errors"]:
            self.info.append("round %d: mock internal errors %d" % (rnd, stats["internal_errors"]))

    def check_log(self, rnd, plan):
        text = self.pg.server_log()[self.round_log_offset:]
        for m in re.finditer(r"^.*terminated by signal (\d+).*$", text, re.M):
            if m.group(1) != "9" or "d365inv worker" not in m.group(0):
                self.violate(rnd, "crash", m.group(0))
        for m in re.finditer(r"^.*\b(PANIC|TRAP|terminated by exception)\b.*$", text, re.M):
            self.violate(rnd, "crash", m.group(0))
        errors = [l for l in text.splitlines() if "ERROR:" in l and "d365inv" in l]
        if errors:
            self.info.append("round %d: worker errors: %s" % (rnd, errors[:5]))

    def check_global(self):
        counts = self.mock.counts()
        preexisting = self.mock.preexisting()
        rows = q(self.pg, "SELECT vendor_key || '|' || invoice_key AS k, settled_by"
                          " FROM d365inv.invoice WHERE status = 'created'")
        # a lookup after an unknown fate may find a record created outside d365inv
        found = [r["k"] for r in rows if r["k"] not in counts and r["k"] in preexisting
                 and r["settled_by"] == "lookup"]
        created = len(rows) - len(found)
        total = sum(counts.values())
        log("global: %d creations in the mock, %d distinct keys, %d invoices 'created'"
            " (+%d found by lookup among keys created outside)" % (total, len(counts), created, len(found)))
        if not (total == len(counts) == created):
            self.violate(-1, "global count", "mock creations %d, distinct keys %d, invoices created %d"
                         % (total, len(counts), created))


def test_chaos(pg, mock):
    log("CHAOS_SEED=%d CHAOS_ROUNDS=%d CHAOS_KEY_FILTER=%s (replay: CHAOS_SEED=%d)"
        % (SEED, ROUNDS, KEY_FILTER, SEED))
    if KEY_FILTER != "on":
        q(pg, "ALTER SYSTEM SET d365inv.key_filter = %s", (KEY_FILTER,))
        q(pg, "SELECT pg_reload_conf()")
        time.sleep(0.5)
    chaos = Chaos(pg, mock)
    chaos.plan = None
    started = time.monotonic()
    completed = 0
    for rnd in range(1, ROUNDS + 1):
        if not chaos.run_round(rnd):
            log("round %d did not settle: stopping" % rnd)
            break
        completed += 1
    chaos.plan = None
    chaos.round_start_ts = "-infinity"
    chaos.round_log_offset = 0
    if completed == ROUNDS:
        chaos.check_global()
    totals = q(pg, "SELECT status::text, count(*) AS n FROM d365inv.invoice"
                   " WHERE source LIKE %s GROUP BY 1 ORDER BY 1", ("chaos:%",))
    log("%d/%d rounds in %.1fs (slowest %.1fs), %d worker SIGKILLs; invoices %s"
        % (completed, ROUNDS, time.monotonic() - started, max(chaos.round_times, default=0),
           chaos.kills, {r["status"]: r["n"] for r in totals}))
    log("faults fired: %s" % dict(chaos.fired))
    settled_by = q(pg, "SELECT status::text || '/' || coalesce(settled_by, '-') AS s, count(*) AS n"
                       " FROM d365inv.invoice WHERE source LIKE %s GROUP BY 1 ORDER BY 1", ("chaos:%",))
    log("settled: %s" % {r["s"]: r["n"] for r in settled_by})
    for line in chaos.info:
        log("note: " + line)
    if chaos.violations:
        with open(EVIDENCE_PATH, "w") as f:
            json.dump({"seed": SEED, "rounds": ROUNDS, "key_filter": KEY_FILTER,
                       "violations": chaos.violations}, f, indent=1, default=str)
        kinds = Counter(v["kind"] for v in chaos.violations)
        summary = "\n".join("round %d: %s: %s" % (v["round"], v["kind"], v["message"])
                            for v in chaos.violations[:30])
        pytest.fail("CHAOS_SEED=%d: %d violations %s; evidence in %s\n%s"
                    % (SEED, len(chaos.violations), dict(kinds), EVIDENCE_PATH, summary), pytrace=False)
    assert completed == ROUNDS
