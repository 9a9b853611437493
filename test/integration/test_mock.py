"""Tests of the mock Dynamics 365 server (test/mock-d365) itself.

The mock runs as a subprocess on a free port; these tests talk to it with
http.client only and parse its $batch answers with the standard email
package, an independent multipart parser, so the mock's own parsing and
rendering are not checked against themselves.
"""

import email
import email.utils
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from urllib.parse import quote, urljoin, urlsplit

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mockctl  # noqa: E402

MOCK = mockctl.MOCK_SCRIPT
PYTHON = mockctl.PYTHON
SERVICE = "/api/data/v9.2"
ODATA_JSON = "application/json; odata.metadata=minimal"


# ---------------------------------------------------------------------------
# Process and HTTP helpers

def spawn(*args):
    """Start mock-d365 on a free port; returns (proc, port, port_file)."""
    tmp = tempfile.mkdtemp(prefix="mock-test.")
    port_file = os.path.join(tmp, "port")
    proc = subprocess.Popen([PYTHON, MOCK, "--port", "0", "--port-file", port_file, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.tmpdir = tmp  # removed by stop()
    deadline = time.monotonic() + 10
    while not os.path.exists(port_file):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "mock did not start"
        time.sleep(0.02)
    with open(port_file) as f:
        return proc, int(f.read()), port_file


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stderr.close()
    shutil.rmtree(proc.tmpdir, ignore_errors=True)
    return proc.returncode


@pytest.fixture(scope="module")
def port():
    proc, port, _ = spawn()
    yield port
    assert stop(proc) == 0


@pytest.fixture(autouse=True)
def clean(request):
    """Reset before each test; after it, the mock must have hit no bug of
    its own (those answer 500 and would hide behind fault tests)."""
    port = request.getfixturevalue("port") if "port" in request.fixturenames else None
    if port:
        admin(port, "POST", "reset", {})
    yield
    if port:
        assert stats(port)["internal_errors"] == 0


def call(port, method, path, body=None, headers=None, conn=None, timeout=10):
    """One request; returns (status, headers, body bytes)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers, data
    finally:
        if own:
            conn.close()


def admin(port, method, name, payload=None):
    status, _, data = call(port, method, f"/_admin/{name}", payload,
                           {"Content-Type": "application/json"})
    return status, json.loads(data)


def counts(port):
    return admin(port, "GET", "counts")[1]


def stats(port):
    return admin(port, "GET", "stats")[1]


def configure(port, **settings):
    status, cfg = admin(port, "POST", "config", settings)
    assert status == 200, cfg
    return cfg


def token(port, secret="test-secret"):
    status, _, data = call(port, "POST", "/oauth2/token",
                           f"grant_type=client_credentials&client_id=test-client&client_secret={secret}"
                           "&scope=https%3A%2F%2Fexample.operations.dynamics.com%2F.default",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    return status, json.loads(data)


# ---------------------------------------------------------------------------
# Building $batch requests

def op(method, url, body=None, cid=None, headers=()):
    return {"method": method, "url": url, "body": body, "cid": cid, "headers": list(headers)}


def post_op(vendor, invoice, cid=None, **extra):
    return op("POST", "VendorInvoices", {"VendorAccount": vendor, "InvoiceNumber": invoice, **extra}, cid)


def changeset(*ops):
    return {"changeset": list(ops)}


def op_lines(o):
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if o["cid"] is not None:
        lines.append(f"Content-ID: {o['cid']}")
    lines += ["", f"{o['method']} {o['url']} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in o["headers"]]
    body = o["body"]
    if body is not None:
        lines.append("Content-Type: application/json; type=entry")
        body = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    lines += ["", body or ""]
    return lines


def batch_body(items, boundary="batch_8f1c", eol="\r\n"):
    lines = []
    for item in items:
        lines.append(f"--{boundary}")
        if "changeset" in item:
            csb = f"changeset_{uuid.uuid4().hex[:8]}"
            lines += [f"Content-Type: multipart/mixed; boundary={csb}", ""]
            for o in item["changeset"]:
                lines.append(f"--{csb}")
                lines += op_lines(o)
            lines.append(f"--{csb}--")
        else:
            lines += op_lines(item)
    lines.append(f"--{boundary}--")
    return (eol.join(lines) + eol).encode()


def post_batch(port, items, prefer=None, boundary="batch_8f1c", ctype=None, eol="\r\n",
               bearer=None, conn=None):
    headers = {"Content-Type": ctype or f"multipart/mixed; boundary={boundary}",
               "OData-Version": "4.0", "Accept": "application/json"}
    if prefer:
        headers["Prefer"] = prefer
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    return call(port, "POST", f"{SERVICE}/$batch", batch_body(items, boundary, eol), headers, conn)


# ---------------------------------------------------------------------------
# Parsing $batch answers with the email package

def parse_batch(headers, body):
    """-> list of answers: {"cid", "status", "headers", "body", "json"} or
    {"changeset": [answers]}."""
    raw = b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body
    msg = email.message_from_bytes(raw)
    assert msg.is_multipart() and not msg.defects, msg.defects
    return [parse_answer(part) for part in msg.get_payload()]


def parse_answer(part):
    if part.is_multipart():
        return {"changeset": [parse_answer(p) for p in part.get_payload()]}
    assert part.get_content_type() == "application/http"
    assert part["Content-Transfer-Encoding"] == "binary"
    raw = part.get_payload(decode=True)
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.decode().split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    hdrs = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return {"cid": part["Content-ID"], "status": int(status), "headers": hdrs, "body": body,
            "json": json.loads(body) if body else None}


def get_json(port, path, **kw):
    status, headers, data = call(port, "GET", path, **kw)
    return status, json.loads(data) if data else None


def seed(port, rows):
    status, created = admin(port, "POST", "entities", rows)
    assert status == 200, created
    return created


# ---------------------------------------------------------------------------
# Process, transport, OAuth

def test_port_file_service_document_keepalive(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(2):  # same TCP connection twice: keep-alive
        status, headers, data = call(port, "GET", SERVICE + "/", conn=conn)
        assert status == 200
        assert int(headers["Content-Length"]) == len(data)
        assert json.loads(data)["value"] == [{"name": "VendorInvoices", "kind": "EntitySet",
                                               "url": "VendorInvoices"}]
    sock = conn.sock
    status, headers, _ = call(port, "GET", "/nowhere", conn=conn)
    assert status == 404 and conn.sock is sock and headers["Content-Length"]
    conn.close()


def test_sigterm_and_sigint_exit_cleanly_and_remove_port_file():
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, port, port_file = spawn()
        assert get_json(port, "/_admin/config")[0] == 200
        proc.send_signal(sig)
        assert proc.wait(5) == 0
        assert not os.path.exists(port_file)
        assert b"Traceback" not in proc.stderr.read()
        stop(proc)


def test_cli_flags_set_startup_config_which_reset_restores():
    proc, port, _ = spawn("--no-unique", "--duplicate-status", "412", "--page-size", "7",
                          "--service-path", "/data/", "--entity-set", "Invoices",
                          "--fault-next", "drop_before=2", "--config", '{"seed": 9}')
    try:
        cfg = admin(port, "GET", "config")[1]
        assert (cfg["unique"], cfg["duplicate_status"], cfg["page_size"], cfg["seed"]) == (False, 412, 7, 9)
        assert cfg["service_path"] == "/data" and cfg["fault_next"] == {"drop_before": 2}
        configure(port, page_size=50, fault_next={"drop_before": 0})
        admin(port, "POST", "reset", {})
        cfg = admin(port, "GET", "config")[1]
        assert cfg["page_size"] == 7 and cfg["fault_next"] == {"drop_before": 2}
        status, _, _ = call(port, "POST", "/data/Invoices", {"VendorAccount": "V", "InvoiceNumber": "I"})
        assert status == 201  # plain POST on the renamed service and entity set
    finally:
        stop(proc)


def test_token_endpoint(port):
    status, body = token(port)
    assert status == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and len(body["access_token"]) >= 32
    assert token(port, secret="wrong") == (401, {"error": "invalid_client"})
    status, _, data = call(port, "POST", "/tenant-id/oauth2/v2.0/token",
                           "grant_type=password&client_id=test-client&client_secret=test-secret")
    assert (status, json.loads(data)) == (400, {"error": "unsupported_grant_type"})
    assert stats(port)["tokens_issued"] == 1


def test_require_auth_on_batch_and_plain_get(port):
    configure(port, require_auth=True)
    status, headers, _ = post_batch(port, [post_op("V1", "I1")])
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    status, headers, _ = call(port, "GET", SERVICE + "/VendorInvoices",
                              headers={"Authorization": "Bearer not-a-token"})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert counts(port) == {}
    tok = token(port)[1]["access_token"]
    status, _, _ = post_batch(port, [post_op("V1", "I1")], bearer=tok)
    assert status == 200 and counts(port) == {"v1|i1": 1}
    assert call(port, "GET", SERVICE + "/VendorInvoices", headers={"Authorization": f"Bearer {tok}"})[0] == 200
    assert stats(port)["auth_failures"] == 2


def test_token_expiry_and_expire_now(port):
    configure(port, require_auth=True, token_expiry=0.4)
    tok = token(port)[1]["access_token"]
    assert post_batch(port, [post_op("V1", "I1")], bearer=tok)[0] == 200
    time.sleep(0.6)
    assert post_batch(port, [post_op("V1", "I2")], bearer=tok)[0] == 401
    configure(port, token_expiry=3600)
    tok = token(port)[1]["access_token"]
    assert post_batch(port, [post_op("V1", "I3")], bearer=tok)[0] == 200
    configure(port, fault_next={"expire_token": 1})
    assert post_batch(port, [post_op("V1", "I4")], bearer=tok)[0] == 401
    assert counts(port) == {"v1|i1": 1, "v1|i3": 1}


# ---------------------------------------------------------------------------
# Creates and the duplicate key

def test_create_answers_like_d365(port):
    status, headers, body = post_batch(port, [post_op("V001", "INV-1", cid="1", Amount=12.5, Currency="EUR")])
    assert status == 200
    assert headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert int(headers["Content-Length"]) == len(body)
    [ans] = parse_batch(headers, body)
    assert ans["status"] == 201 and ans["cid"] == "1"
    ent = ans["json"]
    invoice_id = str(uuid.UUID(ent["InvoiceId"]))
    url = f"http://127.0.0.1:{port}{SERVICE}/VendorInvoices({invoice_id})"
    assert ans["headers"]["location"] == url and ans["headers"]["odata-entityid"] == url
    assert ans["headers"]["content-type"] == ODATA_JSON
    assert ent["@odata.etag"].startswith('W/"')
    assert (ent["VendorAccount"], ent["InvoiceNumber"], ent["Amount"], ent["Currency"]) == \
        ("V001", "INV-1", 12.5, "EUR")
    assert counts(port) == {"v001|inv-1": 1}


@pytest.mark.parametrize("body, status, code", [
    ({"InvoiceNumber": "I1"}, 400, "0x80040203"),
    ({"VendorAccount": "  ", "InvoiceNumber": "I1"}, 400, "0x80040203"),
    ('{"VendorAccount": "V1", ', 400, "0x80048d19"),
])
def test_bad_create_bodies(port, body, status, code):
    _, headers, data = post_batch(port, [op("POST", "VendorInvoices", body, cid="7")])
    [ans] = parse_batch(headers, data)
    assert ans["status"] == status and ans["json"]["error"]["code"] == code
    assert ans["json"]["error"]["message"]
    assert counts(port) == {}


def test_unknown_entity_set_and_bad_urls_404(port):
    items = [op("GET", "NoSuchSet"), op("GET", "/other/api/VendorInvoices"), op("POST", "VendorInvoice", {})]
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    assert status == 200
    assert [a["status"] for a in parse_batch(headers, data)] == [404, 404, 404]
    assert call(port, "GET", SERVICE + "/Nope")[0] == 404


def test_duplicates_use_sql_collation_and_company(port):
    items = [post_op("V1", "INV-1"), post_op("  v1 ", "inv-1 "),
             post_op("V1", "INV-1", dataAreaId="USMF"), post_op("V1", "INV-1", dataAreaId=" usmf"),
             post_op("V1", "INV-1", dataAreaId="DEMF")]
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    answers = parse_batch(headers, data)
    assert [a["status"] for a in answers] == [201, 409, 201, 409, 201]
    assert answers[1]["json"] == {"error": {"code": "0x80040237",
                                            "message": "A record with matching key values already exists."}}
    assert counts(port) == {"v1|inv-1": 1, "usmf|v1|inv-1": 1, "demf|v1|inv-1": 1}


@pytest.mark.parametrize("dup_status, dup_code",
                         [(409, "0x80040237"), (412, "0x80040237"), (500, "0x80040333")])
def test_duplicate_status_and_code_are_configurable(port, dup_status, dup_code):
    configure(port, duplicate_status=dup_status, duplicate_code=dup_code)
    status, headers, data = post_batch(port, [post_op("V1", "I1", cid="1"), post_op("V1", "I1", cid="2")])
    assert status == 400  # stop-at-first-failure: the duplicate fails the batch
    first, second = parse_batch(headers, data)
    assert first["status"] == 201
    assert second["status"] == dup_status and second["cid"] == "2"
    assert second["json"]["error"] == {"code": dup_code,
                                       "message": "A record with matching key values already exists."}


def test_unique_off_creates_second_entity(port):
    configure(port, unique=False)
    status, headers, data = post_batch(port, [post_op("V1", "I1"), post_op("v1", "i1 ")])
    first, second = parse_batch(headers, data)
    assert status == 200 and first["status"] == second["status"] == 201
    assert first["json"]["InvoiceId"] != second["json"]["InvoiceId"]
    assert counts(port) == {"v1|i1": 2}
    _, page = get_json(port, SERVICE + "/VendorInvoices?$filter=VendorAccount%20eq%20'V1'")
    assert len(page["value"]) == 2


def test_request_line_url_forms_bare_lf_quoted_boundary(port):
    def create(url, number, cid):
        return op("POST", url, {"VendorAccount": "V", "InvoiceNumber": number}, cid)
    items = [create("VendorInvoices", "rel", "a"),
             create(f"{SERVICE}/VendorInvoices", "abs-path", "b"),
             create(f"http://127.0.0.1:{port}{SERVICE}/VendorInvoices", "abs-url", "c")]
    status, headers, data = post_batch(port, items, boundary="b=1'x", eol="\n",
                                       ctype='multipart/mixed; boundary="b=1\'x"')
    assert status == 200
    assert [(a["cid"], a["status"]) for a in parse_batch(headers, data)] == [("a", 201), ("b", 201), ("c", 201)]
    assert counts(port) == {"v|rel": 1, "v|abs-path": 1, "v|abs-url": 1}


def test_chunked_request_body(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    body = batch_body([post_op("V1", "chunked")])
    conn.request("POST", f"{SERVICE}/$batch", body=iter([body[:50], body[50:]]), encode_chunked=True,
                 headers={"Content-Type": "multipart/mixed; boundary=batch_8f1c",
                          "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200 and b"201 Created" in resp.read()
    assert counts(port) == {"v1|chunked": 1}


def test_non_multipart_or_malformed_batch_is_400(port):
    status, _, data = call(port, "POST", f"{SERVICE}/$batch", {"requests": []},
                           {"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["error"]["code"]
    body = batch_body([post_op("V1", "I1")])
    unclosed = body[:body.rindex(b"--batch_8f1c--")]
    status, _, data = call(port, "POST", f"{SERVICE}/$batch", unclosed,
                           {"Content-Type": "multipart/mixed; boundary=batch_8f1c"})
    assert status == 400 and b"closing delimiter" in data
    assert counts(port) == {}


def test_damaged_batches_get_answers_not_crashes(port):
    """Seeded byte-level damage to valid batches: every request is answered
    200 or 400, and the mock never reaches its own-bug path."""
    rng = random.Random(1234)
    items = [changeset(post_op("V1", "C1", cid="1"), post_op("V1", "C2", cid="2")),
             op("GET", "VendorInvoices?$filter=" + quote("InvoiceNumber eq 'a''b'", safe="")),
             op("PATCH", "VendorInvoices(VendorAccount='V1',InvoiceNumber='P')", {"x": "ü"}, cid="3")]
    original = batch_body(items)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for _ in range(300):
        body = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(body))
            choice = rng.random()
            if choice < 0.4:
                body[i] = rng.choice(b"-\r\n:()'=,%{}\"x\xc3\xff ")
            elif choice < 0.7:
                del body[i:i + rng.randint(1, 40)]
            else:
                body[i:i] = body[rng.randrange(len(body)):][:rng.randint(1, 40)]
        status, _, _ = call(port, "POST", f"{SERVICE}/$batch", bytes(body),
                            {"Content-Type": "multipart/mixed; boundary=batch_8f1c",
                             "Prefer": "odata.continue-on-error"}, conn=conn)
        assert status in (200, 400)
    assert stats(port)["internal_errors"] == 0


# ---------------------------------------------------------------------------
# Queries

AWKWARD = ["O'Brien", "A&B", "#7", "50%", "1+1", "1 1", "Rechnung-Ü€-日本", "x''y"]


def test_filter_escaping_plain_and_in_batch(port):
    seed(port, [{"VendorAccount": "V9", "InvoiceNumber": n} for n in AWKWARD])
    for number in AWKWARD:
        expr = f"VendorAccount eq 'V9' and InvoiceNumber eq '{number.replace(chr(39), chr(39) * 2)}'"
        path = f"{SERVICE}/VendorInvoices?$filter={quote(expr, safe='')}&cross-company=true"
        status, page = get_json(port, path)
        assert status == 200 and [e["InvoiceNumber"] for e in page["value"]] == [number], number
    # '+' is literal in OData query strings: it must not match "1 1"
    _, page = get_json(port, f"{SERVICE}/VendorInvoices?$filter=InvoiceNumber%20eq%20'1+1'")
    assert [e["InvoiceNumber"] for e in page["value"]] == ["1+1"]
    expr = quote("InvoiceNumber eq 'O''Brien' or InvoiceNumber eq '50%'", safe="")
    status, headers, data = post_batch(port, [op("GET", f"VendorInvoices?$filter={expr}", cid="q")])
    [ans] = parse_batch(headers, data)
    assert ans["status"] == 200
    assert sorted(e["InvoiceNumber"] for e in ans["json"]["value"]) == ["50%", "O'Brien"]


def test_filter_and_or_parentheses_ne_and_errors(port):
    rows = [("V1", "I1", "Open"), ("V1", "I2", "Paid"), ("V2", "I1", "Open"), ("V2", "I3", "open")]
    seed(port, [{"VendorAccount": v, "InvoiceNumber": i, "Status": s} for v, i, s in rows])

    def numbers(expr):
        status, page = get_json(port, f"{SERVICE}/VendorInvoices?$filter={quote(expr, safe='')}")
        assert status == 200, page
        return sorted(f"{e['VendorAccount']}/{e['InvoiceNumber']}" for e in page["value"])
    assert numbers("(VendorAccount eq 'v1 ' and InvoiceNumber eq ' i2') or "
                   "(VendorAccount eq 'V2' and InvoiceNumber eq 'I3')") == ["V1/I2", "V2/I3"]
    assert numbers("VendorAccount eq 'V2' and (InvoiceNumber eq 'I1' or InvoiceNumber eq 'I3')") == \
        ["V2/I1", "V2/I3"]
    assert numbers("Status eq 'Open'") == ["V1/I1", "V2/I1"]  # non-key properties compare exactly
    assert numbers("not (VendorAccount eq 'V1') and Status ne 'Open'") == ["V2/I3"]
    for bad in ("VendorAccount eq", "VendorAccount gt 'a'", "(VendorAccount eq 'a'",
                "VendorAccount eq 'unterminated"):
        status, err = get_json(port, f"{SERVICE}/VendorInvoices?$filter={quote(bad, safe='')}")
        assert status == 400 and err["error"]["code"] == "0x80048d19", bad


def test_select_and_top(port):
    seed(port, [{"VendorAccount": "V1", "InvoiceNumber": f"I{i}", "Amount": i} for i in range(5)])
    status, page = get_json(port, f"{SERVICE}/VendorInvoices?$select=InvoiceNumber,InvoiceId&$top=2")
    assert status == 200 and "@odata.nextLink" not in page
    assert page["@odata.context"] == \
        f"http://127.0.0.1:{port}{SERVICE}/$metadata#VendorInvoices(InvoiceNumber,InvoiceId)"
    assert [sorted(e) for e in page["value"]] == [["@odata.etag", "InvoiceId", "InvoiceNumber"]] * 2
    assert [e["InvoiceNumber"] for e in page["value"]] == ["I0", "I1"]


def test_paging_follows_next_links(port):
    configure(port, page_size=3)
    seed(port, [{"VendorAccount": "V1" if i % 4 else "V2", "InvoiceNumber": f"I{i:02}"} for i in range(12)])
    def pages(path):
        seen = []
        while path:
            status, page = get_json(port, path)
            assert status == 200 and len(page["value"]) <= 3
            seen.append([e["InvoiceNumber"] for e in page["value"]])
            link = page.get("@odata.nextLink")
            if link:
                parts = urlsplit(link)
                assert (parts.scheme, parts.netloc) == ("http", f"127.0.0.1:{port}") and "$skiptoken=" in link
                path = f"{parts.path}?{parts.query}"
            else:
                path = None
        return seen
    expr = quote("VendorAccount eq 'V1'", safe="")
    assert pages(f"{SERVICE}/VendorInvoices?$filter={expr}&cross-company=true") == [
        ["I01", "I02", "I03"], ["I05", "I06", "I07"], ["I09", "I10", "I11"]]
    assert pages(f"{SERVICE}/VendorInvoices?$top=5") == [["I00", "I01", "I02"], ["I03", "I04"]]
    _, headers, data = post_batch(port, [op("GET", "VendorInvoices?$count=true",
                                            headers=[("Prefer", "odata.maxpagesize=2")])])
    [ans] = parse_batch(headers, data)
    assert ans["json"]["@odata.count"] == 12 and len(ans["json"]["value"]) == 2
    assert ans["json"]["@odata.nextLink"].endswith("$skiptoken=2")


def test_get_single_by_key_and_by_id(port):
    [row] = seed(port, [{"VendorAccount": "V'1", "InvoiceNumber": "A&B #1", "Amount": 3}])
    key = quote("VendorAccount='v''1 ',InvoiceNumber='a&b #1'", safe="=,")
    status, ent = get_json(port, f"{SERVICE}/VendorInvoices({key})")
    assert status == 200 and ent["InvoiceId"] == row["InvoiceId"] and ent["Amount"] == 3
    assert get_json(port, f"{SERVICE}/VendorInvoices({row['InvoiceId']})")[1]["InvoiceNumber"] == "A&B #1"
    status, err = get_json(port, f"{SERVICE}/VendorInvoices(VendorAccount='V1',InvoiceNumber='nope')")
    assert status == 404 and err["error"]["code"]
    assert get_json(port, f"{SERVICE}/VendorInvoices({uuid.uuid4()})")[0] == 404


def test_patch_upsert_and_conditional_headers(port):
    url = "VendorInvoices(VendorAccount='V001',InvoiceNumber='" + quote("INV''1", safe="") + "')"
    items = [op("PATCH", url, {"Amount": 1}, cid="create"),
             op("PATCH", url, {"Amount": 2}, cid="update"),
             op("PATCH", url, {"Amount": 3}, cid="create-only", headers=[("If-None-Match", "*")]),
             op("PATCH", url.replace("V001", "V404"), {"Amount": 4}, cid="update-only",
                headers=[("If-Match", "*")]),
             op("PATCH", url.replace("V001", "V002"), {"Amount": 5}, cid="create-only-new",
                headers=[("If-None-Match", "*")])]
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    answers = {a["cid"]: a for a in parse_batch(headers, data)}
    assert answers["create"]["status"] == 204 and answers["update"]["status"] == 204
    assert answers["create"]["headers"]["odata-entityid"] == answers["update"]["headers"]["odata-entityid"]
    assert answers["create-only"]["status"] == 412
    assert answers["create-only"]["json"]["error"] == {
        "code": "0x80060892", "message": "A record with matching key values already exists."}
    assert answers["update-only"]["status"] == 404
    assert answers["create-only-new"]["status"] == 204
    _, ent = get_json(port, f"{SERVICE}/VendorInvoices(VendorAccount='V001',InvoiceNumber='INV%27%271')")
    assert ent["Amount"] == 2 and ent["InvoiceNumber"] == "INV'1"
    assert counts(port) == {"v001|inv'1": 1, "v002|inv'1": 1}


# ---------------------------------------------------------------------------
# Batch semantics

def test_stop_at_first_failure(port):
    items = [post_op("V1", "I1", cid="1"), post_op("V1", "I1", cid="2"), post_op("V1", "I2", cid="3")]
    status, headers, data = post_batch(port, items)
    assert status == 400 and "Preference-Applied" not in headers
    assert [(a["cid"], a["status"]) for a in parse_batch(headers, data)] == [("1", 201), ("2", 409)]
    assert counts(port) == {"v1|i1": 1}  # the third was never processed


def test_continue_on_error_answers_every_part(port):
    items = [post_op("V1", "I1", cid="1"), post_op("V1", "I1", cid="2"), post_op("V1", "I2", cid="3")]
    status, headers, data = post_batch(port, items, prefer="return=minimal, odata.continue-on-error")
    assert status == 200 and headers["Preference-Applied"] == "odata.continue-on-error"
    assert [(a["cid"], a["status"]) for a in parse_batch(headers, data)] == [("1", 201), ("2", 409), ("3", 201)]
    assert counts(port) == {"v1|i1": 1, "v1|i2": 1}


def test_changeset_commits_and_answers_nested(port):
    items = [changeset(post_op("V1", "C1", cid="1"), post_op("V1", "C2", cid="2")),
             post_op("V1", "after", cid="3")]
    status, headers, data = post_batch(port, items)
    assert status == 200
    cs, after = parse_batch(headers, data)
    assert [(a["cid"], a["status"]) for a in cs["changeset"]] == [("1", 201), ("2", 201)]
    assert after["status"] == 201
    assert counts(port) == {"v1|c1": 1, "v1|c2": 1, "v1|after": 1}


def test_changeset_failure_rolls_back(port):
    seed(port, [{"VendorAccount": "V1", "InvoiceNumber": "taken"}])
    items = [changeset(post_op("V1", "C1", cid="1"), post_op("V1", "TAKEN", cid="2"),
                       post_op("V1", "C3", cid="3")),
             post_op("V1", "after", cid="4")]
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    failure, after = parse_batch(headers, data)
    assert "changeset" not in failure and failure["cid"] == "2" and failure["status"] == 409
    assert after["status"] == 201
    assert counts(port) == {"v1|after": 1}
    assert sorted(e["InvoiceNumber"] for e in admin(port, "GET", "entities")[1]) == ["after", "taken"]


# ---------------------------------------------------------------------------
# Admin API

def test_admin_config_validation_and_reset(port):
    status, err = admin(port, "POST", "config", {"no_such_setting": 1})
    assert status == 400 and "no_such_setting" in err["error"]
    assert admin(port, "POST", "config", {"error_rate": 2})[0] == 400
    assert admin(port, "POST", "config", {"fault_next": {"meteor": 1}})[0] == 400
    cfg = configure(port, latency_ms=5, fault_next={"garble": 2})
    assert cfg["latency_ms"] == 5 and cfg["fault_next"] == {"garble": 2} and cfg["unique"] is True
    post_batch(port, [post_op("V1", "I1")])
    assert admin(port, "POST", "reset", {}) == (200, {"reset": True})
    cfg = admin(port, "GET", "config")[1]
    assert cfg["latency_ms"] == 0 and cfg["fault_next"] == {}
    assert counts(port) == {} and stats(port)["batches"] == 0 and admin(port, "GET", "requests")[1] == []


def test_admin_request_log_keeps_last_200(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for i in range(203):
        post_batch(port, [post_op("V1", f"I{i}")], conn=conn)
    log = admin(port, "GET", "requests")[1]
    assert len(log) == 200 and "I3" in log[0]["body"] and "I202" in log[-1]["body"]
    last2 = admin(port, "GET", "requests?last=2")[1]
    assert [e["body"] for e in last2] == [e["body"] for e in log[-2:]]
    assert last2[0]["method"] == "POST" and last2[0]["path"] == f"{SERVICE}/$batch"
    assert last2[0]["headers"]["Content-Type"] == "multipart/mixed; boundary=batch_8f1c"


def test_admin_seeded_entities_are_preexisting(port):
    created = seed(port, [{"VendorAccount": "V1", "InvoiceNumber": "OLD", "dataAreaId": "usmf"}])
    assert created[0]["InvoiceId"] and created[0]["dataAreaId"] == "usmf"
    assert admin(port, "GET", "preexisting")[1] == {"usmf|v1|old": 1}
    status, headers, data = post_batch(port, [post_op("v1", "old", dataAreaId="USMF")])
    assert parse_batch(headers, data)[0]["status"] == 409
    assert counts(port) == {}
    assert stats(port)["preexisting"] == 1 and stats(port)["entities"] == 1
    assert admin(port, "POST", "entities", [{"VendorAccount": "V1"}])[0] == 400


def test_admin_stats(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    patch = op("PATCH", "VendorInvoices(VendorAccount='V1',InvoiceNumber='I1')", {"A": 1})
    post_batch(port, [post_op("V1", "I1"), op("GET", "VendorInvoices"), patch], conn=conn)
    post_batch(port, [post_op("V1", "I1")], conn=conn)
    call(port, "GET", SERVICE + "/VendorInvoices", conn=conn)
    s = stats(port)
    assert s["batches"] == 2 and s["operations"] == {"POST": 2, "GET": 1, "PATCH": 1}
    assert s["responses"] == {"200": 1, "201": 1, "204": 1, "409": 1}
    assert s["batch_responses"] == {"200": 1, "400": 1}
    assert s["plain_requests"] == {"GET": 1} and s["connections_dropped"] == 0 and s["faults"] == {}
    assert s["tokens_issued"] == s["auth_failures"] == s["internal_errors"] == 0


# ---------------------------------------------------------------------------
# Faults

def test_latency_applies_to_batches_and_plain_gets(port):
    configure(port, latency_ms=300)
    t0 = time.monotonic()
    assert post_batch(port, [post_op("V1", "I1")])[0] == 200
    t1 = time.monotonic()
    assert call(port, "GET", SERVICE + "/VendorInvoices")[0] == 200
    t2 = time.monotonic()
    assert t1 - t0 >= 0.29 and t2 - t1 >= 0.29
    t3 = time.monotonic()
    admin(port, "GET", "stats")
    assert time.monotonic() - t3 < 0.25  # admin is never delayed


@pytest.mark.parametrize("order, applied_early", [("process_first", True), ("sleep_first", False)])
def test_latency_order(port, order, applied_early):
    """process_first applies the batch at once and holds only the answer;
    sleep_first applies it after the latency."""
    configure(port, latency_ms=500, latency_order=order)
    result = {}
    worker = threading.Thread(target=lambda: result.update(status=post_batch(port, [post_op("V1", "I1")])[0]))
    t0 = time.monotonic()
    worker.start()
    time.sleep(0.2)
    assert (counts(port) == {"v1|i1": 1}) is applied_early
    worker.join(5)
    assert result["status"] == 200 and time.monotonic() - t0 >= 0.49
    assert counts(port) == {"v1|i1": 1}


def test_error_fault_next_is_not_applied(port):
    configure(port, error_status=503, fault_next={"error": 1})
    items = [post_op("V1", "I1", cid="1"), post_op("V1", "I2", cid="2")]
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    first, second = parse_batch(headers, data)
    assert (first["status"], second["status"]) == (503, 201) and first["json"]["error"]["code"]
    assert counts(port) == {"v1|i2": 1}
    assert stats(port)["faults"] == {"error": 1}


def test_error_rate_is_seeded_and_reproducible(port):
    def run():
        configure(port, error_rate=0.5, seed=42)
        items = [post_op("V1", f"I{i}") for i in range(20)]
        _, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
        pattern = [a["status"] for a in parse_batch(headers, data)]
        created = counts(port)
        admin(port, "POST", "reset", {})
        return pattern, created
    pattern, created = run()
    assert set(pattern) == {201, 500}
    assert len(created) == pattern.count(201)
    assert run() == (pattern, created)


@pytest.mark.parametrize("fmt", ["seconds", "http-date"])
def test_throttle_whole_batch(port, fmt):
    configure(port, retry_after=7, retry_after_format=fmt, fault_next={"throttle": 1})
    status, headers, data = post_batch(port, [post_op("V1", "I1")])
    assert status == 429 and json.loads(data)["error"]["code"]
    if fmt == "seconds":
        assert headers["Retry-After"] == "7"
    else:
        when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
        assert 4 <= when - time.time() <= 9
    assert counts(port) == {}
    assert post_batch(port, [post_op("V1", "I1")])[0] == 200  # one-shot: next batch is fine


def test_throttle_per_operation(port):
    configure(port, throttle_scope="operation", retry_after=3, fault_next={"throttle": 1})
    status, headers, data = post_batch(port, [post_op("V1", "I1"), post_op("V1", "I2")],
                                       prefer="odata.continue-on-error")
    first, second = parse_batch(headers, data)
    assert status == 200 and first["status"] == 429 and first["headers"]["retry-after"] == "3"
    assert second["status"] == 201 and counts(port) == {"v1|i2": 1}


def test_drop_before_closes_without_processing(port):
    configure(port, fault_next={"drop_before": 1})
    with pytest.raises(http.client.RemoteDisconnected):
        post_batch(port, [post_op("V1", "I1")])
    assert counts(port) == {}
    configure(port, drop_mode="reset", fault_next={"drop_before": 1})
    with pytest.raises(ConnectionResetError) as exc:
        post_batch(port, [post_op("V1", "I1")])
    assert not isinstance(exc.value, http.client.RemoteDisconnected)  # a real RST, not EOF
    s = stats(port)
    assert s["connections_dropped"] == 2 and s["faults"] == {"drop_before": 2} and counts(port) == {}


def test_drop_after_applies_then_hangs_up(port):
    configure(port, fault_next={"drop_after": 1})
    with pytest.raises(http.client.RemoteDisconnected):
        post_batch(port, [post_op("V1", "I1"), post_op("V1", "I2")])
    assert counts(port) == {"v1|i1": 1, "v1|i2": 1}  # fate unknown to the client, but applied
    status, headers, data = post_batch(port, [post_op("V1", "I1")])  # the retry hits the duplicate key
    assert status == 400 and parse_batch(headers, data)[0]["status"] == 409


def test_truncate_sends_half_the_body(port):
    configure(port, fault_next={"truncate": 1})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", f"{SERVICE}/$batch", batch_body([post_op("V1", "I1")]),
                 {"Content-Type": "multipart/mixed; boundary=batch_8f1c"})
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as exc:
        resp.read()
    assert len(exc.value.partial) == int(resp.headers["Content-Length"]) // 2
    assert counts(port) == {"v1|i1": 1}


def test_garble_answers_unparseable_multipart(port):
    configure(port, fault_next={"garble": 1})
    status, headers, data = post_batch(port, [post_op("V1", "I1")])
    boundary = headers["Content-Type"].split("boundary=")[1]
    assert status == 200 and b"201 Created" in data and ("--" + boundary).encode() not in data
    msg = email.message_from_bytes(b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + data)
    assert msg.defects  # the independent parser cannot find the parts either
    assert counts(port) == {"v1|i1": 1}


def test_slow_body_trickles_a_complete_answer(port):
    configure(port, slow_body_ms=600, slow_body_chunks=6, fault_next={"slow_body": 1})
    t0 = time.monotonic()
    status, headers, data = post_batch(port, [post_op("V1", "I1", cid="1")])
    assert time.monotonic() - t0 >= 0.55
    assert status == 200 and parse_batch(headers, data)[0]["status"] == 201


@pytest.mark.parametrize("mode", ["reverse", "shuffle"])
def test_reorder_keeps_content_ids(port, mode):
    configure(port, reorder_mode=mode, seed=1, fault_next={"reorder": 1})
    items = [post_op("V1", f"I{i}", cid=str(i)) for i in range(8)]
    status, headers, data = post_batch(port, items)
    answers = parse_batch(headers, data)
    cids = [a["cid"] for a in answers]
    assert status == 200 and cids != [str(i) for i in range(8)] and sorted(cids) == [str(i) for i in range(8)]
    if mode == "reverse":
        assert cids == [str(i) for i in reversed(range(8))]
    for a in answers:  # each Content-ID still labels its own operation
        assert a["json"]["InvoiceNumber"] == f"I{a['cid']}"


def test_drop_content_id_correlates_by_position(port):
    configure(port, fault_next={"drop_content_id": 1})
    status, headers, data = post_batch(port, [post_op("V1", "I0", cid="1"), post_op("V1", "I1", cid="2")])
    answers = parse_batch(headers, data)
    assert b"Content-ID" not in data and [a["cid"] for a in answers] == [None, None]
    assert [a["json"]["InvoiceNumber"] for a in answers] == ["I0", "I1"]


def test_batch_fault_rates_are_seeded(port):
    def run():
        configure(port, drop_after_rate=0.5, seed=5)
        fates = []
        for i in range(12):
            try:
                fates.append(post_batch(port, [post_op("V1", f"I{i}")])[0])
            except http.client.RemoteDisconnected:
                fates.append("dropped")
        total = len(counts(port))
        admin(port, "POST", "reset", {})
        return fates, total
    fates, total = run()
    assert set(fates) == {200, "dropped"} and total == 12  # dropped ones were applied too
    assert run()[0] == fates


# ---------------------------------------------------------------------------
# mockctl

def test_mockctl_drives_the_mock():
    base, port = mockctl.start(unique=False)
    try:
        assert base == f"http://127.0.0.1:{port}"
        assert mockctl.instance().service_root == f"{base}{SERVICE}/"
        cfg = mockctl.configure(fault_next={"drop_after": 1})
        assert cfg["unique"] is False and cfg["fault_next"] == {"drop_after": 1}
        with pytest.raises(http.client.RemoteDisconnected):
            post_batch(port, [post_op("V1", "I1")])
        post_batch(port, [post_op("V1", "I1")])
        assert mockctl.counts() == {"v1|i1": 2}
        assert mockctl.stats()["connections_dropped"] == 1
        assert len(mockctl.requests()) == 2 and len(mockctl.requests(last=1)) == 1
        mockctl.seed_entities([{"VendorAccount": "X", "InvoiceNumber": "Y"}])
        assert mockctl.preexisting() == {"x|y": 1} and len(mockctl.entities()) == 3
        mockctl.reset()
        assert mockctl.counts() == {} and mockctl.config()["unique"] is False
        with pytest.raises(mockctl.MockError):
            mockctl.instance().admin("GET", "nope")
    finally:
        assert mockctl.stop() == 0
    with mockctl.MockD365("--page-size", "2") as mock:
        assert mock.config()["page_size"] == 2 and mock.port != port


# ---------------------------------------------------------------------------
# Exactly once when D365 commits late: hold, client keys, 413, nextLink forms

def wait_stats(port, predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        s = stats(port)
        if predicate(s):
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.02)


def post_in_thread(port, items, result, key="status", **kw):
    def run():
        try:
            status, headers, data = post_batch(port, items, **kw)
            result[key] = status
            result[key + "_answers"] = parse_batch(headers, data)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result[key] = e
        result[key + "_done"] = time.monotonic()
    worker = threading.Thread(target=run)
    worker.start()
    return worker


def test_hold_commits_after_the_client_gave_up(port):
    """The client times out (2 s in d365inv, 0.4 s here) before the hold
    (4 s there, 1.5 s here) ends; the batch commits anyway, answer lost."""
    configure(port, hold_ms=1500, fault_next={"hold": 1})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.4)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        post_batch(port, [post_op("V1", "I1", cid="1"), post_op("V1", "I2", cid="2")], conn=conn)
    conn.close()
    s = stats(port)
    assert (s["held"], s["holding"], s["held_committed"], s["entities"]) == (1, 1, 0, 0)
    assert counts(port) == {} and admin(port, "GET", "entities")[1] == []  # not yet
    s = wait_stats(port, lambda s: s["held_committed"] == 1)
    assert time.monotonic() - t0 >= 1.45
    assert counts(port) == {"v1|i1": 1, "v1|i2": 1}  # committed after the hold
    assert (s["holding"], s["held_abandoned"], s["faults"]) == (0, 1, {"hold": 1})
    assert s["operations"]["POST"] == 2 and s["responses"] == {"201": 2}
    assert admin(port, "GET", "config")[1]["fault_next"] == {}  # one-shot spent
    # A blind retry now meets the duplicate key: what "exactly once" must avoid.
    status, headers, data = post_batch(port, [post_op("V1", "I1", cid="1")])
    assert status == 400 and parse_batch(headers, data)[0]["status"] == 409


def test_hold_answers_a_patient_client_after_the_hold(port):
    configure(port, hold_ms=600, fault_next={"hold": 1})
    t0 = time.monotonic()
    status, headers, data = post_batch(port, [post_op("V1", "I1", cid="1")])
    assert time.monotonic() - t0 >= 0.59
    assert status == 200 and parse_batch(headers, data)[0]["status"] == 201
    s = stats(port)
    assert (s["held"], s["holding"], s["held_committed"], s["held_abandoned"]) == (1, 0, 1, 0)
    assert s["batch_responses"] == {"200": 1}
    t0 = time.monotonic()
    assert post_batch(port, [post_op("V1", "I2")])[0] == 200
    assert time.monotonic() - t0 < 0.5  # the next batch is not held


def test_hold_does_not_block_other_connections(port):
    configure(port, hold_ms=2000, fault_next={"hold": 1})
    result = {}
    worker = post_in_thread(port, [post_op("V1", "held", cid="1")], result)
    wait_stats(port, lambda s: s["holding"] == 1)
    t0 = time.monotonic()
    status, headers, data = post_batch(port, [post_op("V1", "other", cid="1")])
    assert status == 200 and parse_batch(headers, data)[0]["status"] == 201
    assert call(port, "GET", SERVICE + "/VendorInvoices")[0] == 200
    assert counts(port) == {"v1|other": 1}  # the held one is not there yet
    assert time.monotonic() - t0 < 0.5
    worker.join(5)
    assert result["status"] == 200 and result["status_answers"][0]["status"] == 201
    assert counts(port) == {"v1|held": 1, "v1|other": 1}


def test_concurrent_holds_run_in_parallel(port):
    configure(port, hold_rate=1.0, hold_ms=800)
    result = {}
    t0 = time.monotonic()
    workers = [post_in_thread(port, [post_op("V1", f"I{i}")], result, key=f"b{i}") for i in range(3)]
    for w in workers:
        w.join(5)
    elapsed = time.monotonic() - t0
    assert [result[f"b{i}"] for i in range(3)] == [200] * 3
    assert 0.79 <= elapsed < 1.5  # three holds side by side, not one after another
    s = stats(port)
    assert (s["held"], s["held_committed"], s["faults"]) == (3, 3, {"hold": 3})
    assert len(counts(port)) == 3


def test_reset_ends_holds_without_committing(port):
    configure(port, hold_ms=5000, fault_next={"hold": 1})
    result = {}
    worker = post_in_thread(port, [post_op("V1", "I1")], result)
    wait_stats(port, lambda s: s["holding"] == 1)
    t0 = time.monotonic()
    admin(port, "POST", "reset", {})
    worker.join(3)
    assert isinstance(result["status"], http.client.RemoteDisconnected)
    assert result["status_done"] - t0 < 1
    time.sleep(0.2)
    s = stats(port)
    assert counts(port) == {} and (s["held"], s["holding"], s["batches"], s["batch_responses"]) == (0, 0, 0, {})


def test_sigterm_during_a_hold_exits_promptly():
    proc, port, port_file = spawn("--hold-ms", "10000", "--fault-next", "hold=1")
    try:
        result = {}
        worker = post_in_thread(port, [post_op("V1", "I1")], result)
        wait_stats(port, lambda s: s["holding"] == 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(3) == 0 and not os.path.exists(port_file)
        worker.join(3)
        assert isinstance(result["status"], (http.client.RemoteDisconnected, ConnectionError))
    finally:
        stop(proc)


def test_new_settings_from_the_command_line():
    proc, port, _ = spawn("--client-keys", "--client-key-format", "guid", "--id-duplicate-status", "409",
                          "--max-batch-bytes", "100000", "--max-batch-operations", "5",
                          "--next-link-form", "relative", "--hold-rate", "0.25", "--hold-ms", "250",
                          "--fault-next", "hold=2")
    try:
        cfg = admin(port, "GET", "config")[1]
        assert (cfg["client_keys"], cfg["client_key_format"], cfg["id_duplicate_status"]) == (True, "guid", 409)
        assert (cfg["id_duplicate_code"], cfg["id_duplicate_message"]) == \
            ("0x80040237", "A record with matching key values already exists.")
        assert (cfg["max_batch_bytes"], cfg["max_batch_operations"], cfg["next_link_form"]) == \
            (100000, 5, "relative")
        assert (cfg["hold_rate"], cfg["hold_ms"], cfg["fault_next"]) == (0.25, 250, {"hold": 2})
        for bad in ({"max_batch_bytes": -1}, {"max_batch_operations": 1.5}, {"next_link_form": "weird"},
                    {"client_keys": "yes"}, {"hold_ms": -5}, {"client_key_format": "int"}):
            assert admin(port, "POST", "config", bad)[0] == 400, bad
    finally:
        stop(proc)


def test_client_keys_duplicate_id_is_refused_like_dataverse(port):
    configure(port, client_keys=True)
    gid = str(uuid.uuid4()).upper()
    items = [post_op("V1", "I1", cid="1", InvoiceId=gid),
             post_op("V1", "I2", cid="2", InvoiceId=gid.lower()),   # same GUID, other case
             post_op("V1", "I1", cid="3", InvoiceId="another-id"),  # free id, taken business key
             post_op("V1", "I3", cid="4")]                          # no id: the server assigns
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    first, dup_id, dup_key, assigned = parse_batch(headers, data)
    assert first["status"] == 201 and first["json"]["InvoiceId"] == gid.lower()
    assert first["headers"]["location"] == f"http://127.0.0.1:{port}{SERVICE}/VendorInvoices({gid.lower()})"
    assert dup_id["status"] == 412 and dup_id["json"] == {"error": {
        "code": "0x80040237", "message": "A record with matching key values already exists."}}
    assert dup_key["status"] == 409  # unique=true still guards the business key
    assert assigned["status"] == 201 and str(uuid.UUID(assigned["json"]["InvoiceId"]))
    assert counts(port) == {"v1|i1": 1, "v1|i3": 1}
    # The id is checked first: same id and same business key is the id's 412.
    status, headers, data = post_batch(port, [post_op("V1", "I1", InvoiceId=gid)])
    assert parse_batch(headers, data)[0]["status"] == 412


def test_client_keys_without_unique_and_lookups_by_id(port):
    configure(port, client_keys=True, unique=False)
    ids = ["inv-a", "inv b/1?#%", "o'id"]
    items = [post_op("V1", "I1", cid=str(n), InvoiceId=i, Amount=n) for n, i in enumerate(ids)]
    status, headers, data = post_batch(port, items)
    answers = parse_batch(headers, data)
    assert status == 200 and [a["status"] for a in answers] == [201] * 3
    assert [a["json"]["InvoiceId"] for a in answers] == ids
    assert counts(port) == {"v1|i1": 3}  # three entities for one business key
    _, headers, data = post_batch(port, [post_op("V9", "I9", InvoiceId="inv-a")])
    assert parse_batch(headers, data)[0]["status"] == 412  # the id is enforced without unique
    for n, (invoice_id, ans) in enumerate(zip(ids, answers)):
        location = ans["headers"]["location"]
        status, ent = get_json(port, urlsplit(location).path)  # the Location URL works
        assert status == 200 and (ent["InvoiceId"], ent["Amount"]) == (invoice_id, n), location
        literal = quote("'" + invoice_id.replace("'", "''") + "'", safe="")
        status, page = get_json(port, f"{SERVICE}/VendorInvoices?$filter=InvoiceId%20eq%20{literal}")
        assert status == 200 and [e["Amount"] for e in page["value"]] == [n]
    assert get_json(port, f"{SERVICE}/VendorInvoices(InvoiceId='inv-a')")[1]["Amount"] == 0
    assert get_json(port, f"{SERVICE}/VendorInvoices('nope')")[0] == 404
    # Lookups by business key carry the id, even under $select (as Dataverse does).
    expr = quote("VendorAccount eq 'v1' and InvoiceNumber eq 'I1'", safe="")
    _, page = get_json(port, f"{SERVICE}/VendorInvoices?$filter={expr}&$select=Amount")
    assert [(e["InvoiceId"], e["Amount"]) for e in page["value"]] == [(i, n) for n, i in enumerate(ids)]
    expr = quote("InvoiceId eq 'inv-a' or InvoiceId eq 'o''id' or InvoiceNumber eq 'I1'", safe="")
    assert len(get_json(port, f"{SERVICE}/VendorInvoices?$filter={expr}")[1]["value"]) == 3
    gid = str(uuid.uuid4())
    post_batch(port, [post_op("V2", "I2", InvoiceId=gid)])
    status, ent = get_json(port, f"{SERVICE}/VendorInvoices({gid.upper()})")  # GUIDs: any case
    assert status == 200 and ent["InvoiceId"] == gid
    _, page = get_json(port, f"{SERVICE}/VendorInvoices?$filter=InvoiceId%20eq%20{gid.upper()}")
    assert [e["InvoiceNumber"] for e in page["value"]] == ["I2"]


def test_client_keys_off_ignores_the_body_id(port):
    items = [post_op("V1", "I1", InvoiceId="mine"), post_op("V1", "I2", InvoiceId="mine")]
    status, headers, data = post_batch(port, items)
    answers = parse_batch(headers, data)
    assert status == 200 and [a["status"] for a in answers] == [201, 201]
    assert all(str(uuid.UUID(a["json"]["InvoiceId"])) for a in answers)  # server-assigned
    _, page = get_json(port, f"{SERVICE}/VendorInvoices?$select=Amount")
    assert [sorted(e) for e in page["value"]] == [["@odata.etag"]] * 2  # F&O: $select is exact


@pytest.mark.parametrize("fmt, bad_ids", [
    ("any", ["", "   ", 17, True, ["x"], "x" * 201, "tab\there"]),
    ("guid", ["not-a-guid", "{%s}" % uuid.uuid4(), str(uuid.uuid4())[:-1]]),
])
def test_client_key_format_and_bad_ids(port, fmt, bad_ids):
    configure(port, client_keys=True, client_key_format=fmt)
    items = [post_op("V1", f"I{n}", cid=str(n), InvoiceId=i) for n, i in enumerate(bad_ids)]
    items.append(post_op("V1", "ok", cid="ok", InvoiceId=str(uuid.uuid4())))
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    answers = parse_batch(headers, data)
    assert [a["status"] for a in answers] == [400] * len(bad_ids) + [201]
    assert {a["json"]["error"]["code"] for a in answers[:-1]} == {"0x80048d19"}
    assert counts(port) == {"v1|ok": 1}
    _, headers, data = post_batch(port, [post_op("V1", "null-id", InvoiceId=None)])
    assert parse_batch(headers, data)[0]["status"] == 201  # null: the server assigns


def test_client_keys_rollback_patch_upsert_and_configurable_refusal(port):
    configure(port, client_keys=True, id_duplicate_status=409, id_duplicate_message="Cannot insert duplicate key.")
    seed(port, [{"VendorAccount": "V1", "InvoiceNumber": "taken", "InvoiceId": "seeded"}])
    # A failed changeset frees the id it had taken.
    status, headers, data = post_batch(port, [changeset(post_op("V1", "C1", cid="1", InvoiceId="x1"),
                                                        post_op("V1", "TAKEN", cid="2", InvoiceId="x2"))])
    assert status == 400 and parse_batch(headers, data)[0]["status"] == 409
    _, headers, data = post_batch(port, [post_op("V1", "C1", InvoiceId="x1"), post_op("V1", "C2", InvoiceId="seeded")],
                                  prefer="odata.continue-on-error")
    created, refused = parse_batch(headers, data)
    assert created["status"] == 201
    assert refused["status"] == 409 and refused["json"]["error"] == {
        "code": "0x80040237", "message": "Cannot insert duplicate key."}  # id of a preexisting entity
    # PATCH by id: an upsert that creates with the URL's id, then updates.
    body = {"VendorAccount": "V2", "InvoiceNumber": "P1", "Amount": 1}
    items = [op("PATCH", "VendorInvoices('p-1')", body, cid="create"),
             op("PATCH", "VendorInvoices('p-1')", {"Amount": 2}, cid="update"),
             op("PATCH", "VendorInvoices('p-2')", {"Amount": 3}, cid="update-only", headers=[("If-Match", "*")]),
             op("PATCH", "VendorInvoices('p-3')", {"VendorAccount": "v1", "InvoiceNumber": "TAKEN"}, cid="dup-key"),
             op("PATCH", "VendorInvoices('p-4')", {"Amount": 4}, cid="no-key")]
    status, headers, data = post_batch(port, items, prefer="odata.continue-on-error")
    answers = {a["cid"]: a for a in parse_batch(headers, data)}
    assert {c: a["status"] for c, a in answers.items()} == \
        {"create": 204, "update": 204, "update-only": 404, "dup-key": 409, "no-key": 400}
    assert answers["create"]["headers"]["odata-entityid"].endswith("/VendorInvoices('p-1')")
    assert get_json(port, f"{SERVICE}/VendorInvoices('p-1')")[1]["Amount"] == 2
    assert counts(port) == {"v1|c1": 1, "v2|p1": 1}
    assert admin(port, "GET", "preexisting")[1] == {"v1|taken": 1}
    # Seeding checks ids too.
    assert admin(port, "POST", "entities", [{"VendorAccount": "A", "InvoiceNumber": "B", "InvoiceId": "p-1"}])[0] == 400
    assert admin(port, "POST", "entities", [{"VendorAccount": "A", "InvoiceNumber": "B", "InvoiceId": "z"},
                                            {"VendorAccount": "A", "InvoiceNumber": "C", "InvoiceId": "z"}])[0] == 400


def test_max_batch_bytes_413_processes_nothing(port):
    items = [post_op("V1", "I1"), post_op("V1", "I2")]
    size = len(batch_body(items))
    configure(port, max_batch_bytes=size - 1, hold_ms=3000, fault_next={"hold": 1})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    t0 = time.monotonic()
    status, headers, data = post_batch(port, items, conn=conn)
    assert status == 413 and time.monotonic() - t0 < 1  # refused before any hold
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert err["code"] == "RequestEntityTooLarge" and str(size) in err["message"]
    assert counts(port) == {} and stats(port)["operations"]["POST"] == 0
    assert admin(port, "GET", "config")[1]["fault_next"] == {"hold": 1}  # not spent on it
    configure(port, max_batch_bytes=size, fault_next={"hold": 0})
    assert post_batch(port, items, conn=conn)[0] == 200  # same connection: still usable
    s = stats(port)
    assert s["too_large"] == 1 and s["batch_responses"] == {"200": 1, "413": 1}
    assert counts(port) == {"v1|i1": 1, "v1|i2": 1}


def test_max_batch_operations_413_counts_changeset_members(port):
    items = [changeset(post_op("V1", "C1"), post_op("V1", "C2")), post_op("V1", "I3")]
    configure(port, max_batch_operations=2)
    status, _, data = post_batch(port, items)
    assert status == 413 and "3 operations" in json.loads(data)["error"]["message"]
    assert counts(port) == {}
    configure(port, max_batch_operations=3)
    assert post_batch(port, items)[0] == 200
    assert len(counts(port)) == 3 and stats(port)["too_large"] == 1


@pytest.mark.parametrize("form", ["absolute", "relative", "absolute_path", "other_origin"])
def test_next_link_forms(port, form):
    configure(port, page_size=2, next_link_form=form)
    seed(port, [{"VendorAccount": "V1", "InvoiceNumber": f"I{i}"} for i in range(5)])
    expr = quote("VendorAccount eq 'V1'", safe="")
    url = f"http://127.0.0.1:{port}{SERVICE}/VendorInvoices?$filter={expr}&cross-company=true"
    seen = []
    while url:
        status, page = get_json(port, url[len(f"http://127.0.0.1:{port}"):])
        assert status == 200
        seen += [e["InvoiceNumber"] for e in page["value"]]
        link = page.get("@odata.nextLink")
        if not link:
            break
        tail = f"VendorInvoices?$filter={expr}&cross-company=true&$skiptoken={len(seen)}"
        expected = {"absolute": f"http://127.0.0.1:{port}{SERVICE}/{tail}", "relative": tail,
                    "absolute_path": f"{SERVICE}/{tail}",
                    "other_origin": f"http://evil.example{SERVICE}/{tail}"}[form]
        assert link == expected
        # RFC 3986 resolution against the request URL and against @odata.context agree.
        resolved = urljoin(url, link)
        assert resolved == urljoin(page["@odata.context"], link)
        if form == "other_origin":
            assert urlsplit(resolved).netloc == "evil.example"
            break  # a client must refuse to send its token there
        assert urlsplit(resolved).netloc == f"127.0.0.1:{port}"
        url = resolved
    assert seen == (["I0", "I1"] if form == "other_origin" else [f"I{i}" for i in range(5)])


def test_next_link_relative_inside_batch(port):
    configure(port, page_size=2, next_link_form="relative")
    seed(port, [{"VendorAccount": "V1", "InvoiceNumber": f"I{i}"} for i in range(3)])
    _, headers, data = post_batch(port, [op("GET", "VendorInvoices?$select=InvoiceNumber")])
    [ans] = parse_batch(headers, data)
    assert ans["json"]["@odata.nextLink"] == "VendorInvoices?$select=InvoiceNumber&$skiptoken=2"


def test_mockctl_hold_helpers():
    with mockctl.MockD365(client_keys=True, hold_ms=400, fault_next={"hold": 1}) as mock:
        assert mock.held() == {"held": 0, "holding": 0, "committed": 0, "abandoned": 0}
        result = {}
        worker = post_in_thread(mock.port, [post_op("V1", "I1", InvoiceId="k-1")], result)
        assert mock.wait_for(lambda m: m.held()["holding"] == 1)
        assert mock.entity("k-1") is None
        assert mock.wait_holds_over(5) == {"held": 1, "holding": 0, "committed": 1, "abandoned": 0}
        assert mock.entity("k-1")["InvoiceNumber"] == "I1" and mock.counts() == {"v1|i1": 1}
        worker.join(5)
        assert result["status"] == 200
        mock.reset()
        assert mock.config()["fault_next"] == {"hold": 1} and mock.held()["held"] == 0


# ---------------------------------------------------------------------------
# Service protection limits (issue #16), scaled down to seconds

BURST = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME_LEFT = "x-ms-ratelimit-time-remaining-xrm-requests"


def sp_batch(port, items, user=None, bearer=None):
    """post_batch as `user` (X-D365inv-Client-Id) or with a bearer token."""
    headers = {"Content-Type": "multipart/mixed; boundary=batch_8f1c", "OData-Version": "4.0"}
    if user:
        headers["X-D365inv-Client-Id"] = user
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    return call(port, "POST", f"{SERVICE}/$batch", batch_body(items), headers)


def seconds_left(headers):
    """The execution time header, Dataverse's "1,199.46" form -> float."""
    return float(headers[TIME_LEFT].replace(",", ""))


def sp_error(status, headers, data, code):
    """A service protection 429: the code, Retry-After seconds (int)."""
    assert status == 429 and headers["Content-Type"] == ODATA_JSON
    err = json.loads(data)["error"]
    assert err["code"] == code and err["message"], err
    return int(headers["Retry-After"])


def user_stats(port, user="anonymous"):
    return stats(port)["users"][user]


def test_sp_request_limit_trips_processes_nothing_and_slides(port):
    configure(port, sp_window_s=2, sp_requests=3)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    token(port)  # token requests do not count
    left = []
    for i in range(2):
        status, headers, _ = post_batch(port, [post_op("V1", f"I{i}"), post_op("V1", f"J{i}")], conn=conn)
        assert status == 200
        left.append(int(headers[BURST]))
    status, headers, _ = call(port, "GET", SERVICE + "/VendorInvoices", conn=conn)  # a GET counts too
    assert status == 200
    left.append(int(headers[BURST]))
    assert left == [2, 1, 0] and TIME_LEFT not in headers  # no execution limit: no time header
    before = (counts(port), stats(port)["operations"])
    status, headers, data = post_batch(port, [post_op("V1", "X1"), post_op("V1", "X2")], conn=conn)
    retry = sp_error(status, headers, data, "0x80072322")
    assert 1 <= retry <= 2 and headers[BURST] == "0"
    assert "3" in json.loads(data)["error"]["message"]  # names the limit, as Dataverse does
    assert call(port, "GET", SERVICE + "/VendorInvoices", conn=conn)[0] == 429
    assert (counts(port), stats(port)["operations"]) == before  # nothing processed
    u = user_stats(port)
    assert u["requests"] == 3 and u["throttled"] == {"requests": 2, "execution": 0, "concurrent": 0}
    assert u["window_requests"] == 3  # 429s are not counted toward the limit
    s = stats(port)
    assert s["batch_responses"] == {"200": 2, "429": 1} and s["faults"] == {}
    assert s["service_protection"]["throttled"]["requests"] == 2
    time.sleep(retry)
    status, headers, _ = post_batch(port, [post_op("V1", "X1")], conn=conn)
    assert status == 200 and counts(port)["v1|x1"] == 1
    assert int(headers[BURST]) == 2  # the window slid: only this request is in it
    admin(port, "POST", "reset", {})
    assert stats(port)["users"] == {}


def test_sp_execution_time_limit_and_remaining_time_header(port):
    configure(port, sp_window_s=3, sp_execution_s=1, op_cost_ms=50)
    status, headers, _ = post_batch(port, [post_op("V1", f"A{i}") for i in range(3)])
    first = seconds_left(headers)
    assert status == 200 and 0.8 <= first <= 0.85 and BURST not in headers
    status, headers, _ = post_batch(port, [post_op("V1", f"B{i}") for i in range(3)])
    second = seconds_left(headers)
    assert status == 200 and 0.6 <= second <= first - 0.15
    status, headers, _ = post_batch(port, [post_op("V1", f"C{i}") for i in range(15)])
    assert status == 200 and headers[TIME_LEFT] == "0.00"
    before = counts(port)
    status, headers, data = post_batch(port, [post_op("V1", "D1")])
    retry = sp_error(status, headers, data, "0x80072321")
    assert "1,000 milliseconds" in json.loads(data)["error"]["message"]
    assert 1 <= retry <= 3 and counts(port) == before
    u = user_stats(port)
    assert u["throttled"]["execution"] == 1 and 1050 <= u["execution_ms"] < 1300
    time.sleep(retry)
    status, headers, _ = post_batch(port, [post_op("V1", "D1")])
    assert status == 200 and counts(port)["v1|d1"] == 1
    # Dataverse writes the seconds with thousands separators and two decimals
    configure(port, sp_execution_s=1500, op_cost_ms=0)
    status, headers, _ = call(port, "GET", SERVICE + "/VendorInvoices")
    assert status == 200 and headers[TIME_LEFT].startswith("1,49") and headers[TIME_LEFT][-3] == "."


def test_sp_concurrency_limit(port):
    configure(port, sp_concurrent=2, op_cost_ms=400)
    result = {}
    workers = [post_in_thread(port, [post_op("V1", f"I{i}")], result, key=f"b{i}") for i in range(2)]
    wait_stats(port, lambda s: s["users"].get("anonymous", {}).get("in_progress") == 2)
    status, headers, data = post_batch(port, [post_op("V1", "late")])
    assert sp_error(status, headers, data, "0x80072326") == 1
    for w in workers:
        w.join(5)
    assert [result["b0"], result["b1"]] == [200, 200]
    assert counts(port) == {"v1|i0": 1, "v1|i1": 1}
    u = user_stats(port)
    assert (u["in_progress"], u["max_in_progress"], u["throttled"]["concurrent"]) == (0, 2, 1)
    assert post_batch(port, [post_op("V1", "late")])[0] == 200
    # another user is not held back by this one's requests in progress
    workers = [post_in_thread(port, [post_op("V2", f"I{i}")], result, key=f"c{i}") for i in range(2)]
    wait_stats(port, lambda s: s["users"]["anonymous"]["in_progress"] == 2)
    assert sp_batch(port, [post_op("V3", "I1")], user="app-2")[0] == 200
    for w in workers:
        w.join(5)


def test_sp_users_are_independent_by_header_and_by_token(port):
    configure(port, sp_window_s=30, sp_requests=2)
    for _ in range(2):
        assert sp_batch(port, [post_op("V1", str(uuid.uuid4()))], user="app-1")[0] == 200
    status, headers, data = sp_batch(port, [post_op("V1", "no")], user="app-1")
    assert sp_error(status, headers, data, "0x80072322") >= 29
    status, headers, _ = sp_batch(port, [post_op("V1", "yes")], user="app-2")
    assert status == 200 and headers[BURST] == "1"
    assert post_batch(port, [post_op("V1", "anon")])[0] == 200  # no header: "anonymous"
    users = stats(port)["users"]
    assert sorted(users) == ["anonymous", "app-1", "app-2"]
    assert [users[u]["requests"] for u in sorted(users)] == [1, 2, 1]
    assert users["app-1"]["throttled"]["requests"] == 1 and users["app-2"]["throttled"]["requests"] == 0

    # with require_auth the user is the token's client id; the header is ignored
    admin(port, "POST", "reset", {})
    configure(port, require_auth=True, sp_window_s=30, sp_requests=2,
              clients={"app-2": "secret-2", "app-3": "secret-3"})
    tokens = {}
    for client, secret in (("test-client", "test-secret"), ("app-2", "secret-2")):
        status, _, data = call(port, "POST", "/oauth2/token",
                               f"grant_type=client_credentials&client_id={client}&client_secret={secret}")
        assert status == 200
        tokens[client] = json.loads(data)["access_token"]
    status, _, _ = call(port, "POST", "/oauth2/token",
                        "grant_type=client_credentials&client_id=app-2&client_secret=secret-3")
    assert status == 401  # another client's secret
    for _ in range(2):
        assert sp_batch(port, [post_op("V1", str(uuid.uuid4()))], user="app-2",
                        bearer=tokens["test-client"])[0] == 200
    assert sp_batch(port, [post_op("V1", "no")], bearer=tokens["test-client"])[0] == 429
    status, headers, _ = sp_batch(port, [post_op("V1", "yes")], bearer=tokens["app-2"])
    assert status == 200 and headers[BURST] == "1"
    status, headers, _ = post_batch(port, [post_op("V1", "x")])
    assert status == 401 and BURST not in headers  # no user: no budget to report
    assert sorted(stats(port)["users"]) == ["app-2", "test-client"]


def test_sp_op_cost_makes_a_batch_take_n_times_the_cost(port):
    configure(port, op_cost_ms=60)
    t0 = time.monotonic()
    status, headers, data = post_batch(port, [post_op("V1", f"I{i}") for i in range(5)])
    elapsed = time.monotonic() - t0
    assert status == 200 and 0.3 <= elapsed < 0.6
    assert BURST not in headers and TIME_LEFT not in headers  # no limit set: no headers
    t0 = time.monotonic()
    assert call(port, "GET", SERVICE + "/VendorInvoices")[0] == 200
    assert 0.06 <= time.monotonic() - t0 < 0.3
    # a changeset's operations cost the same, spent outside the store's lock
    t0 = time.monotonic()
    status, _, _ = post_batch(port, [changeset(post_op("V1", "C1"), post_op("V1", "C2"))])
    assert status == 200 and 0.12 <= time.monotonic() - t0 < 0.4
    # operations not executed (stop at the first failure) cost nothing
    t0 = time.monotonic()
    status, _, _ = post_batch(port, [post_op("V1", "I0"), post_op("V1", "I9"), post_op("V1", "I8")])
    assert status == 400 and time.monotonic() - t0 < 0.3
    u = user_stats(port)
    assert u["requests"] == 4 and 300 + 60 + 120 + 60 <= u["execution_ms"] < 900
    # sp_headers false: none even with limits; automatic: the budget left,
    # which counts the requests from before the limits were set (6 with this one)
    configure(port, sp_headers=False, sp_requests=100, sp_execution_s=100)
    assert BURST not in call(port, "GET", SERVICE + "/VendorInvoices")[1]
    configure(port, sp_headers=None)
    headers = call(port, "GET", SERVICE + "/VendorInvoices")[1]
    u = user_stats(port)
    assert u["window_requests"] == 6 and int(headers[BURST]) == 100 - 6
    assert abs(seconds_left(headers) - (100 - u["window_execution_ms"] / 1000)) < 0.011


def test_sp_throttle_fault_and_multipart_answer_carry_the_headers(port):
    configure(port, sp_requests=10, sp_execution_s=60, op_cost_ms=20, fault_next={"throttle": 1})
    status, headers, _ = post_batch(port, [post_op("V1", "I1")])
    assert status == 429 and headers[BURST] == "9" and headers[TIME_LEFT] == "60.00"
    status, headers, data = post_batch(port, [post_op("V1", "I1", cid="1")])
    assert status == 200 and headers[BURST] == "8" and seconds_left(headers) < 60
    assert parse_batch(headers, data)[0]["status"] == 201


def test_sp_settings_from_the_command_line_and_validation():
    proc, port, _ = spawn("--sp-window-s", "10", "--sp-requests", "200", "--sp-execution-s", "40",
                          "--sp-concurrent", "52", "--op-cost-ms", "10", "--no-sp-headers",
                          "--clients", '{"app-2": "secret-2"}')
    try:
        cfg = admin(port, "GET", "config")[1]
        assert (cfg["sp_window_s"], cfg["sp_requests"], cfg["sp_execution_s"], cfg["sp_concurrent"],
                cfg["op_cost_ms"], cfg["sp_headers"], cfg["clients"]) == \
            (10, 200, 40, 52, 10, False, {"app-2": "secret-2"})
        for bad in ({"sp_window_s": 0}, {"sp_requests": -1}, {"sp_requests": 1.5}, {"sp_execution_s": -1},
                    {"sp_concurrent": "2"}, {"op_cost_ms": -1}, {"sp_headers": "yes"},
                    {"clients": ["app-2"]}, {"clients": {"app-2": ""}}):
            assert admin(port, "POST", "config", bad)[0] == 400, bad
        assert admin(port, "POST", "config", {"sp_headers": None})[1]["sp_headers"] is None
    finally:
        stop(proc)


def test_mockctl_service_protection_helpers():
    with mockctl.MockD365(sp_window_s=30, sp_requests=1) as mock:
        assert mock.users() == {} and mock.throttled() == 0
        assert sp_batch(mock.port, [post_op("V1", "I1")], user="app-1")[0] == 200
        assert sp_batch(mock.port, [post_op("V1", "I2")], user="app-1")[0] == 429
        assert mock.users()["app-1"]["requests"] == 1
        assert mock.throttled() == mock.throttled("app-1") == 1 and mock.throttled("app-2") == 0
