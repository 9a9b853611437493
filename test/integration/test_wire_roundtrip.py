"""The $batch wire format over real HTTP: requests built by d365inv.build_batch()
in a real PostgreSQL, sent to the mock D365 over loopback, answered in real
multipart, read back by d365inv.parse_batch_response() and d365inv.classify().

Needs the throwaway cluster started by test/run-tests (PGHOST, PGPORT, PGUSER).
"""
import http.client
import json
import urllib.parse

import pytest

from mockctl import MockD365

HOSTILE = ["O'Brien & Sons", "#7 100%+/?", "a'' or ''1''=''1", "x') or (VendorAccount ne '",
           "spaced  out", "Ünïcödé-Ω", "L" * 20]



@pytest.fixture
def mock():
    with MockD365() as m:
        yield m


def stage(db, rows):
    """rows: (vendor, invoice) pairs; returns their invoice ids in order."""
    with db.cursor() as cur:
        cur.execute("TRUNCATE d365inv.invoice")
        ids = []
        for vendor, invoice in rows:
            cur.execute("INSERT INTO d365inv.invoice (vendor_account, invoice_number, invoice_date, amount)"
                        " VALUES (%s, %s, '2024-01-15', 12.30) RETURNING id", (vendor, invoice))
            ids.append(cur.fetchone()[0])
    return ids


def exchange(db, mock, ids, operation="create", continue_on_error=True):
    """Build, send, parse and classify one $batch; returns (outer status, rows)."""
    with db.cursor() as cur:
        cur.execute("SELECT content_type, body FROM d365inv.build_batch('default', %s, %s)", (ids, operation))
        content_type, body = cur.fetchone()
    conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
    headers = {"Content-Type": content_type, "OData-Version": "4.0", "Accept": "application/json"}
    if continue_on_error:
        headers["Prefer"] = "odata.continue-on-error"
    conn.request("POST", urllib.parse.urlsplit(mock.batch_url).path, body=bytes(body), headers=headers)
    resp = conn.getresponse()
    rbody = resp.read()
    rtype = resp.getheader("Content-Type")
    conn.close()
    with db.cursor() as cur:
        cur.execute("""SELECT p.content_id, p.http_status, c.outcome, c.d365_id, c.error_code, p.body
                       FROM d365inv.parse_batch_response(%s, %s) p,
                            LATERAL d365inv.classify('default', p.http_status, p.body, p.headers) c
                       ORDER BY p.position""", (rtype, rbody))
        return resp.status, cur.fetchall()


@pytest.fixture(autouse=True)
def relative_urls(db, mock):
    with db.cursor() as cur:
        cur.execute("UPDATE d365inv.target SET service_root = %s, url_form = 'relative', company = NULL",
                    (mock.service_root,))


def test_create_then_duplicate(db, mock):
    ids = stage(db, [("V001", "INV-1"), ("V001", "INV-2"), ("V002", "INV-1")])
    status, rows = exchange(db, mock, ids)
    assert status == 200
    assert [(r[0], r[1], r[2]) for r in rows] == [(str(i), 201, "created") for i in ids]
    created = {e["InvoiceId"] for e in mock.entities()}
    assert {r[3] for r in rows} == created          # the id D365 returned is what we read back
    status, rows = exchange(db, mock, ids)
    assert [r[2] for r in rows] == ["duplicate"] * 3
    assert mock.counts() == {"v001|inv-1": 1, "v001|inv-2": 1, "v002|inv-1": 1}


@pytest.mark.parametrize("status,code", [(409, "0x80040237"), (412, "0x80060892"), (500, "0x80040333")])
def test_every_duplicate_answer_is_a_duplicate(db, mock, status, code):
    mock.configure(duplicate_status=status, duplicate_code=code)
    ids = stage(db, [("V9", "DUP-1")])
    assert exchange(db, mock, ids)[1][0][2] == "created"
    rows = exchange(db, mock, ids)[1]
    assert (rows[0][1], rows[0][2], rows[0][4]) == (status, "duplicate", code)


def test_hostile_keys_created_and_found_exactly(db, mock):
    ids = stage(db, [("V1", k) for k in HOSTILE])
    status, rows = exchange(db, mock, ids)
    assert [r[2] for r in rows] == ["created"] * len(HOSTILE)
    # a lookup of all of them finds each exactly once and nothing else
    status, rows = exchange(db, mock, ids, "lookup")
    assert status == 200 and len(rows) == 1 and rows[0][1] == 200
    found = sorted(v["InvoiceNumber"] for v in json.loads(rows[0][5])["value"])
    assert found == sorted(HOSTILE)
    # a key that only looks like another one is not found
    ids2 = stage(db, [("V1", "O'Brien"), ("V1", "x")])
    rows = exchange(db, mock, ids2, "lookup")[1]
    assert json.loads(rows[0][5])["value"] == []


def test_lookup_splits_keys_twenty_per_get(db, mock):
    ids = stage(db, [("V7", "L-%03d" % i) for i in range(45)])
    exchange(db, mock, ids[:30])
    status, rows = exchange(db, mock, ids, "lookup")
    assert [r[1] for r in rows] == [200, 200, 200]
    assert mock.stats()["operations"]["GET"] == 3
    assert sum(len(json.loads(r[5])["value"]) for r in rows) == 30


@pytest.mark.parametrize("url_form", ["relative", "absolute_path", "absolute_url"])
def test_url_forms(db, mock, url_form):
    with db.cursor() as cur:
        cur.execute("UPDATE d365inv.target SET url_form = %s", (url_form,))
    ids = stage(db, [("V3", "U-" + url_form)])
    assert exchange(db, mock, ids)[1][0][2] == "created"


def test_upsert_and_create_only(db, mock):
    ids = stage(db, [("V5", "O'Up 1")])
    rows = exchange(db, mock, ids, "upsert_create_only")[1]
    assert rows[0][2] == "created"
    rows = exchange(db, mock, ids, "upsert_create_only")[1]
    assert (rows[0][1], rows[0][2]) == (412, "duplicate")
    rows = exchange(db, mock, ids, "upsert")[1]
    assert rows[0][2] == "created" and rows[0][1] in (200, 204)
    assert mock.counts() == {"v5|o'up 1": 1}


def test_stop_at_first_failure_leaves_rest_unanswered(db, mock):
    ids = stage(db, [("V6", "S-1"), ("V6", "S-2"), ("V6", "S-3")])
    exchange(db, mock, ids[1:2])                       # S-2 exists already
    status, rows = exchange(db, mock, ids, continue_on_error=False)
    assert status == 400
    assert [(r[0], r[2]) for r in rows] == [(str(ids[0]), "created"), (str(ids[1]), "duplicate")]
    assert "v6|s-3" not in mock.counts()                # not processed: no response part


def test_reordered_and_id_less_parts_are_correlated(db, mock):
    ids = stage(db, [("V8", "R-%d" % i) for i in range(5)])
    mock.configure(fault_next={"reorder": 1})
    rows = exchange(db, mock, ids)[1]
    assert [r[0] for r in rows] == [str(i) for i in reversed(ids)]
    mock.configure(fault_next={"drop_content_id": 1})
    ids2 = stage(db, [("V8", "Q-%d" % i) for i in range(3)])
    rows = exchange(db, mock, ids2)[1]
    assert [r[0] for r in rows] == [None, None, None] and [r[2] for r in rows] == ["created"] * 3


def test_company_filter_and_key_predicate(db, mock):
    with db.cursor() as cur:
        cur.execute("UPDATE d365inv.target SET company = 'usmf'")
    ids = stage(db, [("V4", "C-1")])
    assert exchange(db, mock, ids)[1][0][2] == "created"
    assert "usmf|v4|c-1" in mock.counts()
    rows = exchange(db, mock, ids, "lookup")[1]
    assert [v["InvoiceNumber"] for v in json.loads(rows[0][5])["value"]] == ["C-1"]
    assert "cross-company=true" in mock.requests(last=1)[0]["body"]
