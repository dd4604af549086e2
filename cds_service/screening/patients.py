"""One patient of an export through the same engine as `cds-service evaluate`: the function every screening
engine (local worker processes, Spark executors) calls. A worker loads the catalog once."""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from datetime import date
from multiprocessing import get_context
from operator import itemgetter
from pathlib import Path

import orjson

from ..fhir.bundles import loose_resources, request_from_resources
from ..knowledge.catalog import load_catalog, reuse_validated_files, validated_files
from ..fhir.fhir_client import FhirClient
from ..fhir.record import TYPED, warm_models
from ..services import CollectBetween, ServiceRegistry, evaluation_line, keep_out_of_gc_scans
from .outputs import PatientFacts, patient_facts



@dataclass
class Screened:
    """A patient's findings line (exactly `evaluate --explain`'s) and the facts the tallies take from it."""
    patient: str
    line: bytes | None            # the findings.ndjson line, None when the evaluation failed
    facts: PatientFacts | None = None
    error: str | None = None
    survey_rows: dict | None = None   # the code survey's rows for this patient, when asked for (CodeSurvey.rows)


class PatientScreen:
    """The engine, loaded once per process, and the export's Medications for the records that reference them."""

    def __init__(self, cards_dir: str | None, as_of: date, medications: dict[str, str], catalog=None):
        self.catalog = catalog or load_catalog(cards_dir or None)
        self.services = ServiceRegistry(self.catalog, FhirClient())
        self.as_of = as_of
        self.medications = medications
        keep_out_of_gc_scans()
        self.collector = CollectBetween()      # the cyclic collector between patients, not inside one
        self._code_survey = None               # made by the first patient the code survey reads

    def __call__(self, patient: str, lines: list[str], survey: bool = False) -> Screened:
        """The patient's findings; with `survey`, also what the code survey makes of its codes (the report's
        survey reads the first patients, and their lines are parsed here once for both)."""
        with self.collector.unit():
            return self._screen(patient, lines, survey)

    def _screen(self, patient: str, lines: list[str], survey: bool = False) -> Screened:
        rows = None
        try:
            values = list(map(orjson.loads, lines))
            if survey:                           # before the engine reads them, as the survey reads a fresh parse
                rows = self._survey(patient, lines, values)
            resources = loose_resources(values)
            if self.medications:                 # the Medications this patient's orders reference, from the export
                wanted = {ref[len("Medication/"):] for r in resources if "medicationReference" in r
                          for ref in _medication_refs(r)}
                resources += loose_resources([orjson.loads(self.medications[m]) for m in sorted(wanted)
                                              if m in self.medications])
            # the request `evaluate` builds from this patient's Bundle (request_from_bundle), without the Bundle
            line = evaluation_line(self.services, request_from_resources(resources), self.as_of, True)
            person = next((r for r in resources if r.get("resourceType") == "Patient"), {})
            sex = person.get("gender") if isinstance(person.get("gender"), str) else None
            return Screened(patient, orjson.dumps(line),
                            patient_facts(line, _age(person.get("birthDate"), self.as_of), sex), survey_rows=rows)
        except Exception as exc:  # noqa: BLE001 - one patient's failure is reported, never the run's end
            message = getattr(exc, "diagnostics", None) or f"{type(exc).__name__}: {exc}"
            return Screened(patient, None, error=str(message)[:300], survey_rows=rows)

    def _survey(self, patient: str, lines: list[str], values: list) -> dict | None:
        """This patient's rows of the code survey. One survey per process (its record builder keeps what codes
        mean), emptied after each patient. A survey that fails leaves the patient's findings alone."""
        if self._code_survey is None:
            from ..clinical.survey import CodeSurvey
            self._code_survey = CodeSurvey(self.catalog, self.as_of)
        try:
            self._code_survey.add_bundle(survey_bundle(lines, values), patient)
            return self._code_survey.rows
        except Exception:  # noqa: BLE001 - the survey is a report's side table, never a reason to fail a patient
            return None
        finally:
            self._code_survey.rows = {}


def survey_bundle(lines: list[str], values: list) -> dict:
    """A patient's resources (`values`, parsed from `lines`) as the code survey reads them: in the order of their
    lines, so that a screen's survey does not depend on the order the export gave them in."""
    return {"entry": [{"resource": v} for _, v in sorted(zip(lines, values), key=itemgetter(0))]}


def _medication_refs(resource: dict) -> list[str]:
    ref = resource.get("medicationReference")
    if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].startswith("Medication/"):
        return [ref["reference"]]
    return []


def _age(birth: object, as_of: date) -> int | None:
    if not isinstance(birth, str) or len(birth) < 4 or not birth[:4].isdigit():
        return None
    try:
        born = date.fromisoformat(birth[:10]) if len(birth) >= 10 else date(int(birth[:4]), 7, 1)
    except ValueError:
        return None
    return as_of.year - born.year - ((as_of.month, as_of.day) < (born.month, born.day))


# ---- process-pool plumbing: one PatientScreen per worker process ----------------------------------
def worker_context():
    """How worker processes start. Where the platform has it, a fork server that imported the engine once: each
    worker is forked from it ready, instead of spending 1.4 s of CPU on imports on the cores that are reading the
    export. Never a plain fork of this process, whose DuckDB and catalog threads may be running. Else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload([__name__] + [f"fhir.resources.R4B.{rt.lower()}" for rt in TYPED])
    return context


class CatalogHandoff:
    """The main process parses and checks cards/ once and hands the result to the workers through a file in the
    run's work folder: each worker then builds its catalog in a tenth of a second instead of parsing the YAML and
    checking the schema again (a second or two each, on the cores that are reading the export)."""

    WAIT_SECONDS = 120.0          # past this a worker loads the catalog itself

    def __init__(self, work: Path) -> None:
        self.path = str(work / "catalog.validated")
        self.ready = worker_context().Event()          # set once the file is written, or the load failed

    def load(self, cards_dir: str | None):
        """In the main process: the catalog, its checked files left for the workers."""
        try:
            catalog = load_catalog(cards_dir or None)
            state = validated_files(cards_dir or None)
            if state is not None:
                partial = self.path + ".partial"
                with open(partial, "wb") as f:
                    f.write(state)
                os.replace(partial, self.path)
            return catalog
        finally:
            self.ready.set()

    def take(self) -> None:
        """In a worker: wait for the main process's files and reuse them (or, without them, load as usual)."""
        self.ready.wait(self.WAIT_SECONDS)
        try:
            with open(self.path, "rb") as f:
                reuse_validated_files(f.read())
        except OSError:
            pass


_SCREEN: PatientScreen | None = None
_MEDICATIONS_FILE: str | None = None


def init_worker(cards_dir: str | None, as_of: date, medications_file: str, handoff: CatalogHandoff | None = None) -> None:
    """A worker starts while the export is still being read and builds its catalog from the main process's checked
    files (`handoff`); the export's Medications (`medications_file`, JSON written once the export is read) are taken
    with its first batch."""
    global _SCREEN, _MEDICATIONS_FILE
    warm_models()                 # the fhir.resources models, imported now rather than by the first patient
    if handoff is not None:
        handoff.take()
    _SCREEN = PatientScreen(cards_dir, as_of, {})
    _MEDICATIONS_FILE = medications_file


def worker_ready() -> None:
    """A task that does nothing: submitting one per worker starts the workers (and their catalog loads) now."""


def screen_batch(batch: list[tuple[str, list[str], bool]]) -> tuple[list[Screened], int]:
    """The batch screened, and this worker's peak memory so far (for the run's summary)."""
    global _MEDICATIONS_FILE
    assert _SCREEN is not None, "init_worker was not called in this process"
    if _MEDICATIONS_FILE is not None:
        with open(_MEDICATIONS_FILE, "rb") as f:
            _SCREEN.medications = orjson.loads(f.read())
        _MEDICATIONS_FILE = None
    return [_SCREEN(patient, lines, survey) for patient, lines, survey in batch], peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program: VmHWM, which exec resets (a spawned
    worker's ru_maxrss keeps the pages it shared with its parent between fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
