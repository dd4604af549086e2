"""docker-compose.yml and the Dockerfile stay in step with the service's configuration."""
from __future__ import annotations

import json
import re
from dataclasses import fields

import yaml

from cds_service.config import ENV_DOC, Settings

from .conftest import ROOT

SETTING_NAMES = {f"CDS_{f.name.upper()}" for f in fields(Settings)}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_ports_and_env_match_the_config():
    services = compose()["services"]
    assert {"cds", "fhir", "fhir-loader"} <= set(services)
    cds = services["cds"]
    # resolve compose's ${VAR:-default} to its default, as compose does with VAR unset
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in cds["environment"].items()}
    assert set(env) <= SETTING_NAMES, set(env) - SETTING_NAMES
    assert env["CDS_HOST"] == "0.0.0.0"
    host_port, container_port = cds["ports"][0].split(":")
    assert container_port == env["CDS_PORT"]
    fhir_container_port = services["fhir"]["ports"][0].split(":")[1]
    assert env["CDS_FHIR_ALLOWLIST"] == f"http://fhir:{fhir_container_port}/fhir"
    loader = services["fhir-loader"]["command"]
    assert f"http://fhir:{fhir_container_port}/fhir" in loader and "tools/load_fixtures.py" in loader
    assert "fhir" in cds["depends_on"]
    settings = Settings.from_env(env)                        # the values parse as the service reads them
    assert settings.auth_required
    from cds_service.web.auth import parse_trusted_issuers
    assert "https://sandbox.cds-hooks.org" in parse_trusted_issuers(settings.trusted_issuers)


def test_dockerfile_serves_with_the_production_server():
    text = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["cds-service", "serve"]' in text
    for name in re.findall(r"\b(CDS_[A-Z_]+)=", text):
        assert name in SETTING_NAMES, name


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for f in fields(Settings):
        assert f"CDS_{f.name.upper()}" in readme, f.name
        assert f.name in ENV_DOC


def test_the_wheel_works_from_any_directory_with_no_environment(tmp_path):
    """What `pip install` gives a user: the catalog travels inside the wheel, so `evaluate` and `serve`
    work from any folder without CDS_CARDS_DIR. Built offline; the fresh virtualenv borrows only the
    dependencies (not the checkout) from the test environment."""
    import os
    import site
    import subprocess
    import sys
    import time

    import requests

    from .conftest import FIXTURES, free_port

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    target = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(target), *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    # the dependencies from the test environment's site-packages; its .pth files (the editable
    # install of this checkout) are not processed from a path added this way
    (target / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env["CDS_DATA_DIR"] = str(tmp_path / "data")
    env["CDS_AUTH"] = "off"                                     # local testing: asked for explicitly
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = str(venv / "bin" / "python")
    where = subprocess.run([python, "-c", "import cds_service.knowledge.catalog as c; print(c.DEFAULT_CARDS_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert str(target) in where.stdout, where.stderr            # the installed copy, not the checkout
    out = subprocess.run([python, "-m", "cds_service.cli", "evaluate", str(FIXTURES / "patients/glucocorticoids-positive.json"),
                          "--as-of", "2026-06-30"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cards"], out.stdout
    port = free_port()
    server = subprocess.Popen([python, "-m", "cds_service.cli", "serve", "--port", str(port), "--workers", "1"],
                              cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=2)
                break
            except requests.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        assert resp.status_code == 200 and resp.json()["services"][0]["id"] == "secondary-osteoporosis"
    finally:
        server.terminate()
        server.wait(timeout=20)
