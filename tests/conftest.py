"""Shared test fixtures: the app per test, the real server and the real FHIR server on loopback."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import requests

from cds_service import create_app
from cds_service.fhir.bundles import bundle_resources, request_from_bundle
from cds_service.knowledge.catalog import load_catalog
from cds_service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
LABELS = json.loads((FIXTURES / "labels.json").read_text())
AS_OF = date.fromisoformat(LABELS["as_of"])
SERVICE_URL = "/cds-services/secondary-osteoporosis"


def load_fixture(rel: str) -> dict:
    return json.loads((FIXTURES / rel).read_text())


def fixture_request(rel: str) -> dict:
    """A full-prefetch patient-view request for a fixture patient."""
    return request_from_bundle(load_fixture(rel), hook_instance="d3b07384-d9a0-4c9b-8f2e-1a2b3c4d5e6f")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def registry(catalog):
    """The hook services, called in-process (no HTTP, no store)."""
    from cds_service.fhir.fhir_client import FhirClient
    from cds_service.services import ServiceRegistry
    return ServiceRegistry(catalog, FhirClient())


def view(registry, bundle: dict):
    """(card or None, assessment) at chart open for a patient's Bundle."""
    from cds_service.fhir.bundles import request_from_bundle
    result = registry.get("secondary-osteoporosis").invoke(request_from_bundle(bundle), AS_OF)
    cards = result.response["cards"]
    return (cards[0] if cards else None), result.assessment


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(auth="off", cors_origins="*", data_dir=str(tmp_path / "data"), as_of=AS_OF.isoformat(), fhir_timeout=2.0, log_level="WARNING")


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def request_for():
    return lambda rel: copy.deepcopy(fixture_request(rel))


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=0.5).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


class LiveServer:
    """`cds-service serve` (gunicorn) on a random loopback port."""

    def __init__(self, data_dir: Path, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = {**os.environ, "CDS_DATA_DIR": str(data_dir), "CDS_AS_OF": AS_OF.isoformat(),
                    "CDS_WORKERS": "2", "CDS_LOG_LEVEL": "INFO", "CDS_AUTH": "off", "CDS_CORS_ORIGINS": "*",
                    **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"server-{self.port}.log"

    def start(self) -> "LiveServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cds_service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(self.base + "/healthz", self.proc)
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("live")).start()
    yield server
    server.kill(signal.SIGTERM)


class FhirServer:
    """Medplum's in-memory FHIR engine (tests/fhir_server/server.mjs) on a random loopback port."""

    def __init__(self, resources_file: Path):
        node = shutil.which("node")
        server_dir = ROOT / "tests" / "fhir_server"
        if node is None or not (server_dir / "node_modules" / "@medplum" / "fhir-router").exists():
            raise RuntimeError("The FHIR test server needs Node and `npm ci` in tests/fhir_server (make install-test).")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([node, "--experimental-websocket", "server.mjs", "--port", str(self.port),
                                      "--load", str(resources_file)], cwd=server_dir,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening"):
            raise RuntimeError(f"FHIR server did not start: {line}{self.proc.stdout.read(2000).decode()}")

    def requests_seen(self) -> list[dict]:
        return requests.get(self.base + "/__requests", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


FHIR_PATIENTS = ["patients/already-treated-glucocorticoids-positive.json", "patients/ckd-positive.json",
                 "patients/thyroid_hormone_excess-positive.json", "patients/no-risk-factors-negative.json",
                 "patients/androgen_deprivation-positive.json", "patients/dmpa-positive.json",
                 "labelled/mixed-001.json", "labelled/mixed-002.json"]


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory):
    resources = []
    for rel in FHIR_PATIENTS:
        resources += bundle_resources(load_fixture(rel))
    path = tmp_path_factory.mktemp("fhir") / "resources.json"
    path.write_text(json.dumps(resources))
    server = FhirServer(path)
    yield server
    server.stop()


def issue_cards(app, *card_uuids: str, days_ago: float = 0) -> None:
    """Record cards as issued by this service (as an invocation does), so that feedback on them is taken."""
    from datetime import datetime, timedelta, timezone
    when = (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat()
    app.extensions["cds"]["feedback"].record_issued([(card, "", "[]", when) for card in card_uuids])


def walk_empty(node, path="$"):
    """Paths of null or empty values (CDS Hooks: optional members are omitted, never empty)."""
    bad = []
    if node is None or node == "" or node == [] or node == {}:
        return [path]
    if isinstance(node, dict):
        for k, v in node.items():
            bad += walk_empty(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            bad += walk_empty(v, f"{path}[{i}]")
    return bad


@pytest.fixture(scope="session")
def postgres():
    from .pg import PostgresServer
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def json_log():
    """The service's JSON log lines while the test runs (INFO and up), as a StringIO."""
    import io
    import logging
    from cds_service.logs import JsonFormatter
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cds_service")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield buf
    logger.removeHandler(handler)
    logger.setLevel(level)


# Modules that start real parts (servers, PostgreSQL, a browser, a wheel build): `make test-fast` runs the rest
INTEGRATION_MODULES = {"test_sandbox", "test_fhir_fallback", "test_live_server", "test_packaging", "test_schemathesis",
                       "test_feedback_store", "test_store_isolation", "test_fuzz", "test_snooze"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
