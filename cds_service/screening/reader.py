"""One export file read line by line in Python, as the Spark engine's executors read it: each line becomes a
resource row (its type and patient), a Medication, an Encounter opening, or a data-quality record with the file
and 1-based line. The rules are the DuckDB load's (`partition.py`): the same patient references, the same
counts of lines without a patient and of types the engine does not read, the same rescue of a damaged .gz."""
from __future__ import annotations

import gzip
import re
import zlib
from typing import Iterator, NamedTuple

import orjson

from .partition import MAX_LINE_BYTES, reads_type

_PATIENT_REF = re.compile(r"(?:^|/)Patient/([^/]+)$")


class ExportRow(NamedTuple):
    kind: str             # "res", "med", "enc", "nopatient", "bad", "skipped"
    file: str
    line_no: int          # 1-based, in the decompressed text; for "skipped", the number of lines
    rt: str | None        # the resource type (for "enc": the opening's location)
    pid: str | None       # the patient (for "med": the Medication id)
    text: str | None      # the resource line; for "bad", the error; for "enc", the opening's start
    concept: str | None = None    # an Observation's code, as JSON (the screen leaves out results no rule reads)


def read_export_file(file_type: str, path: str, start: int = 0, end: int | None = None) -> Iterator[ExportRow]:
    """Every row of one export file; never raises for what the file holds (a damaged file ends in a "bad" row).

    An uncompressed file can be read in byte ranges, one task each: a range holds the lines that start in
    [start, end), and its line numbers count from its first line (`lines_before` turns them into the file's)."""
    compressed = path.endswith(".gz")
    if compressed and (start or end is not None):
        raise ValueError("a gzip stream is read whole, not in ranges")
    wanted = reads_type(file_type)
    n = skipped = 0
    last = None                     # a last line without a newline: whole if the stream ends cleanly
    try:
        with (gzip.open if compressed else open)(path, "rb") as src:
            pos, first = start, 1
            if start:
                src.seek(start - 1)
                if src.read(1) != b"\n":       # the line under way at `start` belongs to the range before
                    pos += len(src.readline())
                    first = 2
            for n, raw in enumerate(src, first):
                if end is not None and pos >= end:
                    n -= 1
                    break
                pos += len(raw)
                if len(raw) > MAX_LINE_BYTES:
                    yield ExportRow("bad", path, n, None, None, f"line over {MAX_LINE_BYTES:,} bytes")
                    continue
                if not raw.endswith(b"\n"):
                    last = (n, raw)
                    break
                if not raw.strip():
                    continue
                if not wanted:
                    skipped += 1
                    continue
                yield _row(path, n, raw)
            if last is not None:
                src.read(1)         # a damaged stream says so here
    except (EOFError, OSError, zlib.error) as exc:
        if last is not None and compressed:
            yield ExportRow("bad", path, last[0], None, None, "line cut off: the gzip stream ends inside it")
        yield ExportRow("bad", path, n + 1, None, None, f"gzip stream unreadable from here: {exc}")
        last = None
    if last is not None and last[1].strip():
        if wanted:
            yield _row(path, last[0], last[1])
        else:
            skipped += 1
    if skipped:
        yield ExportRow("skipped", path, skipped, file_type, None, None)


def _row(path: str, n: int, raw: bytes) -> ExportRow:
    try:
        resource = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return ExportRow("bad", path, n, None, None, f"not JSON: {exc}"[:300])
    rt = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rt, str):
        return ExportRow("bad", path, n, None, None, "not a FHIR resource (no resourceType)")
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    if rt == "Medication":
        return ExportRow("med", path, n, rt, _text(resource.get("id")), text)
    pid = patient_of(resource)
    if pid is None:
        return ExportRow("nopatient", path, n, rt, None, None)
    if rt == "Encounter":
        start = _text(_get(resource, "period", "start")) or _text(_get(resource, "actualPeriod", "start"))
        location = _text(_location(resource)) or _text(_get(resource, "serviceProvider", "display"))
        return ExportRow("enc", path, n, location, pid, start)
    code = resource.get("code") if rt == "Observation" else None
    return ExportRow("res", path, n, rt, pid, text, None if code is None else orjson.dumps(code).decode())


def patient_of(resource: dict) -> str | None:
    """The Patient compartment's key: a Patient's id, else the first of subject, patient and beneficiary that has a
    reference, when that reference names a Patient."""
    if resource.get("resourceType") == "Patient":
        return _text(resource.get("id"))
    for key in ("subject", "patient", "beneficiary"):
        value = resource.get(key)
        ref = value.get("reference") if type(value) is dict else None
        if ref is None:
            continue
        # the usual reference, "Patient/<id>", without the pattern (a quarter of the reader's time went to it)
        if type(ref) is str and ref.startswith("Patient/") and len(ref) > 8 and "/" not in ref[8:] \
                and not ref.endswith("\n"):
            return ref[8:]
        m = _PATIENT_REF.search(_text(ref))
        return m.group(1) if m and m.group(1) else None
    return None


def _get(resource: dict, key: str, inner: str):
    value = resource.get(key)
    return value.get(inner) if isinstance(value, dict) else None


def _location(resource: dict):
    locations = resource.get("location")
    if isinstance(locations, list) and locations and isinstance(locations[0], dict):
        return _get(locations[0], "location", "display")
    return None


def _text(value) -> str | None:
    """A JSON value as text, as DuckDB's json_extract_string gives it (None for a missing value or null)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def lines_before(path: str, offset: int) -> int:
    """How many lines of an uncompressed file end before byte `offset` (to number a range's lines in the file)."""
    count = 0
    with open(path, "rb") as src:
        while offset > 0:
            block = src.read(min(offset, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count
