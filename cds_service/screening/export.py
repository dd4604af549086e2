"""A FHIR Bulk Data export as `$export` leaves it: a folder of `Type.ndjson` / `Type.000.ndjson.gz` files, or the
completion manifest that lists them (`output[].type` and `.url`: `file://` URLs, absolute paths or paths relative
to the manifest)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

_NAME = re.compile(r"^([A-Z][A-Za-z]+)(?:[._-][^/]*)?\.ndjson(?:\.gz)?$")


class ExportError(ValueError):
    """The EXPORT cannot be used at all (no such folder, a manifest that cannot be read, no NDJSON files)."""


@dataclass(frozen=True)
class ExportFile:
    type: str              # the resource type its name or manifest entry gives
    path: Path

    @property
    def compressed(self) -> bool:
        return self.path.name.endswith(".gz")


def export_files(export: str | Path) -> list[ExportFile]:
    """Every NDJSON file of the export, by type then name."""
    root = Path(export)
    if root.is_dir():
        files = [ExportFile(m.group(1), p) for p in sorted(root.iterdir())
                 if p.is_file() and (m := _NAME.match(p.name))]
        if not files:
            raise ExportError(f"{root} holds no Bulk Data NDJSON files (Type.ndjson or Type.*.ndjson.gz)")
    elif root.is_file():
        files = _from_manifest(root)
    else:
        raise ExportError(f"{root}: no such folder or manifest")
    return sorted(files, key=lambda f: (f.type, str(f.path)))


def _from_manifest(manifest: Path) -> list[ExportFile]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{manifest} is not a Bulk Data manifest: {exc}") from None
    output = data.get("output") if isinstance(data, dict) else None
    if not isinstance(output, list):
        raise ExportError(f"{manifest} is not a Bulk Data manifest: it has no output list")
    files = []
    for item in output:
        if not (isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("url"), str)):
            raise ExportError(f"{manifest}: an output entry without type and url: {str(item)[:200]}")
        url = item["url"]
        parts = urlsplit(url)
        if parts.scheme == "file":
            path = Path(unquote(parts.path))
        elif parts.scheme in ("http", "https"):
            raise ExportError(f"{manifest}: {url} is remote; download the export first (the screen reads files only)")
        else:
            path = Path(url) if Path(url).is_absolute() else manifest.parent / url
        if not path.is_file():
            raise ExportError(f"{manifest}: {path} listed in the manifest does not exist")
        files.append(ExportFile(item["type"], path))
    if not files:
        raise ExportError(f"{manifest} lists no output files")
    return files
