"""Prefetch fallback to the EHR's FHIR server: a real FHIR server (Medplum) and scripted faults."""
from __future__ import annotations

import copy
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from cds_service import create_app
from cds_service.config import Settings

from .conftest import AS_OF, FHIR_PATIENTS, ROOT, SERVICE_URL, fixture_request

TOKEN = "fallback-test-token-7c1e"
AUTH = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
        "scope": "patient/Patient.read patient/Condition.read patient/Observation.read", "subject": "cds-client"}


def strip_ids(body: dict) -> list:
    out = []
    for c in body["cards"]:
        c = {k: v for k, v in c.items() if k != "uuid"}
        c["suggestions"] = [{k: v for k, v in s.items() if k != "uuid"} for s in c.get("suggestions", [])]
        out.append(c)
    return out


@pytest.fixture
def fallback_client(tmp_path):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=2.0, log_level="WARNING"))
    return app.test_client()


# ---- against Medplum's FHIR engine --------------------------------------------------------------
def test_the_access_token_never_reaches_the_logs(fallback_client, fhir_server, faults, json_log):
    body = {k: v for k, v in fixture_request(FHIR_PATIENTS[0]).items() if k != "prefetch"}
    body.update(fhirServer=fhir_server.base, fhirAuthorization=AUTH)
    assert fallback_client.post(SERVICE_URL, json=body).status_code == 200
    faults.mode = "500"
    assert fallback_client.post(SERVICE_URL, json=bare_request(faults.base)).status_code == 412
    buf = json_log
    assert '"event":"request"' in buf.getvalue() and TOKEN not in buf.getvalue()


@pytest.mark.parametrize("rel", FHIR_PATIENTS)
def test_fallback_gives_the_same_cards_as_full_prefetch(fallback_client, fhir_server, rel):
    assert_fallback_gives_the_same_cards(fallback_client, fhir_server, SERVICE_URL, fixture_request(rel))


def assert_fallback_gives_the_same_cards(client, fhir_server, url: str, full: dict) -> list:
    """The request without prefetch (with fhirServer and a token) gives the cards it gives with full
    prefetch; every template is fetched once, with the token."""
    expected = strip_ids(client.post(url, json=full).get_json())
    fhir_server.requests_seen()
    bare = {k: v for k, v in full.items() if k != "prefetch"}
    bare.update(fhirServer=fhir_server.base, fhirAuthorization=AUTH)
    resp = client.post(url, json=bare)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert strip_ids(resp.get_json()) == expected
    seen = fhir_server.requests_seen()
    assert len(seen) == 9                                   # every template, each once
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in seen)
    return expected


def test_order_sign_falls_back_to_the_fhir_server_like_patient_view(fallback_client, fhir_server):
    """The prescribing service fetches the chart it was not given, with the same templates and token,
    and gives the card it gives with full prefetch."""
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import as_order_sign
    full = as_order_sign(fixture_request(FHIR_PATIENTS[3]))      # no risk factors on record
    cards = assert_fallback_gives_the_same_cards(fallback_client, fhir_server, "/cds-services/bone-protection-order-sign",
                                                 full)
    assert cards and cards[0]["summary"].startswith("Prednisone 10 mg daily for 3 months")


def test_full_prefetch_makes_no_fhir_call(fallback_client, fhir_server):
    body = fixture_request(FHIR_PATIENTS[0])
    body.update(fhirServer=fhir_server.base, fhirAuthorization=AUTH)
    fhir_server.requests_seen()
    assert fallback_client.post(SERVICE_URL, json=body).status_code == 200
    assert fhir_server.requests_seen() == []


def test_only_missing_keys_are_fetched_with_the_resolved_template(fallback_client, fhir_server):
    body = fixture_request("patients/thyroid_hormone_excess-positive.json")
    expected = strip_ids(fallback_client.post(SERVICE_URL, json=body).get_json())
    del body["prefetch"]["observations"]
    body["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    body.update(fhirServer=fhir_server.base, fhirAuthorization=AUTH)
    fhir_server.requests_seen()
    resp = fallback_client.post(SERVICE_URL, json=body)
    assert strip_ids(resp.get_json()) == expected and expected        # from the fetched TSH
    urls = sorted(r["url"] for r in fhir_server.requests_seen())
    assert len(urls) == 2
    assert urls[0] == "/Condition?patient=thyroid-hormone-excess-positive&_count=200"
    assert urls[1].startswith("/Observation?patient=thyroid-hormone-excess-positive&code=http://loinc.org%7C")


def test_a_bundle_carrying_an_error_outcome_is_fetched_again(fallback_client, fhir_server):
    """A searchset may hold an error OperationOutcome beside partial matches (a timed-out shard):
    that key is queried again in full, and only that key."""
    body = fixture_request("patients/thyroid_hormone_excess-positive.json")
    expected = strip_ids(fallback_client.post(SERVICE_URL, json=body).get_json())
    observations = body["prefetch"]["observations"]
    observations["entry"] = observations["entry"][:1] + [{"resource": {
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]},
        "search": {"mode": "outcome"}}]
    body.update(fhirServer=fhir_server.base, fhirAuthorization=AUTH)
    fhir_server.requests_seen()
    resp = fallback_client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200 and strip_ids(resp.get_json()) == expected and expected
    urls = [r["url"] for r in fhir_server.requests_seen()]
    assert len(urls) == 1 and urls[0].startswith("/Observation?patient=thyroid-hormone-excess-positive&code=")
    # a warning is not a failure: the client's data is used as it is
    observations["entry"][-1]["resource"]["issue"][0]["severity"] = "warning"
    del body["fhirServer"], body["fhirAuthorization"]
    assert fallback_client.post(SERVICE_URL, json=body).status_code == 200


def test_open_server_without_fhir_authorization_gets_no_token(fallback_client, fhir_server):
    body = {k: v for k, v in fixture_request(FHIR_PATIENTS[1]).items() if k != "prefetch"}
    body["fhirServer"] = fhir_server.base
    fhir_server.requests_seen()
    assert fallback_client.post(SERVICE_URL, json=body).status_code == 200
    assert all(r["authorization"] is None for r in fhir_server.requests_seen())


def test_unknown_patient_on_the_server_is_412(fallback_client, fhir_server):
    body = {"hook": "patient-view", "hookInstance": "x1", "context": {"patientId": "nobody-here", "userId": "Practitioner/1"},
            "fhirServer": fhir_server.base}
    resp = fallback_client.post(SERVICE_URL, json=body)
    assert resp.status_code == 412 and resp.get_json()["resourceType"] == "OperationOutcome"


# ---- scripted faults on loopback -----------------------------------------------------------------
class FaultServer:
    """A tiny HTTP server whose every answer is set by the test. Records what it was asked."""

    def __init__(self):
        self.mode = "ok"
        self.seen: list[dict] = []
        self.bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                mode = outer.mode
                if mode == "slow":
                    time.sleep(4)
                if mode == "trickle":               # the status line, then a header byte a second, forever
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.wfile.flush()
                    try:
                        for _ in range(120):
                            self.wfile.write(b"X")
                            self.wfile.flush()
                            time.sleep(1)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if mode == "declared-huge":         # says 2 GB: refused before any of it is read
                    self.send_response(200)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(2 * 1024 ** 3))
                    self.end_headers()
                    try:
                        self.wfile.write(b'{"resourceType":"Bundle"' + b" " * 65536)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if mode in ("401", "403", "500"):
                    return self._send(int(mode), {"resourceType": "OperationOutcome", "issue": []})
                if mode == "garbage":
                    return self._send(200, b"<html>definitely not json", raw=True)
                if mode == "not-fhir":
                    return self._send(200, [1, 2, 3])
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.end_headers()
                    return
                if mode == "huge":
                    return self._send(200, b'{"resourceType":"Bundle","type":"searchset","entry":[' + b" " * 3_000_000 + b"]}", raw=True)
                if mode == "endless-next":
                    n = int(self.path.rsplit("page=", 1)[-1]) if "page=" in self.path else 0
                    return self._send(200, {"resourceType": "Bundle", "type": "searchset", "entry": [],
                                            "link": [{"relation": "next", "url": f"{outer.base}/Observation?page={n + 1}"}]})
                if mode == "next-off-server":
                    return self._send(200, {"resourceType": "Bundle", "type": "searchset", "entry": [],
                                            "link": [{"relation": "next", "url": "https://elsewhere.invalid/page2"}]})
                path = urlsplit(self.path).path
                if path.startswith("/Patient/"):
                    return self._send(200, {"resourceType": "Patient", "id": path.split("/")[-1], "gender": "female",
                                            "birthDate": "1950-01-01"})
                if path == "/page2":
                    return self._send(200, outer.page2)
                return self._send(200, outer.bundle)

            def _send(self, status, body, raw=False):
                data = body if raw else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.page2 = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faults():
    server = FaultServer()
    yield server
    server.close()


def bare_request(base: str, token: bool = True) -> dict:
    body = {"hook": "patient-view", "hookInstance": "f-1", "context": {"patientId": "pat-9", "userId": "Practitioner/7"},
            "fhirServer": base}
    if token:
        body["fhirAuthorization"] = AUTH
    return body


@pytest.mark.parametrize("mode", ["401", "403", "500", "garbage", "not-fhir", "redirect", "huge", "next-off-server"])
def test_fhir_failures_give_412_quickly(tmp_path, faults, mode):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=2.0,
                              fhir_max_bytes=1_000_000, log_level="WARNING"))
    faults.mode = mode
    start = time.monotonic()
    resp = app.test_client().post(SERVICE_URL, json=bare_request(faults.base))
    elapsed = time.monotonic() - start
    assert resp.status_code == 412, resp.get_data(as_text=True)
    assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert TOKEN not in resp.get_data(as_text=True)
    assert elapsed < 2.5
    assert all("169.254" not in r["path"] for r in faults.seen)


def test_slow_server_beyond_the_deadline_gives_412_at_the_deadline(tmp_path, faults):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=1.0, log_level="WARNING"))
    faults.mode = "slow"
    start = time.monotonic()
    resp = app.test_client().post(SERVICE_URL, json=bare_request(faults.base))
    assert resp.status_code == 412
    assert time.monotonic() - start < 1.8


def test_endless_next_links_stop_at_the_page_cap(tmp_path, faults):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_max_pages=5, log_level="WARNING"))
    faults.mode = "endless-next"
    body = bare_request(faults.base)
    body["prefetch"] = {"patient": {"resourceType": "Patient", "id": "pat-9", "gender": "male", "birthDate": "1950-01-01"}}
    resp = app.test_client().post(SERVICE_URL, json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert len(faults.seen) <= 8 * 5                           # 8 keys x 5 pages at most


def test_paginated_prefetch_is_completed_from_next_links(tmp_path, faults, json_log):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), log_level="INFO"))
    body = copy.deepcopy(fixture_request("patients/no-risk-factors-negative.json"))
    body.update(fhirServer=faults.base, fhirAuthorization=AUTH)
    pid = body["context"]["patientId"]
    body["prefetch"]["conditions"]["link"] = [{"relation": "next", "url": f"{faults.base}/page2"}]
    faults.page2 = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {
        "resourceType": "Condition", "id": "c-page2", "subject": {"reference": f"Patient/{pid}"},
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M32.9"}], "text": "SLE"}}}]}
    resp = app.test_client().post(SERVICE_URL, json=body)
    assert resp.status_code == 200
    assert "  - SLE\n" in resp.get_json()["cards"][0]["detail"]      # the page-2 condition
    assert [r["path"] for r in faults.seen] == ["/page2"] and faults.seen[0]["authorization"] == f"Bearer {TOKEN}"
    logged = [json.loads(line) for line in json_log.getvalue().splitlines()]
    served = next(r for r in logged if r.get("event") == "request" and r["status"] == 200)
    assert served["fhir_requests"] == 1                      # the next page is counted


def test_token_is_never_sent_over_plain_http_off_loopback(fallback_client):
    # refused before any connection is made
    body = bare_request("http://ehr.invalid/fhir")
    resp = fallback_client.post(SERVICE_URL, json=body)
    assert resp.status_code == 412 and "https" in resp.get_json()["issue"][0]["diagnostics"]


def test_parallel_fetch_takes_about_one_query_not_nine(tmp_path, faults):
    """Nine missing keys against a server that takes 0.3 s per answer: parallel, not serial."""
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=3.0, log_level="WARNING"))
    original = faults.httpd.RequestHandlerClass.do_GET

    def slow_get(handler):
        time.sleep(0.3)
        original(handler)
    faults.httpd.RequestHandlerClass.do_GET = slow_get
    start = time.monotonic()
    resp = app.test_client().post(SERVICE_URL, json=bare_request(faults.base))
    elapsed = time.monotonic() - start
    assert resp.status_code == 200 and len(faults.seen) == 9
    assert elapsed < 9 * 0.3 * 0.5                                 # serial would take 2.7 s


def test_fhir_server_off_the_allowlist_is_never_contacted(tmp_path, faults):
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_allowlist="https://ehr.example.org/fhir",
                              log_level="WARNING"))
    resp = app.test_client().post(SERVICE_URL, json=bare_request(faults.base, token=False))
    assert resp.status_code == 412 and "allowlist" in resp.get_json()["issue"][0]["diagnostics"]
    assert faults.seen == []
    allowed = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_allowlist=faults.base,
                                  log_level="WARNING"))
    assert allowed.test_client().post(SERVICE_URL, json=bare_request(faults.base, token=False)).status_code == 200


def test_connection_refused_gives_412_quickly(tmp_path):
    from .conftest import free_port
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=2.0, log_level="WARNING"))
    start = time.monotonic()
    resp = app.test_client().post(SERVICE_URL, json=bare_request(f"http://127.0.0.1:{free_port()}"))
    assert resp.status_code == 412 and time.monotonic() - start < 2.5


def test_userinfo_trick_never_reaches_the_server_behind_the_at_sign(tmp_path, faults):
    """`http://allowed@other` sends the query to `other`: the allowlist compares parsed parts."""
    from .conftest import free_port
    allowed = f"http://127.0.0.1:{free_port()}"
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_allowlist=allowed,
                              log_level="WARNING"))
    trick = faults.base.replace("http://", f"{allowed}@")
    resp = app.test_client().post(SERVICE_URL, json=bare_request(trick, token=False))
    assert resp.status_code == 400 and "fhirServer" in resp.get_json()["issue"][0]["diagnostics"]
    assert faults.seen == []
    open_app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), log_level="WARNING"))
    assert open_app.test_client().post(SERVICE_URL, json=bare_request(trick, token=False)).status_code == 400
    assert faults.seen == []                     # credentials in the URL are refused outright, allowlist or not


@pytest.mark.parametrize("server, allowed", [
    ("https://ehr.example.org/fhir", True),
    ("https://EHR.Example.ORG./fhir/", True),                 # case, trailing dot and slash
    ("https://ehr.example.org:443/fhir/r4", True),            # default port, deeper path
    ("https://ehr.example.org/fhirx", False),                 # path compared by whole segments
    ("https://ehr.example.org/other/fhir", False),
    ("https://ehr.example.org.evil.test/fhir", False),        # look-alike host
    ("https://ehr.example.org:8443/fhir", False),             # another port
    ("http://ehr.example.org/fhir", False),                   # another scheme
    ("https://user:pw@ehr.example.org/fhir", False),          # userinfo
    ("https://ehr.example.org@evil.test/fhir", False),
    ("https://[::1]/fhir", False),
    ("ftp://ehr.example.org/fhir", False),
])
def test_allowlist_compares_scheme_host_port_and_path(server, allowed):
    from cds_service.fhir.allowlist import ServerAllowlist
    assert ServerAllowlist(("https://ehr.example.org/fhir",)).allows(server) is allowed


def test_allowlist_handles_ipv6_and_idna():
    from cds_service.fhir.allowlist import ServerAllowlist
    assert ServerAllowlist(("http://[::1]:8080/fhir",)).allows("http://[::1]:8080/fhir/Patient")
    assert not ServerAllowlist(("http://[::1]:8080/fhir",)).allows("http://[::2]:8080/fhir")
    assert ServerAllowlist(("https://bücher.example/fhir",)).allows("https://xn--bcher-kva.example/fhir")
    with pytest.raises(ValueError):
        ServerAllowlist(("https://u:p@ehr.example.org",))


def test_trickling_servers_hold_no_thread_past_the_deadline_and_starve_no_one(tmp_path):
    """Two FHIR servers that trickle a byte a second: their requests get 412 at the deadline, the
    threads they used are free again, and a request naming a healthy server is served meanwhile."""
    slow = [FaultServer(), FaultServer()]
    healthy = FaultServer()
    try:
        for s in slow:
            s.mode = "trickle"
        app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=2.0,
                                  log_level="WARNING"))
        client = app.test_client()
        with ThreadPoolExecutor(6) as pool:
            stuck = [pool.submit(lambda b=s.base: timed(lambda: client.post(SERVICE_URL, json=bare_request(b))))
                     for s in slow for _ in range(2)]
            time.sleep(0.5)
            ok, ok_s = timed(lambda: client.post(SERVICE_URL, json=bare_request(healthy.base)))
            results = [f.result() for f in stuck]
        assert ok.status_code == 200 and ok_s < 1.5                 # well before the 2 s deadline the stuck ones wait for
        for resp, seconds in results:
            assert resp.status_code == 412 and seconds < 3.0
        fhir = app.extensions["cds"]["services"].kit.resolver.client
        deadline = time.monotonic() + 1.5
        while fhir._slots._value < fhir.max_workers:          # every thread given back soon after the deadline
            assert time.monotonic() < deadline, (fhir._slots._value, fhir.max_workers)
            time.sleep(0.05)
        again, again_s = timed(lambda: client.post(SERVICE_URL, json=bare_request(healthy.base)))
        assert again.status_code == 200 and again_s < 1.5
    finally:
        for s in slow + [healthy]:
            s.close()


def test_a_declared_oversize_response_is_refused_before_reading(tmp_path, faults):
    faults.mode = "declared-huge"
    app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=2.0,
                              fhir_max_bytes=1_000_000, log_level="WARNING"))
    resp, seconds = timed(lambda: app.test_client().post(SERVICE_URL, json=bare_request(faults.base)))
    assert resp.status_code == 412 and seconds < 1.0


def timed(fn):
    start = time.monotonic()
    out = fn()
    return out, time.monotonic() - start


def test_hostile_servers_streaming_without_end_stay_within_the_memory_budget(tmp_path):
    """Eight servers streaming gigabytes with no Content-Length: every body read at once shares one
    budget (CDS_FHIR_MAX_BYTES per response, 64 MB in all), so the requests end in 412 quickly."""
    class Endless(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.end_headers()
            try:
                self.wfile.write(b'{"resourceType":"Bundle","entry":[')
                for _ in range(3000):
                    self.wfile.write(b'{"resource":{"resourceType":"Observation"}},' * 20000)
            except (BrokenPipeError, ConnectionResetError):
                pass
    servers = []
    for _ in range(8):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
    try:
        app = create_app(Settings(auth="off", cors_origins="*", data_dir=str(tmp_path), as_of=AS_OF.isoformat(), fhir_timeout=10.0,
                                  log_level="WARNING"))
        client = app.test_client()
        fhir = app.extensions["cds"]["services"].kit.resolver.client
        peak = [0]

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], fhir._in_flight)
                time.sleep(0.005)
        done = threading.Event()
        threading.Thread(target=watch, daemon=True).start()
        calls = [lambda s=s: client.post(SERVICE_URL, json=bare_request(f"http://127.0.0.1:{s.server_address[1]}",
                                                                         token=False)) for s in servers]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda f: timed(f), calls))
        done.set()
        assert all(r.status_code == 412 and seconds < 5.0 for r, seconds in answers)
        assert 0 < peak[0] <= fhir.budget_bytes == 64 * 1024 * 1024
        deadline = time.monotonic() + 2
        while fhir._in_flight:                      # the readers still running stop at their socket shutdown
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for httpd in servers:
            httpd.shutdown()
