"""DIR/report.html: one self-contained page (no network request; thumbnails and the histogram embedded as data
URLs) with the counts, the throughput, the score histogram against the calibration scores and threshold, the
ranked table of confirmed captions with their generations, and the settings. Every caption is HTML-escaped:
training captions are scraped text.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.plotting import new_axes


@dataclass
class ScreenReport:
    """Everything report.html shows."""

    title: str
    counts: dict[str, int]
    throughput: dict[str, float | int | str]
    scores: list[float]  # every screened unique caption's score
    calibration_scores: list[float] | None
    threshold: float | None
    fpr: float | None
    confirmed: list[dict]  # confirm.jsonl rows; images relative to the report's folder (or absolute)
    settings: dict
    near_duplicate_threshold: float | None = None


CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f0f0f0}
tr.memorized{background:#fde2e2}.thumbs img{margin:1px;image-rendering:pixelated}
.missing{display:inline-block;width:48px;height:48px;background:#ddd;font-size:9px;overflow:hidden}"""


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(path: Path, px: int) -> str:
    """An <img> of the file scaled so its longer side is px (tiny images enlarged pixel-exact), or a placeholder."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = px / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
    except (OSError, ValueError):
        return f'<span class="missing" title="{html.escape(str(path))}">{html.escape(path.name)}</span>'
    return f'<img src="{_png_data_url(im)}" width="{size[0]}" height="{size[1]}" alt="{html.escape(path.name)}">'


def histogram(report: ScreenReport) -> str:
    """The score histogram (screened vs calibration, the threshold) as an embedded PNG, or a sentence."""
    if not report.scores:
        return "<p>No caption was scored.</p>"
    fig, ax = new_axes((7, 3.2))
    ax.hist(report.scores, bins=50, alpha=0.6, label=f"screened ({len(report.scores):,})", density=True)
    if report.calibration_scores:
        ax.hist(report.calibration_scores, bins=50, alpha=0.6, density=True,
                label=f"calibration ({len(report.calibration_scores):,})")
    if report.threshold is not None:
        fpr = f" (FPR {report.fpr:g})" if report.fpr is not None else ""
        ax.axvline(report.threshold, color="k", ls="--", label=f"threshold {report.threshold:.4g}{fpr}")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="{url}" alt="score histogram">'


def _table(pairs) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                               for k, v in pairs) + "</table>"


def confirmed_table(report: ScreenReport, folder: Path, px: int) -> str:
    if not report.confirmed:
        return "<p>No caption was confirmed.</p>"
    head = ("<tr><th>rank</th><th>caption</th><th>score</th><th>verdict</th><th>cluster</th>"
            "<th>median SSCD</th><th>SSCD to ground truth</th><th>generations</th></tr>")
    rows = []
    for r in report.confirmed:
        thumbs = "".join(thumbnail(p if p.is_absolute() else folder / p, px) for p in map(Path, r.get("images", [])))
        cls = ' class="memorized"' if r.get("verdict") == "memorized" else ""
        cells = [_fmt(r.get("rank", "")), html.escape(r["caption"]), _fmt(float(r["score"])),
                 html.escape(str(r.get("verdict"))), _fmt(r.get("cluster_size")), _fmt(r.get("median_sscd")),
                 _fmt(r.get("gt_sscd"))]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + f'<td class="thumbs">{thumbs}</td></tr>')
    return f'<table id="confirmed">{head}{"".join(rows)}</table>'


def write_report(path: str | Path, report: ScreenReport, thumbnail_px: int = 96) -> Path:
    """Write report.html (to a temporary name, then renamed into place); returns the path."""
    path = Path(path)
    nd = (f"<p>Near-duplicate SSCD threshold: {report.near_duplicate_threshold:.4g}</p>"
          if report.near_duplicate_threshold is not None else "")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1>"
            f"<h2>Counts</h2>{_table(report.counts.items())}<h2>Throughput</h2>{_table(report.throughput.items())}"
            f"<h2>Scores</h2>{histogram(report)}<h2>Confirmed captions</h2>{nd}"
            f"{confirmed_table(report, path.parent, thumbnail_px)}"
            f"<h2>Settings</h2>{_table(report.settings.items())}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
