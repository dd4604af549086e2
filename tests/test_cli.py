"""`cds-service evaluate`: the exact service response for Bundles or requests, offline."""
from __future__ import annotations

import json
import subprocess
import sys

from .conftest import AS_OF, FIXTURES, LABELS, ROOT, fixture_request

FILES = ["patients/glucocorticoids-positive.json", "patients/ckd-negative.json",
         "labelled/mixed-003.json", "patients/dmpa-positive.json"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", "evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_one_line_per_file_in_order_with_explain():
    out = evaluate(*(str(FIXTURES / f) for f in FILES), "--as-of", AS_OF.isoformat(), "--explain")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(FILES)
    for rel, line in zip(FILES, lines):
        assert {f["cause"] for f in line["findings"]} == set(LABELS["patients"][rel]["causes"])
        for f in line["findings"]:
            assert f["evidence"] and all("/" in ref for ref in f["evidence"])
        assert isinstance(line["cards"], list)


def test_without_explain_the_line_is_exactly_a_service_response():
    out = evaluate(str(FIXTURES / FILES[0]), "--as-of", AS_OF.isoformat())
    line = json.loads(out.stdout)
    assert set(line) == {"cards"} and line["cards"][0]["summary"].startswith("Possible secondary osteoporosis")


def test_same_cards_as_the_http_service(client):
    out = evaluate(str(FIXTURES / FILES[0]), "--as-of", AS_OF.isoformat())
    offline = json.loads(out.stdout)["cards"][0]
    online = client.post("/cds-services/secondary-osteoporosis", json=fixture_request(FILES[0])).get_json()["cards"][0]
    strip = lambda c: {k: v for k, v in c.items() if k not in ("uuid", "suggestions")}
    assert strip(offline) == strip(online)
    assert [s["label"] for s in offline["suggestions"]] == [s["label"] for s in online["suggestions"]]


def test_as_of_is_today_for_the_rules():
    f = str(FIXTURES / "patients/ppi-positive.json")                 # omeprazole started 800 days before as-of
    early = evaluate(f, "--as-of", "2025-01-01", "--explain")
    late = evaluate(f, "--as-of", AS_OF.isoformat(), "--explain")
    assert "ppi" not in {x["cause"] for x in json.loads(early.stdout)["findings"]}
    assert "ppi" in {x["cause"] for x in json.loads(late.stdout)["findings"]}


def test_cds_hooks_request_file_and_bad_files(tmp_path):
    req = tmp_path / "request.json"
    req.write_text(json.dumps(fixture_request("patients/celiac-positive.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = evaluate(str(req), str(bad), str(tmp_path / "missing.json"), "--as-of", AS_OF.isoformat(), "--explain")
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert {f["cause"] for f in lines[0]["findings"]} == {"celiac"}       # not also malabsorption (policy.not_with)
    assert lines[1]["error"]["resourceType"] == "OperationOutcome" and lines[2]["error"]["resourceType"] == "OperationOutcome"
