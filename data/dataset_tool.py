"""Build an EDM dataset zip (NVlabs/edm's and DiffMemorize's format) with DiffMemorize's subset rules.

    python data/dataset_tool.py --source SRC --dest OUT.zip [--max_images N] [--subset first|random] [--seed S]
        [--classes C] [--labels true|random|unique|none] [--num_classes K] [--resolution R]
        [--transform center-crop] [--mix_source SRC2 --mix_alpha A] [--split train|test] [--channels 1|3]
    python data/dataset_tool.py --source molrg --dest OUT.zip [--molrg_res 4] [--molrg_classes 2] [--molrg_dim 7]
        [--molrg_per_class 350] [--seed S]

SRC is the CIFAR-10 python tarball (cifar-10-python.tar.gz), a folder of images (labels from its dataset.json),
an EDM dataset zip, or ``digits`` (scikit-learn's bundled 8×8 digits; needs no download). ``molrg`` writes Zhang et
al.'s mixture of low-rank Gaussians instead (``common.edm.molrg``): float data in a zip with ``data.npy``, labels =
class; it takes only the --molrg_* options and --seed. The rules (class-balanced
first N/C, seeded draws, label rules, Lanczos resizing, intra-class mixing) are those of ``common.edm.dataset``.
The zip is written under a temporary name beside OUT.zip and renamed when complete (a temporary left by a killed
write is removed by the next write into that folder); an existing OUT.zip is replaced only with --overwrite.
Bad input: one line on stderr (``FILE[:MEMBER]: what was expected``) and exit code 2, with no output left behind.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.cli import ArgumentParser, run_main
from diffmem.common.edm.dataset import (
    CHANNELS,
    CIFAR_SPLITS,
    LABEL_RULES,
    SUBSETS,
    TRANSFORMS,
    DatasetRecipe,
    build_dataset,
    mix_count,
    write_dataset_zip,
    write_float_dataset_zip,
)
from diffmem.common.edm.molrg import MoLRGRecipe, molrg_dataset
from diffmem.common.errors import ConfigError

MOLRG = "molrg"


@dataclass
class DatasetToolConfig:
    recipe: DatasetRecipe
    dest: Path
    molrg: MoLRGRecipe | None = None  # set for --source molrg (then recipe only names the source)
    molrg_flags: tuple[str, ...] = ()  # the --molrg_* options given (refused without --source molrg)
    overwrite: bool = False  # replace an existing --dest
    check_args: bool = False  # validate only (a sweep checks its stage arguments before the stages run)


def parse_args(argv=None) -> DatasetToolConfig:
    p = ArgumentParser(prog="dataset_tool", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, metavar="SRC",
                   help="cifar-10-python.tar.gz, a folder of images, an EDM dataset zip, 'digits', or 'molrg' "
                        "(float MoLRG data; see the --molrg_* options)")
    p.add_argument("--dest", required=True, type=Path, metavar="OUT.zip", help="the EDM dataset zip to write")
    p.add_argument("--max_images", type=int, metavar="N",
                   help="keep N images, class-balanced: N//C per class, one more for the first N mod C classes")
    p.add_argument("--subset", choices=SUBSETS, default="first",
                   help="first: the first images of each class in source order; random: a seeded draw per class")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of every random draw (default 0)")
    p.add_argument("--classes", type=int, metavar="C",
                   help="keep classes 0..C-1 only; with --max_images N: N//C each, the remainder to the last")
    p.add_argument("--labels", choices=LABEL_RULES,
                   help="true (default when the source has labels), random (needs --num_classes), "
                        "unique (label = output index) or none")
    p.add_argument("--num_classes", type=int, metavar="K", help="random labels are drawn in 0..K-1")
    p.add_argument("--resolution", type=int, metavar="R", help="resize to R×R with PIL's Lanczos filter")
    p.add_argument("--transform", choices=TRANSFORMS,
                   help="center-crop: crop to the centred square before resizing (non-square images)")
    p.add_argument("--mix_source", metavar="SRC2", help="second source whose images replace part of the subset")
    p.add_argument("--mix_alpha", type=float, metavar="A",
                   help="fraction of the subset replaced by --mix_source images: round(A·N), seeded")
    p.add_argument("--split", choices=tuple(CIFAR_SPLITS), default="train",
                   help="CIFAR-10 split: train (data_batch_1..5) or test (test_batch)")
    p.add_argument("--channels", type=int, choices=CHANNELS,
                   help="1 (RGB by luma) or 3 (grayscale repeated); default: the source's")
    p.add_argument("--overwrite", action="store_true", help="replace --dest if it exists (refused otherwise)")
    p.add_argument("--check_args", action="store_true",
                   help="parse and check the arguments, then exit without reading --source or writing anything "
                        "(detect/emm.py checks a sweep's stage arguments so)")
    g = p.add_argument_group("MoLRG (--source molrg)")
    d = MoLRGRecipe()
    g.add_argument("--molrg_res", type=int, metavar="R", help=f"images 3×R×R, D = 3·R² (default {d.res})")
    g.add_argument("--molrg_classes", type=int, metavar="K", help=f"classes (default {d.classes})")
    g.add_argument("--molrg_dim", type=int, metavar="d", help=f"dimension of each class's subspace (default {d.dim})")
    g.add_argument("--molrg_per_class", type=int, metavar="N", help=f"samples per class (default {d.per_class})")
    a = p.parse_args(argv)
    recipe = DatasetRecipe(source=a.source, max_images=a.max_images, subset=a.subset, seed=a.seed,
                           classes=a.classes, labels=a.labels, num_classes=a.num_classes, resolution=a.resolution,
                           transform=a.transform, mix_source=a.mix_source, mix_alpha=a.mix_alpha, split=a.split,
                           channels=a.channels)
    given = {k: getattr(a, f"molrg_{k}") for k in ("res", "classes", "dim", "per_class")}
    given = {k: v for k, v in given.items() if v is not None}
    molrg = MoLRGRecipe(**given, seed=a.seed) if a.source == MOLRG else None
    return DatasetToolConfig(recipe=recipe, dest=a.dest, molrg=molrg,
                             molrg_flags=tuple(f"--molrg_{k}" for k in given), overwrite=a.overwrite,
                             check_args=a.check_args)


def check_molrg_options(cfg: DatasetToolConfig) -> None:
    """--molrg_* only with --source molrg, and none of the image-selection options with it (ConfigError)."""
    if cfg.molrg is None:
        if cfg.molrg_flags:
            raise ConfigError(f"{cfg.molrg_flags[0]} applies to --source molrg only")
        return
    r = cfg.recipe
    image_only = {"--max_images": r.max_images, "--subset": r.subset != "first" or None, "--classes": r.classes,
                  "--labels": r.labels, "--num_classes": r.num_classes, "--resolution": r.resolution,
                  "--transform": r.transform, "--mix_source": r.mix_source, "--mix_alpha": r.mix_alpha,
                  "--split": r.split != "train" or None, "--channels": r.channels}
    for flag, value in image_only.items():
        if value is not None:
            raise ConfigError(f"{flag} selects images and does not apply to --source molrg (float data; it takes "
                              f"--molrg_res, --molrg_classes, --molrg_dim, --molrg_per_class and --seed)")
    cfg.molrg.check()


def validate(cfg: DatasetToolConfig) -> None:
    """Argument-level checks before any source is read; raises ConfigError with the one-line message."""
    check_molrg_options(cfg)
    cfg.recipe.check()
    if cfg.dest.suffix.lower() != ".zip":
        raise ConfigError(f"--dest must name a .zip file (an EDM dataset zip), got {cfg.dest}")
    if cfg.dest.is_dir():
        raise ConfigError(f"--dest {cfg.dest} is a folder; expected a .zip file name")
    if cfg.dest.exists() and not cfg.overwrite and not cfg.check_args:
        raise ConfigError(f"--dest {cfg.dest} exists; pass --overwrite to replace it, or write another file")
    for flag, src in (("--source", cfg.recipe.source), ("--mix_source", cfg.recipe.mix_source)):
        if src is not None and Path(src).resolve() == cfg.dest.resolve():
            raise ConfigError(f"--dest {cfg.dest} is also {flag}; write the new dataset elsewhere")


def run(cfg: DatasetToolConfig) -> None:
    """Build the dataset in memory (every check passes first), then write the zip atomically."""
    validate(cfg)
    if cfg.check_args:
        return
    if cfg.molrg is not None:
        data = molrg_dataset(cfg.molrg)
        write_float_dataset_zip(cfg.dest, data.images, data.labels, cfg.molrg.to_dict())
        n, c, h, w = data.images.shape
        m = cfg.molrg
        print(f"wrote {cfg.dest}: {n} MoLRG samples {c}×{h}×{w} (float32), {m.classes} classes of dimension "
              f"{m.dim} in D = {m.ambient_dim}, {m.per_class} per class; labels: class")
        return
    data = build_dataset(cfg.recipe)
    write_dataset_zip(cfg.dest, data.images, data.labels)
    n, c, h, w = data.images.shape
    if data.labels is None:
        labels = "none"
    else:
        labels = f"{cfg.recipe.labels or 'true'}, {len(set(data.labels.tolist()))} distinct"
    mixed = ""
    if cfg.recipe.mix_source is not None:
        mixed = f", {mix_count(cfg.recipe.mix_alpha, n)} of them from {cfg.recipe.mix_source}"
    print(f"wrote {cfg.dest}: {n} images {c}×{h}×{w}{mixed}; labels: {labels}")


def main(argv=None) -> int:
    return run_main("dataset_tool", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
