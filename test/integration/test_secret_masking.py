"""The OAuth2 client secret never reaches a message, however a careless token
endpoint echoes it: raw, form-encoded, JSON-escaped, HTML-escaped, cleaned
up, double-encoded, or cut short at the 200-byte limit of a quoted
description.

A small token endpoint runs in a thread on 127.0.0.1 and answers every token
request with an OAuth error whose error_description (or error code, or a
token_type) spells the client secret from the request form in the encoding
named by the URL path.  d365inv.refresh_remote_keys() asks it for a token
and fails with the message the worker would log; the secret must be in it in
no reading, and the message must show the masking ('*') rather than lose
the description.

Runs against the cluster of test/run-tests (the db fixture of conftest.py).
"""
import html
import http.server
import json
import re
import threading
import urllib.parse
import uuid

import psycopg2
import pytest

# no dictionary words: any 6-character piece of it in a message is a leak
SECRET = "Zq9~x/W+y&=%<'" + uuid.uuid4().hex[:16]
BLANK_SECRET = "Zq9 x W\ty " + uuid.uuid4().hex[:16]


def json_escape(s):
    """As a JSON encoder that escapes '/' writes a string's contents."""
    return json.dumps(s)[1:-1].replace("/", "\\/")


def u_escape(s):
    return "".join("\\u%04x" % ord(c) for c in s)


def html_escape(s):
    return html.escape(s, quote=True)


def html_numeric(s):
    return "".join("&#x%X;" % ord(c) if not c.isalnum() else c for c in s)


SPELLINGS = {
    "raw": lambda s: s,
    "form": lambda s: urllib.parse.quote_plus(s),
    "form-lower": lambda s: re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(),
                                   urllib.parse.quote_plus(s)),
    "json": json_escape,
    "json-u": u_escape,
    "html": html_escape,
    "html-numeric": html_numeric,
    "double-form": lambda s: urllib.parse.quote(urllib.parse.quote(s, safe=""), safe=""),
    "html-of-json": lambda s: html_escape(json_escape(s)),
    "blanks": lambda s: s.replace(" ", "\r\n\t "),
    # only the secret's first 20 characters, straddling the 200-byte cut
    "cut-raw": lambda s: "x" * 180 + " " + s[:20] + " and the rest",
    # the secret \u-escaped, cut at 200 bytes after its fifth character
    "cut-json-u": lambda s: "x" * 160 + " " + u_escape(s),
}


class TokenEndpoint:
    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                form = urllib.parse.parse_qs(
                    self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
                secret = form.get("client_secret", [""])[0]
                _, spelling, where, _ = self.path.split("/", 3)
                text = SPELLINGS[spelling](secret)
                if where == "type":
                    status, body = 200, {"token_type": "x " + text, "access_token": "t"}
                elif where == "code":
                    status, body = 400, {"error": text, "error_description": "d"}
                else:
                    status, body = 401, {"error": "invalid_client",
                                         "error_description": "Echo: " + text}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def endpoint():
    e = TokenEndpoint()
    yield e
    e.close()


def readings(text):
    """The message as a reader of the log might decode it."""
    out = {text}
    for _ in range(3):
        more = set()
        for t in out:
            more.add(urllib.parse.unquote_plus(t))
            more.add(html.unescape(t))
            more.add(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)),
                            t.replace("\\/", "/").replace('\\"', '"').replace("\\\\", "\\")))
        out |= more
    return {re.sub(r"\s+", " ", t) for t in out}


def leaked(message, secret):
    canon = re.sub(r"\s+", " ", secret).strip()
    pieces = {canon[i:i + 6] for i in range(len(canon) - 5)}
    return [r for r in readings(message) if canon in r or any(p in r for p in pieces)]


def refresh_error(db, endpoint, spelling, where, secret):
    with db.cursor() as cur:
        cur.execute("DELETE FROM d365inv.target_secret")
        cur.execute("UPDATE d365inv.target SET service_root = %s, auth = 'oauth2', token_url = %s,"
                    " client_id = 'client-1', scope = 'https://d365.example/.default'"
                    " WHERE name = 'default'",
                    ("http://127.0.0.1:%d/data/" % endpoint.port,
                     "http://127.0.0.1:%d/%s/%s/token" % (endpoint.port, spelling, where)))
        cur.execute("INSERT INTO d365inv.target_secret VALUES ('default', %s)", (secret,))
        with pytest.raises(psycopg2.Error) as err:
            cur.execute("SELECT d365inv.refresh_remote_keys('default')")
    return err.value.pgerror or str(err.value)


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_echoed_secret_is_masked(db, endpoint, spelling):
    secret = BLANK_SECRET if spelling == "blanks" else SECRET
    message = refresh_error(db, endpoint, spelling, "description", secret)
    assert 'd365inv target "default": no access token: token request for target default' \
           ' failed: HTTP 401 invalid_client: Echo: ' in message, message
    assert "*" in message, message
    assert not leaked(message, secret), message


@pytest.mark.parametrize("where", ["code", "type"])
def test_secret_in_error_code_or_token_type_is_masked(db, endpoint, where):
    message = refresh_error(db, endpoint, "json", where, SECRET)
    assert "no access token" in message and "*" in message, message
    assert not leaked(message, SECRET), message
