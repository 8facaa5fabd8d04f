"""One Accelerate training loop for every diffmem training arm.

The caller brings trainable models, a loss function (batch -> per-sample losses, a keep mask and per-sample
statistics) and a dataset keyed by (epoch, position, index); the loop does the rest: data order and sharding,
gradient accumulation, mixed precision (Accelerate autocast over fp32 trainable weights), clipping, EMA
(diffusers ``EMAModel``), the LR schedule (a named diffusers schedule, or a :class:`StepSchedule` of per-step
LR, EMA β and snapshots), the optimizer (AdamW, Adam with coupled L2 or SGD), checkpoints with a total limit, exact
resume, network snapshots, tracking and the final export.

Resume is exact: a checkpoint holds the models (``<name>/`` in ``save_pretrained`` format, plus ``<name>_ema/``),
the EMA state, optimizer, LR scheduler, grad scaler, RNG states and ``trainer_state.json`` (step and the
settings that fix the data order). The data order is a permutation per epoch seeded by (seed, epoch) and every
random draw of a sample is seeded by (seed, epoch, position) (see :mod:`common.seeding`), so the resumed run
starts at the exact micro-batch where the checkpoint was taken, mid-epoch included.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffmem.common.errors import DiffmemError
from diffmem.common.results import bind_run_settings, check_run_settings, jsonable, read_results, write_json_atomic
from diffmem.common.safe_load import UnsafeFileError, safe_torch_load, verify_checkpoint_files
from diffmem.common.seeding import STREAM_LOADER, STREAM_PERMUTATION, derive_seed, torch_generator
from diffmem.common.settings import option
from diffmem.common.training.loss import masked_mean

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_SUMMARY = "train_summary.json"  # written once a training has finished
TRAINER_STATE = "trainer_state.json"
TRAIN_LOG = "train_log.jsonl"
TRAINING_OPTIONS = "training_options.json"
# The EMA inside a checkpoint: the shadow weights (safetensors, keyed <model>.<parameter>) and the scalars (JSON).
# Neither format can carry code, unlike the pickle Accelerate writes for a registered object, which its
# load_custom_state reads with weights_only=False.
EMA_WEIGHTS = "ema_shadow.safetensors"
EMA_STATE = "ema_state.json"
LEGACY_EMA_STATE = "custom_checkpoint_0.pkl"  # checkpoints written before EMA_STATE: read weights-only
# Settings a resumed run must share with the checkpoint, or the data order / step arithmetic would differ.
RESUME_KEYS = ("seed", "train_batch_size", "num_processes", "gradient_accumulation_steps", "num_samples",
               "shuffle", "use_ema", "model_names")


# TrainConfig fields that change no trained weight: where files go and how often, what is logged or shown, and
# the run's length (a run may be extended; its steps so far stay the same, unless an LR schedule's shape depends
# on the length, which the arm then binds itself). Every other field is bound to a run once it has a checkpoint.
TRAIN_FREE_FIELDS = ("output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
                     "report_to", "tracker_project_name", "logging_dir", "show_progress", "validation_steps",
                     "dataloader_num_workers", "max_train_steps", "num_train_epochs")

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")


class TrainSetupError(DiffmemError, ValueError):
    """A training setup that cannot run; str() is the one-line message for the user."""


@dataclass
class TrainConfig:
    """Settings of the generic loop (model- and data-independent)."""

    output_dir: str = option(help="run folder: checkpoints, logs and the trained model")
    seed: int = option(0, help="seed of the data order, noise and timesteps")
    train_batch_size: int = option(16, help="per process")
    num_train_epochs: int = option(100, help="passes over the data (unless --max_train_steps)")
    max_train_steps: int | None = option(None, type=int, help="overrides --num_train_epochs")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    learning_rate: float = option(1e-4, help="base learning rate")
    scale_lr: bool = option(False, help="multiply the LR by accumulation x batch x processes")
    lr_scheduler: str = option("constant", choices=LR_SCHEDULERS, help="diffusers' named LR schedule")
    lr_warmup_steps: int = option(500, help="LR warm-up in optimizer steps")
    adam_beta1: float = option(0.9, help="Adam beta1")
    adam_beta2: float = option(0.999, help="Adam beta2")
    adam_weight_decay: float = option(1e-2, help="weight decay")
    adam_epsilon: float = option(1e-8, help="Adam epsilon")
    max_grad_norm: float = option(1.0, help="0 disables clipping")
    use_8bit_adam: bool = option(False, help="bitsandbytes 8-bit AdamW (needs the bnb extra and a GPU)")
    # adamw: decoupled weight decay; adam: torch Adam, weight decay as coupled L2 (EDM/DiffMemorize's
    # ``Adam(weight_decay=…)``); sgd: momentum SGD. adam_weight_decay is the weight decay of each of them.
    optimizer: str = option("adamw", choices=OPTIMIZERS, help="adamw: decoupled weight decay; adam: coupled L2; "
                                                             "sgd: momentum SGD")
    sgd_momentum: float = option(0.9, help="momentum of --optimizer sgd")
    use_ema: bool = option(False, help="keep an EMA of the weights (saved as the model)")
    ema_decay: float = option(0.9999, help="EMA decay")
    checkpointing_steps: int = option(500, help="save a checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = option(None, type=int, help="keep at most N checkpoints")
    resume_from_checkpoint: str | None = option(None, type=str, help="'latest' or a checkpoint-N folder")
    mixed_precision: str | None = option(None, choices=MIXED_PRECISIONS, help="None: the accelerate config's")
    report_to: str = option("tensorboard", choices=REPORT_TO, help="experiment tracker")
    tracker_project_name: str = option("diffmem", help="the tracker's project name")
    logging_dir: str = option("logs", help="tracker folder, relative to --output_dir")
    dataloader_num_workers: int = option(0, help="data loader worker processes")
    allow_tf32: bool = option(False, help="TF32 matmuls on Ampere+ GPUs")
    validation_steps: int | None = option(None, type=int,
                                          help="run the validation every N steps (always at the end)")
    shuffle: bool = option(True, help="reshuffle the data every epoch", flag="--no_shuffle")
    show_progress: bool = option(True, help="hide the progress bar", flag="--no_progress")


@dataclass
class LossTerms:
    """A loss function's per-sample output. ``per_sample`` carries the graph and any loss weights."""

    per_sample: torch.Tensor  # [B] fp32
    keep: torch.Tensor | None = None  # [B] bool; None keeps every sample
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] values, averaged per step for logging


@dataclass
class TrainSummary:
    global_step: int
    samples_seen: int
    samples_kept: int
    resumed_from: str | None
    final_logs: dict


@dataclass(frozen=True)
class StepSchedule:
    """A run paced per optimizer step (the EDM wing's schedule), in place of TrainConfig's named LR schedule and
    constant EMA β.

    lr(k) scales the base LR at optimizer step k (0-based); ema_beta(k) is the EMA β of step k (used with
    ``use_ema``; None keeps ``cfg.ema_decay``). snapshot(step, models) runs on the main process with unwrapped
    models (EMA weights swapped in) after every step where snapshot_due(step) holds (1-based), before that
    step's checkpoint (so a kill between the two redoes the snapshot), and after the last step.
    """

    lr: Callable[[int], float]
    ema_beta: Callable[[int], float] | None = None
    snapshot: Callable[[int, dict], None] | None = None
    snapshot_due: Callable[[int], bool] | None = None


@dataclass
class StepSums:
    """Sums over the samples of a micro-batch (or an accumulation window), by name: the kept samples' loss, the
    kept and seen counts and each of the loss function's statistics. Tensors on the device until ``to_host``."""

    loss: torch.Tensor | float
    kept: torch.Tensor | float
    seen: torch.Tensor | float
    stats: dict[str, torch.Tensor | float]

    @classmethod
    @torch.no_grad()
    def of_batch(cls, per_sample: torch.Tensor, keep: torch.Tensor, stats: dict[str, torch.Tensor]) -> StepSums:
        """This process's sums of one micro-batch (per_sample [B] fp32, keep [B] bool, stats [B] each)."""
        return cls(
            loss=torch.where(keep, per_sample.detach(), torch.zeros_like(per_sample)).sum(),
            kept=keep.float().sum(),
            seen=torch.tensor(float(per_sample.numel()), device=per_sample.device),
            stats={k: stats[k].detach().float().sum() for k in sorted(stats)},
        )

    @torch.no_grad()
    def all_reduce(self, accelerator) -> StepSums:
        """The sums over every process, in one collective."""
        names = list(self.stats)
        total = accelerator.reduce(torch.stack([self.loss, self.kept, self.seen, *self.stats.values()]),
                                   reduction="sum")
        loss, kept, seen, *stats = total.unbind()
        return StepSums(loss, kept, seen, dict(zip(names, stats)))

    def __add__(self, other: StepSums) -> StepSums:
        return StepSums(self.loss + other.loss, self.kept + other.kept, self.seen + other.seen,
                        {k: v + other.stats[k] for k, v in self.stats.items()})

    def to_host(self) -> StepSums:
        """The same sums as Python floats, read back from the device at once."""
        loss, kept, seen, *stats = torch.stack([self.loss, self.kept, self.seen, *self.stats.values()]).tolist()
        return StepSums(loss, kept, seen, dict(zip(self.stats, stats)))


# ------------------------------------------------------------------------------------- data order


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of an epoch: a permutation seeded by (seed, epoch), or 0..n-1 without shuffling."""
    if not shuffle:
        return list(range(num_samples))
    g = torch.Generator("cpu").manual_seed(derive_seed(seed, epoch, STREAM_PERMUTATION))
    return torch.randperm(num_samples, generator=g).tolist()


def micro_batches_per_epoch(num_samples: int, batch_size: int, num_processes: int) -> int:
    """Global micro-batches of batch_size × num_processes samples per epoch; the last one wraps around."""
    return math.ceil(num_samples / (batch_size * num_processes))


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of one epoch, from micro-batch ``start_batch`` on.

    Global micro-batch b covers positions [b·B·P, (b+1)·B·P) of the epoch's permutation (wrapping past the end
    so that every process gets a full batch); process r takes positions b·B·P + r·B … + B. Each item is the
    key (epoch, position, dataset index).
    """

    def __init__(self, num_samples: int, batch_size: int, num_processes: int, process_index: int, seed: int,
                 epoch: int, start_batch: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.num_processes = num_samples, batch_size, num_processes
        self.process_index, self.seed, self.epoch, self.start_batch = process_index, seed, epoch, start_batch
        self.shuffle = shuffle

    def __len__(self) -> int:
        return max(0, micro_batches_per_epoch(self.n, self.batch_size, self.num_processes) - self.start_batch)

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        global_batch = self.batch_size * self.num_processes
        for b in range(self.start_batch, micro_batches_per_epoch(self.n, self.batch_size, self.num_processes)):
            first = b * global_batch + self.process_index * self.batch_size
            yield [(self.epoch, p, perm[p % self.n]) for p in range(first, first + self.batch_size)]


# ------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of ``checkpoint-N`` folders in step order; complete ones have trainer_state.json."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (not complete_only or (p / TRAINER_STATE).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` (None when there is none yet) or an explicit path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir() and (Path(output_dir) / resume).is_dir():
        path = Path(output_dir) / resume  # the diffusers example accepts a bare checkpoint-N name
    if not (path / TRAINER_STATE).is_file():
        raise TrainSetupError(f"{resume}: not a complete diffmem checkpoint (no {TRAINER_STATE})")
    return path


def resolved_mixed_precision(value: str | None) -> str:
    """The mixed precision a run gets: the flag, else the one ``accelerate launch`` passes on, else no."""
    return value or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def launched_processes() -> int:
    """The number of processes of this launch (1 without ``accelerate launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def bound_train_settings(cfg: TrainConfig) -> dict:
    """The generic loop's settings that change the trained weights (all but TRAIN_FREE_FIELDS), resolved.

    The process count and micro-batch are bound too: the same global batch split otherwise sums the gradient in
    another order, so the weights differ in the last bits and drift apart, and exact resume is lost.
    """
    settings = {k: v for k, v in asdict(cfg).items() if k not in TRAIN_FREE_FIELDS}
    settings["mixed_precision"] = resolved_mixed_precision(cfg.mixed_precision)
    settings["num_processes"] = launched_processes()
    return settings


def resume_hint(outdir_flag: str) -> str:
    """What to do about a refused setting, naming the CLI's output-folder flag."""
    return f"resume with the recorded value, or train the new one in another output folder ({outdir_flag} NEW_DIR)"


def bind_training_settings(cfg: TrainConfig, settings: dict, results_exist: bool = False,
                           outdir_flag: str = "--output_dir") -> Path | None:
    """Bind the settings that change a run's result to its output folder; the checkpoint to resume from.

    Once the folder holds a complete checkpoint (or results_exist: an arm's own outputs such as snapshots),
    settings that differ from its ``training_options.json`` are refused with one line naming each setting, the
    recorded and the new value (ConfigError). Call it before any model is built: on refusal nothing is written.
    Accepted settings are recorded by the main process when the folder has no result yet. A run started in a new
    folder from another run's checkpoint is a new run (a fork: the lab's mitigated run continues the lab run
    with a loss threshold), bound to its own settings from then on.
    """
    out = Path(cfg.output_dir)
    settings = jsonable(settings)
    resume = resolve_resume(cfg.resume_from_checkpoint, out)
    results = results_exist or bool(list_checkpoints(out))
    hint = resume_hint(outdir_flag)
    check_run_settings(out / TRAINING_OPTIONS, settings, results, hint, overwrite_flag=None)
    if os.environ.get("RANK", "0") == "0":
        out.mkdir(parents=True, exist_ok=True)
        bind_run_settings(out / TRAINING_OPTIONS, settings, results, hint, overwrite_flag=None)
    return resume


def _save_module(module: torch.nn.Module, path: Path) -> None:
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(path)
    else:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path / "model.pt")


def _load_module(module: torch.nn.Module, path: Path) -> None:
    # from_pretrained handles each library's key layout (e.g. transformers 5 drops the text_model. prefix).
    if hasattr(module, "save_pretrained") and hasattr(type(module), "from_pretrained"):
        loaded = type(module).from_pretrained(path)
        state = loaded.state_dict()
        del loaded
    else:
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    module.load_state_dict(state)


def save_ema_state(ema, named_params: list[tuple[str, torch.nn.Parameter]], folder: Path) -> None:
    """The EMA's shadow weights as safetensors keyed by parameter name, its scalars as JSON."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    if len(shadow) != len(named_params):
        raise TrainSetupError(f"the EMA holds {len(shadow)} tensors for {len(named_params)} trainable parameters")
    save_file({name: s.detach().cpu().contiguous() for (name, _), s in zip(named_params, shadow)},
              str(folder / EMA_WEIGHTS))
    write_json_atomic(folder / EMA_STATE, state)


def load_ema_state(ema, named_params: list[tuple[str, torch.nn.Parameter]], folder: Path) -> None:
    """Restore the EMA from a checkpoint (its safetensors and JSON, or a legacy pickle read weights-only); a file
    that is not what it should be is one line (UnsafeFileError / TrainSetupError)."""
    weights, scalars = folder / EMA_WEIGHTS, folder / EMA_STATE
    if scalars.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads(scalars.read_text())
            tensors = load_file(str(weights))
        except (OSError, ValueError, SafetensorError) as exc:
            raise UnsafeFileError(f"{folder}: unreadable EMA state ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); expected {EMA_STATE} and "
                                  f"{EMA_WEIGHTS} as this trainer writes them") from None
        names = [n for n, _ in named_params]
        if not isinstance(state, dict) or sorted(tensors) != sorted(names):
            raise UnsafeFileError(f"{weights}: holds other tensors than this run's {len(names)} trainable "
                                  f"parameters; expected the EMA of this model")
        state["shadow_params"] = [tensors[n] for n in names]
    elif (folder / LEGACY_EMA_STATE).is_file():
        state = safe_torch_load(folder / LEGACY_EMA_STATE)
    else:
        raise TrainSetupError(f"{folder}: no EMA state ({EMA_STATE}); the run uses --use_ema")
    shadow = state.get("shadow_params") if isinstance(state, dict) else None
    if not isinstance(shadow, list) or [tuple(t.shape) for t in shadow] != [tuple(p.shape) for _, p in named_params]:
        raise UnsafeFileError(f"{folder}: the EMA state does not match this model's trainable parameters")
    try:
        ema.load_state_dict(state)
    except ValueError as exc:
        raise UnsafeFileError(f"{folder}: bad EMA state ({exc})") from None


def architecture_mismatch(text: str) -> str:
    """The first size mismatch, missing or unexpected key of torch's load_state_dict error, in a few words."""
    size = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                     r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if size:
        return f"{size.group(1)}: {size.group(2)} in the checkpoint, {size.group(3)} here"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"", text)
    if keys:
        return f"{'missing' if keys.group(1) == 'Missing' else 'unexpected'} parameter {keys.group(2)}"
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else "load_state_dict failed"


@contextmanager
def accelerate_view(checkpoint: Path):
    """The folder to hand Accelerate's load_state: the checkpoint itself, or for a legacy checkpoint (its EMA in
    LEGACY_EMA_STATE) a temporary folder of links to every other file. Accelerate refuses a custom-state file
    that no registered object claims, and would read it with weights_only=False; load_ema_state reads it
    weights-only instead."""
    if not (checkpoint / LEGACY_EMA_STATE).exists():
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="diffmem-resume-") as tmp:
        for entry in checkpoint.iterdir():
            if entry.name != LEGACY_EMA_STATE:
                (Path(tmp) / entry.name).symlink_to(entry.resolve())
        yield Path(tmp)


def _sanitize_for_tracker(config: dict) -> dict:
    # TensorBoard hparams accept only scalars and strings.
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


# ----------------------------------------------------------------------------------- accelerator


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for ``cfg`` (mixed precision from cfg, else from the accelerate config / launch flags)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir))
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to in (None, "none") else cfg.report_to,
            project_config=project,
        )
    except (ValueError, RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()
        raise TrainSetupError(f"cannot set up Accelerate: {first[0] if first else type(exc).__name__}") from exc
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise TrainSetupError(
            f"{world} processes were launched but Accelerate runs each alone (no GPU: launch with "
            "ACCELERATE_USE_CPU=true for multi-process CPU training)"
        )
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype frozen modules are kept in: fp16/bf16 under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)




def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float):
    """Fused AdamW (or Adam with coupled L2, or momentum SGD, by ``cfg.optimizer``), or bitsandbytes' 8-bit
    AdamW with ``use_8bit_adam``."""
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainSetupError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise TrainSetupError("--use_8bit_adam needs bitsandbytes (pip install 'diffmem[bnb]')") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.adam_weight_decay,
                               foreach=True)
    # The fused kernel (CPU and CUDA) updates every tensor in one call: on small models the per-tensor Python
    # loop of the default CPU path was a fifth of a training step (a 49408-row token embedding included).
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=True)


def scheduled_ema(params, decay_fn: Callable[[int], float], foreach: bool):
    """A diffusers ``EMAModel`` whose β at optimizer step k (0-based) is ``decay_fn(k)``: EDM's half-life EMA
    and DiffMemorize's modes change β every step, which EMAModel's warm-up formula cannot express."""
    from diffusers.training_utils import EMAModel

    class ScheduledEMAModel(EMAModel):
        def get_decay(self, optimization_step: int) -> float:
            # EMAModel.step increments optimization_step before asking, so the first update asks for 1.
            return float(decay_fn(optimization_step - 1))

    return ScheduledEMAModel(params, foreach=foreach)


def configure_deepspeed(accelerator, cfg: TrainConfig, names: list[str]) -> bool:
    """Fit DeepSpeed's config to the loop (micro-batch, clipping); whether DeepSpeed runs."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return False
    if len(names) > 1:
        raise TrainSetupError(
            f"DeepSpeed trains one model per optimizer; got {', '.join(names)} (train one at a time)"
        )
    # Without a prepared DataLoader, Accelerate cannot infer DeepSpeed's micro-batch size.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        # DeepSpeed clips inside its step; --max_grad_norm is honoured through its config.
        plugin.deepspeed_config["gradient_clipping"] = float(cfg.max_grad_norm or 0.0)
    return True


def base_learning_rate(cfg: TrainConfig, num_processes: int) -> float:
    """cfg.learning_rate, times the global batch per optimizer step with ``scale_lr``."""
    if cfg.scale_lr:
        return cfg.learning_rate * cfg.gradient_accumulation_steps * cfg.train_batch_size * num_processes
    return cfg.learning_rate


def total_train_steps(cfg: TrainConfig, micro_batches: int) -> int:
    """cfg.max_train_steps, else the optimizer steps of num_train_epochs epochs of ``micro_batches`` each."""
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    return math.ceil(cfg.num_train_epochs * micro_batches / cfg.gradient_accumulation_steps)


def build_lr_scheduler(optimizer, cfg: TrainConfig, max_train_steps: int, num_processes: int,
                       schedule: StepSchedule | None = None):
    """The schedule's per-step LR multiplier, else cfg's named diffusers schedule, in the steps it will be
    stepped in: a prepared scheduler steps once per process per optimizer step (Accelerate, split_batches=False)."""
    P = num_processes
    if schedule is not None:
        lr = schedule.lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr(s // P))
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps * P,
                         num_training_steps=max_train_steps * P)


def build_ema(params: list[torch.nn.Parameter], cfg: TrainConfig, schedule: StepSchedule | None, foreach: bool):
    """fp32 shadow weights with the schedule's per-step β, else cfg.ema_decay; None without ``use_ema``."""
    if not cfg.use_ema:
        return None
    if schedule is not None and schedule.ema_beta is not None:
        return scheduled_ema(params, schedule.ema_beta, foreach=foreach)
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay, foreach=foreach)


# ------------------------------------------------------------------------------------------- loop


class Trainer:
    """The training loop. ``models`` maps names (checkpoint sub-folders) to trainable fp32 modules.

    loss_fn(batch, models) -> LossTerms is called with the prepared (possibly wrapped) models by name.
    validate_fn(step, models) -> [(caption, PIL image)] runs on the main process with unwrapped models (EMA
    weights swapped in with use_ema). export_fn(models, output_dir) writes the final result on the main
    process with the final (EMA when use_ema) weights. on_step_end(step, logs) runs on every process after
    each optimizer step (benchmarks, custom logging). schedule (a StepSchedule) paces LR, EMA β and snapshots
    per optimizer step in place of cfg's named LR schedule and constant β (the EDM wing's; the t2i wing has none).
    """

    def __init__(self, accelerator, cfg: TrainConfig, models: dict[str, torch.nn.Module],
                 loss_fn: Callable, dataset, collate_fn: Callable, *,
                 validate_fn: Callable | None = None, export_fn: Callable | None = None,
                 tracker_config: dict | None = None, extra_state: dict | None = None,
                 on_step_end: Callable[[int, dict], None] | None = None,
                 schedule: StepSchedule | None = None):
        if not models:
            raise ValueError("no trainable models")
        self.accelerator = accelerator
        self.cfg = cfg
        self.names = list(models)
        self.models = dict(models)
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.validate_fn = validate_fn
        self.export_fn = export_fn
        self.tracker_config = tracker_config or {}
        self.extra_state = extra_state or {}
        self.on_step_end = on_step_end
        self.schedule = schedule
        self.snapshot_fn = schedule.snapshot if schedule is not None else None
        self.output_dir = Path(cfg.output_dir)
        self.ema = None
        self.totals = {"seen": 0, "kept": 0}  # samples since step 0, whatever the resumes
        self.grad_norm = None  # of the last clipped step
        self.last_snapshot: int | None = None
        self.resume_path: Path | None = None

    # ------------------------------------------------------------------ main entry
    def train(self) -> TrainSummary:
        """Set up, resume, run optimizer steps up to max_train_steps, export; the run's summary."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        self._setup()
        step, resume_path = self._resume()
        epoch, start_batch = divmod(step * self.grad_accum, self.micro_batches)  # global micro-batches so far
        progress = tqdm(total=self.max_train_steps, initial=step, desc="steps",
                        disable=not (acc.is_local_main_process and cfg.show_progress))
        for model in self.prepared.values():
            model.train()
        logs: dict = {}
        window = None  # the accumulation window's sums over every process (on the device)
        while step < self.max_train_steps:
            for batch in self._epoch_loader(epoch, start_batch):
                sums = self._micro_step(batch)
                window = sums if window is None else window + sums
                if not acc.sync_gradients:
                    continue
                step += 1
                if self.ema is not None:
                    self.ema.step(self.train_params)
                logs = self._log_step(step, epoch, window.to_host())
                window = None
                progress.update(1)
                progress.set_postfix(loss=f"{logs['train_loss']:.4f}", dropped=f"{logs['dropped_fraction']:.2f}")
                self._after_step(step, logs)
                if step >= self.max_train_steps:
                    break
            epoch, start_batch = epoch + 1, 0
        progress.close()
        return self._finish(step, resume_path, logs)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Optimizer, LR schedule and EMA, prepared by Accelerate, with checkpoint hooks and trackers."""
        acc, cfg = self.accelerator, self.cfg
        P = acc.num_processes
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        is_deepspeed = configure_deepspeed(acc, cfg, self.names)
        params = self._params(self.models.values())
        optimizer = build_optimizer(params, cfg, base_learning_rate(cfg, P))
        if len(self.dataset) == 0:
            raise TrainSetupError("the training set is empty")
        self.micro_batches = micro_batches_per_epoch(len(self.dataset), cfg.train_batch_size, P)
        self.max_train_steps = total_train_steps(cfg, self.micro_batches)
        lr_scheduler = build_lr_scheduler(optimizer, cfg, self.max_train_steps, P, self.schedule)
        # foreach needs matching dtypes, which DeepSpeed fp16 breaks.
        self.ema = build_ema(params, cfg, self.schedule, foreach=not is_deepspeed)

        prepared = acc.prepare(*self.models.values(), optimizer, lr_scheduler)
        self.prepared = dict(zip(self.names, prepared[: len(self.names)]))
        self.optimizer, self.lr_scheduler = prepared[len(self.names):]
        self.grad_accum = acc.gradient_accumulation_steps  # DeepSpeed's config may set it
        if self.ema is not None:
            # Saved and loaded by our own hooks, not register_for_checkpointing: see EMA_WEIGHTS.
            self.ema.to(acc.device)
        self._register_hooks()
        self.train_params = self._params(self._unwrapped().values())

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if acc.trackers == [] and cfg.report_to not in (None, "none"):
                acc.init_trackers(cfg.tracker_project_name,
                                  _sanitize_for_tracker({**asdict(cfg), **self.tracker_config}))

    def _register_hooks(self) -> None:
        acc = self.accelerator

        def save_hook(models, weights, output_dir):
            if acc.is_main_process:
                out = Path(output_dir)
                for name, model in zip(self.names, models):
                    _save_module(acc.unwrap_model(model), out / name)
                if self.ema is not None:
                    unwrapped = [acc.unwrap_model(m) for m in models]
                    params = self._params(unwrapped)
                    self.ema.store(params)
                    self.ema.copy_to(params)
                    for name, model in zip(self.names, unwrapped):
                        _save_module(model, out / f"{name}_ema")
                    self.ema.restore(params)
                    # Named from the trainer's own models: under DeepSpeed the hook is given none.
                    save_ema_state(self.ema, self._named_params(self._unwrapped().values()), out)
            # The models are saved above in their own format; Accelerate must not save them again.
            weights.clear()

        def load_hook(models, input_dir):
            # Under DeepSpeed ``models`` is empty: the engine restores its own weights.
            for name, model in zip(self.names, models):
                try:
                    _load_module(acc.unwrap_model(model), Path(input_dir) / name)
                except RuntimeError as exc:
                    raise TrainSetupError(self._mismatch_line(name, exc)) from None
            models.clear()

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def _resume(self) -> tuple[int, Path | None]:
        """(optimizer steps done, checkpoint resumed from): the checkpoint's state loaded and its totals and log
        taken up, or step 0 with a fresh log."""
        acc, cfg = self.accelerator, self.cfg
        path = resolve_resume(cfg.resume_from_checkpoint, self.output_dir)
        if cfg.resume_from_checkpoint == "latest" and path is None:
            acc.print(f"no checkpoint in {self.output_dir} yet; starting a new run")
        if path is None:
            if acc.is_main_process and (self.output_dir / TRAIN_LOG).exists():
                (self.output_dir / TRAIN_LOG).unlink()
            return 0, None
        state = self._check_resume(path)
        self.resume_path = path
        verify_checkpoint_files(path)  # before Accelerate reads any of them
        with accelerate_view(path) as view:
            acc.load_state(str(view))
        if self.ema is not None:
            load_ema_state(self.ema, self._named_params(self._unwrapped().values()), path)
            self.ema.to(acc.device)
        step = int(state["global_step"])
        # Checkpoints written before these totals were recorded: every micro-batch is full, so seen is exact.
        seen = step * self.grad_accum * cfg.train_batch_size * acc.num_processes
        self.totals = {"seen": int(state.get("samples_seen", seen)), "kept": int(state.get("samples_kept", seen))}
        self._trim_log(step)
        acc.print(f"resumed from {path} at step {step}")
        return step, path

    def _mismatch_line(self, name: str, exc: RuntimeError) -> str:
        """One line for a checkpoint whose network does not fit this run's (a fork with another architecture):
        the first differing parameter, and the settings the checkpoint's run recorded otherwise."""
        path = self.resume_path
        detail = architecture_mismatch(str(exc))
        recorded = path.parent / TRAINING_OPTIONS
        ours = self.output_dir / TRAINING_OPTIONS
        differing = ""
        if recorded.is_file() and ours.is_file() and recorded.resolve() != ours.resolve():
            old, new = json.loads(recorded.read_text()), json.loads(ours.read_text())
            changed = [f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in sorted({**old, **new})
                       if old.get(k) != new.get(k) and k not in TRAIN_FREE_FIELDS]
            if changed:
                differing = f"; its run used {', '.join(changed)}"
        return (f"{path}: its {name} network does not fit this run's ({detail}){differing}; fork with the "
                f"checkpoint's architecture, or train the new one from scratch")

    def _check_resume(self, path: Path) -> dict:
        state = json.loads((path / TRAINER_STATE).read_text())
        now = self._state_record(state.get("global_step", 0))
        for key in RESUME_KEYS:
            if key in state and state[key] != now[key]:
                raise TrainSetupError(
                    f"{path}: written with {key}={state[key]!r} but this run has {key}={now[key]!r}; "
                    "resuming needs the same data order and step arithmetic"
                )
        return state

    def _state_record(self, global_step: int) -> dict:
        return {
            "global_step": global_step,
            "seed": self.cfg.seed,
            "train_batch_size": self.cfg.train_batch_size,
            "num_processes": self.accelerator.num_processes,
            "gradient_accumulation_steps": self.grad_accum,
            "num_samples": len(self.dataset),
            "shuffle": self.cfg.shuffle,
            "use_ema": self.cfg.use_ema,
            "model_names": self.names,
            "max_train_steps": self.max_train_steps,
            # Totals since step 0, whatever the resumes: a resumed run's summary continues them.
            "samples_seen": self.totals["seen"],
            "samples_kept": self.totals["kept"],
            **self.extra_state,
        }

    # ------------------------------------------------------------------ one step
    def _epoch_loader(self, epoch: int, start_batch: int) -> torch.utils.data.DataLoader:
        """This process's micro-batches of ``epoch`` from micro-batch ``start_batch`` on."""
        acc, cfg = self.accelerator, self.cfg
        sampler = EpochBatchSampler(len(self.dataset), cfg.train_batch_size, acc.num_processes, acc.process_index,
                                    cfg.seed, epoch, start_batch, cfg.shuffle)
        # The loader's own generator: starting an iterator otherwise draws from torch's global RNG, and a
        # resumed run starts one more iterator than the uninterrupted run, shifting every later dropout mask.
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
            num_workers=cfg.dataloader_num_workers, pin_memory=acc.device.type == "cuda",
            generator=torch_generator(cfg.seed, epoch, STREAM_LOADER),
        )

    def _micro_step(self, batch: dict) -> StepSums:
        """Forward and backward of one micro-batch, and at the end of an accumulation window clipping and the
        optimizer and LR steps; the micro-batch's sums over every process."""
        acc, cfg = self.accelerator, self.cfg
        batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with acc.accumulate(*self.prepared.values()):
            terms = self.loss_fn(batch, self.prepared)
            per_sample = terms.per_sample.float()
            keep = terms.keep if terms.keep is not None else torch.ones_like(per_sample, dtype=torch.bool)
            # One collective per micro-batch: the loss denominator needs the kept count of every process, and
            # the logged values come along.
            sums = StepSums.of_batch(per_sample, keep, terms.stats).all_reduce(acc)
            acc.backward(masked_mean(per_sample, keep, sums.kept, acc.num_processes))
            if acc.sync_gradients and cfg.max_grad_norm and cfg.max_grad_norm > 0:
                self.grad_norm = acc.clip_grad_norm_(self.train_params, cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return sums

    # ------------------------------------------------------------------ logging
    def _log_step(self, step: int, epoch: int, sums: StepSums) -> dict:
        """Count the step's samples and log its values (trackers and train_log.jsonl); the logged row."""
        self.totals["seen"] += int(sums.seen)
        self.totals["kept"] += int(sums.kept)
        logs = {
            "train_loss": sums.loss / max(sums.kept, 1.0),
            "dropped_fraction": 1.0 - sums.kept / sums.seen,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "epoch": epoch,
        }
        if self.ema is not None:
            logs["ema_beta"] = float(self.ema.cur_decay_value)
        if self.grad_norm is not None:
            logs["grad_norm"] = float(self.grad_norm)
        logs.update({name: total / sums.seen for name, total in sums.stats.items()})
        self.accelerator.log(logs, step=step)
        self._append_log({"step": step, **logs})
        return logs

    def _append_log(self, row: dict) -> None:
        # One whole line per write; no fsync per step (a network filesystem would make it a share of a small
        # model's step): the log is synced with each checkpoint, and rows after it are replayed on resume anyway.
        if self.accelerator.is_main_process:
            with open(self.output_dir / TRAIN_LOG, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _sync_log(self) -> None:
        log = self.output_dir / TRAIN_LOG
        if log.is_file():
            with open(log, "rb+") as f:
                os.fsync(f.fileno())

    def _trim_log(self, global_step: int) -> None:
        # Rows written after the checkpoint by an interrupted run are replayed by the resumed run; a kill in the
        # middle of a write leaves a torn last line, which the shared reader leaves out.
        log = self.output_dir / TRAIN_LOG
        if self.accelerator.is_main_process and log.is_file():
            rows = read_results(log, hint="remove the line: the log is a record, the checkpoint holds the state")
            kept = [r for r in rows if r.get("step", 0) <= global_step]
            write_json_atomic(log, kept, jsonl=True)

    def _log_images(self, step: int, images) -> None:
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                arr = np.stack([np.asarray(im.convert("RGB")) for _, im in images])
                tracker.writer.add_images("validation", arr, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=c) for c, im in images]}, step=step)

    # ------------------------------------------------------------------ saving
    def _after_step(self, step: int, logs: dict) -> None:
        """The step's hook, then what is due: snapshot, checkpoint (after the snapshot), validation."""
        cfg, schedule = self.cfg, self.schedule
        if self.on_step_end is not None:
            self.on_step_end(step, logs)
        if self.snapshot_fn is not None and schedule.snapshot_due is not None and schedule.snapshot_due(step):
            self._run_snapshot(step)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
            self._save_checkpoint(step)
        if self.validate_fn is not None and cfg.validation_steps and step % cfg.validation_steps == 0:
            self._run_validation(step)

    def _save_checkpoint(self, global_step: int) -> Path:
        acc, cfg = self.accelerator, self.cfg
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
        if acc.is_main_process:
            if cfg.checkpoints_total_limit is not None:
                existing = [p for s, p in list_checkpoints(self.output_dir, complete_only=False) if s != global_step]
                excess = len(existing) - (cfg.checkpoints_total_limit - 1)
                for old in existing[:max(excess, 0)]:
                    shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                shutil.rmtree(path)
        acc.wait_for_everyone()
        # Every process calls save_state: DeepSpeed writes its shards from all ranks (diffusers#2606 hangs
        # when only the main process does), and Accelerate saves each process's RNG state.
        acc.save_state(str(path))
        if acc.is_main_process:
            self._sync_log()
            write_json_atomic(path / TRAINER_STATE, self._state_record(global_step))
        acc.wait_for_everyone()
        return path

    def _run_snapshot(self, step: int) -> None:
        if self.accelerator.is_main_process:
            self._with_ema_weights(lambda models: self.snapshot_fn(step, models))
        self.accelerator.wait_for_everyone()
        self.last_snapshot = step

    def _run_validation(self, step: int) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            images = self._with_ema_weights(lambda models: self.validate_fn(step, models))
            out = self.output_dir / "validation" / f"step-{step}"
            out.mkdir(parents=True, exist_ok=True)
            for i, (caption, image) in enumerate(images):
                image.save(out / f"{i:03d}.png")
            write_json_atomic(out / "captions.json", [c for c, _ in images])
            self._log_images(step, images)
        acc.wait_for_everyone()

    def _with_ema_weights(self, fn: Callable[[dict], object]):
        """fn(unwrapped models) with the EMA weights swapped in (when there is an EMA), then restored."""
        models = self._unwrapped()
        params = self._params(models.values())
        if self.ema is not None:
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            return fn(models)
        finally:
            if self.ema is not None:
                self.ema.restore(params)

    def _finish(self, step: int, resume_path: Path | None, logs: dict) -> TrainSummary:
        """The last snapshot, the export with the final (EMA) weights, a last validation and train_summary.json."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        if self.snapshot_fn is not None and self.last_snapshot != step:
            self._run_snapshot(step)
        if acc.is_main_process:
            final = self._unwrapped()
            if self.ema is not None:
                self.ema.copy_to(self._params(final.values()))
            if self.export_fn is not None:
                self.export_fn(final, self.output_dir)
        summary = TrainSummary(global_step=step, samples_seen=self.totals["seen"], samples_kept=self.totals["kept"],
                               resumed_from=str(resume_path) if resume_path else None, final_logs=logs)
        if self.validate_fn is not None and (not cfg.validation_steps or step % cfg.validation_steps):
            # The final weights are already in place (EMA copied), so validate without swapping.
            ema, self.ema = self.ema, None
            self._run_validation(step)
            self.ema = ema
        if acc.is_main_process:
            write_json_atomic(self.output_dir / TRAIN_SUMMARY, asdict(summary))
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    # ------------------------------------------------------------------ helpers
    def _params(self, modules) -> list[torch.nn.Parameter]:
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _named_params(self, modules) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters in _params' order, named <model>.<parameter> (the EMA file's keys)."""
        return [(f"{name}.{n}", p) for name, m in zip(self.names, modules) for n, p in m.named_parameters()
                if p.requires_grad]

    def _unwrapped(self) -> dict[str, torch.nn.Module]:
        return {n: self.accelerator.unwrap_model(m) for n, m in self.prepared.items()}
