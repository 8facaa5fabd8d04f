"""Detect memorized prompts without generating images: six detectors behind one harness.

    --detector wen          text-conditional noise magnitude (Wen et al., ICLR 2024), the default
    --detector anisotropy   zero-step norm + channel-cosine score (Asthana & Belagiannis, ICLR 2026)
    --detector sharpness    score-Jacobian JVP norm at the first step (Jeon, Kim & No, ICML 2025)
    --detector grad_diff    gradient difference of the prediction energies at step 0 (Early Detection, ICML 2026)
    --detector dsm          prediction shift over one guided step (Early Detection, ICML 2026)
    --detector broken       latent-norm z-scores along the trajectory (Broken Memories, KDD 2026; a calibration)

    python detect/detect_mem.py --model ID_OR_DIR --data FILE|HF_NAME --run_name NAME [options]
    accelerate launch detect/detect_mem.py ...        # shards prompts across processes

Writes {output_dir}/{run_name}.jsonl (one row per prompt, dataset order) and {run_name}.summary.json.
Results are appended per batch under {run_name}.parts/; re-running the same command resumes.
"""

from __future__ import annotations

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.t2i.detect_run import DetectConfig, run_detection


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Score prompts for memorization: Wen et al.'s noise magnitude, anisotropy, "
                                   "sharpness, grad_diff, dsm or Broken Memories' z-scores.")
    add_settings_arguments(p, DetectConfig)
    return p


def parse_config(argv: list[str] | None) -> DetectConfig:
    return settings_from_args(DetectConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return run_main("detect_mem", run_detection, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())
