"""Shared fixtures for the integration tests (cluster from test/run-tests)."""
import os

import psycopg2
import pytest

from diagnostics import file_stem


@pytest.fixture(scope="module")
def db(request):
    """A fresh database with the extension, named after the test module."""
    name = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "it_")
    admin = psycopg2.connect(dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('DROP DATABASE IF EXISTS "%s"' % name)
        cur.execute('CREATE DATABASE "%s"' % name)
    conn = psycopg2.connect(dbname=name)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION d365inv")
    yield conn
    conn.close()
    with admin.cursor() as cur:
        cur.execute('DROP DATABASE "%s"' % name)
    admin.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test (or setup, or teardown) of a module that has
    failure_diagnostics(item) (diagnostics.py) gets its text as a report
    section ("d365inv diagnostics"), taken while the module's cluster still
    runs, before the fixtures' teardown cleans up; with D365INV_DIAG_DIR set
    it is written there too (one file per test, <file_stem>.txt, which
    test/run-tests prints)."""
    outcome = yield
    rep = outcome.get_result()
    diagnose = getattr(item.module, "failure_diagnostics", None)
    if diagnose is None or not rep.failed:
        return
    try:
        text = diagnose(item)
    except Exception as e:          # the diagnosis must not hide the failure
        text = "failure_diagnostics failed: %r" % (e,)
    if not text:
        return
    rep.sections.append(("d365inv diagnostics", text))
    where = os.environ.get("D365INV_DIAG_DIR")
    if where:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, file_stem(item) + ".txt"), "w") as f:
            f.write(text)
