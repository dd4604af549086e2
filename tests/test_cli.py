"""`cds-service evaluate`: the exact service response for Bundles or requests, offline."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

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


def codes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cds_service.cli", "codes", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_code_survey_lists_each_coding_once_with_patients_and_meaning(tmp_path):
    """An informaticist surveys a site's export: what codes it uses, in how many patients, and what
    the catalog makes of each (a Synthea-style emphysema code is COPD; a sinusitis code is nothing)."""
    sys.path.insert(0, str(ROOT))
    from fixtures.generate import Patient
    for n in range(3):
        p = Patient(f"survey{n}", sex="male", age=70)
        p.condition("http://snomed.info/sct", "87433001", "Pulmonary emphysema (disorder)")
        if n == 0:
            p.condition("http://snomed.info/sct", "444814009", "Viral sinusitis (disorder)")
        p.obs("33914-3", "eGFR (MDRD)", 50, "mL/min/{1.73_m2}", 20)
        (tmp_path / f"p{n}.json").write_text(json.dumps(p.bundle()))
    out = codes(str(tmp_path), "--csv")
    assert out.returncode == 0, out.stderr
    rows = {(r[0], r[2]): r for r in (line.split(",") for line in out.stdout.splitlines()[1:])}
    assert rows[("Condition", "87433001")][4:] == ["3", "cause copd"]
    assert rows[("Condition", "444814009")][4:] == ["1", ""]
    assert rows[("Observation", "33914-3")][4] == "3" and "egfr_low_persistent" in rows[("Observation", "33914-3")][5]
    assert "3 files" in out.stderr and "distinct codings" in out.stderr
    unmatched = codes(str(tmp_path), "--unmatched")
    assert "444814009" in unmatched.stdout and "87433001" not in unmatched.stdout
    missing = codes(str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_code_survey_shows_conditions_recorded_as_text_and_what_the_text_means(tmp_path):
    sys.path.insert(0, str(ROOT))
    from fixtures.generate import Patient
    p = Patient("survey-text", age=60)
    p.add({"resourceType": "Condition", "subject": p.subject, "code": {"text": "Celiac disease"}})
    p.add({"resourceType": "Condition", "subject": p.subject, "code": {"text": "FH: celiac disease"}})
    p.add({"resourceType": "Condition", "subject": p.subject,
           "code": {"coding": [{"system": "urn:oid:1.2.3.4", "code": "L77", "display": "Crohn's disease"}]}})
    (tmp_path / "p.json").write_text(json.dumps(p.bundle()))
    out = codes(str(tmp_path), "--csv")
    rows = {r[3]: r for r in csv.reader(io.StringIO(out.stdout))}
    assert rows["Celiac disease"][1:3] == ["(text only)", ""] and rows["Celiac disease"][5] == "cause celiac (by text)"
    assert rows["FH: celiac disease"][5] == ""
    assert rows["Crohn's disease"][5] == "cause ibd (by text)"


def test_explain_shows_the_context_a_reviewer_checks(tmp_path):
    sys.path.insert(0, str(ROOT))
    from fixtures.generate import Patient
    p = Patient("explain-ctx", sex="male", age=80)
    p.condition("http://snomed.info/sct", "359817006", "Closed fracture of hip (disorder)", clinical="resolved",
                onset=700, abated=640)
    p.condition("http://snomed.info/sct", "87433001", "Pulmonary emphysema (disorder)", onset=3000)
    p.med_request("sertraline 50 MG Oral Tablet", "36437", start=400, dose=50)
    p.obs("98979-8", "eGFR (CKD-EPI 2021)", 29, "mL/min/{1.73_m2}", 20)
    (tmp_path / "p.json").write_text(json.dumps(p.bundle()))
    out = subprocess.run([sys.executable, "-m", "cds_service.cli", "evaluate", "--explain", "--as-of", AS_OF.isoformat(),
                          str(tmp_path / "p.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    line = json.loads(out.stdout)
    ctx = line["context"]
    assert {k: ctx[k] for k in ("treatment_gap", "on_treatment", "next_decision", "kidney_caution", "latest_egfr",
                                "latest_t_score", "pregnant", "snoozed", "silenced", "treatment_line")} == {
        "treatment_gap": True, "on_treatment": None, "next_decision": None, "kidney_caution": True,
        "latest_egfr": {"value": 29, "date": "2026-06-10"}, "latest_t_score": None, "pregnant": False,
        "snoozed": False, "silenced": None, "treatment_line": "kidney_g4_g5"}
    assert [f["site"] for f in ctx["fractures"]] == ["hip"] and ctx["risk"]["level"] == "high"
    roles = {f["cause"]: f["role"] for f in line["findings"]}
    assert roles["copd"] == "fires" and roles["ssri"] == "listed"


def cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, input=stdin, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, env, says", [
    (["serve"], {"CDS_PORT": "abc"}, "CDS_PORT='abc' is not a valid int"),
    (["serve"], {"CDS_DATABASE_URL": "mysql://x"}, "CDS_DATABASE_URL must be sqlite"),
    (["serve"], {"CDS_CARDS_DIR": "/nonexistent"}, "missing catalog file"),
    (["evaluate", "x.json", "--as-of", "2026-13-01"], {}, "--as-of '2026-13-01' is not a date"),
    (["evaluate", "x.json"], {"CDS_AS_OF": "yesterday"}, "CDS_AS_OF='yesterday' is not a date (YYYY-MM-DD)"),
    (["serve", "--port", "99999"], {}, "the port must be 1-65535 (CDS_PORT or --port), not 99999"),
    (["serve"], {"CDS_DATABASE_URL": "postgresql://bone:s3cret-pw@127.0.0.1:1/cds"},
     "cannot open the feedback store at PostgreSQL 127.0.0.1:1/cds"),
    (["evaluate", "{empty}"], {}, "holds no *.json files"),
    (["codes", "{empty}"], {}, "holds no *.json files"),
    (["request", "README.md"], {}, "README.md is not valid JSON"),
    (["request", "fixtures/orders/anastrozole.json"], {}, "is not a FHIR Bundle"),
    (["request", "{empty}/none.json"], {}, "No such file"),
])
def test_config_and_cli_errors_are_one_line_and_exit_2(tmp_path, args, env, says):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    out = cli(*args, env={"CDS_DATA_DIR": str(tmp_path), **env})
    assert out.returncode == 2 and says in out.stderr
    plain = [x for x in out.stderr.strip().splitlines() if not x.startswith("{")]       # JSON log lines aside
    assert len(plain) == 1 and "Traceback" not in out.stderr
    assert "serving" not in out.stderr                     # the banner only after settings are valid


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("serve", "--port", str(port), env={"CDS_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"cds-service serve: cannot bind 127.0.0.1:{port}: Address already in use (CDS_PORT or --port)"


def test_a_closed_pipe_ends_quietly_as_cli_tools_do():
    """`cds-service codes ... | head`: the reader has gone (here: before the first write, so every run is the same);
    no "Broken pipe" traceback, and the status a command killed by SIGPIPE has."""
    import os
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "cds_service.cli", "codes", "fixtures/patients"], cwd=ROOT,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_command_and_the_settings_and_version_answers():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("serve", "evaluate", "codes", "request", "screen", "spark-classes", "check-catalog"):
        assert command in out.stdout
    for setting in ("CDS_AUTH", "CDS_DATABASE_URL", "CDS_SNOOZE", "CDS_AS_OF", "CDS_FHIR_ALLOWLIST"):
        assert setting in out.stdout
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("cds-service 0.")


def test_evaluate_reads_folders_stdin_and_names_the_bad_file(tmp_path):
    (tmp_path / "a.json").write_text("{bad")
    (tmp_path / "b.json").write_text((FIXTURES / "patients/rheumatoid_arthritis-positive.json").read_text())
    out = cli("evaluate", str(tmp_path), "--as-of", AS_OF.isoformat())
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert out.returncode == 1 and len(lines) == 2 and lines[1]["cards"]           # one line per file, in order
    assert f"{tmp_path / 'a.json'} is not valid JSON" in out.stderr and "line 1 column 2" in out.stderr
    piped = cli("evaluate", "-", "--as-of", AS_OF.isoformat(), stdin=(tmp_path / "b.json").read_text())
    assert piped.returncode == 0 and json.loads(piped.stdout)["cards"]


def test_check_catalog_for_a_reviewers_ci(tmp_path):
    import shutil
    ok = cli("check-catalog")
    assert ok.returncode == 0 and "OK: 65 causes" in ok.stdout
    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    text = (cards / "causes.yaml").read_text()
    text = text.replace("      min_days: 90\n", "      min_dayz: 90\n", 1).replace("  strength: strong\n", "  strength: strong\n  strength: weak\n", 1)
    (cards / "causes.yaml").write_text(text)
    bad = cli("check-catalog", str(cards))
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert any(x.startswith("cards/causes.yaml:") and "duplicate key 'strength'" in x for x in lines)
    assert any(x.startswith("cards/causes.yaml:") and "'min_dayz' was unexpected" in x for x in lines)
    assert lines[-1] == "cds-service check-catalog: the catalog has 2 problem(s)"
    serve = cli("serve", env={"CDS_CARDS_DIR": str(cards), "CDS_DATA_DIR": str(tmp_path / "d")})
    assert serve.returncode == 2 and "'min_dayz' was unexpected" in serve.stderr and "serving" not in serve.stderr


def test_maintainer_tools_answer_help_and_never_overwrite_reviewed_content_without_force(tmp_path):
    """tools/import_reference.py rerun 'as its docstring said' replaced 12,288 reviewed catalog lines."""
    tool = [sys.executable, "tools/import_reference.py"]
    assert subprocess.run(tool + ["--help"], cwd=ROOT, capture_output=True, text=True).stdout.startswith("usage:")
    reviewed = tmp_path / "cards"
    reviewed.mkdir()
    (reviewed / "causes.yaml").write_text("# reviewed\n")
    refused = subprocess.run(tool + ["--out", str(reviewed)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "without --force" in refused.stderr
    assert (reviewed / "causes.yaml").read_text() == "# reviewed\n"
    fresh = subprocess.run(tool + ["--out", str(tmp_path / "import")], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert fresh.returncode == 0 and (tmp_path / "import" / "causes.yaml").exists()
    vs = subprocess.run([sys.executable, "tools/import_value_sets.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert vs.returncode == 0 and "--force" in vs.stdout


def test_request_writes_the_patient_view_an_ehr_would_send_and_evaluate_reads_it(tmp_path):
    bundle = FIXTURES / "patients" / "glucocorticoids-positive.json"
    out = cli("request", str(bundle), "--fhir-server", "https://ehr.example.org/fhir")
    assert out.returncode == 0, out.stderr
    request = json.loads(out.stdout)
    assert request["hook"] == "patient-view" and request["context"]["patientId"] == "glucocorticoids-positive"
    assert request["fhirServer"] == "https://ehr.example.org/fhir"
    assert request["prefetch"]["medicationRequests"]["entry"]
    (tmp_path / "request.json").write_text(out.stdout)
    via_request = json.loads(evaluate(str(tmp_path / "request.json")).stdout)
    via_bundle = json.loads(evaluate(str(bundle)).stdout)
    assert [c["summary"] for c in via_request["cards"]] == [c["summary"] for c in via_bundle["cards"]] != []
