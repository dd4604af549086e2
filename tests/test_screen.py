"""`cds-service screen`: a Bulk Data export screened patient by patient with the engine `evaluate` runs.

The labelled development corpora (../shared/dev-corpus, and its messy/ EHR-style exports) are written as Bulk Data
exports by tools/bundles_to_bulk.py; every patient's findings line must be exactly what `cds-service evaluate
--explain` prints for that patient's exported resources, whatever the files' order, split or compression."""
from __future__ import annotations

import csv
import gzip
import json
import random
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

import duckdb
import pytest

from cds_service.screening import screen

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from bundles_to_bulk import convert  # noqa: E402

CORPUS = ROOT.parent / "shared" / "dev-corpus"
AS_OF = date(2026, 6, 30)


def _strip_uuids(node):
    if isinstance(node, dict):
        return {k: _strip_uuids(v) for k, v in node.items() if k != "uuid"}
    if isinstance(node, list):
        return [_strip_uuids(v) for v in node]
    return node


def _lines(path: Path) -> dict[str, dict]:
    out = {}
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        out[line["patient"]] = _strip_uuids(line)
    return out


def _export_resources(export: Path) -> list[dict]:
    resources = []
    for f in sorted(export.glob("*.ndjson*")):
        text = gzip.decompress(f.read_bytes()).decode() if f.name.endswith(".gz") else f.read_text()
        resources += [json.loads(x) for x in text.splitlines() if x.strip()]
    return resources


def _patient_bundles(export: Path, folder: Path, seed: int) -> list[Path]:
    """One Bundle per patient from the export's own lines (their Medications added), shuffled: what a user hands
    `evaluate` for one patient of the export."""
    resources = _export_resources(export)
    meds = {r["id"]: r for r in resources if r["resourceType"] == "Medication"}
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for r in resources:
        if r["resourceType"] == "Patient":
            by_patient[r["id"]].append(r)
            continue
        for key in ("subject", "patient"):
            ref = (r.get(key) or {}).get("reference", "")
            if ref.startswith("Patient/"):
                by_patient[ref[len("Patient/"):]].append(r)
                mid = (r.get("medicationReference") or {}).get("reference", "")
                if mid.startswith("Medication/") and mid[11:] in meds and meds[mid[11:]] not in by_patient[ref[8:]]:
                    by_patient[ref[8:]].append(meds[mid[11:]])
                break
    folder.mkdir()
    paths = []
    for pid, rs in sorted(by_patient.items()):
        random.Random(seed).shuffle(rs)
        p = folder / f"{len(paths):04d}.json"
        p.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in rs]}))
        paths.append(p)
    return paths


def _evaluate(paths: list[Path], as_of: date) -> dict[str, dict]:
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "evaluate", "--explain", "--as-of", as_of.isoformat(),
                           *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = {}
    for raw in done.stdout.splitlines():
        line = json.loads(raw)
        out[line["patient"]] = _strip_uuids(line)
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    if not CORPUS.is_dir():
        pytest.fail("../shared/dev-corpus is needed beside the project")
    tmp = tmp_path_factory.mktemp("bulk")
    dev, messy = tmp / "dev", tmp / "messy"
    convert(sorted((CORPUS / "data").glob("*.json")), dev, compress=True, files_per_type=2)
    convert(sorted((CORPUS / "messy" / "data").glob("*.json")), messy)
    return {"dev": dev, "messy": messy}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["dev", "messy"])
def test_every_findings_line_is_what_evaluate_prints_for_that_patient(corpora, name, tmp_path):
    export = corpora[name]
    summary = screen(export, tmp_path / "out", AS_OF, workers=2)
    screened = _lines(tmp_path / "out" / "findings.ndjson")
    expected = _evaluate(_patient_bundles(export, tmp_path / "bundles", seed=7), AS_OF)
    assert summary["patients"] == len(expected) == len(screened) > 40
    assert summary["failed_patients"] == [] and summary["malformed_lines"] == []
    assert 0 < summary["peak_rss_bytes_by_process"]["largest_worker"] <= summary["peak_rss_bytes"]   # workers report it
    assert 0 < summary["load_seconds"] <= summary["first_patient_seconds"] <= summary["seconds"]
    differing = [p for p in expected if screened.get(p) != expected[p]]
    assert not differing, f"{len(differing)} patients differ, e.g. {differing[:3]}"
    assert sum(bool(line["cards"]) for line in screened.values()) == sum(summary["cards"].values()) > 0


@pytest.mark.integration
def test_a_public_synthea_bulk_export_screens_as_evaluate_reads_each_patient(tmp_path):
    """SMART's sample-bulk-fhir-datasets (10 patients, as a Bulk Data server wrote them, with the types the engine
    does not read): every patient screened, each line what `evaluate --explain` prints for that patient."""
    export = ROOT / "fixtures" / "bulk" / "smart-sample-10-patients"
    as_of = date(2023, 6, 30)                      # its last Encounters are of early 2023
    summary = screen(export, tmp_path / "out", as_of, workers=1)
    screened = _lines(tmp_path / "out" / "findings.ndjson")
    expected = _evaluate(_patient_bundles(export, tmp_path / "bundles", seed=11), as_of)
    assert summary["patients"] == len(screened) == len(expected) == 13      # 10 alive at export, as Synthea counts
    assert summary["failed_patients"] == [] and summary["malformed_lines"] == []
    assert summary["resources_without_patient"] == {}
    assert summary["skipped_types"] == {t: len(gzip.decompress((export / f"{t}.000.ndjson.gz").read_bytes()).splitlines())
                                        for t in ("AllergyIntolerance", "Device", "Immunization")}
    assert summary["alert_burden"]["chart_openings"] > 0
    assert [p for p in expected if screened[p] != expected[p]] == []
    assert any(line["findings"] for line in screened.values())


@pytest.mark.integration
def test_partitioning_order_and_compression_do_not_change_a_line(corpora, tmp_path):
    """The messy corpus again as one uncompressed file per type, its lines shuffled, screened in one process."""
    export = tmp_path / "shuffled"
    export.mkdir()
    for f in corpora["messy"].glob("*.ndjson"):
        lines = f.read_text().splitlines()
        random.Random(3).shuffle(lines)
        (export / f.name.replace(".000", "")).write_text("\n".join(lines) + "\n")
    screen(corpora["messy"], tmp_path / "a", AS_OF, workers=1)
    screen(export, tmp_path / "b", AS_OF, workers=1)
    assert _lines(tmp_path / "a" / "findings.ndjson") == _lines(tmp_path / "b" / "findings.ndjson")


@pytest.mark.integration
def test_the_worklist_agrees_with_the_labels_as_score_py_does(tmp_path):
    """Each labelled patient screened on its own as_of: the worklist lists every patient whose card fired, and
    scored as score.py scores, the screen finds every labelled positive and fires on no negative."""
    rows = list(csv.DictReader(open(CORPUS / "messy" / "labels.csv", newline="", encoding="utf-8")))
    by_date = defaultdict(list)
    for r in rows:
        by_date[r["as_of"]].append(r)
    tp = fn = tn = fp = 0
    for as_of, group in sorted(by_date.items()):
        export, out = tmp_path / f"e{as_of}", tmp_path / f"o{as_of}"
        convert([CORPUS / "messy" / r["file"] for r in group], export)
        screen(export, out, date.fromisoformat(as_of), workers=1)
        lines = _lines(out / "findings.ndjson")
        listed = {w["patient"]: w for w in csv.DictReader(open(out / "worklist.csv", newline=""))}
        for r in group:
            line = lines[r["patient_id"]]
            fired = bool(line["cards"])
            assert (r["patient_id"] in listed and listed[r["patient_id"]]["indicator"] != "") == fired
            got = {f["cause"] for f in line["findings"]}
            want = {c for c in r["causes"].split(";") if c and c != "other"}
            if r["should_alert"] == "yes":
                ok = fired or bool(want & got)
                tp, fn = tp + ok, fn + (not ok)
            elif r["should_alert"] == "no":
                tn, fp = tn + (not fired), fp + fired
    assert (tp, fn, tn, fp) == (30, 0, 10, 0)


def _write(folder: Path, name: str, lines: list[str], gz: bool = False) -> None:
    data = ("\n".join(lines) + "\n").encode()
    (folder / name).write_bytes(gzip.compress(data) if gz else data)


def _patient(pid: str, birth: str = "1950-01-01", sex: str = "female") -> str:
    return json.dumps({"resourceType": "Patient", "id": pid, "birthDate": birth, "gender": sex})


def _condition(cid: str, pid: str | None, code: str = "M05.79", display: str = "Rheumatoid arthritis") -> str:
    res = {"resourceType": "Condition", "id": cid, "clinicalStatus": {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code, "display": display}]},
        "onsetDateTime": "2020-01-01"}
    if pid:
        res["subject"] = {"reference": f"Patient/{pid}"}
    return json.dumps(res)


def _bad_export(export: Path) -> Path:
    """Two patients amid what real exports hold: lines that are not resources, a resource without a patient, a
    truncated .gz, a patient whose Patient resource is missing, a type the engine does not read."""
    export.mkdir(exist_ok=True)
    _write(export, "Patient.000.ndjson", [_patient("p1"), "{not json", "", _patient("p2"), "[1, 2]"])
    _write(export, "Condition.000.ndjson.gz", [_condition("c1", "p1"), _condition("c2", None)], gz=True)
    whole = gzip.compress(("\n".join(_condition(f"t{i}", "p2") for i in range(200)) + "\n").encode())
    (export / "Condition.001.ndjson.gz").write_bytes(whole[: len(whole) * 2 // 3])         # a truncated download
    _write(export, "Condition.002.ndjson", [_condition("g1", "ghost")])                    # a patient not exported
    _write(export, "Claim.000.ndjson", ['{"resourceType": "Claim", "id": "x"}'] * 3)       # a type not read
    return export


def test_bad_input_is_counted_with_file_and_line_and_never_stops_the_run(tmp_path):
    export = _bad_export(tmp_path / "export")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "screen", str(export), "--out", str(out),
                           "--as-of", "2026-06-30", "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "Traceback" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    bad = {(Path(m["file"]).name, m["line"]) for m in summary["malformed_lines"]}
    assert ("Patient.000.ndjson", 2) in bad and ("Patient.000.ndjson", 5) in bad
    assert any(name == "Condition.001.ndjson.gz" for name, _ in bad)                          # the truncation
    assert summary["resources_without_patient"] == {"Condition": 1}
    assert summary["skipped_types"] == {"Claim": 3}
    assert [f["patient"] for f in summary["failed_patients"]] == ["ghost"]                  # no Patient resource
    assert summary["patients"] == 3
    lines = _lines(out / "findings.ndjson")
    assert set(lines) == {"p1", "p2"} and any(f["cause"] == "rheumatoid_arthritis" for f in lines["p1"]["findings"])
    report = (out / "report.html").read_text()
    assert "Condition.001.ndjson.gz" in report and "ghost" in report


def test_an_unusable_export_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for export in (tmp_path / "empty", tmp_path / "missing"):
        done = subprocess.run([sys.executable, "-m", "cds_service.cli", "screen", str(export), "--out",
                               str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len([x for x in done.stderr.splitlines() if not x.startswith("{")]) == 1, done.stderr


def test_a_manifest_with_relative_and_file_urls(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    _write(export, "a.ndjson", [_patient("p1")])
    _write(export, "b.ndjson", [_condition("c1", "p1")])
    manifest = {"output": [{"type": "Patient", "url": "a.ndjson"},
                           {"type": "Condition", "url": (export / "b.ndjson").as_uri()}]}
    (export / "manifest.json").write_text(json.dumps(manifest))
    summary = screen(export / "manifest.json", tmp_path / "out", AS_OF)
    assert summary["patients"] == 1 and summary["resources"] == 2


def test_outputs_worklist_parquet_and_a_self_contained_report(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    _write(export, "Patient.ndjson", [_patient("p1", "1948-03-02"), _patient("p2", "1990-01-01", "male")])
    _write(export, "Condition.ndjson", [_condition("c1", "p1"),
                                        _condition("f1", "p1", "S72.001A", "Fracture of unspecified part of neck of right femur")])
    _write(export, "Encounter.ndjson", [json.dumps({"resourceType": "Encounter", "id": f"e{i}", "subject": {
        "reference": f"Patient/p{1 + i % 2}"}, "period": {"start": f"2026-0{1 + i % 5}-1{i % 9}"},
        "serviceProvider": {"display": "Bone clinic" if i % 2 else "Primary care"}}) for i in range(8)])
    out = tmp_path / "out"
    summary = screen(export, out, AS_OF)
    rows = list(csv.DictReader(open(out / "worklist.csv", newline="")))
    assert [r["patient"] for r in rows] == ["p1"]
    row = rows[0]
    assert row["priority"] == "2" and row["age"] == "78" and row["treatment_gap"] == "True"
    assert row["next_step"].startswith("Start osteoporosis treatment") and "rheumatoid_arthritis" in row["causes"]
    parquet = duckdb.sql(f"SELECT patient, age FROM '{out / 'worklist.parquet'}'").fetchall()
    assert parquet == [("p1", 78)]
    burden = summary["alert_burden"]
    assert burden["chart_openings"] == 8 and burden["cards_per_1000_openings"] == 500.0
    report = (out / "report.html").read_text()
    assert "<svg" in report and "Alert burden" in report
    assert "<script" not in report and "src=" not in report and "http" not in report.split("</style>")[0]


def test_an_interrupted_run_leaves_no_output_that_looks_complete(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    _write(export, "Patient.ndjson", [_patient(f"p{i}") for i in range(40)])

    def interrupt(done, total, elapsed):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        screen(export, tmp_path / "out", AS_OF, progress=interrupt)
    assert list((tmp_path / "out").iterdir()) == []


# ---- the Spark engine: the same per-patient function, the same files ---------------------------------------
_VARYING = ("seconds", "load_seconds", "first_patient_seconds", "patients_per_second", "peak_rss_bytes", "peak_rss_bytes_by_process", "engine", "workers",
            "temp_disk_bytes", "export")


def _loaded(rows) -> dict:
    """What the Python reader's rows add up to, in the DuckDB load's terms."""
    from collections import Counter
    out = {"bad": set(), "skipped": Counter(), "nopatient": Counter(), "res": Counter(), "enc": 0, "med": 0}
    for r in rows:
        if r.kind == "bad":
            out["bad"].add((Path(r.file).name, r.line_no))
        elif r.kind in ("skipped", "nopatient"):
            out[r.kind][r.rt] += r.line_no if r.kind == "skipped" else 1
        elif r.kind == "res":
            out["res"][r.pid] += 1
        else:
            out[r.kind] += 1
    return out


def test_the_spark_reader_reads_an_export_as_the_duckdb_load_does(corpora, tmp_path):
    """Spark's executors read files with reader.py, the embedded engine with DuckDB: the same lines are bad, the same
    resources lack a patient, the same types are skipped, and every patient gets the same resources."""
    from cds_service.screening.export import export_files
    from cds_service.screening.partition import ExportGroups
    from cds_service.screening.reader import read_export_file

    export = _bad_export(tmp_path / "bad")
    for f in corpora["messy"].glob("*.ndjson"):
        (export / f.name.replace(".000", ".100")).write_bytes(f.read_bytes())
    encounter = {"resourceType": "Encounter", "status": "finished", "period": {"start": "2026-03-02T09:00:00Z"}}
    _write(export, "Encounter.200.ndjson", [json.dumps({**encounter, "id": "e1", "subject": {"reference": "Patient/p1"}}),
                                            json.dumps({**encounter, "id": "e2"})])            # no patient
    _write(export, "Condition.200.ndjson", [json.dumps({**encounter, "id": "e3", "subject": {"reference": "Patient/p2"}})])
    files = export_files(export)
    read = _loaded(row for f in files for row in read_export_file(f.type, str(f.path)))
    (tmp_path / "work").mkdir()
    groups = ExportGroups(files, tmp_path / "work")
    try:
        load = groups.load()
        assert read["bad"] == {(Path(m["file"]).name, m["line"]) for m in load.malformed_lines}
        assert read["nopatient"] == load.resources_without_patient and read["skipped"] == load.skipped_types
        assert dict(read["res"]) == {pid: len(lines) for pid, lines in groups.patients()}
        assert read["med"] == len(groups.medications()) > 0
        assert read["enc"] == len(groups.encounters("2000-01-01", "2100-01-01")) > 2      # a stray one included
        assert load.resources_without_patient["Encounter"] == 1
    finally:
        groups.close()


def test_the_first_patients_do_not_wait_for_the_sort_of_the_rest_and_every_patient_comes_once_in_order(
        corpora, tmp_path, monkeypatch):
    """The first patients come from a query of their own while DuckDB sorts the rest in a thread: they reach the
    workers while that sort is still running (held here until they have all come), and the queries together give
    every patient once, in patient-id order, with the lines one query gives (results no rule reads left out past
    the survey's patients, as before). An export larger than the memory limit is sorted in ranges of patients, so
    that no sort spills the whole export beside the spilled table: the same patients and lines again. A run stopped
    after its first patient ends the sorts behind it."""
    import threading

    from cds_service.knowledge.catalog import load_catalog
    from cds_service.screening import partition
    from cds_service.screening.export import export_files
    from cds_service.screening.partition import ExportGroups

    catalog = load_catalog()

    def grouped(first: int, hold: threading.Event | None = None, name: str = "") -> list[tuple[str, list[str]]]:
        monkeypatch.setattr(partition, "FIRST_PATIENTS", first)
        work = tmp_path / f"work-{first}{name}"
        work.mkdir()
        groups = ExportGroups(export_files(corpora["dev"]), work)
        try:
            groups.load()
            groups.leave_out_unread(catalog, except_first=5)
            out = []
            for pid, lines in groups.patients(batch_rows=50):
                out.append((pid, sorted(lines)))
                if hold is not None and len(out) == first:
                    assert not hold.is_set()            # all of the first ones came while the rest was held
                    hold.set()
            return out
        finally:
            groups.close()

    hold = threading.Event()
    real_run = partition._QueryBehind._run

    def held_run(self, sql, params):
        if "pid > ?" in sql:                            # a range after the first
            assert hold.wait(30), "the first patients never came while the sort of the rest was held"
        real_run(self, sql, params)
    monkeypatch.setattr(partition._QueryBehind, "_run", held_run)
    split = grouped(7, hold)
    monkeypatch.setattr(partition._QueryBehind, "_run", real_run)
    whole = grouped(100_000)                           # more than the export holds: one query
    assert hold.is_set() and split == whole
    assert [pid for pid, _ in split] == sorted({pid for pid, _ in split}) and len(split) > 40

    ranges: list[str] = []
    real_init = partition._QueryBehind.__init__

    def counted_init(self, cursor, sql, params):
        ranges.append(sql)
        real_init(self, cursor, sql, params)
    monkeypatch.setattr(partition._QueryBehind, "__init__", counted_init)
    monkeypatch.setattr(partition, "SORT_IN_MEMORY_BYTES", 0)           # as if the export outgrew the memory limit
    monkeypatch.setattr(partition, "SPILL_RANGES", 4)
    assert grouped(7, name="-ranges") == whole
    assert len(ranges) == 1 + 4 and sum("pid > ? AND pid <= ?" in sql for sql in ranges) == 3

    monkeypatch.setattr(partition, "FIRST_PATIENTS", 3)
    (tmp_path / "stopped").mkdir()
    groups = ExportGroups(export_files(corpora["dev"]), tmp_path / "stopped")
    groups.load()
    patients = groups.patients()
    assert next(patients)[0] == whole[0][0]
    patients.close()                                    # as a run stopped by Ctrl-C or an error
    groups.close()
    assert not [t for t in threading.enumerate() if t.name == "duckdb-sort"]
    (tmp_path / "abandoned").mkdir()
    groups = ExportGroups(export_files(corpora["dev"]), tmp_path / "abandoned")
    groups.load()
    patients = groups.patients()
    next(patients)
    groups.close()                                      # the iteration never closed: the sort behind it ends here
    assert not [t for t in threading.enumerate() if t.name == "duckdb-sort"]
    patients.close()


def test_a_type_not_read_is_counted_as_the_line_reader_counts_it_and_damage_still_reported(tmp_path, monkeypatch):
    """Files of types the engine does not read are only counted, in bytes: blank and whitespace lines are not
    resources, a last line without a newline is, a line across the counter's reads counts once. A damaged .gz or a
    line over the limit goes to the line reader, which reports where."""
    from cds_service.screening import partition, reader
    from cds_service.screening.export import export_files
    from cds_service.screening.partition import ExportGroups

    export = tmp_path / "export"
    export.mkdir()
    claim = '{"resourceType": "Claim", "id": "%d", "patient": {"reference": "Patient/p1"}, "note": "%s"}'
    text = "\n".join([claim % (0, "x" * 9000), "", "   ", "\t", claim % (1, ""), claim % (2, "y" * 20000)]) + "\n  \n"
    (export / "Claim.000.ndjson").write_text(text + claim % (3, ""))                   # the last line has no newline
    (export / "Claim.001.ndjson.gz").write_bytes(gzip.compress((claim % (4, "") + "\n").encode() * 7))
    whole = gzip.compress("".join(claim % (i, "z" * 50) + "\n" for i in range(300)).encode())
    (export / "Coverage.000.ndjson.gz").write_bytes(whole[: len(whole) // 2])          # a truncated download
    _write(export, "Patient.000.ndjson", [_patient("p1")])
    monkeypatch.setattr(partition, "_COUNT_READ_BYTES", 4096)        # lines cross reads
    for module in (partition, reader):
        monkeypatch.setattr(module, "MAX_LINE_BYTES", 15000)         # the 20,000-byte line is over the limit
    files = export_files(export)
    read = _loaded(row for f in files for row in reader.read_export_file(f.type, str(f.path)))
    (tmp_path / "work").mkdir()
    groups = ExportGroups(files, tmp_path / "work")
    try:
        load = groups.load()
    finally:
        groups.close()
    assert load.skipped_types == read["skipped"]
    assert load.skipped_types["Claim"] == 3 + 7                      # the over-long line is reported, not counted
    assert 0 < load.skipped_types["Coverage"] < 300
    bad = {(Path(m["file"]).name, m["line"]) for m in load.malformed_lines}
    assert ("Claim.000.ndjson", 6) in bad and any(name == "Coverage.000.ndjson.gz" for name, _ in bad)
    assert partition._count_resource_lines(export / "Claim.000.ndjson", False) is None      # to the line reader
    assert partition._count_resource_lines(export / "Claim.001.ndjson.gz", True) == 7
    monkeypatch.setattr(partition, "MAX_LINE_BYTES", 64 * 1024 * 1024)
    assert partition._count_resource_lines(export / "Claim.000.ndjson", False) == 4


def test_a_file_read_in_byte_ranges_gives_every_line_once_with_its_line_number(corpora, tmp_path):
    """Spark reads a large uncompressed file in ranges, one task each: cut anywhere, even mid-line or on a newline,
    the ranges together hold each line exactly once, numbered as in the whole file."""
    from cds_service.screening.reader import lines_before, read_export_file

    lines = [x for f in sorted(corpora["messy"].glob("Observation*.ndjson")) for x in f.read_text().splitlines()]
    lines[5:5] = ["{not json", "", "[1, 2]"]
    path = tmp_path / "Observation.ndjson"
    path.write_text("\n".join(lines) + "\n")
    whole = list(read_export_file("Observation", str(path)))
    size = path.stat().st_size
    newline = path.read_bytes().index(b"\n")
    for cuts in ([newline, newline + 1], sorted(random.Random(5).sample(range(1, size), 7)), [size - 1]):
        bounds = [0, *cuts, None]
        ranged = []
        for start, end in zip(bounds, bounds[1:]):
            base = lines_before(str(path), start)
            ranged += [r._replace(line_no=r.line_no + base) for r in read_export_file("Observation", str(path), start, end)]
        assert ranged == whole, cuts
    assert [r.line_no for r in whole if r.kind == "bad"] == [6, 8]


@pytest.fixture(scope="module")
def spark():
    """One local[2] session for the module's Spark runs (the screen uses the active session)."""
    import os
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from cds_service.screening.spark import ClassArchive, local_conf
    builder = SparkSession.builder.master("local[2]").appName("tests")
    for key, value in local_conf(2, ClassArchive.for_this_machine()).items():     # `make spark` recorded one
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    yield session
    session.stop()


@pytest.mark.integration
def test_spark_local_2_writes_what_the_embedded_engine_writes(corpora, spark, tmp_path, monkeypatch):
    """The messy corpus with every kind of bad input beside it, screened on Spark local[2] and by the embedded
    engine: the same findings lines in the same order, the same worklist, the same summary. Files are read in
    64 KB ranges here (32 MB in use), so a bad line deep in a file is numbered across ranges too."""
    import cds_service.screening.spark as spark_engine

    monkeypatch.setattr(spark_engine, "RANGE_BYTES", 64 * 1024)
    export = _bad_export(tmp_path / "export")
    for f in corpora["messy"].glob("*.ndjson"):
        text = f.read_bytes() + (b'{"resourceType": "Observation", broken\n' if f.name.startswith("Observation") else b"")
        (export / f.name.replace(".000", ".100")).write_bytes(text)
    assert max(f.stat().st_size for f in export.iterdir()) > 4 * 64 * 1024
    local = screen(export, tmp_path / "local", AS_OF, workers=1)
    distributed = screen(export, tmp_path / "spark", AS_OF, workers=2, engine="spark")
    assert distributed["engine"] == "spark" and local["patients"] == distributed["patients"] > 40
    assert {k: v for k, v in local.items() if k not in _VARYING} == \
        {k: v for k, v in distributed.items() if k not in _VARYING}
    assert local["malformed_lines"] and local["failed_patients"] and local["alert_burden"]["chart_openings"] > 0
    assert any(m["file"].endswith("Observation.100.ndjson") and m["line"] > 100 for m in local["malformed_lines"])
    strip = [_strip_uuids(json.loads(x)) for x in (tmp_path / "local" / "findings.ndjson").read_text().splitlines()]
    assert strip == [_strip_uuids(json.loads(x)) for x in (tmp_path / "spark" / "findings.ndjson").read_text().splitlines()]
    assert (tmp_path / "local" / "worklist.csv").read_bytes() == (tmp_path / "spark" / "worklist.csv").read_bytes()
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'spark' / 'worklist.parquet'}'").fetchall()[0][0] > 0


_FAKE_JVM = """
import sys
sys.stdin.read()                               # the gateway JVM runs until its input ends, then exits
open(sys.argv[1], "wb").write(b"classes" * 1000)   # ... writing the archive as it goes (-XX:ArchiveClassesAtExit)
sys.exit(int(sys.argv[2]))
"""


class _FakeGateway:
    def __init__(self, partial: Path, exit_code: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _FAKE_JVM, str(partial), str(exit_code)],
                                     stdin=subprocess.PIPE)
        self.closed = False

    def shutdown(self):
        self.closed = True


def test_a_recorded_spark_class_archive_is_used_only_once_its_jvm_has_exited_cleanly(tmp_path, monkeypatch):
    """A JVM given a cut-off class archive crashes at start: the recording takes the archive's name only after the
    JVM that writes it has exited with status 0; until then, and after a failed exit, Spark starts without one.
    A recording left by a stopped training run is removed by the next one once it is an hour old."""
    pytest.importorskip("pyspark")
    import os
    import time

    from pyspark import SparkContext

    from cds_service.screening.spark import ClassArchive, local_conf

    monkeypatch.setenv("CDS_SPARK_CLASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(SparkContext, "_jvm", SparkContext._jvm)     # restored afterwards: finish() resets both
    monkeypatch.setattr(SparkContext, "_gateway", SparkContext._gateway)
    assert ClassArchive.for_this_machine() is None                  # nothing recorded: Spark starts as it always has
    assert "SharedArchiveFile" not in local_conf(2)["spark.driver.extraJavaOptions"]

    failed = ClassArchive.for_this_machine(record=True)
    assert failed.recording and f"-XX:ArchiveClassesAtExit={failed.partial}" in failed.java_options()
    gateway = _FakeGateway(failed.partial, exit_code=1)
    monkeypatch.setattr(SparkContext, "_gateway", gateway)
    assert failed.finish(timeout=30) is False
    assert not failed.path.exists() and not failed.partial.exists() and ClassArchive.for_this_machine() is None

    stale = failed.path.with_name(failed.path.name + ".999.0badc0de.partial")
    fresh = failed.path.with_name(failed.path.name + ".998.0000beef.partial")
    stale.write_bytes(b"cut off"), fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    archive = ClassArchive.for_this_machine(record=True)
    assert not stale.exists() and fresh.exists()                    # another training run may still be writing it
    gateway = _FakeGateway(archive.partial, exit_code=0)
    monkeypatch.setattr(SparkContext, "_gateway", gateway)
    monkeypatch.setattr(SparkContext, "_jvm", object())
    assert not archive.path.exists()                                # not while the JVM runs
    assert archive.finish(timeout=30) is True
    assert gateway.closed and gateway.proc.returncode == 0
    assert archive.path.read_bytes() == b"classes" * 1000 and not archive.partial.exists()
    assert SparkContext._gateway is None and SparkContext._jvm is None   # a later session starts a new JVM
    used = ClassArchive.for_this_machine()
    assert used.path == archive.path and not used.recording
    assert f"-XX:SharedArchiveFile={archive.path}" in local_conf(2, used)["spark.driver.extraJavaOptions"]
    archive.path.write_bytes(b"classes" * 999)                      # a copy cut short is never handed to a JVM
    assert ClassArchive.for_this_machine() is None
    monkeypatch.setenv("CDS_SPARK_CLASS_CACHE", "off")
    assert ClassArchive.for_this_machine() is None and ClassArchive.for_this_machine(record=True) is None


def test_a_spark_class_archive_the_jvm_cannot_start_from_is_removed_and_spark_started_without_it(tmp_path, monkeypatch):
    """An archive damaged after it was recorded (a disk error, a copy cut short) stops the JVM at start: the screen
    removes it and starts Spark without it, instead of failing every run until someone finds the cache."""
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    import cds_service.screening.spark as spark_engine

    monkeypatch.setenv("CDS_SPARK_CLASS_CACHE", str(tmp_path / "cache"))
    damaged = spark_engine.ClassArchive.for_this_machine(record=True).path
    damaged.write_bytes(b"\0" * 4096)
    damaged.with_name(damaged.name + ".size").write_text("4096")      # whole, as far as its size tells
    real_start, started = spark_engine._start, []

    class Session:
        class sparkContext:
            @staticmethod
            def setLogLevel(level):
                pass

    def start(session_class, master, workers, local, archive):
        started.append(archive.path if archive is not None else None)
        if archive is not None:
            raise spark_engine.SparkUnavailable("Spark could not start: Java gateway process exited before sending "
                                                "its port number")
        return Session()

    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))
    monkeypatch.setattr(spark_engine, "_start", start)
    session, owned, archive = spark_engine.spark_session(None, 2)
    assert isinstance(session, Session) and owned and archive is None
    assert started == [damaged, None] and not damaged.exists()

    class NoJava:
        class builder:                      # SparkSession.builder as the JVM's launch fails
            @staticmethod
            def appName(name):
                return NoJava.builder

            @staticmethod
            def master(url):
                return NoJava.builder

            @staticmethod
            def config(key, value):
                return NoJava.builder

            @staticmethod
            def getOrCreate():
                raise RuntimeError("Java gateway process exited before sending its port number\nmore")

    with pytest.raises(spark_engine.SparkUnavailable,
                       match="^Spark could not start: Java gateway process exited before sending its port number$"):
        real_start(NoJava, None, 2, True, None)


def test_the_spark_engine_without_pyspark_is_one_line_and_exit_2(tmp_path):
    """A site that has not installed the [spark] extra is told how to, not shown a traceback."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pyspark.py").write_text("raise ImportError('No module named pyspark')\n")
    _write(tmp_path / "export", "Patient.ndjson", [_patient("p1")]) if (tmp_path / "export").mkdir() is None else None
    import os
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "screen", str(tmp_path / "export"), "--out",
                           str(tmp_path / "out"), "--engine", "spark"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pip install" in done.stderr and "[spark]" in done.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
    classes = subprocess.run([sys.executable, "-m", "cds_service.cli", "spark-classes"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env={**env, "CDS_SPARK_CLASS_CACHE": str(tmp_path / "cache")})
    assert classes.returncode == 2 and "Traceback" not in classes.stderr and "pip install" in classes.stderr
    assert not any((tmp_path / "cache").glob("*.jsa*"))


def test_a_terminal_sees_the_files_read_then_patients_rate_and_eta(tmp_path):
    """On a terminal the screen says which file it reads (grouping needs them all first), then patients done with a
    rate and an ETA, and ends its line; piped to a file it prints nothing."""
    import io

    from cds_service.screening import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    export = tmp_path / "export"
    export.mkdir()
    _write(export, "Patient.ndjson", [_patient(f"p{i}") for i in range(40)])
    _write(export, "Condition.ndjson", [_condition(f"c{i}", f"p{i}") for i in range(40)])
    shown = Terminal()
    screen(export, tmp_path / "out", AS_OF, progress=progress_bar(shown))
    text = shown.getvalue()
    assert "reading the export: 0/2 files (Condition.ndjson)" in text and "1/2 files (Patient.ndjson)" in text
    assert "40/40 patients" in text and "/s, ETA 0 s" in text and text.endswith("\n")
    assert progress_bar(io.StringIO()) is None


def test_a_catalog_that_fails_to_load_releases_the_waiting_workers(tmp_path):
    """The workers wait for the main process's checked catalog; when it fails to load they are released at once
    (and load it themselves, meeting the same error), never left waiting out the timeout."""
    import shutil
    import time

    from cds_service.knowledge.catalog import CatalogError
    from cds_service.screening.patients import CatalogHandoff

    cards = tmp_path / "cards"
    shutil.copytree(ROOT / "cards", cards)
    (cards / "causes.yaml").write_text("causes: [\n")
    handoff = CatalogHandoff(tmp_path)
    with pytest.raises(CatalogError):
        handoff.load(str(cards))
    assert handoff.ready.is_set() and not Path(handoff.path).exists()
    t = time.monotonic()
    handoff.take()
    assert time.monotonic() - t < 1
    good = CatalogHandoff(tmp_path)
    good.load(None)
    assert good.ready.is_set() and Path(good.path).stat().st_size > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_the_code_survey_surveyed_beside_the_findings_is_the_survey_of_the_first_patients(corpora, tmp_path, workers):
    """The report's code survey reads the first patients by id. The workers survey them while screening them (one
    parse) and their rows are merged in patient order: the table is the one a single survey of those patients makes,
    display, meaning and patients alike, drug codes read by text included."""
    from cds_service.clinical.survey import CodeSurvey
    from cds_service.knowledge.catalog import load_catalog
    from cds_service.screening import SurveySample
    from cds_service.screening.export import export_files
    from cds_service.screening.local import LocalEngine

    catalog = load_catalog()
    files = export_files(corpora["messy"])
    (tmp_path / "work").mkdir()
    engine = LocalEngine(files, tmp_path / "work", AS_OF, workers, None)
    try:
        engine.load()
        merged = SurveySample(CodeSurvey(catalog, AS_OF), 25)
        screened = [r.patient for results in engine.results(merged, catalog) for r in results]
        one_by_one = SurveySample(CodeSurvey(catalog, AS_OF), 25)
        for pid, lines in engine.groups.patients():
            one_by_one.offer(pid, lines)
    finally:
        engine.close()

    def table(sample):
        return [(r.resource_type, r.system, r.code, r.display, sorted(r.patients), r.meaning, r.to_add)
                for r in sample.survey.sorted_rows()]

    assert len(screened) > 25 and merged.seen == one_by_one.seen == 25
    assert table(merged) == table(one_by_one)
    assert any(kind == "Medication, by text" for kind, *_ in table(merged))      # the messy corpus has them
    assert {p for row in table(merged) for p in row[4]} == set(sorted(screened)[:25])


def test_a_drug_code_surveyed_in_two_workers_keeps_one_row_as_a_single_survey_keeps_it(tmp_path):
    """An NDC the catalog does not list is read by its product name where the text names one ("Medication, by
    text"). When one patient's text names the drug and the next patient's does not, a single survey lists both
    patients on that one row; surveyed in separate workers and merged, so must the report. Within a patient, the
    display kept is the one of the first line in line order, as a single survey reads them."""
    from cds_service.clinical.survey import BY_TEXT, CodeSurvey
    from cds_service.knowledge.catalog import load_catalog
    from cds_service.screening import SurveySample
    from cds_service.screening.patients import PatientScreen

    def order(pid, rid, display):
        return json.dumps({"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
                           "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2026-01-05",
                           "medicationCodeableConcept": {"coding": [{"system": "http://hl7.org/fhir/sid/ndc",
                                                                     "code": "0054-4728-25", "display": display}]}})

    patients = {"a": [_patient("a"), order("a", "m1", "predniSONE 5 MG Oral Tablet"), order("a", "m2", "Tablet")],
                "b": [_patient("b"), order("b", "m3", "Tablet")]}
    catalog = load_catalog()
    screen_one = PatientScreen(None, AS_OF, {}, catalog)
    merged, single = SurveySample(CodeSurvey(catalog, AS_OF), 10), SurveySample(CodeSurvey(catalog, AS_OF), 10)
    for pid, lines in patients.items():
        merged.take()
        merged.merge(screen_one(pid, list(reversed(lines)), survey=True).survey_rows)     # each "in its own worker"
        single.offer(pid, lines)

    def table(sample):
        return [(r.resource_type, r.code, r.display, sorted(r.patients), r.meaning)
                for r in sample.survey.sorted_rows() if r.code == "0054-4728-25"]

    assert table(merged) == table(single)
    assert [(kind, patients_) for kind, _, _, patients_, _ in table(single)] == [(BY_TEXT, ["a", "b"])]


def test_an_export_scaled_up_for_the_benchmark_holds_copies_that_screen_as_the_originals(corpora, tmp_path):
    """tools/replicate_export.py turns a few real patients into many for the screen benchmark: every copy is its
    own patient (its own ids) whose findings are the original's, and what names no patient is written once."""
    from replicate_export import replicate

    source = corpora["messy"]
    written = replicate(source, tmp_path / "x2", copies=2)
    originals = screen(source, tmp_path / "out1", AS_OF, workers=1)
    copies = screen(tmp_path / "x2", tmp_path / "out2", AS_OF, workers=1)
    assert copies["patients"] == 2 * originals["patients"] > 0
    assert written["Patient.000.ndjson"] == 2 * originals["patients"]
    assert copies["cards"] == {k: 2 * n for k, n in originals["cards"].items()} and originals["cards"]
    assert copies["treatment_gaps"] == {k: 2 * n for k, n in originals["treatment_gaps"].items()}
    by_original: dict[str, list] = defaultdict(list)
    for pid, line in _lines(tmp_path / "out2" / "findings.ndjson").items():
        by_original[pid.rsplit("-", 1)[0]].append(line)

    def causes(line):
        return sorted((f["cause"], f.get("status")) for f in line["findings"])

    for pid, line in _lines(tmp_path / "out1" / "findings.ndjson").items():
        assert [causes(c) for c in by_original[pid]] == [causes(line)] * 2


def _result(pid: str, n: int, code: dict, value: float, unit: str) -> dict:
    return {"resourceType": "Observation", "id": f"{pid}-obs-{n}", "status": "final", "code": code,
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2026-05-02T09:30:00Z",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


def test_results_no_rule_reads_are_left_out_before_the_workers_except_for_the_surveyed_patients(tmp_path, monkeypatch):
    """Three results in four of a Synthea chart are vital signs and panels no rule reads; parsing them was most of a
    worker's time. They are left out in the load, decided once per distinct code by the engine's own test: a result
    read by its LOINC code or by its name (a local code, "Calcium, serum") still reaches the engine, and so does a
    code the test cannot read (the engine counts it invalid). The first patients keep every result, for the code
    survey, which lists codes no rule reads; in an export of fewer patients than the survey reads, all of them do
    (they lost their unread results, and the report's survey its unread codes)."""
    from cds_service.knowledge.catalog import load_catalog
    from cds_service.screening import SurveySample
    from cds_service.clinical.survey import CodeSurvey
    from cds_service.screening.export import export_files
    from cds_service.screening.local import LocalEngine
    from cds_service.screening.patients import PatientScreen

    heart_rate = {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]}
    creatinine = {"coding": [{"system": "http://loinc.org", "code": "2160-0",
                              "display": "Creatinine [Mass/volume] in Serum or Plasma"}]}
    local_calcium = {"coding": [{"system": "urn:oid:1.2.840.114350.1.13.0.1.7.2.768282", "code": "CA"}],
                     "text": "Calcium, serum"}
    undecidable = {"coding": [{"system": "http://loinc.org", "code": ["2160-0"]}]}
    export = tmp_path / "export"
    export.mkdir()
    pids = ["a-1", "b-2", "c-3"]
    (export / "Patient.ndjson").write_text("".join(json.dumps({"resourceType": "Patient", "id": p, "gender": "female",
                                                               "birthDate": "1950-04-01"}) + "\n" for p in pids))
    (export / "Observation.ndjson").write_text("".join(
        json.dumps(_result(p, n, code, value, unit)) + "\n" for p in pids
        for n, (code, value, unit) in enumerate([(heart_rate, 72, "/min"), (creatinine, 1.1, "mg/dL"),
                                                 (local_calcium, 9.4, "mg/dL"), (undecidable, 1.0, "mg/dL")])))
    seen: dict[str, list[str]] = {}
    real_call = PatientScreen.__call__

    def call(self, patient, lines, survey=False):
        seen[patient] = sorted(json.loads(line)["id"] for line in lines if '"Observation"' in line)
        return real_call(self, patient, lines, survey)
    monkeypatch.setattr(PatientScreen, "__call__", call)
    catalog = load_catalog()

    def screened_with_a_survey_of(limit: int):
        seen.clear()
        (tmp_path / f"work-{limit}").mkdir()
        engine = LocalEngine(export_files(export), tmp_path / f"work-{limit}", AS_OF, 1, None)
        try:
            engine.load()
            sample = SurveySample(CodeSurvey(catalog, AS_OF), limit)
            return [r for results in engine.results(sample, catalog) for r in results], sample
        finally:
            engine.close()

    screened, sample = screened_with_a_survey_of(1)
    assert [r.patient for r in screened] == pids and all(r.error is None for r in screened)
    assert seen["a-1"] == ["a-1-obs-0", "a-1-obs-1", "a-1-obs-2", "a-1-obs-3"]       # surveyed: every result
    for p in pids[1:]:
        assert seen[p] == [f"{p}-obs-1", f"{p}-obs-2", f"{p}-obs-3"]                # no heart rate
    assert any(row.code == "8867-4" for row in sample.survey.sorted_rows(unmatched_only=True))

    screened, sample = screened_with_a_survey_of(100)    # fewer patients than the survey reads: all keep all
    assert [r.patient for r in screened] == pids
    assert all(seen[p] == [f"{p}-obs-{i}" for i in range(4)] for p in pids)
    heart = [r for r in sample.survey.sorted_rows(unmatched_only=True) if r.code == "8867-4"]
    assert heart and sum(len(r.patients) for r in heart) == 3      # the survey lists it for every patient
