"""Population screening: every patient of a FHIR Bulk Data export through the same engine as the CDS Hooks
service and `cds-service evaluate`.

    screen(export, out, as_of)          -> summary dict; writes findings.ndjson, worklist.csv, worklist.parquet,
                                           report.html and summary.json into `out`

Two engines feed the same outputs. `local.py` (the default) groups the export by patient with DuckDB
(`partition.py`, spilling to disk) and evaluates each group in worker processes that load the catalog once;
`spark.py` reads, groups and evaluates on Apache Spark. Both call `patients.PatientScreen` per patient, and the
lines are tallied into the worklist, the alert burden and the report (`outputs.py`, `report.py`). Outputs are written under temporary names
and renamed at the end, so an interrupted run leaves nothing that looks complete."""
from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import orjson

from .export import ExportError, export_files
from .outputs import Tally, alert_burden, write_worklist_csv

__all__ = ["screen", "ExportError", "OUTPUTS", "ENGINES"]

OUTPUTS = ("findings.ndjson", "worklist.csv", "worklist.parquet", "report.html", "summary.json")
ENGINES = ("local", "spark")
SURVEY_PATIENTS = 100          # the code survey in the report reads this many patients (the first by id)


def screen(export: str | Path, out: str | Path, as_of: date, workers: int = 1, cards_dir: str | None = None,
           progress=None, engine: str = "local", master: str | None = None) -> dict:
    """Screen every patient of `export` into the folder `out`; the summary is returned and written.

    `engine` "local" groups with DuckDB and evaluates in `workers` processes; "spark" runs the same per-patient
    function on Apache Spark (`master`, else the active session or local[workers]). Both write the same files."""
    from ..clinical.survey import CodeSurvey
    from .patients import CatalogHandoff

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    started = time.perf_counter()
    files = export_files(export)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".screen-", dir=out))
    temp = {name: out / f".{name}.partial" for name in OUTPUTS}
    # this process's catalog (the survey's, and the engine's with one worker) loads while the export is read: the
    # load runs in DuckDB's or Spark's own threads, and the catalog's 2-3 s no longer come before the first patient
    # (the local engine's workers then build theirs from it: CatalogHandoff)
    handoff = CatalogHandoff(work)
    catalog_loading = ThreadPoolExecutor(1, thread_name_prefix="catalog")
    runner = None
    try:
        if engine == "spark":
            from .spark import SparkEngine
            catalog_future = catalog_loading.submit(handoff.load, cards_dir)    # beside the JVM's start
            runner = SparkEngine(files, work, as_of, workers, cards_dir, master)
        else:
            from .local import LocalEngine
            # DuckDB is imported and opened first: an import beside the catalog's thread waits for the GIL at each
            # of its file reads (1.4 s instead of 0.25 s on 2 cores), and the export's load is what the catalog
            # overlaps best (DuckDB's C++ threads run without the GIL)
            runner = LocalEngine(files, work, as_of, workers, cards_dir, handoff)
            catalog_future = catalog_loading.submit(handoff.load, cards_dir)
        load = runner.load(getattr(progress, "reading", None))
        catalog = catalog_future.result()               # a catalog that does not load raises here, as before
        survey = SurveySample(CodeSurvey(catalog, as_of), SURVEY_PATIENTS)
        loaded = time.perf_counter() - started          # grouping by patient reads every file before the first patient
        first = None
        temp_bytes = _folder_bytes(work)             # the temporary disk: after the load, then as the sort spills
        total = runner.patient_count()
        tally, rows = Tally(), []
        done = 0
        with open(temp["findings.ndjson"], "wb") as findings:
            for n, results in enumerate(runner.results(survey, catalog)):
                if first is None:
                    first = time.perf_counter() - started
                if n % 64 == 0:                          # the sort's spill, now and then
                    temp_bytes = max(temp_bytes, _folder_bytes(work))
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
        write_worklist_csv(rows, temp["worklist.csv"])
        _parquet(temp["worklist.csv"], temp["worklist.parquet"])
        burden = alert_burden(tally, sorted(runner.encounters(), key=_encounter_key), as_of)
        seconds = time.perf_counter() - started
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        child = getattr(runner, "worker_peak_rss", 0)
        summary = {
            "export": str(export), "as_of": as_of.isoformat(), "catalog_version": catalog.version,
            "engine": engine, "workers": workers,
            "patients": tally.patients + len(tally.failed),
            "cards": dict(sorted(tally.cards.items())),
            "treatment_gaps": dict(tally.treatment_gaps.most_common()),
            "failed_patients": tally.failed,
            "malformed_lines": sorted(load.malformed_lines, key=lambda m: (m["file"], m["line"], m["error"])),
            "resources_without_patient": dict(sorted(load.resources_without_patient.items())),
            "skipped_types": dict(sorted(load.skipped_types.items())),
            "resources": load.resources, "input_bytes": load.input_bytes, "filtered_input_bytes": load.filtered_bytes,
            "temp_disk_bytes": temp_bytes,
            "alert_burden": burden,
            "seconds": round(seconds, 2),
            "load_seconds": round(loaded, 2),
            "first_patient_seconds": round(first, 2) if first is not None else None,
            "patients_per_second": round((tally.patients + len(tally.failed)) / seconds, 1) if seconds else None,
            "peak_rss_bytes": max(own, child),
            # Spark's JVM and executors keep their own memory (its UI and metrics show it): here, the driver's Python
            "peak_rss_bytes_by_process": {"main": own, "largest_worker": child if workers > 1 else own}
            if engine == "local" else {"driver_python": own},
        }
        unrecognised = [(r.resource_type, r.system, r.code or r.display, len(r.patients))
                        for r in survey.survey.sorted_rows(unmatched_only=True)]
        from .report import render
        temp["report.html"].write_text(render(summary, tally, burden, unrecognised), encoding="utf-8")
        temp["summary.json"].write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        for name, path in temp.items():                  # all written: now they take their real names
            os.replace(path, out / name)
        return summary
    finally:
        catalog_loading.shutdown(wait=True, cancel_futures=True)
        if runner is not None:
            runner.close()
        for path in temp.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


class SurveySample:
    """The code survey over the first `limit` patients (in patient-id order). An engine either offers their lines
    here (Spark's driver), or marks them (`take`) for its workers to survey beside their findings and the rows
    are merged here, in the same order, into the same table."""

    def __init__(self, survey, limit: int) -> None:
        self.survey, self.limit, self.seen = survey, limit, 0

    def take(self) -> bool:
        """Whether the next patient, in patient-id order, is one the survey reads."""
        if self.seen < self.limit:
            self.seen += 1
            return True
        return False

    def offer(self, patient: str, lines: list[str]) -> None:
        if self.take():
            from .patients import survey_bundle
            self.survey.add_bundle(survey_bundle(lines, [orjson.loads(t) for t in lines]), patient)

    def merge(self, rows: dict) -> None:
        """One patient's rows, surveyed elsewhere, added as `offer` would have added them: a drug code already
        listed, read by its code or by its text, keeps its row and gains the patient."""
        from ..clinical.survey import BY_TEXT

        mine = self.survey.rows
        for key, row in rows.items():
            kind, system, code = key
            have = mine.get(key)
            if have is None and kind in ("Medication", BY_TEXT):
                have = mine.get(("Medication", system, code)) or mine.get((BY_TEXT, system, code))
            if have is None:
                mine[key] = row
            else:
                have.patients |= row.patients


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _encounter_key(e: tuple) -> tuple:
    return tuple("" if v is None else v for v in e)


def _parquet(csv_path: Path, parquet_path: Path) -> None:
    import duckdb

    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT * FROM read_csv('{_sql(csv_path)}', header=true, all_varchar=false)) "
                    f"TO '{_sql(parquet_path)}' (FORMAT parquet)")


def _sql(path: Path) -> str:
    return str(path).replace("'", "''")


def progress_bar(stream=sys.stderr):
    """A one-line progress display for a terminal (files read, then patients done, rate, ETA); None when not a TTY."""
    return ProgressBar(stream) if stream.isatty() else None


class ProgressBar:
    """Called with (done, total, elapsed) as patients finish; `reading` shows the load before the first patient
    (grouping by patient needs every file read first). The rate counts from the first patient."""

    def __init__(self, stream) -> None:
        self.stream, self.last, self.first = stream, 0.0, None

    def reading(self, files_done: int, files_total: int, name: str) -> None:
        self.stream.write(f"\rreading the export: {files_done:,}/{files_total:,} files ({name[:40]})\x1b[K")
        self.stream.flush()

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if self.first is None:
            self.first = (elapsed, done)
        if elapsed - self.last < 0.2 and done < total:
            return
        self.last = elapsed
        span = elapsed - self.first[0]
        rate = (done - self.first[1]) / span if span > 0 else 0.0
        eta = (total - done) / rate if rate else 0.0
        width = 30
        filled = int(width * done / total) if total else width
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} patients, "
                          f"{rate:,.0f}/s, ETA {eta:,.0f} s\x1b[K")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
