"""report.html: one self-contained page (inline SVG and CSS, no script, no network) a governance committee or a
care-gap team opens from disk."""
from __future__ import annotations

from html import escape


def _bars(title: str, items: list[tuple[str, float]], unit: str = "", note: str = "") -> str:
    items = [(str(k), float(v)) for k, v in items if v is not None][:25]
    if not items:
        return f"<section><h2>{escape(title)}</h2><p class=note>None in this export.</p></section>"
    top = max(v for _, v in items) or 1.0
    row_h, label_w, bar_w = 22, 260, 420
    rows = []
    for i, (label, value) in enumerate(items):
        y = i * row_h
        w = max(1.0, bar_w * value / top)
        shown = f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"
        rows.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(label[:40])}</text>'
                    f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="2"></rect>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{shown}{escape(unit)}</text>')
    height = row_h * len(items)
    return (f"<section><h2>{escape(title)}</h2>"
            f'<svg role="img" aria-label="{escape(title)}" width="{label_w + bar_w + 90}" height="{height}" '
            f'viewBox="0 0 {label_w + bar_w + 90} {height}">{"".join(rows)}</svg>'
            + (f"<p class=note>{escape(note)}</p>" if note else "") + "</section>")


def _table(title: str, head: tuple[str, ...], rows: list[tuple], note: str = "") -> str:
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<section><h2>{escape(title)}</h2>" + (f"<p class=note>{escape(note)}</p>" if note else "")
            + ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + f"</tr>{body}</table>"
               if rows else "<p class=note>None.</p>") + "</section>")


def render(summary: dict, tally, burden: dict, unrecognised: list[tuple[str, str, str, int]]) -> str:
    n = summary["patients"] or 1
    cards = summary["cards"]
    carded = sum(cards.values())
    share = f"{100 * cards.get('warning', 0) / carded:.0f}%" if carded else "n/a"
    kpis = [("patients screened", f"{summary['patients']:,}"),
            ("with a card", f"{carded:,} ({100 * carded / n:.1f}%)"),
            ("warning share of cards", share),
            ("cards per 1,000 chart openings", burden["cards_per_1000_openings"] if burden["chart_openings"] else "no encounters"),
            ("cards per clinic day", burden["cards_per_clinic_day"] if burden["clinic_days"] else "no encounters"),
            ("treatment gaps and therapy alerts", f"{sum(summary['treatment_gaps'].values()):,}")]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Secondary osteoporosis screen</title><style>",
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:980px;color:#222}"
        "h1{font-size:22px}h2{font-size:16px;margin:28px 0 8px}svg text{font:12px system-ui,sans-serif;fill:#222}"
        "svg rect{fill:#3b6ea8}.kpis{display:flex;flex-wrap:wrap;gap:12px}.kpi{border:1px solid #ccd;border-radius:6px;"
        "padding:10px 14px;min-width:150px}.kpi b{display:block;font-size:20px}.note{color:#555}"
        "table{border-collapse:collapse}td,th{border:1px solid #dde;padding:3px 8px;text-align:left;font-size:13px}",
        "</style></head><body>",
        f"<h1>Secondary osteoporosis screen</h1><p class=note>Export {escape(summary['export'])}, evaluated as of "
        f"{escape(summary['as_of'])} by catalog {escape(summary['catalog_version'])}: the same engine and cards as "
        f"the CDS Hooks service. Chart openings are the Encounters of the 12 months before that date.</p>",
        "<div class=kpis>" + "".join(f"<div class=kpi><b>{escape(str(v))}</b>{escape(k)}</div>" for k, v in kpis)
        + "</div>",
        _bars("Cause prevalence (patients with the cause found)", tally.causes_found.most_common(),
              note="Found: firing, listed beside a cause that fires, or suspected."),
        _bars("Causes that fire a card (patients)", tally.causes_firing.most_common()),
        _bars("Cards by indicator (patients)", sorted(cards.items())),
        _bars("Alert burden by cause (cards per 1,000 chart openings)", list(burden["by_cause"].items())),
        _bars("Alert burden by location or department (cards per 1,000 openings there)",
              [(k, v["cards_per_1000_openings"]) for k, v in burden["by_location"].items()]),
        _bars("Treatment gaps and therapy alerts, by kind (patients)", tally.treatment_gaps.most_common()),
        _bars("Flagged patients by age", sorted(tally.flagged_age.items())),
        _bars("Flagged patients by sex", sorted(tally.flagged_sex.items())),
        "<h2>Data quality</h2>",
        _table("Lines that could not be read", ("file", "line", "error"),
               [(m["file"], m["line"], m["error"]) for m in summary["malformed_lines"][:200]],
               note=f"{len(summary['malformed_lines'])} in all" + (" (first 200 shown)" if len(summary['malformed_lines']) > 200 else "")),
        _table("Resources with no patient reference", ("type", "count"),
               sorted(summary["resources_without_patient"].items())),
        _table("Types the engine does not read (skipped)", ("type", "resources"), sorted(summary["skipped_types"].items())),
        _table("Patients whose evaluation failed", ("patient", "error"),
               [(f["patient"], f["error"]) for f in summary["failed_patients"][:100]]),
        _table("Codes not recognised (most common)", ("resource", "system", "code", "patients"),
               [(t, s, c, k) for t, s, c, k in unrecognised[:40]],
               note="From the code survey on the first patients: add what should count to cards/ as data."),
        "<h2>Run</h2>",
        _table("Throughput and memory", ("figure", "value"), [
            ("seconds", summary["seconds"]), ("patients per second", summary["patients_per_second"]),
            ("seconds reading the export (before the first patient)", summary["load_seconds"]),
            ("seconds to the first patient's findings", summary["first_patient_seconds"]),
            ("engine", summary["engine"]), ("workers", summary["workers"]),
            ("input bytes", f"{summary['input_bytes']:,}"),
            ("input bytes of the types read", f"{summary['filtered_input_bytes']:,}"),
            ("temporary disk, largest", f"{summary['temp_disk_bytes']:,}"),
            ("peak RSS, largest process", f"{summary['peak_rss_bytes']:,}")]),
        "</body></html>",
    ]
    return "".join(parts)
