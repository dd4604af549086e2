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
import sys
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


def spark_session(master: str | None, workers: int):
    """The active session (spark-submit, a notebook), else one on `master`, else `local[workers]`."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkUnavailable("the spark engine needs PySpark: pip install 'cds-secondary-osteoporosis[spark]' "
                               "(or pip install -e '.[spark]' in a checkout)") from None
    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active, False
    # executors run this interpreter's packages unless the site says otherwise
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("cds-service screen")
    if master or not os.environ.get("SPARK_HOME"):
        builder = builder.master(master or f"local[{workers}]")
    if (master or "local").startswith("local"):
        for key, value in local_conf(workers).items():
            builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - py4j: no java, a master that cannot be reached
        raise SparkUnavailable(f"Spark could not start: {str(exc).splitlines()[0][:300]}") from None
    session.sparkContext.setLogLevel("ERROR")
    return session, True


def local_conf(workers: int) -> dict[str, str]:
    """Spark settings for one machine. The JVM's work here is small beside the Python engine's (it shuffles and
    sorts text), so the settings favour a quick start: the C1 compiler only, no whole-stage code generation, no
    adaptive re-planning (a 13-patient run: 29 s -> 18 s; 1,000 patients: the same either way)."""
    return {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": str(max(2, workers * 4)),
            "spark.driver.memory": os.environ.get("CDS_SPARK_DRIVER_MEMORY", "2g"),
            "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1",
            "spark.sql.codegen.wholeStage": "false", "spark.sql.adaptive.enabled": "false"}


class SparkEngine:
    name = "spark"

    def __init__(self, files: list[ExportFile], work: Path, as_of: date, workers: int, cards_dir: str | None,
                 master: str | None = None) -> None:
        self.files, self.as_of, self.workers = files, as_of, workers
        self.cards_dir = str(Path(cards_dir).resolve()) if cards_dir else None
        self.spark, self._owned = spark_session(master, workers)
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
