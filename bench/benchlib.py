"""benchlib: what the Python benchmarks (bench/submit.py, bench/preflight.py,
bench/batchsize.py) share: paths, the report that is printed and kept for
bench/out/, and small helpers around the mock's counters.

Importing it also puts test/integration on sys.path, so a benchmark can
`from pgcluster import Cluster` and `from mockctl import MockD365`.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "test", "integration"))

PYTHON = "/usr/bin/python3"
GEN = os.path.join(HERE, "gen_invoices.py")
OUT_DIR = os.path.join(HERE, "out")
# the inbox columns bench/gen_invoices.py writes, in its order
COLS = "vendor_account, invoice_number, invoice_date, amount, currency, description, payload"


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
