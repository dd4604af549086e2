"""Group a Bulk Data export by patient with DuckDB: it reads NDJSON and gzip in C++, keeps only the types the
engine reads, extracts each resource's patient (the Patient compartment: `subject`, `patient`, `beneficiary`), and
sorts by patient with spill to disk, so memory stays flat whatever the export's size. The rows come back in
patient order, one patient's resources together: the caller never holds more than a batch."""
from __future__ import annotations

import gzip
import os
import threading
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import orjson

from .export import ExportFile

# what the engine reads (bundles.PREFETCH_KEY and the Patient), and what the screen reads beside it
ENGINE_TYPES = ("Patient", "Condition", "Procedure", "Observation", "MedicationRequest", "MedicationStatement",
                "MedicationAdministration", "MedicationDispense")
SIDE_TYPES = ("Medication", "Encounter")


def reads_type(resource_type: str) -> bool:
    """Whether the screen reads a file of this type (the others are only counted)."""
    return resource_type in ENGINE_TYPES or resource_type in SIDE_TYPES

MAX_LINE_BYTES = 64 * 1024 * 1024        # a resource larger than this is reported as a malformed line
_COUNT_READ_BYTES = 4 * 1024 * 1024      # the line counter's read size

_LINES = ("read_csv(?, columns={'line': 'VARCHAR'}, delim=chr(1), quote='', escape='', header=false, "
          "auto_detect=false, strict_mode=false, null_padding=true, max_line_size=" + str(MAX_LINE_BYTES) + ", buffer_size=" + str(2 * MAX_LINE_BYTES) + ")")
# one JSON parse a line for its type and its patient: [resourceType, subject, patient, beneficiary, id]; NULL when
# the line is not JSON (TRY, row by row), so it is counted as malformed. A separate validation (json_valid or
# try_cast AS JSON) parsed every line twice: 1.21 s against 0.76 s on 725 MB of Synthea Observations
_FIELDS = ("TRY(json_extract_string(line, ['$.resourceType', '$.subject.reference', "
           "'$.patient.reference', '$.beneficiary.reference', '$.id', '$.code']))")
# a result's code, kept to leave out, before they are parsed, the results no rule reads (most of a chart's)
_CONCEPT = "CASE WHEN f[1] = 'Observation' THEN f[6] END"
# the reference's patient: the usual "Patient/<id>" sliced, anything else through the pattern (the same answer: on
# 550 MB, 0.15 s of a 1.75 s load)
_PATIENT = ("CASE WHEN f[1] IS NULL THEN NULL WHEN f[1] = 'Patient' THEN f[5] "
            "WHEN starts_with(r, 'Patient/') AND NOT contains(substr(r, 9), '/') THEN nullif(substr(r, 9), '') "
            "ELSE nullif(regexp_extract(r, '(?:^|/)Patient/([^/]+)$', 1), '') END")


@dataclass
class LoadReport:
    """What the load found besides patients: every line that could not be read, with file and 1-based line."""
    malformed_lines: list[dict] = field(default_factory=list)
    resources_without_patient: Counter = field(default_factory=Counter)
    skipped_types: Counter = field(default_factory=Counter)
    resources: int = 0
    input_bytes: int = 0
    filtered_bytes: int = 0


class ExportGroups:
    """The export loaded into a DuckDB database under `workdir` (deleted with it), grouped by patient."""

    def __init__(self, files: list[ExportFile], workdir: Path, memory_limit: str = "1GB", threads: int | None = None):
        import duckdb

        self.workdir = workdir
        # An in-memory database whose blocks spill to `workdir` past the memory limit: a scratch table needs no
        # write-ahead log or checkpoint, and a database file doubled the load's time (200 Synthea-sized patients:
        # 10.1 s on disk, 5.3 s in memory, 5.1 s in memory with a 300 MB limit and 319 MB spilled)
        self.con = duckdb.connect(":memory:")
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET temp_directory = '{workdir / 'spill'}'")
        self.con.execute("SET preserve_insertion_order = false")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")
        self.con.execute("CREATE TABLE res (file VARCHAR, rt VARCHAR, pid VARCHAR, line VARCHAR, concept VARCHAR)")
        self.con.execute("CREATE TABLE unread (concept VARCHAR)")
        self._read_all_up_to: str | None = None     # patients up to this id keep their unread results
        self._behind: list[_QueryBehind] = []        # the ranges' queries, once `patients` starts
        self.con.execute("CREATE TABLE bad (file VARCHAR, n BIGINT)")
        self.con.execute("CREATE TABLE enc (pid VARCHAR, start VARCHAR, location VARCHAR)")
        self.files = files
        self.report = LoadReport()

    # ---- load ------------------------------------------------------------------------------------
    def load(self, on_file=None) -> LoadReport:
        """Every file into the database; `on_file(done, total, name)` before each (for a progress display).

        Files of types no rule reads are counted in a thread meanwhile: DuckDB's inserts leave the GIL and part of
        the cores free, and counting them first, in turn, left DuckDB idle (Synthea exports: a third of the bytes,
        1.3 s of a 6.7 s load)."""
        counting = ThreadPoolExecutor(1, thread_name_prefix="count-lines")
        try:
            counts = self._load_files(on_file, counting)
            for f, future in counts:                        # in the export's order
                n, damage = future.result()
                self.report.skipped_types[f.type] += n
                self.report.malformed_lines += damage
        finally:
            counting.shutdown(wait=True, cancel_futures=True)
        self.con.execute("INSERT INTO bad SELECT file, count(*) FROM res WHERE rt IS NULL GROUP BY file")
        for file, _n in self.con.execute("SELECT file, n FROM bad ORDER BY file").fetchall():
            self.report.malformed_lines += _malformed_lines(Path(file))
        self.con.execute("DELETE FROM res WHERE rt IS NULL")
        for rt, n in self.con.execute("SELECT rt, count(*) FROM res WHERE pid IS NULL AND rt NOT IN ('Medication') "
                                      "GROUP BY rt ORDER BY rt").fetchall():
            self.report.resources_without_patient[rt] = n
        self._take_encounters("", [])                  # any an export put in a file of another type
        self.con.execute("DELETE FROM res WHERE rt = 'Encounter'")
        self.report.resources = self.con.execute("SELECT count(*) FROM res WHERE rt <> 'Medication'").fetchone()[0]
        return self.report

    def _load_files(self, on_file, counting: ThreadPoolExecutor) -> list:
        """The files the engine reads inserted, in order; the others handed to `counting`: [(file, future)]."""
        counts = []
        for i, f in enumerate(self.files):
            if on_file:
                on_file(i, len(self.files), f.path.name)
            self.report.input_bytes += f.path.stat().st_size
            if not reads_type(f.type):
                counts.append((f, counting.submit(_count_lines, f)))
                continue
            self.report.filtered_bytes += f.path.stat().st_size
            try:
                self._insert(f.path, f.path)
            except Exception:  # noqa: BLE001 - duckdb: a damaged .gz, an oversize line; the statement rolled back
                try:
                    self._insert(f.path, self._rescue(f))
                except Exception as exc:  # noqa: BLE001 - what even the rescue cannot read: reported, never fatal
                    self.report.malformed_lines.append(
                        {"file": str(f.path), "line": 1, "error": f"file unreadable: {str(exc)[:200]}"})
            if f.type == "Encounter":                  # its openings taken now, while its rows are in memory
                self._take_encounters("file = ? AND ", [str(f.path)])
        return counts

    def _take_encounters(self, where: str, params: list) -> None:
        """Encounters with a patient become openings (the alert burden's denominator) and leave the resources.
        Taken file by file as each Encounter file is read: one pass over the whole table at the end read back
        every spilled line (3 s of a 10 s load on 500 Synthea-sized patients)."""
        self.con.execute(
            "INSERT INTO enc SELECT pid, coalesce(json_extract_string(line, '$.period.start'), "
            "json_extract_string(line, '$.actualPeriod.start')), coalesce(json_extract_string(line, "
            "'$.location[0].location.display'), json_extract_string(line, '$.serviceProvider.display')) "
            f"FROM res WHERE {where}rt = 'Encounter' AND pid IS NOT NULL", params)
        self.con.execute(f"DELETE FROM res WHERE {where}rt = 'Encounter' AND pid IS NOT NULL", params)

    def _insert(self, name: Path, source: Path) -> None:
        self.con.execute(
            f"INSERT INTO res SELECT ?, f[1], {_PATIENT}, line, {_CONCEPT} FROM (SELECT line, f, "
            f"coalesce(f[2], f[3], f[4]) AS r FROM (SELECT line, {_FIELDS} AS f FROM {_LINES} WHERE trim(line) <> ''))",
            [str(name), str(source)])

    def _rescue(self, f: ExportFile) -> Path:
        """For a truncated or corrupt .gz, the lines before the damage (the damage reported with its line)."""
        rescued = self.workdir / f"rescued-{len(os.listdir(self.workdir))}.ndjson"
        n = 0
        with open(rescued, "wb") as out:
            try:
                with (gzip.open if f.compressed else open)(f.path, "rb") as src:
                    for n, raw in enumerate(src, 1):
                        if len(raw) > MAX_LINE_BYTES:
                            self.report.malformed_lines.append(
                                {"file": str(f.path), "line": n, "error": f"line over {MAX_LINE_BYTES:,} bytes"})
                            out.write(b"\n")                 # keeps the line count; an empty line is skipped
                        elif raw.endswith(b"\n"):
                            out.write(raw)
                        elif f.compressed:                   # the last line, cut off mid-resource
                            self.report.malformed_lines.append(
                                {"file": str(f.path), "line": n, "error": "line cut off: the gzip stream ends inside it"})
                        else:
                            out.write(raw + b"\n")
            except (EOFError, OSError, zlib.error) as exc:
                self.report.malformed_lines.append(
                    {"file": str(f.path), "line": n + 1, "error": f"gzip stream unreadable from here: {exc}"})
        return rescued

    # ---- read back -------------------------------------------------------------------------------
    def medications(self) -> dict[str, str]:
        """Medication resources by id, for the records that reference them."""
        rows = self.con.execute("SELECT json_extract_string(line, '$.id'), line FROM res WHERE rt = 'Medication'")
        return {mid: line for mid, line in rows.fetchall() if mid}

    def encounters(self, since: str, upto: str) -> list[tuple[str, str | None, str | None]]:
        """The openings that started after `since`, up to `upto` (ISO dates): the alert burden's window."""
        return self.con.execute("SELECT pid, start, location FROM enc WHERE substr(start, 1, 10) > ? "
                                "AND substr(start, 1, 10) <= ?", [since, upto]).fetchall()

    def patient_count(self) -> int:
        return self.con.execute("SELECT count(DISTINCT pid) FROM res WHERE pid IS NOT NULL "
                                "AND rt <> 'Medication'").fetchone()[0]

    def leave_out_unread(self, catalog, except_first: int = 0) -> int:
        """From now on `patients()` leaves out the results whose code no rule of `catalog` reads, except for the
        first `except_first` patients (the code survey reads all of theirs). Returns how many codes are left out.
        On a Synthea chart three results in four are vital signs and panels no rule reads: parsing them was most of
        a worker's time."""
        unread = unread_codes((text for (text,) in self.con.execute(
            "SELECT DISTINCT concept FROM res WHERE concept IS NOT NULL").fetchall()), catalog)
        self.con.execute("DELETE FROM unread")
        self.con.execute("INSERT INTO unread SELECT unnest(?::VARCHAR[])", [unread])
        self._read_all_up_to = None
        if except_first > 0:
            at = self._patient_ids(except_first, 1)
            self._read_all_up_to = at[0] if at else self.con.execute(         # fewer patients: all keep every result
                "SELECT max(pid) FROM res WHERE rt <> 'Medication'").fetchone()[0]
        return len(unread)

    def patients(self, batch_rows: int = 20_000) -> Iterator[tuple[str, list[str]]]:
        """(patient id, that patient's resource lines), in patient-id order, streamed in batches; without the results
        `leave_out_unread` left out.

        The patients are read in ranges of patient ids, each by a query of its own that DuckDB runs in a thread
        (without the GIL) while the range before it is read:
        - the first `FIRST_PATIENTS` alone, so the first findings do not wait for the sort of the rest, which spills
          once the export outgrows the memory limit (10,000 synthetic patients: 4.7 s between the load and the
          first patient);
        - the rest in one range, or in `SPILL_RANGES` when the loaded rows outgrow 1 GiB: a sort's spill is
          about the size of what it sorts, and beside the spilled table one sort of everything took the temporary
          disk to 1.8x the input (100,000 patients); a range's sort takes a fifth, for one more scan of the table."""
        kept = ("pid IS NOT NULL AND rt <> 'Medication' AND "
                "(concept IS NULL OR pid <= ? OR concept NOT IN (SELECT concept FROM unread))")
        bounds = self._range_bounds()
        queries = []
        for lo, hi in zip([None] + bounds, bounds + [None]):
            where = (" AND pid > ?" if lo is not None else "") + (" AND pid <= ?" if hi is not None else "")
            queries.append((f"SELECT pid, line FROM res WHERE {kept}{where} ORDER BY pid",
                            [self._read_all_up_to] + [b for b in (lo, hi) if b is not None]))
        self._behind = [_QueryBehind(self.con.cursor(), *q) for q in queries[:2]]
        try:
            for n in range(len(queries)):
                if 1 <= n < len(queries) - 1:               # the next range sorts while this one is read
                    self._behind.append(_QueryBehind(self.con.cursor(), *queries[n + 1]))
                yield from _grouped(self._behind[n].result(), batch_rows)
                self._behind[n].close()
        finally:
            for query in self._behind:
                query.close()

    def _range_bounds(self) -> list[str]:
        """The last patient id of each range but the last (`patients`): [] for an export of `FIRST_PATIENTS` or
        fewer."""
        first = self._nth_patient(FIRST_PATIENTS)
        if first is None:
            return []
        if self._table_bytes() <= SORT_IN_MEMORY_BYTES:
            return [first]
        cuts = [round(i / SPILL_RANGES, 6) for i in range(1, SPILL_RANGES)]
        rest = self.con.execute(f"SELECT quantile_disc(pid, {cuts}) FROM (SELECT DISTINCT pid FROM res WHERE "
                                "pid > ? AND rt <> 'Medication')", [first]).fetchone()[0] or []
        return [first] + sorted(set(rest))

    def _table_bytes(self) -> int:
        """What the loaded rows take, in memory and spilled: the decompressed text, whatever the files' compression
        (a gzip export takes five to ten times its size here)."""
        used, spilled = self.con.execute("SELECT sum(memory_usage_bytes), sum(temporary_storage_bytes) "
                                         "FROM duckdb_memory()").fetchone()
        return int(used or 0) + int(spilled or 0)

    def _nth_patient(self, n: int) -> str | None:
        """The n-th patient id in order; None when the export has no more than n patients."""
        ids = self._patient_ids(n, 2)
        return ids[0] if len(ids) == 2 else None

    def _patient_ids(self, n: int, count: int) -> list[str]:
        """Up to `count` patient ids in order, from the n-th (1-based)."""
        return [pid for (pid,) in self.con.execute(
            "SELECT pid FROM (SELECT DISTINCT pid FROM res WHERE pid IS NOT NULL AND rt <> 'Medication') "
            "ORDER BY pid LIMIT ? OFFSET ?", [count, n - 1]).fetchall()]

    def close(self) -> None:
        for query in self._behind:          # a run that stopped without closing its iteration of the patients
            query.close()
        self.con.close()


FIRST_PATIENTS = 100          # patients read by a query of their own, ahead of the sort of the rest (`patients`)
SORT_IN_MEMORY_BYTES = 1 << 30     # loaded rows (`_table_bytes`) up to this are sorted in one range; past it, in ranges
SPILL_RANGES = 5


def _grouped(cursor, batch_rows: int) -> Iterator[tuple[str, list[str]]]:
    """(pid, lines) from a cursor over (pid, line) rows in pid order."""
    current, lines = None, []
    while rows := cursor.fetchmany(batch_rows):
        for pid, text in rows:
            if pid != current:
                if current is not None:
                    yield current, lines
                current, lines = pid, []
            lines.append(text)
    if current is not None:
        yield current, lines


class _QueryBehind:
    """A query executed on its own DuckDB cursor in a thread, so that its sort runs while the caller works;
    `result()` waits for it (and raises what it raised), `close()` interrupts it if it is still running."""

    def __init__(self, cursor, sql: str, params: list) -> None:
        self.cursor, self.error = cursor, None
        self.thread = threading.Thread(target=self._run, args=(sql, params), name="duckdb-sort", daemon=True)
        self.thread.start()

    def _run(self, sql: str, params: list) -> None:
        try:
            self.cursor.execute(sql, params)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self.error = exc

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.cursor

    def close(self) -> None:
        if self.cursor is None:
            return
        if self.thread.is_alive():
            self.cursor.interrupt()
            self.thread.join()
        self.cursor.close()
        self.cursor = None


def unread_codes(codes: Iterable[str], catalog) -> list[str]:
    """The result codes (JSON text) no rule of `catalog` reads, each decided once by the engine's own test
    (`RecordBuilder.result_codes`); a code that cannot be parsed or decided is kept (never listed here): the engine
    then decides on it as it always has."""
    from ..fhir.record.builder import RecordBuilder

    read = RecordBuilder(catalog).result_codes
    unread = []
    for text in codes:
        try:
            if not read(orjson.loads(text)):
                unread.append(text)
        except Exception:  # noqa: BLE001 - a code the test cannot read is kept
            continue
    return unread


def _count_lines(f: ExportFile) -> tuple[int, list[dict]]:
    """A file of a type not read: its resources counted, and where it is damaged (a damaged file is counted as far as
    it goes, by the line reader, which says where)."""
    counted = _count_resource_lines(f.path, f.compressed)
    if counted is not None:
        return counted, []
    from .reader import read_export_file
    count, damage = 0, []
    for row in read_export_file(f.type, str(f.path)):
        if row.kind == "skipped":
            count = row.line_no
        else:
            damage.append({"file": row.file, "line": row.line_no, "error": row.text})
    return count, damage


def _count_resource_lines(path: Path, compressed: bool) -> int | None:
    """The non-blank lines of a file of a type the screen does not read, counted in bytes without parsing (DuckDB's
    CSV reader took 1.3 s of a 5 s load on a Synthea export, mostly on long Provenance and DocumentReference lines).
    None for a damaged stream or a line near the limit: the line-by-line reader then reports where."""
    count, tail = 0, b""
    try:
        with (gzip.open if compressed else open)(path, "rb") as src:
            while chunk := src.read(_COUNT_READ_BYTES):
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                if len(tail) >= MAX_LINE_BYTES or (lines and max(map(len, lines)) >= MAX_LINE_BYTES):
                    return None
                count += sum(1 for line in lines if line.strip())
    except (EOFError, OSError, zlib.error):
        return None
    return count + (1 if tail.strip() else 0)


def _malformed_lines(path: Path) -> list[dict]:
    """The lines of one file that are not JSON resources, with 1-based line numbers in the decompressed text."""
    out = []
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as src:
            for n, raw in enumerate(src, 1):
                if not raw.strip():
                    continue
                try:
                    value = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    out.append({"file": str(path), "line": n, "error": f"not JSON: {exc}"[:300]})
                    continue
                if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
                    out.append({"file": str(path), "line": n, "error": "not a FHIR resource (no resourceType)"})
    except (EOFError, OSError, zlib.error):
        pass                                   # a damaged stream is reported where it was rescued
    return out
