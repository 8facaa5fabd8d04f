"""The files of a screening run folder, named once for every stage (prepare, screen, merge, confirm, report)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from diffmem.common.results import read_results

CAPTION_SETS = ("screen", "calibration")  # the set being audited, and the known non-memorized captions

OUTPUT_NAMES = ("settings.json", "captions", "parts", "screen.jsonl", "screen.parquet",
                "calibration.jsonl", "threshold.json", "confirm", "confirm.jsonl", "near_duplicate.json",
                "report.html", "summary.json", "submitit")


class ScreenFiles:
    """The run folder:

    - settings.json: the bound score settings and each source's identity;
    - captions/SET.jsonl: the unique captions; SET.json once complete; SET.skipped.jsonl: the rows left out;
    - parts/SET-W.jsonl: scores, one file per worker;
    - screen.jsonl, screen.parquet (ranked), calibration.jsonl, threshold.json;
    - confirm/: settings.json, parts/SET-W.jsonl, images/SET/ID/G.png; confirm.jsonl, near_duplicate.json;
    - report.html, summary.json, submitit/ (Slurm logs).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.settings = self.out / "settings.json"
        self.captions_dir = self.out / "captions"
        self.parts_dir = self.out / "parts"
        self.ranked = self.out / "screen.jsonl"
        self.ranked_parquet = self.out / "screen.parquet"
        self.calibration_scores = self.out / "calibration.jsonl"
        self.threshold = self.out / "threshold.json"
        self.confirm_dir = self.out / "confirm"
        self.confirm_settings = self.confirm_dir / "settings.json"
        self.confirm_parts_dir = self.confirm_dir / "parts"
        self.confirmed = self.out / "confirm.jsonl"
        self.near_duplicate = self.out / "near_duplicate.json"
        self.report = self.out / "report.html"
        self.summary = self.out / "summary.json"
        self.submitit = self.out / "submitit"

    def clear(self) -> None:
        """Remove every output of a run (--overwrite); other files in the folder stay."""
        for name in OUTPUT_NAMES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def captions(self, caption_set: str) -> Path:
        return self.captions_dir / f"{caption_set}.jsonl"

    def skipped(self, caption_set: str) -> Path:
        return self.captions_dir / f"{caption_set}.skipped.jsonl"

    def captions_marker(self, caption_set: str) -> Path:
        return self.captions_dir / f"{caption_set}.json"

    def part(self, caption_set: str, worker: int) -> Path:
        return self.parts_dir / f"{caption_set}-{worker:05d}.jsonl"

    def confirm_part(self, caption_set: str, worker: int) -> Path:
        return self.confirm_parts_dir / f"{caption_set}-{worker:05d}.jsonl"

    def images(self, caption_set: str, caption_id: int) -> Path:
        return self.confirm_dir / "images" / caption_set / f"{caption_id:08d}"

    @staticmethod
    def _parts(folder: Path, caption_set: str) -> list[Path]:
        pattern = re.compile(rf"{caption_set}-\d+\.jsonl")
        return sorted(p for p in folder.glob(f"{caption_set}-*.jsonl") if pattern.fullmatch(p.name))

    def score_rows(self, caption_set: str, own: Path | None = None) -> list[dict]:
        """Every stored score row of a set (a torn last line ignored; the caller's own part is repaired)."""
        return [r for p in self._parts(self.parts_dir, caption_set) for r in read_results(p, repair=p == own)]

    def confirm_rows(self, caption_set: str, own: Path | None = None) -> list[dict]:
        """Every stored confirmation row of a set."""
        return [r for p in self._parts(self.confirm_parts_dir, caption_set) for r in read_results(p, repair=p == own)]

    def has_scores(self) -> bool:
        return any(self.score_rows(s) for s in CAPTION_SETS)
