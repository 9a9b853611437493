"""A guest in someone's production database: the attacks and accidents of the
guest-safety issue, each against a real cluster (pgcluster.Cluster) and, where
delivery matters, the worker and the mock D365 on 127.0.0.1.

- an operator who may create objects in public plants an operator that the
  superuser worker would call (privilege escalation): the worker pins its
  search_path, so it never does;
- a server without shared_preload_libraries: loading and ingest work, the
  session survives, functions that need the worker say so;
- payloads: whatever the check accepts, ::jsonb stores (a property test over
  random and adversarial payloads), and ingest() never fails on one;
- numbers reach D365 with their exact digits, and a payload that is as deep as
  allowed is delivered with its neighbours.
"""
import json
import random
import time

import psycopg2
import pytest

from mockctl import MockD365
from pgcluster import Cluster, wait_for

CONF = {
    "d365inv.in_doubt_delay": "300ms",
    # the mock commits a request as it arrives, before any latency; the
    # late-commit tests hold requests and set a longer lifetime
    "d365inv.server_request_lifetime": "200ms",
    "d365inv.retry_base_delay": "100ms",
    "d365inv.naptime": "200ms",
    "d365inv.http_timeout": "3s",
}


def submit(pg, wait="20 s"):
    return {r["status"]: r["invoices"] for r in
            pg.rows("SELECT * FROM d365inv.d365inv_submit(wait => %s::interval)", (wait,))}


# --------------------------------------------------------------------------
# privilege escalation through the worker's search_path

ATTACK = r"""
CREATE TABLE public.attack_log (caller name, superuser boolean);
GRANT INSERT ON public.attack_log TO PUBLIC;
CREATE FUNCTION public.sneaky_lt(d365inv.invoice_status, d365inv.invoice_status) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.attack_log
    SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE regress_attacker SUPERUSER';
    END IF;
    RETURN pg_catalog.enum_lt($1, $2);
END
$$;
CREATE OPERATOR public.< (LEFTARG = d365inv.invoice_status, RIGHTARG = d365inv.invoice_status,
                          FUNCTION = public.sneaky_lt);
"""


def test_operator_planted_in_public_never_runs_as_the_worker(tmp_path):
    with Cluster(CONF) as pg, MockD365() as mock:
        pg.wait_for_worker()
        # invoices waiting while the trap is laid (the target sends nothing yet)
        pg.sql("UPDATE d365inv.target SET service_root = %s, enabled = false", (mock.service_root,))
        pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
               " SELECT 'V1', 'ATT-' || i, '2024-01-15', '1' FROM generate_series(1, 30) i")
        pg.sql("SELECT d365inv.ingest()")
        pg.sql("CREATE ROLE regress_attacker LOGIN IN ROLE d365inv_operator")
        # the database owner may create in public, and may set the
        # database's search_path for everyone, superusers included
        pg.sql('ALTER DATABASE "%s" OWNER TO regress_attacker' % pg.dbname)
        pg.sql("GRANT CREATE ON SCHEMA public TO regress_attacker")
        conn = psycopg2.connect(host=pg.dir, port=5432, user="regress_attacker", dbname=pg.dbname)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(ATTACK)
            cur.execute('ALTER DATABASE "%s" SET search_path = public, pg_catalog' % pg.dbname)
            # the trap works: unqualified SQL like the worker's calls it
            cur.execute("SELECT count(*) FROM d365inv.invoice WHERE status < 'created'")
            cur.execute("SELECT count(*) FROM public.attack_log")
            assert cur.fetchone()[0] == 30
            cur.execute("TRUNCATE public.attack_log")
        conn.close()

        # a new worker (it reads the database's settings when it connects)
        # claims, sends and records the invoices
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
               " WHERE backend_type = 'd365inv worker'")
        pg.wait_for_worker()
        pg.sql("UPDATE d365inv.target SET enabled = true")
        # the worker may deliver some or all of them before d365inv_submit()
        # looks (it counts the invoices open when it starts): what matters
        # is that all 30 are created, by the worker, with the trap in place
        submit(pg)
        assert wait_for(lambda: pg.value("SELECT count(*) FROM d365inv.invoice"
                                         " WHERE status = 'created'") == 30, timeout=20)

        assert pg.value("SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_attacker'") is False
        assert pg.rows("SELECT * FROM public.attack_log WHERE superuser") == []


# --------------------------------------------------------------------------
# without shared_preload_libraries

def test_without_preload_loading_works_and_the_session_survives():
    with Cluster({"shared_preload_libraries": "''"}, extension=False) as pg:
        conn = pg.connect()
        with conn.cursor() as cur:
            cur.execute("LOAD 'd365inv'")
            cur.execute("CREATE EXTENSION d365inv")
            cur.execute("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
                        " VALUES ('V1', 'NP-1', '2024-01-15', '1'), ('v1 ', 'np-1', '2024-01-15', '1'),"
                        "        ('V1', 'NP-2', 'bad', '1')")
            cur.execute("SELECT * FROM d365inv.ingest()")
            assert cur.fetchone() == (1, 1, 1)
            cur.execute("SELECT d365inv.invoice_key(' ABC ')")
            assert cur.fetchone() == ("abc",)
            for call in ("SELECT d365inv.d365inv_submit()",
                         "SELECT * FROM d365inv.d365inv_submit(wait => '1 s')"):
                with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState) as err:
                    cur.execute(call)
                assert "shared_preload_libraries" in str(err.value)
            # the same connection goes on
            cur.execute("SELECT d365inv.worker_pid(), count(*) FROM d365inv.invoice")
            assert cur.fetchone() == (None, 1)
        conn.close()
        assert "cannot create PGC_POSTMASTER" not in pg.server_log()


# --------------------------------------------------------------------------
# payloads: the check and the cast agree

def random_json(rng, depth=0):
    kind = rng.choice(["num", "str", "bool", "null", "obj", "arr"] if depth < 70 else ["num", "str"])
    if kind == "num":
        mantissa = rng.choice(["0", "-0", "1", "-12.5", "12345678901234567890.123456789",
                               "9" * rng.randint(1, 1200), "0." + "0" * rng.randint(0, 1100) + "1"])
        if rng.random() < 0.5:
            mantissa += rng.choice(["e", "E", "e+", "e-", "E-"]) + str(rng.choice(
                [0, 1, 5, 308, 400, 999, 1000, 1001, 5000, 200000, 10 ** 12]))
        return mantissa
    if kind == "str":
        return json.dumps(rng.choice(["", "x", "\u00e9", "\ud7ff", "line\nbreak", "q\"uote"])) \
            if rng.random() < 0.8 else rng.choice(['"\\u0000"', '"\\ud800"', '"\\udc00x"',
                                                    '"\\ud83d\\ude00"', '"\\x"', '"\\u12"'])
    if kind == "bool":
        return rng.choice(["true", "false"])
    if kind == "null":
        return "null"
    if kind == "arr":
        return "[" + ",".join(random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    return "{" + ",".join('"k%d":%s' % (i, random_json(rng, depth + 1))
                          for i in range(rng.randint(0, 3))) + "}"


def adversarial(rng):
    d = rng.choice([1, 60, 63, 64, 65, 100, 5000, 200000])
    return rng.choice([
        '{"a":' + "[" * d + "]" * d + "}",
        '{"a":' + "{\"b\":" * d + "1" + "}" * d + "}",
        "{" * d,
        '{"a":"' + "x" * rng.choice([10, 1048560, 1048600]) + '"}',
        '{"a": 1}' + rng.choice(["", " ", "x", "}", "\n"]),
        '{"a": [1, 2', '{"a": 1,}', "{'a': 1}", "{\"a\": NaN}", "{\"a\": Infinity}",
        '{"a": 01}', '{"a": .5}', '{"a": 1.}', '{"a": -}', '{"a": 1e}', '{"a": "\t"}',
    ])


def mutate(rng, text):
    if not text or rng.random() < 0.5:
        return text
    i = rng.randrange(len(text))
    return rng.choice([text[:i], text[:i] + rng.choice('{}[]",:\\e-.0') + text[i:], text[:i] + text[i + 1:]])


def test_whatever_the_check_accepts_jsonb_stores(tmp_path):
    rng = random.Random(20261201)
    cases = []
    for n in range(3000):
        if n % 3 == 0:
            cases.append(adversarial(rng))
        else:
            cases.append(mutate(rng, "{" + '"p":%s' % random_json(rng) + "}"))
    with Cluster(CONF) as pg:
        conn = pg.connect()
        accepted = rejected = blank = 0
        with conn.cursor() as cur:
            for p in cases:
                if p.strip(" \t\r\n") == "":
                    blank += 1          # no payload at all: the line is queued
                    continue
                cur.execute("SELECT d365inv.is_json_object(%s)", (p,))
                ok = cur.fetchone()[0]
                if ok:
                    accepted += 1
                    cur.execute("SELECT %s::jsonb", (p,))   # raises if the two disagree
                    try:
                        parsed = json.loads(p)
                    except ValueError:
                        parsed = None
                    assert isinstance(parsed, dict), p[:200]
                else:
                    rejected += 1
            # every line of the lot, through COPY and ingest(): nothing fails,
            # every line accounted for
            cur.execute("TRUNCATE d365inv.inbox")
            rows = "".join("V%d\tI%d\t2024-01-15\t1\t%s\n" % (i % 7, i, p.replace("\\", "\\\\")
                                                            .replace("\n", "\\n").replace("\t", "\\t"))
                           for i, p in enumerate(cases))
            path = tmp_path / "payloads.tsv"
            path.write_text(rows)
            with open(path) as f:
                cur.copy_expert("COPY d365inv.inbox (vendor_account, invoice_number, invoice_date,"
                                " amount, payload) FROM STDIN", f)
            cur.execute("SELECT * FROM d365inv.ingest()")
            queued, duplicates, rejects = cur.fetchone()
        conn.close()
    assert accepted > 500 and rejected > 500, (accepted, rejected)
    assert duplicates == 0
    assert (queued, rejects) == (accepted + blank, rejected)


# --------------------------------------------------------------------------
# what goes out is what came in

def test_numbers_are_sent_with_their_exact_digits_and_deep_payloads_are_delivered():
    with Cluster(CONF) as pg, MockD365(unique=True) as mock:
        pg.wait_for_worker()
        pg.sql("UPDATE d365inv.target SET service_root = %s", (mock.service_root,))
        deep = '{"Lines":' + "[" * 63 + "]" * 63 + "}"
        too_deep = '{"Lines":' + "[" * 1100 + "]" * 1100 + "}"
        pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount, payload)"
               " VALUES ('V1', 'EX-1', '2024-01-15', '1', %s), ('V1', 'EX-2', '2024-01-15', '2', %s),"
               "        ('V1', 'EX-3', '2024-01-15', '3', %s), ('V1', 'EX-4', '2024-01-15', '4', NULL)",
               ('{"Qty": 12345678901234567890.123456789, "Big": 1e400, "Small": 1.50}', deep, too_deep))
        assert submit(pg) == {"created": 3, "ingest_reject": 1}
        bodies = "".join(r["body"] for r in mock.requests())
        assert '"Qty":12345678901234567890.123456789' in bodies
        assert '"Big":1' + "0" * 400 + "," in bodies or '"Big":1' + "0" * 400 + "}" in bodies
        assert '"Small":1.50' in bodies
        assert '"Lines":' + "[" * 63 in bodies
        assert pg.value("SELECT reason FROM d365inv.reject") == "payload: nested deeper than 64 levels"
        assert pg.value("SELECT count(*) FROM d365inv.invoice WHERE status = 'review'") == 0


# --------------------------------------------------------------------------
# a Retry-After of 999999999999 seconds

def test_a_huge_retry_after_is_cut_and_logged():
    conf = dict(CONF, **{"d365inv.retry_max_delay": "5s"})
    with Cluster(conf) as pg, MockD365(throttle_rate=1.0, retry_after=999999999999) as mock:
        pg.wait_for_worker()
        pg.sql("UPDATE d365inv.target SET service_root = %s", (mock.service_root,))
        pg.sql("INSERT INTO d365inv.inbox (vendor_account, invoice_number, invoice_date, amount)"
               " VALUES ('V1', 'RA-1', '2024-01-15', '1')")
        pg.sql("SELECT d365inv.d365inv_submit()")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and pg.value(
                "SELECT count(*) FROM d365inv.invoice WHERE last_http_status = 429") == 0:
            time.sleep(0.1)
        # throttled: back to pending, no attempt counted, due after the capped wait
        row = pg.rows("SELECT status::text, attempts,"
                      "       extract(epoch FROM next_attempt_at - updated_at)::float8 AS wait_s"
                      "  FROM d365inv.invoice")[0]
        assert (row["status"], row["attempts"]) == ("pending", 0), row
        assert 0 < row["wait_s"] <= 5.1, row
        assert "D365 asked to wait more than 86400 s (Retry-After); waiting at most" \
               " d365inv.retry_max_delay = 5 s" in pg.server_log()
