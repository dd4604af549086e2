"""docker-compose.yml and the Dockerfile stay in step with the service's configuration."""
from __future__ import annotations

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
    from cds_service.auth import parse_trusted_issuers
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
