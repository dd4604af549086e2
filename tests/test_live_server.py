"""The production server (gunicorn via `cds-service serve`) on loopback, over real HTTP."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from .conftest import SERVICE_URL, LiveServer, fixture_request

ACCEPTED = {"card": "5b0c6f1e-2a8d-4a3b-9f7e-1c2d3e4f5a6b", "outcome": "accepted",
            "acceptedSuggestions": [{"id": "7e8f9a0b-1c2d-4e3f-8a9b-0c1d2e3f4a5b"}],
            "outcomeTimestamp": "2026-06-30T09:00:00Z"}


def test_discovery_and_invocation_over_http(live_server):
    s = requests.Session()
    d = s.get(live_server.base + "/cds-services", headers={"Accept": "application/json"}, timeout=5)
    assert d.status_code == 200 and d.json()["services"][0]["id"] == "secondary-osteoporosis"
    r = s.post(live_server.base + SERVICE_URL, json=fixture_request("patients/glucocorticoids-positive.json"), timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.json()["cards"][0]["indicator"] == "warning"
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_errors_over_http_are_operation_outcomes(live_server):
    base = live_server.base
    cases = [
        requests.post(base + SERVICE_URL, data="{oops", headers={"Content-Type": "application/json"}, timeout=5),
        requests.post(base + "/cds-services/nope", json={}, timeout=5),
        requests.get(base + SERVICE_URL, timeout=5),
        requests.post(base + SERVICE_URL, data=b"x" * (11 * 1024 * 1024), headers={"Content-Type": "application/json"}, timeout=10),
    ]
    assert [c.status_code for c in cases] == [400, 404, 405, 413]
    for c in cases:
        assert c.json()["resourceType"] == "OperationOutcome"
        assert "Traceback" not in c.text and c.headers["Access-Control-Allow-Origin"]


def test_a_chunked_body_over_the_limit_is_413_over_http(live_server):
    """Without Content-Length the size cap still holds: the body is refused, never cut off and answered."""
    def chunks():
        yield b'{"hook": "patient-view", "hookInstance": "x", "context": {"pad": "'
        for _ in range(11):
            yield b"x" * (1024 * 1024)
        yield b'"}}'
    r = requests.post(live_server.base + SERVICE_URL, data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=20)
    assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"


def _raw(live_server, request: bytes) -> tuple[str, dict]:
    import socket
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n")[0], json.loads(body)


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT A REQUEST LINE\r\n\r\n", "400"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "414"),
    (b"GET /cds-services HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", "431"),
    (b"GET /cds-services HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(120)) + b"\r\n", "431"),
])
def test_the_http_servers_own_refusals_are_json(live_server, request_bytes, status):
    line, body = _raw(live_server, request_bytes)
    assert line.split(" ")[1] == status and body["resourceType"] == "OperationOutcome"
    log = live_server.log.read_text()
    assert "a" * 200 not in log and "b" * 200 not in log                 # no request text in the logs
    lines = [x for x in log.splitlines() if x.strip() and not x.startswith("cds-service: serving")]  # the banner
    assert all(json.loads(x) for x in lines)                             # every log line is JSON


def test_preflight_over_http(live_server):
    r = requests.options(live_server.base + SERVICE_URL, headers={
        "Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=5)
    assert r.status_code == 204 and "Authorization" in r.headers["Access-Control-Allow-Headers"]


def test_request_log_lines_have_no_patient_data(live_server):
    body = fixture_request("patients/rheumatoid_arthritis-positive.json")
    requests.post(live_server.base + SERVICE_URL, json=body, timeout=5)
    logs = live_server.logs()
    assert '"event":"request"' in logs
    assert body["context"]["patientId"] not in logs and "M32.9" not in logs and "lupus" not in logs.lower()


def test_acknowledged_feedback_survives_a_killed_server(tmp_path):
    server = LiveServer(tmp_path / "srv").start()
    try:
        entries = [dict(ACCEPTED, card=f"card-{i}") for i in range(20)]
        from datetime import datetime, timezone
        from cds_service.storage.feedback import SQLiteFeedbackStore
        issued = SQLiteFeedbackStore(tmp_path / "srv" / "feedback.sqlite3")      # the server's own store
        issued.record_issued([(e["card"], "", "[]", datetime.now(timezone.utc).isoformat())     # as if it had
                              for e in entries])                                                   # issued them
        for i in range(0, 20, 5):
            r = requests.post(server.base + SERVICE_URL + "/feedback", json={"feedback": entries[i:i + 5]}, timeout=5)
            assert r.status_code == 200
    finally:
        server.kill(signal.SIGKILL)              # no graceful shutdown: master and workers die at once
    restarted = LiveServer(tmp_path / "srv").start()
    try:
        from cds_service.storage.feedback import SQLiteFeedbackStore
        store = SQLiteFeedbackStore(tmp_path / "srv" / "feedback.sqlite3")
        assert store.count() == 20
        r = requests.post(restarted.base + SERVICE_URL + "/feedback", json={"feedback": entries[:5]}, timeout=5)
        assert r.json() == {"stored": 0, "received": 5} and store.count() == 20
    finally:
        restarted.kill(signal.SIGTERM)


def test_fallback_through_the_live_server_to_the_fhir_server(live_server, fhir_server):
    full = fixture_request("patients/thyroid_hormone_excess-positive.json")
    bare = {k: v for k, v in full.items() if k != "prefetch"}
    bare["fhirServer"] = fhir_server.base
    r = requests.post(live_server.base + SERVICE_URL, json=bare, timeout=10)
    assert r.status_code == 200
    assert "Excess thyroid hormone" in r.json()["cards"][0]["detail"]


def test_metrics_add_up_across_workers(live_server):
    for _ in range(6):
        requests.post(live_server.base + SERVICE_URL, json=fixture_request("patients/rheumatoid_arthritis-positive.json"), timeout=5)
    requests.post(live_server.base + SERVICE_URL, data="{", headers={"Content-Type": "application/json"}, timeout=5)
    text = requests.get(live_server.base + "/metrics", timeout=5).text
    import re
    ok = sum(float(v) for v in re.findall(r'^cds_requests_total\{service="service",service_id="secondary-osteoporosis",status="200"\} ([\d.e+]+)', text, re.M))
    bad = sum(float(v) for v in re.findall(r'^cds_requests_total\{service="service",service_id="secondary-osteoporosis",status="400"\} ([\d.e+]+)', text, re.M))
    assert ok >= 6 and bad >= 1
    assert 'cds_cards_total{indicator="info",service_id="secondary-osteoporosis"}' in text or 'cds_cards_total{indicator="warning",service_id="secondary-osteoporosis"}' in text
    assert "cds_request_duration_seconds_bucket" in text
    assert "rheumatoid-arthritis-positive" not in text


def test_a_replaced_worker_and_its_successors_keep_serving_and_counting(tmp_path):
    """Workers are replaced after CDS_MAX_REQUESTS requests (to give back a burst's memory). A worker leaving must
    not take the others' metrics with it: one that removed the metrics folder on its way out left every later
    worker answering 500 to each patient-view (seen in the benchmark after 20,000 requests)."""
    import subprocess as sp

    server = LiveServer(tmp_path / "srv", env={"CDS_WORKERS": "1", "CDS_MAX_REQUESTS": "10",
                                               "CDS_LOG_LEVEL": "WARNING"}).start()
    try:
        def worker() -> int:
            return int(sp.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()[0])
        body = fixture_request("patients/rheumatoid_arthritis-positive.json")
        first = worker()
        statuses = []
        with requests.Session() as s:
            for _ in range(40):                          # past three replacements (10 requests, plus up to 2)
                statuses.append(s.post(server.base + SERVICE_URL, json=body, timeout=10).status_code)
        assert statuses == [200] * 40
        assert worker() != first                         # replaced, and its successors served the rest
        text = requests.get(server.base + "/metrics", timeout=5).text
        assert 'cds_cards_total{indicator="warning",service_id="secondary-osteoporosis"}' in text \
            or 'cds_cards_total{indicator="info",service_id="secondary-osteoporosis"}' in text
    finally:
        server.kill(signal.SIGTERM)


def test_soak_memory_stays_flat(tmp_path):
    """3,000 patient-view calls on one worker: resident memory does not keep growing."""
    import threading
    server = LiveServer(tmp_path / "soak", env={"CDS_WORKERS": "1", "CDS_LOG_LEVEL": "WARNING"}).start()
    try:
        import subprocess as sp
        worker = int(sp.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()[0])
        body = fixture_request("labelled/mixed-007.json")

        def rss() -> int:
            return int(next(line for line in open(f"/proc/{worker}/status") if line.startswith("VmRSS")).split()[1])

        def hammer(n: int):
            s = requests.Session()
            for _ in range(n):
                assert s.post(server.base + SERVICE_URL, json=body, timeout=10).status_code == 200
        hammer(500)                                             # warm-up: caches, pools, allocator
        before = rss()
        threads = [threading.Thread(target=hammer, args=(750,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        growth_kb = rss() - before
        print(f"\nsoak: 3000 requests, worker RSS {before} KB -> {before + growth_kb} KB")
        assert growth_kb < 8 * 1024
    finally:
        server.kill(signal.SIGTERM)


class SlowFhir:
    """A FHIR server that takes its time: each search answers an empty Bundle after a delay."""

    def __init__(self, delay: float):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(delay)
                body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_sigterm_finishes_requests_in_flight_and_readiness_goes_false_first(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    server = LiveServer(tmp_path / "graceful", env={"CDS_WORKERS": "1", "CDS_FHIR_TIMEOUT": "5"}).start()
    fhir = SlowFhir(delay=1.5)
    body = {"hook": "patient-view", "hookInstance": "g-1", "fhirServer": fhir.base,
            "context": {"patientId": "pat-1", "userId": "Practitioner/1"},
            "prefetch": {"patient": {"resourceType": "Patient", "id": "pat-1", "gender": "female",
                                     "birthDate": "1950-01-01"}}}
    kept = requests.Session()
    assert kept.get(server.base + "/readyz", timeout=5).status_code == 200       # a kept-alive connection
    try:
        with ThreadPoolExecutor(3) as pool:
            flights = [pool.submit(requests.post, server.base + SERVICE_URL, json=body, timeout=20) for _ in range(3)]
            time.sleep(0.5)                                        # all three are waiting on the FHIR server
            os.kill(server.proc.pid, signal.SIGTERM)               # what an orchestrator sends the master
            time.sleep(0.3)
            draining = kept.get(server.base + "/readyz", timeout=5)
            answers = [f.result() for f in flights]
        assert [a.status_code for a in answers] == [200, 200, 200]        # none reset
        assert draining.status_code == 503 and draining.json()["status"] == "shutting-down"
        server.proc.wait(timeout=20)
        with pytest.raises(requests.ConnectionError):                     # the listener is closed
            requests.get(server.base + "/healthz", timeout=2)
    finally:
        server.kill(signal.SIGKILL)
        fhir.httpd.shutdown()


def test_fifty_slow_clients_do_not_starve_normal_requests(tmp_path):
    """Clients sending their headers a byte a second hold no worker thread: the event loop reads request
    heads, and answers 408 to a head not complete in 10 s."""
    import socket
    import threading
    server = LiveServer(tmp_path / "slow", env={"CDS_WORKERS": "1", "CDS_THREADS": "4"}).start()
    answers: list[bytes] = []
    stop = threading.Event()

    def slowloris():
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            for b in b"GET /cds-services HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
                if stop.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    break
                time.sleep(0.5)
            try:
                answers.append(s.recv(4096))
            except OSError:
                pass

    threads = [threading.Thread(target=slowloris, daemon=True) for _ in range(50)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        latencies = []
        with requests.Session() as s:
            for _ in range(40):
                start = time.monotonic()
                assert s.get(server.base + "/cds-services", timeout=15).status_code == 200
                latencies.append(time.monotonic() - start)
        latencies.sort()
        assert latencies[int(len(latencies) * 0.95) - 1] < 0.1, latencies
        for t in threads:
            t.join(timeout=20)
        assert answers and all(a.startswith(b"HTTP/1.1 408 ") and b'"OperationOutcome"' in a for a in answers)
    finally:
        stop.set()
        server.kill(signal.SIGKILL)


def test_a_request_that_waited_past_its_clients_patience_is_shed_with_503(tmp_path):
    """Issue 21: one worker, one thread, held for 2.5 s by a FHIR server that answers slowly; a request queued
    behind it for longer than CDS_SHED_AFTER (1 s here) is answered 503 with Retry-After when a thread frees,
    instead of being worked on for a client that has gone; the next request is served normally."""
    from concurrent.futures import ThreadPoolExecutor
    fhir = SlowFhir(delay=2.5)
    server = LiveServer(tmp_path, env={"CDS_WORKERS": "1", "CDS_THREADS": "1", "CDS_SHED_AFTER": "1",
                                       "CDS_FHIR_TIMEOUT": "5"}).start()
    try:
        slow = {"hook": "patient-view", "hookInstance": "shed-1", "context": {"patientId": "p-1", "userId": "Practitioner/1"},
                "fhirServer": fhir.base}
        with ThreadPoolExecutor(2) as pool:
            holding = pool.submit(requests.post, server.base + SERVICE_URL, json=slow, timeout=15)
            time.sleep(0.5)                                  # the one thread is now waiting on the FHIR server
            queued = pool.submit(requests.post, server.base + SERVICE_URL,
                                 json=fixture_request("patients/glucocorticoids-positive.json"), timeout=15)
            shed = queued.result()
            assert holding.result().status_code == 412        # served (this FHIR server has no such patient)
        assert shed.status_code == 503 and shed.headers["Retry-After"] == "1"
        assert shed.json()["resourceType"] == "OperationOutcome"
        again = requests.post(server.base + SERVICE_URL, json=fixture_request("patients/glucocorticoids-positive.json"),
                              timeout=5)
        assert again.status_code == 200 and again.json()["cards"]
    finally:
        server.kill(signal.SIGTERM)
        fhir.httpd.shutdown()
