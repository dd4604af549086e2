"""Population screening: every patient of a FHIR Bulk Data export through the same engine as the CDS Hooks
service and `cds-service evaluate`.

    screen(export, out, as_of)          -> summary dict; writes findings.ndjson, worklist.csv, worklist.parquet,
                                           report.html and summary.json into `out`

The export is grouped by patient with DuckDB (`partition.py`, spilling to disk), each group is evaluated by
`patients.PatientScreen` in worker processes that load the catalog once, and the lines are tallied into the
worklist, the alert burden and the report (`outputs.py`, `report.py`). Outputs are written under temporary names
and renamed at the end, so an interrupted run leaves nothing that looks complete."""
from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import orjson

from .export import ExportError, export_files
from .outputs import Tally, alert_burden, write_worklist_csv
from .partition import ExportGroups
from .patients import PatientScreen, init_worker, screen_batch

__all__ = ["screen", "ExportError", "OUTPUTS"]

OUTPUTS = ("findings.ndjson", "worklist.csv", "worklist.parquet", "report.html", "summary.json")
BATCH = 16                     # patients per task sent to a worker
SURVEY_PATIENTS = 100          # the code survey in the report reads this many patients


def screen(export: str | Path, out: str | Path, as_of: date, workers: int = 1, cards_dir: str | None = None,
           progress=None) -> dict:
    """Screen every patient of `export` into the folder `out`; the summary is returned and written."""
    from ..knowledge.catalog import load_catalog
    from ..clinical.survey import CodeSurvey

    started = time.perf_counter()
    files = export_files(export)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".screen-", dir=out))
    temp = {name: out / f".{name}.partial" for name in OUTPUTS}
    catalog = load_catalog(cards_dir or None)
    survey = CodeSurvey(catalog, as_of)
    groups = None
    try:
        groups = ExportGroups(files, work)
        load = groups.load()
        medications = groups.medications()
        total = groups.patient_count()
        tally, rows = Tally(), []
        done = 0
        with open(temp["findings.ndjson"], "wb") as findings:
            def take(results) -> None:
                nonlocal done
                for r in results:
                    done += 1
                    if r.line is None:
                        tally.failed.append({"patient": r.patient, "error": r.error})
                        continue
                    findings.write(r.line + b"\n")
                    tally.add(r.facts)
                    if r.facts.row is not None:
                        rows.append(r.facts.row)
                if progress:
                    progress(done, total, time.perf_counter() - started)

            batches = _batches(groups.patients(), survey)
            if workers <= 1:
                one = PatientScreen(cards_dir, as_of, medications, catalog)
                for batch in batches:
                    take([one(p, lines) for p, lines in batch])
            else:
                with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                                         initargs=(cards_dir, as_of, medications)) as pool:
                    pending: deque = deque()
                    for batch in batches:                 # bounded: never more than 4 tasks a worker in flight
                        pending.append(pool.submit(screen_batch, batch))
                        if len(pending) >= workers * 4:
                            take(pending.popleft().result())
                    while pending:
                        take(pending.popleft().result())
        write_worklist_csv(rows, temp["worklist.csv"])
        groups.con.execute(f"COPY (SELECT * FROM read_csv('{_sql(temp['worklist.csv'])}', header=true, "
                           f"all_varchar=false)) TO '{_sql(temp['worklist.parquet'])}' (FORMAT parquet)")
        burden = alert_burden(tally, groups.encounters(), as_of)
        seconds = time.perf_counter() - started
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        summary = {
            "export": str(export), "as_of": as_of.isoformat(), "catalog_version": catalog.version,
            "engine": "local", "workers": workers,
            "patients": tally.patients + len(tally.failed),
            "cards": dict(sorted(tally.cards.items())),
            "treatment_gaps": dict(tally.treatment_gaps.most_common()),
            "failed_patients": tally.failed,
            "malformed_lines": load.malformed_lines,
            "resources_without_patient": dict(sorted(load.resources_without_patient.items())),
            "skipped_types": dict(sorted(load.skipped_types.items())),
            "resources": load.resources, "input_bytes": load.input_bytes,
            "alert_burden": burden,
            "seconds": round(seconds, 2),
            "patients_per_second": round((tally.patients + len(tally.failed)) / seconds, 1) if seconds else None,
            "peak_rss_bytes": max(own, child),
            "peak_rss_bytes_by_process": {"main": own, "largest_worker": child if workers > 1 else own},
        }
        unrecognised = [(r.resource_type, r.system, r.code or r.display, len(r.patients))
                        for r in survey.sorted_rows(unmatched_only=True)]
        from .report import render
        temp["report.html"].write_text(render(summary, tally, burden, unrecognised), encoding="utf-8")
        temp["summary.json"].write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        for name, path in temp.items():                  # all written: now they take their real names
            os.replace(path, out / name)
        return summary
    finally:
        if groups is not None:
            groups.close()
        for path in temp.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _batches(patients, survey):
    """Groups in batches of BATCH; the first SURVEY_PATIENTS also feed the code survey."""
    batch, seen = [], 0
    for pid, lines in patients:
        if seen < SURVEY_PATIENTS:
            seen += 1
            survey.add_bundle({"entry": [{"resource": orjson.loads(t)} for t in lines]}, pid)
        batch.append((pid, lines))
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _sql(path: Path) -> str:
    return str(path).replace("'", "''")


def progress_bar(stream=sys.stderr):
    """A one-line progress display for a terminal (patients done, rate, ETA); nothing when not a TTY."""
    if not stream.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int, elapsed: float) -> None:
        if elapsed - last[0] < 0.2 and done < total:
            return
        last[0] = elapsed
        rate = done / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else 0.0
        width = 30
        filled = int(width * done / total) if total else width
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} patients, "
                     f"{rate:,.0f}/s, ETA {eta:,.0f} s ")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show
