"""The distributed engine: Apache Spark reads the export, groups it by patient and runs the same per-patient
function as the embedded engine (`patients.PatientScreen`) on its executors.

    files --mapInArrow(read_export_file)--> rows (persisted) --repartition(pid), sort--> mapInArrow(PatientScreen)

Only the DataFrame API is used (`mapInArrow`, no RDDs), so it runs under `spark-submit` on YARN, Kubernetes or a
standalone cluster, and through Spark Connect (Databricks). The export's files must be readable by every executor
at the path the driver names (a shared mount: /dbfs/..., EFS, NFS), and every node needs this package installed
(`pip install '.[spark]'`, a cluster library, a bootstrap action or the container image). The findings reach the
driver sorted by patient, so `findings.ndjson` is byte-for-byte what the embedded engine writes (bar uuids)."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Iterator

from .export import ExportFile
from .outputs import burden_window
from .partition import LoadReport, reads_type, unread_codes
from .reader import lines_before
from .patients import Screened

ROWS_SCHEMA = ("kind string, file string, line_no long, rt string, pid string, text string, concept string, "
               "start long")
RANGE_BYTES = 32 * 1024 * 1024     # an uncompressed file is read in ranges of this size, one task each
OUT_SCHEMA = "patient string, line binary, facts binary, error string"
OUT_BATCH = 16                 # screened patients per Arrow batch back from an executor


class SparkUnavailable(ValueError):
    """`--engine spark` without PySpark installed (the optional extra) or without a Java runtime."""


class SparkFailed(ValueError):
    """A Spark job failed (an executor lost or out of memory, the cluster gone): one line, and no output written."""


@contextmanager
def _jobs():
    """Spark's errors (Py4J, PySpark) as one SparkFailed line; the screen's own errors pass as they are."""
    try:
        yield
    except SparkUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - narrowed by the module the error comes from
        if not type(exc).__module__.startswith(("py4j", "pyspark")):
            raise
        first = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        raise SparkFailed(f"a Spark job failed: {first[:300]}") from None


def spark_session(master: str | None, workers: int, record_classes: bool = False):
    """The active session (spark-submit, a notebook), else one on `master`, else `local[workers]`; and, for a local
    session this call started from the pip-installed PySpark, the `ClassArchive` it starts from or (with
    `record_classes`) records (None otherwise)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkUnavailable("the spark engine needs PySpark: pip install 'cds-secondary-osteoporosis[spark]' "
                               "(or pip install -e '.[spark]' in a checkout)") from None
    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active, False, None
    # executors run this interpreter's packages unless the site says otherwise
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    local = (master or "local").startswith("local")
    archive = ClassArchive.for_this_machine(record_classes) if local and not os.environ.get("SPARK_HOME") else None
    try:
        session = _start(SparkSession, master, workers, local, archive)
    except SparkUnavailable:
        if archive is None or archive.recording:
            raise
        archive.discard()           # an archive the JVM cannot map stops it at start: removed, and started without
        archive = None
        session = _start(SparkSession, master, workers, local, None)
    session.sparkContext.setLogLevel("ERROR")
    return session, True, archive


def _start(session_class, master: str | None, workers: int, local: bool, archive: "ClassArchive | None"):
    builder = session_class.builder.appName("cds-service screen")
    if master or not os.environ.get("SPARK_HOME"):
        builder = builder.master(master or f"local[{workers}]")
    if local:
        for key, value in local_conf(workers, archive).items():
            builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - py4j: no java, a master that cannot be reached, a JVM that crashed
        raise SparkUnavailable(f"Spark could not start: {str(exc).splitlines()[0][:300]}") from None


def local_conf(workers: int, archive: "ClassArchive | None" = None) -> dict[str, str]:
    """Spark settings for one machine. The JVM's work here is small beside the Python engine's (it shuffles and
    sorts text), so the settings favour a quick start: the C1 compiler only, no whole-stage code generation, no
    adaptive re-planning (a 13-patient run: 29 s -> 18 s; 1,000 patients: the same either way), the classes
    of an earlier run from `archive` (`ClassArchive`), and the export's rows cached uncompressed: compressing 550 MB
    of resource text took longer than the cache saves on one machine (3,000 synthetic patients: the read and cache
    14.4 -> 11.7 s; 10,000: 77.3 -> 72.9 s in all)."""
    java = "-XX:TieredStopAtLevel=1" + (" " + archive.java_options() if archive is not None else "")
    return {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": str(max(2, workers * 4)),
            "spark.driver.memory": os.environ.get("CDS_SPARK_DRIVER_MEMORY", "2g"),
            "spark.driver.extraJavaOptions": java,
            "spark.sql.codegen.wholeStage": "false", "spark.sql.adaptive.enabled": "false",
            "spark.sql.inMemoryColumnarStorage.compressed": "false"}


class ClassArchive:
    """The classes a local Spark run loads, kept in a HotSpot class-data-sharing archive (AppCDS) on this machine: a
    JVM started from it maps them instead of reading and verifying some ten thousand classes from Spark's jars.
    Measured on 2 cores: the session starts in 4.6 s instead of 9.6 s, and its first job takes 1.9 s instead of
    4.7 s (1,000 patients: 36.0 / 32.7 s against 41.5 / 44.7 s). It is recorded once per machine (and after a Java
    or PySpark upgrade) by `cds-service spark-classes`, a training run of its own: a JVM that records runs slower
    (a 1,000-patient screen took 72 s instead of 40), so a real screen never does. The archive takes its name only
    once that JVM has exited cleanly, and is used only at the size it was written, because a JVM given a cut-off
    archive crashes at start; one that crashes it anyway is removed, and Spark started without it (`spark_session`).

    Kept in `CDS_SPARK_CLASS_CACHE` (default `$XDG_CACHE_HOME/cds-service`, else `~/.cache/cds-service`), one file
    per Java runtime and PySpark installation; `CDS_SPARK_CLASS_CACHE=off` leaves it unused."""

    STALE_SECONDS = 3600          # a recording left by a training run that was stopped: removed by the next one

    def __init__(self, path: Path, recording: bool = False) -> None:
        self.path = path
        self.recording = recording
        self.partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")

    @classmethod
    def for_this_machine(cls, record: bool = False) -> "ClassArchive | None":
        """This machine's archive when there is one to start from; with `record`, one to record (None when the
        cache is off or cannot be written, or no Java runtime is found)."""
        folder = class_cache_folder()
        key = _runtime_key()
        if folder is None or key is None:
            return None
        archive = cls(folder / f"spark-classes-{key}.jsa", recording=record)
        if not record:
            return archive if archive.whole() else None
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        if not os.access(folder, os.W_OK):
            return None
        archive._remove_stale()
        return archive

    def java_options(self) -> str:
        # -Xlog: a JVM that cannot use the archive (another runtime's, say) says so on its console: kept quiet
        target = f"-XX:ArchiveClassesAtExit={self.partial}" if self.recording else f"-XX:SharedArchiveFile={self.path}"
        return f"{target} -Xlog:cds*=off"

    def finish(self, timeout: float = 120.0) -> bool:
        """After a recording run's session has stopped: end its JVM (which writes the archive as it exits), wait for
        it, and put the archive in place. Returns whether it is now there. Resets PySpark's gateway, so a later
        session in this process starts a new JVM, from the archive."""
        from pyspark import SparkContext

        gateway = SparkContext._gateway
        proc = getattr(gateway, "proc", None)
        if gateway is None or proc is None:
            return False
        try:
            gateway.shutdown()
        except Exception:  # noqa: BLE001 - py4j: the JVM is going anyway
            pass
        SparkContext._gateway = None
        SparkContext._jvm = None
        try:
            if proc.stdin is not None:
                proc.stdin.close()              # the gateway JVM exits at the end of its input
            clean = proc.wait(timeout=timeout) == 0
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            clean = False
        if clean and self.partial.is_file() and self.partial.stat().st_size > 0:
            self._size_file().write_text(str(self.partial.stat().st_size))
            os.replace(self.partial, self.path)
            return True
        self.partial.unlink(missing_ok=True)
        return False

    def whole(self) -> bool:
        """Whether the archive is there at the size its recording wrote: a copy cut short, or one written by some
        other means, is never handed to a JVM (it would crash at start)."""
        try:
            return self.path.stat().st_size == int(self._size_file().read_text())
        except (OSError, ValueError):
            return False

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def _size_file(self) -> Path:
        return self.path.with_name(self.path.name + ".size")

    def _remove_stale(self) -> None:
        cutoff = time.time() - self.STALE_SECONDS
        for old in self.path.parent.glob(f"{self.path.name}.*.partial"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass


def class_cache_folder() -> Path | None:
    """Where `ClassArchive` keeps its archives; None with CDS_SPARK_CLASS_CACHE=off."""
    setting = os.environ.get("CDS_SPARK_CLASS_CACHE", "")
    if setting.lower() in ("off", "false", "0", "no"):
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cds-service"


def _runtime_key() -> str | None:
    """Which Java runtime and which PySpark jars an archive was made from (a JVM refuses, or crashes on, another's):
    None when no Java runtime is found (Spark then fails to start with its own message)."""
    import hashlib

    import pyspark

    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.path.exists(java):
        return None
    java = os.path.realpath(java)
    st = os.stat(java)
    jars = Path(pyspark.__file__).resolve().parent / "jars"
    memory = os.environ.get("CDS_SPARK_DRIVER_MEMORY", "2g")          # the heap's size shapes the archive too
    identity = f"{java}|{st.st_size}|{st.st_mtime_ns}|{jars}|{pyspark.__version__}|{memory}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class SparkEngine:
    name = "spark"

    def __init__(self, files: list[ExportFile], work: Path, as_of: date, workers: int, cards_dir: str | None,
                 master: str | None = None, record_classes: bool = False) -> None:
        self.files, self.as_of, self.workers = files, as_of, workers
        self.cards_dir = str(Path(cards_dir).resolve()) if cards_dir else None
        self.spark, self._owned, self.class_archive = spark_session(master, workers, record_classes)
        self._finished = False
        self.rows = None
        self.medications: dict[str, str] = {}
        self._encounters: list[tuple[str, str | None, str | None]] = []
        self._patients = 0
        self._partitions = max(2, int(self.spark.conf.get("spark.sql.shuffle.partitions", "8")))

    # ---- load: every file read once on the executors, the rows kept for the passes that follow --------
    def load(self, on_file=None) -> LoadReport:
        if on_file:
            on_file(0, len(self.files), "on Spark")
        with _jobs():
            return self._load()

    def _load(self) -> LoadReport:
        from pyspark import StorageLevel

        listing = [(f.type, str(f.path.resolve()), start, end) for f in self.files for start, end in _ranges(f)]
        files = self.spark.createDataFrame(listing, "type string, path string, start long, end long") \
            .repartition(len(listing))
        self.rows = files.mapInArrow(_read_files, ROWS_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
        report = LoadReport(input_bytes=sum(f.path.stat().st_size for f in self.files))
        report.filtered_bytes = sum(f.path.stat().st_size for f in self.files if reads_type(f.type))
        # one pass for what is not a patient's resource; of the openings only the burden's window comes back
        since, upto = burden_window(self.as_of)
        quality = self.rows.filter(f"kind IN ('bad', 'skipped', 'nopatient', 'med') OR (kind = 'enc' AND "
                                   f"substr(text, 1, 10) > '{since}' AND substr(text, 1, 10) <= '{upto}')")
        bases: dict[tuple[str, int], int] = {}   # lines before a range's start, counted once per range
        for r in quality.collect():
            if r.kind == "bad":                 # numbered from its range's first line: now from the file's
                if r.start and (r.file, r.start) not in bases:
                    bases[r.file, r.start] = lines_before(r.file, r.start)
                line = r.line_no + (bases[r.file, r.start] if r.start else 0)
                report.malformed_lines.append({"file": r.file, "line": line, "error": r.text})
            elif r.kind == "skipped":
                report.skipped_types[r.rt] += r.line_no
            elif r.kind == "nopatient":
                report.resources_without_patient[r.rt] += 1
            elif r.kind == "med":
                if r.pid:
                    self.medications[r.pid] = r.text
            else:
                self._encounters.append((r.pid, r.text, r.rt))
        counts = self.rows.filter("kind = 'res'").selectExpr("count(*) AS n", "count(DISTINCT pid) AS p").first()
        no_patient = sum(n for rt, n in report.resources_without_patient.items() if rt != "Encounter")
        report.resources = counts.n + no_patient
        self._patients = counts.p
        return report

    def patient_count(self) -> int:
        return self._patients

    def results(self, survey, catalog) -> Iterator[list[Screened]]:
        """The screened patients in patient-id order: evaluated in parallel on the executors and kept there, then
        streamed to the driver through a sort (never all of them in the driver's memory)."""
        with _jobs():
            yield from self._results(survey, catalog)

    def _resources_read(self, catalog):
        """The resource rows without the results no rule reads (as the embedded engine's load leaves them out: each
        distinct code decided once, here, by the engine's own test). The code survey reads `self.rows`, all of them."""
        from pyspark.sql.functions import broadcast

        codes = [r.concept for r in self.rows.filter("kind = 'res' AND concept IS NOT NULL").select("concept")
                 .distinct().collect()]
        resources = self.rows.filter("kind = 'res'")
        unread = unread_codes(codes, catalog)
        if not unread:
            return resources
        left_out = self.spark.createDataFrame([(c,) for c in unread], "concept string")
        return resources.join(broadcast(left_out), "concept", "left_anti")

    def _results(self, survey, catalog) -> Iterator[list[Screened]]:
        from pyspark import StorageLevel

        screen = _PartitionScreen(self.cards_dir, self.as_of, self.medications)
        screened = (self._resources_read(catalog).select("pid", "text")
                    .repartition(self._partitions, "pid").sortWithinPartitions("pid")
                    .mapInArrow(screen, OUT_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK))
        try:
            screened.count()                                # the evaluation itself, on every executor at once
            batch: list[Screened] = []
            first: list[str] = []                            # the survey's patients: the first by id
            for r in screened.orderBy("patient").toLocalIterator(prefetchPartitions=True):
                facts = pickle.loads(r.facts) if r.facts is not None else None
                batch.append(Screened(r.patient, bytes(r.line) if r.line is not None else None, facts, r.error))
                if len(first) < survey.limit:
                    first.append(r.patient)
                if len(batch) >= 256:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            screened.unpersist()
        self._offer_survey(survey, first)
        self._finished = True

    def _offer_survey(self, survey, first: list[str]) -> None:
        from pyspark.sql.functions import col

        texts: dict[str, list[str]] = {pid: [] for pid in first}
        for r in self.rows.filter(col("pid").isin(first) & (col("kind") == "res")).select("pid", "text").collect():
            texts[r.pid].append(r.text)
        for pid in first:
            survey.offer(pid, texts[pid])

    def encounters(self) -> list[tuple[str, str | None, str | None]]:
        return self._encounters

    def close(self) -> None:
        if self.rows is not None:
            self.rows.unpersist()
        if self._owned:
            self.spark.stop()
            # a training run that got to its end ends its JVM now, so that the archive is complete before it takes
            # its name (a stopped run's recording is never used)
            if self.class_archive is not None and self.class_archive.recording and self._finished:
                self.class_archive.finish()


def record_class_archive(workers: int = 2) -> Path:
    """`cds-service spark-classes`: a training screen of a small generated export on local Spark (every kind of job a
    screen runs: the reader, gzip, the quality pass, the shuffle, the evaluation, the sorted results), recording the
    classes it loads into this machine's `ClassArchive`. Returns the archive's path; SparkUnavailable when it could
    not be recorded."""
    import tempfile

    from ..clinical.survey import CodeSurvey
    from ..knowledge.catalog import load_catalog
    from . import SURVEY_PATIENTS, SurveySample
    from .export import export_files

    if class_cache_folder() is None:
        raise SparkUnavailable("CDS_SPARK_CLASS_CACHE is off: no class archive to record")
    as_of = date.today()
    with tempfile.TemporaryDirectory(prefix="cds-spark-classes-") as tmp:
        export = Path(tmp) / "export"
        _training_export(export, as_of)
        engine = SparkEngine(export_files(export), Path(tmp), as_of, workers, None, record_classes=True)
        try:
            if engine.class_archive is None or not engine.class_archive.recording:
                raise SparkUnavailable("the class archive is recorded by a local Spark session of its own (no "
                                       "SPARK_HOME, no session already running, a cache folder that can be written)")
            archive = engine.class_archive
            engine.load()
            catalog = load_catalog()
            for _ in engine.results(SurveySample(CodeSurvey(catalog, as_of), SURVEY_PATIENTS), catalog):
                pass
        finally:
            engine.close()
    if not archive.path.is_file():
        raise SparkUnavailable("the JVM did not write the class archive as it exited")
    return archive.path


def _training_export(folder: Path, as_of: date, patients: int = 24) -> None:
    """A small export with what a real one holds: results, conditions, medications (one by reference), encounters,
    a gzip file, a line that is not JSON and a type the screen does not read."""
    import gzip
    import json
    from datetime import timedelta

    folder.mkdir(parents=True)
    day = (as_of - timedelta(days=100)).isoformat()
    rows: dict[str, list[dict]] = {t: [] for t in ("Patient", "Condition", "Observation", "MedicationRequest",
                                                   "Encounter", "Medication", "Device")}
    rows["Medication"].append({"resourceType": "Medication", "id": "pred", "code": {"coding": [
        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "312617"}]}})
    for i in range(patients):
        pid, ref = f"training-{i:03d}", {"reference": f"Patient/training-{i:03d}"}
        rows["Patient"].append({"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1950-03-01"})
        rows["Condition"].append({"resourceType": "Condition", "id": f"c{i}", "subject": ref, "onsetDateTime": day,
                                  "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                                       "code": "M06.9"}]}})
        for n, (code, value) in enumerate((("3016-3", 0.05), ("17861-6", 10.9), ("8867-4", 70))):
            rows["Observation"].append({"resourceType": "Observation", "id": f"o{i}-{n}", "status": "final",
                                        "subject": ref, "effectiveDateTime": day,
                                        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                                        "valueQuantity": {"value": value}})
        rows["MedicationRequest"].append({"resourceType": "MedicationRequest", "id": f"m{i}", "status": "active",
                                          "intent": "order", "subject": ref, "authoredOn": day,
                                          "medicationReference": {"reference": "Medication/pred"}})
        rows["Encounter"].append({"resourceType": "Encounter", "id": f"e{i}", "subject": ref,
                                  "period": {"start": day}})
        rows["Device"].append({"resourceType": "Device", "id": f"d{i}", "patient": ref})
    for rt, resources in rows.items():
        text = "".join(json.dumps(r) + "\n" for r in resources)
        if rt == "Observation":
            text += "{not json\n"
        if rt == "Condition":
            with gzip.open(folder / f"{rt}.000.ndjson.gz", "wt", encoding="utf-8") as out:
                out.write(text)
        else:
            (folder / f"{rt}.000.ndjson").write_text(text, encoding="utf-8")


def _ranges(f: ExportFile) -> list[tuple[int, int | None]]:
    """Byte ranges of a file for separate tasks; a gzip stream is one (it cannot be entered midway)."""
    size = f.path.stat().st_size
    if f.compressed or size <= RANGE_BYTES:
        return [(0, None)]
    starts = list(range(0, size, RANGE_BYTES))
    return [(s, e) for s, e in zip(starts, starts[1:] + [None])]


# ---- what runs on the executors (pickled with its arguments; imports happen there) -----------------------
def _read_files(batches):
    import pyarrow as pa

    from .reader import read_export_file

    schema = pa.schema([("kind", pa.string()), ("file", pa.string()), ("line_no", pa.int64()), ("rt", pa.string()),
                        ("pid", pa.string()), ("text", pa.string()), ("concept", pa.string()), ("start", pa.int64())])
    for batch in batches:
        for file_type, path, start, end in zip(*(batch.column(c).to_pylist() for c in ("type", "path", "start", "end"))):
            rows: list = []
            for row in read_export_file(file_type, path, start, end):
                rows.append((*row, start))
                if len(rows) >= 4096:
                    yield _record_batch(list(zip(*rows)), schema)
                    rows = []
            if rows:
                yield _record_batch(list(zip(*rows)), schema)


def _record_batch(columns: list, schema):
    """Python columns as one Arrow batch of `schema` (the types Spark was promised, not the ones Arrow infers)."""
    import pyarrow as pa
    return pa.RecordBatch.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)], schema=schema)


class _PartitionScreen:
    """The per-patient function over one sorted partition: a patient's lines arrive together (possibly across
    Arrow batches) and are evaluated by the executor's PatientScreen, made once per Python worker."""

    def __init__(self, cards_dir: str | None, as_of: date, medications: dict[str, str]) -> None:
        from ..knowledge.catalog import validated_files

        self.cards_dir, self.as_of, self.medications = cards_dir, as_of, medications
        # the driver's checked cards/ travel with the function: an executor whose files are the same (same path,
        # size and time: local mode, one image) builds its catalog from them instead of parsing them again
        self.validated = validated_files(cards_dir)

    def __call__(self, batches):
        import pyarrow as pa

        screen = _worker_screen(self.cards_dir, self.as_of, self.medications, self.validated)
        schema = pa.schema([("patient", pa.string()), ("line", pa.binary()), ("facts", pa.binary()),
                            ("error", pa.string())])
        out: list[Screened] = []

        def flush():
            return _record_batch([[s.patient for s in out], [s.line for s in out],
                                  [pickle.dumps(s.facts) if s.facts is not None else None for s in out],
                                  [s.error for s in out]], schema)

        current, lines = None, []
        for batch in batches:
            for pid, text in zip(batch.column("pid").to_pylist(), batch.column("text").to_pylist()):
                if pid != current:
                    if current is not None:
                        out.append(screen(current, lines))
                        if len(out) >= OUT_BATCH:
                            yield flush()
                            out = []
                    current, lines = pid, []
                lines.append(text)
        if current is not None:
            out.append(screen(current, lines))
        if out:
            yield flush()


_WORKER: tuple | None = None


def _worker_screen(cards_dir, as_of, medications, validated: bytes | None = None):
    """One PatientScreen per executor Python worker (Spark reuses its workers): the catalog loads once."""
    from ..knowledge.catalog import reuse_validated_files
    from .patients import PatientScreen

    global _WORKER
    key = (cards_dir, as_of, len(medications), hash(frozenset(medications)))
    if _WORKER is None or _WORKER[0] != key:
        if validated is not None:
            reuse_validated_files(validated)
        _WORKER = (key, PatientScreen(cards_dir, as_of, medications))
    return _WORKER[1]
