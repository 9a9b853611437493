"""mockctl: start, stop and drive the mock Dynamics 365 server (test/mock-d365)
from integration tests.  Standard library only.

    from mockctl import MockD365
    with MockD365(unique=True, latency_ms=5) as mock:   # settings -> --config
        mock.configure(fault_next={"drop_after": 1})
        ... point d365inv at mock.service_root / mock.token_url ...
        assert mock.counts() == {"v001|inv-1": 1}

    # late commit: the batch is held 4 s, then committed though the client gave up
    with MockD365(hold_ms=4000, client_keys=True, unique=False) as mock:
        mock.configure(fault_next={"hold": 1})
        ... deliver with d365inv.http_timeout = 2s ...
        mock.wait_holds_over()        # -> {"held": 1, "holding": 0, "committed": 1, "abandoned": 1}
        mock.entity("our-id")         # the entity the held batch created, by InvoiceId

    # service protection, scaled: 10 s window, 200 requests, 40 s execution time
    with MockD365(sp_window_s=10, sp_requests=200, sp_execution_s=40, op_cost_ms=10) as mock:
        ... deliver, the client naming itself in X-D365inv-Client-Id ...
        mock.users()                  # -> {"app-1": {"requests": 180, "throttled": {...}, ...}}
        mock.throttled()              # -> 429s for service protection, all users

or the module-level functions on one shared instance:

    base_url, port = mockctl.start()
    mockctl.configure(error_rate=0.1, seed=7)
    mockctl.reset(); mockctl.stop()
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK_SCRIPT = os.path.normpath(os.path.join(HERE, "..", "mock-d365"))
# Debian's interpreter: the mock must not depend on whatever python is on PATH.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# Admin calls must never go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MockError(RuntimeError):
    pass


class MockD365:
    """One mock-d365 subprocess on 127.0.0.1 and a free port."""

    def __init__(self, *cli_args, log_path=None, **settings):
        """cli_args: extra command-line flags (e.g. "--verbose");
        settings: startup settings (what reset() returns to);
        log_path: where the mock's stderr goes (default: a scratch file
        that stop() deletes)."""
        self.cli_args = list(cli_args)
        self.settings = settings
        self.log_path = log_path
        self.proc = None
        self.port = None
        self._tmpdir = None

    # ---- lifecycle ---------------------------------------------------------

    def start(self, timeout=10.0):
        """Start the mock and wait until it listens.  Returns (base_url, port)."""
        if self.proc is not None:
            raise MockError("already started")
        self._tmpdir = tempfile.mkdtemp(prefix="mock-d365.")
        port_file = os.path.join(self._tmpdir, "port")
        if self.log_path is None:
            self.log_path = os.path.join(self._tmpdir, "mock.log")
        cmd = [PYTHON, MOCK_SCRIPT, "--port", "0", "--port-file", port_file, *self.cli_args]
        if self.settings:
            cmd += ["--config", json.dumps(self.settings)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not os.path.exists(port_file):
            if self.proc.poll() is not None:
                raise MockError(f"mock-d365 exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MockError(f"mock-d365 did not start within {timeout}s: {self.log_tail()}")
            time.sleep(0.02)
        with open(port_file) as f:
            self.port = int(f.read())
        return self.base_url, self.port

    def stop(self, timeout=5.0):
        """SIGTERM, then SIGKILL if needed.  Returns the exit code.  Removes
        the scratch directory, and with it the default log."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmpdir:
            if self.log_path and self.log_path.startswith(self._tmpdir + os.sep):
                self.log_path = None
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        return proc.returncode

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n=2000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # ---- addresses ---------------------------------------------------------

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def service_path(self):
        return "/" + self.settings.get("service_path", "/api/data/v9.2").strip("/")

    @property
    def service_root(self):
        """With the trailing slash, as OData uses it."""
        return f"{self.base_url}{self.service_path}/"

    @property
    def batch_url(self):
        return self.service_root + "$batch"

    @property
    def token_url(self):
        return self.base_url + "/oauth2/token"

    # ---- admin API ---------------------------------------------------------

    def admin(self, method, path, payload=None):
        """Call /_admin/<path>; returns the decoded JSON answer."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.base_url}/_admin/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise MockError(f"{method} /_admin/{path}: {e.code} {e.read()!r}") from None

    def configure(self, **settings):
        """Change settings at runtime; returns the full config."""
        return self.admin("POST", "config", settings)

    def config(self):
        return self.admin("GET", "config")

    def reset(self):
        """Back to the startup settings; clears entities, counters, faults, log."""
        return self.admin("POST", "reset", {})

    def counts(self):
        """{"vendor|invoice" (or "company|vendor|invoice"): times created}."""
        return self.admin("GET", "counts")

    def preexisting(self):
        """Like counts(), for entities seeded with seed_entities()."""
        return self.admin("GET", "preexisting")

    def stats(self):
        return self.admin("GET", "stats")

    def requests(self, last=None):
        """The last raw $batch requests (at most 200 are kept), oldest first."""
        return self.admin("GET", "requests" + ("" if last is None else f"?last={int(last)}"))

    def entities(self):
        return self.admin("GET", "entities")

    def seed_entities(self, entities):
        """Pre-seed invoices "created outside d365inv"; returns them with
        InvoiceId (an entity may bring its own InvoiceId)."""
        return self.admin("POST", "entities", list(entities))

    def entity(self, invoice_id):
        """The entity with this InvoiceId (as stored: GUIDs lower-case), or None."""
        return next((e for e in self.entities() if e["InvoiceId"] == invoice_id), None)

    def held(self):
        """Late-commit ("hold") bookkeeping since the last reset:
        held: batches that were held; holding: held and not yet committed;
        committed: processed after their hold; abandoned: of those, the
        client had hung up before the answer (the commit stood anyway)."""
        s = self.stats()
        return {"held": s["held"], "holding": s["holding"],
                "committed": s["held_committed"], "abandoned": s["held_abandoned"]}

    def wait_holds_over(self, timeout=30.0):
        """Wait until every held batch has been committed; returns held().
        Raises MockError if some are still held after timeout seconds."""
        held = self.wait_for(lambda m: (h := m.held())["holding"] == 0 and h, timeout)
        if not held:
            raise MockError(f"batches still held after {timeout}s: {self.held()}")
        return held

    def users(self):
        """Service protection per user (client id) since the last reset:
        {user: {"requests", "throttled": {"requests", "execution",
        "concurrent"}, "execution_ms", "in_progress", "max_in_progress",
        "window_requests", "window_execution_ms"}}."""
        return self.stats()["users"]

    def throttled(self, user=None):
        """Service protection 429s of one user, or of all of them."""
        if user is None:
            return sum(self.stats()["service_protection"]["throttled"].values())
        u = self.users().get(user)
        return sum(u["throttled"].values()) if u else 0

    def wait_for(self, predicate, timeout=10.0, interval=0.05):
        """Poll predicate(self) until true; returns its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(interval)


# ---- module-level convenience on one shared instance -------------------------

_default = None


def _mock():
    if _default is None:
        raise MockError("mockctl.start() has not been called")
    return _default


def start(*cli_args, **settings):
    """Start the shared mock; returns (base_url, port)."""
    global _default
    if _default is not None:
        stop()
    _default = MockD365(*cli_args, **settings)
    return _default.start()


def stop():
    global _default
    mock, _default = _default, None
    return mock.stop() if mock else None


def instance():
    return _mock()


def configure(**settings):
    return _mock().configure(**settings)


def config():
    return _mock().config()


def counts():
    return _mock().counts()


def preexisting():
    return _mock().preexisting()


def stats():
    return _mock().stats()


def reset():
    return _mock().reset()


def requests(last=None):
    return _mock().requests(last)


def entities():
    return _mock().entities()


def seed_entities(items):
    return _mock().seed_entities(items)


def entity(invoice_id):
    return _mock().entity(invoice_id)


def held():
    return _mock().held()


def wait_holds_over(timeout=30.0):
    return _mock().wait_holds_over(timeout)


def users():
    return _mock().users()


def throttled(user=None):
    return _mock().throttled(user)
