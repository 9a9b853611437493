"""Shared fixtures for the integration tests (cluster from test/run-tests)."""
import psycopg2
import pytest


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
