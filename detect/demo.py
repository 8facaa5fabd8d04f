"""Run the demo: detect the shipped lab's memorized captions, print AUC and TPR@1%FPR (make demo).

From an installed diffmem, in any folder: Wen et al.'s detector scores the shipped memorization lab's memorized
and unmemorized captions and the scores are evaluated.

    diffmem demo [--out demo_outputs]          # also: diffmem-demo, python -m diffmem.detect.demo

It runs what ``make demo`` runs, as the two CLIs it names (each a subprocess of this interpreter):

    detect_mem --model LAB --data LAB/memorized.jsonl --run_name memorized --out OUT \\
        --num_inference_steps 50 --target_steps 0 --num_images_per_prompt 4 --overwrite
    detect_mem ... LAB/unmemorized.jsonl --run_name unmemorized ...
    evaluate OUT/memorized.jsonl OUT/unmemorized.jsonl --out OUT/eval

LAB is the lab inside the installation (``diffmem.common.resources.lab_dir``), so it works from any folder.
Writes OUT/{memorized,unmemorized}.jsonl (and their summaries) and OUT/eval/ (summary.json, roc.png,
scores_kde.png); a rerun replaces them. With the defaults the figures are those of the lab's manifest.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.resources import LAB_FILES, lab_dir
from diffmem.common.settings import first_steps, option, prefix_step_count

RUNS = ("memorized", "unmemorized")  # the lab's two caption files; each is one detect_mem run of that name


class DemoStepError(DiffmemError, RuntimeError):
    """A step of the demo (a detect_mem or evaluate run) failed; its own message is printed above."""


@dataclass
class DemoConfig:
    out: str = option("demo_outputs", metavar="DIR",
                      help="the folder the demo writes: memorized.jsonl, unmemorized.jsonl, eval/")
    model_id: str | None = option(None, type=str, metavar="LAB", flag="--model", aliases=("--model_id",),
                                  help="a lab-shaped pipeline folder with memorized.jsonl and unmemorized.jsonl "
                                       "(None: the memorization lab shipped with diffmem)")
    num_images_per_prompt: int = option(4, help="generations G per prompt")
    num_inference_steps: int = option(50, help="DDIM steps of the trajectory")
    target_steps: str = option("0", joined=True, metavar="STEPS",
                               legacy={"--score_steps": (first_steps, "old spelling: the first N steps (1: step 0)")},
                               legacy_metavar="N", help="DDIM steps scored (a prefix of the trajectory): 0, 0-K or all")

    @property
    def score_steps(self) -> int:
        """How many steps from the first are scored (the lab manifest's figure; ConfigError unless a prefix)."""
        return prefix_step_count(self.target_steps, self.num_inference_steps)

    def validate(self) -> None:
        """Raise ConfigError (one line) before any model is loaded."""
        for name in ("num_images_per_prompt", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        self.score_steps  # noqa: B018  (parses and range-checks --target_steps)
        if self.model_id is not None:
            missing = [n for n in LAB_FILES[:3] if not (Path(self.model_id) / n).is_file()]
            if missing:
                raise ConfigError(f"--model {self.model_id}: expected a lab-shaped pipeline folder ({missing[0]} "
                                  f"missing)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out}: expected a folder, it is a file")

    def lab(self) -> Path:
        return Path(self.model_id) if self.model_id is not None else lab_dir()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="The demo: score the shipped memorization lab's memorized and unmemorized "
                                   "captions, evaluate them, print AUC and TPR@1%FPR.")
    add_settings_arguments(p, DemoConfig)
    return p


def parse_config(argv: list[str] | None) -> DemoConfig:
    return settings_from_args(DemoConfig, build_parser().parse_args(argv))


def step_commands(cfg: DemoConfig) -> list[list[str]]:
    """The argv (after ``python``) of each step: detect_mem per caption file, then evaluate."""
    lab, out = cfg.lab(), Path(cfg.out)
    steps = [["-m", "diffmem.detect.detect_mem", "--model", str(lab), "--data", str(lab / f"{run}.jsonl"),
              "--run_name", run, "--out", str(out), "--num_inference_steps", str(cfg.num_inference_steps),
              "--target_steps", cfg.target_steps, "--num_images_per_prompt", str(cfg.num_images_per_prompt),
              "--overwrite"] for run in RUNS]
    steps.append(["-m", "diffmem.detect.evaluate", *(str(out / f"{run}.jsonl") for run in RUNS),
                  "--out", str(out / "eval")])
    return steps


def manifest_figures(cfg: DemoConfig, lab: Path) -> dict | None:
    """The lab manifest's detection figures when this demo used the settings they were measured with."""
    manifest = lab / "manifest.json"
    if not manifest.is_file():
        return None
    detection = json.loads(manifest.read_text(encoding="utf-8")).get("lab", {}).get("detection", {})
    settings = {k: getattr(cfg, k) for k in ("num_images_per_prompt", "num_inference_steps", "score_steps")}
    return detection if all(detection.get(k) == v for k, v in settings.items()) else None


def run(cfg: DemoConfig) -> dict:
    """Run the three steps; print and return the overall split's metrics."""
    cfg.validate()
    lab = cfg.lab()
    # The lab is a local folder: nothing to fetch, so the children never wait on the Hub.
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **os.environ}
    for argv in step_commands(cfg):
        res = subprocess.run([sys.executable, *argv], env=env)
        if res.returncode != 0:
            raise DemoStepError(f"{argv[1].rsplit('.', 1)[1]} exited with code {res.returncode} (its message is "
                                f"above)")
    summary = Path(cfg.out) / "eval" / "summary.json"
    splits = json.loads(summary.read_text(encoding="utf-8"))["splits"]
    metrics = splits.get("all") or next(iter(splits.values()))  # every prompt; the lab has no Webster types
    line = f"demo: AUC {metrics['auc']:.3f}, TPR@1%FPR {metrics['tpr_at_fpr']['1%']:.2f}"
    expected = manifest_figures(cfg, lab)
    if expected is not None:
        line += f" (the lab's manifest.json: {expected['auc']:.3f}, {expected['tpr_at_1pct_fpr']:.2f})"
    print(f"{line}; plots in {summary.parent}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_main("demo", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())
