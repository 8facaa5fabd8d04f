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
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffmem.common.results import read_results, write_json_atomic
from diffmem.common.safe_load import verify_checkpoint_files
from diffmem.common.seeding import STREAM_LOADER, STREAM_PERMUTATION, derive_seed, torch_generator
from diffmem.common.training.builders import (
    base_learning_rate,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    configure_deepspeed,
    total_train_steps,
)
from diffmem.common.training.checkpoints import (
    CHECKPOINT_PREFIX,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    TRAINER_STATE,
    TRAINING_OPTIONS,
    accelerate_view,
    architecture_mismatch,
    list_checkpoints,
    load_ema_state,
    load_module,
    resolve_resume,
    save_ema_state,
    save_module,
)
from diffmem.common.training.config import RESUME_KEYS, TRAIN_FREE_FIELDS, TrainConfig, TrainSetupError
from diffmem.common.training.loss import masked_mean


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
    dropped_fraction: float  # of every sample seen since step 0, left out of the loss by its keep mask
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


def _sanitize_for_tracker(config: dict) -> dict:
    # TensorBoard hparams accept only scalars and strings.
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Trainer:
    """The training loop. ``models`` maps names (checkpoint sub-folders) to trainable fp32 modules.

    loss_fn(batch, models) -> LossTerms is called with the prepared (possibly wrapped) models by name.
    validate_fn(step, models) -> [(caption, PIL image)] runs on the main process with unwrapped models (EMA
    weights swapped in with use_ema). export_fn(models, output_dir) writes the final result on the main
    process with the final (EMA when use_ema) weights. on_step_end(step, logs) runs on every process after
    each optimizer step (benchmarks, custom logging). schedule (a StepSchedule) paces LR, EMA β and snapshots
    per optimizer step in place of cfg's named LR schedule and constant β (the EDM wing's; the t2i wing has none).
    The first optimizer step whose every sample the keep mask drops prints one warning line (naming drop_rule,
    e.g. ``--hard_threshold 2``): the loss gives that step no gradient; the run's dropped fraction is in the summary.
    """

    def __init__(self, accelerator, cfg: TrainConfig, models: dict[str, torch.nn.Module],
                 loss_fn: Callable, dataset, collate_fn: Callable, *,
                 validate_fn: Callable | None = None, export_fn: Callable | None = None,
                 tracker_config: dict | None = None, extra_state: dict | None = None,
                 on_step_end: Callable[[int, dict], None] | None = None,
                 schedule: StepSchedule | None = None, drop_rule: str | None = None):
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
        self.drop_rule = drop_rule  # what the loss's keep mask is, in the user's words (the warning names it)
        self.warned_all_dropped = False
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
                    save_module(acc.unwrap_model(model), out / name)
                if self.ema is not None:
                    unwrapped = [acc.unwrap_model(m) for m in models]
                    params = self._params(unwrapped)
                    self.ema.store(params)
                    self.ema.copy_to(params)
                    for name, model in zip(self.names, unwrapped):
                        save_module(model, out / f"{name}_ema")
                    self.ema.restore(params)
                    # Named from the trainer's own models: under DeepSpeed the hook is given none.
                    save_ema_state(self.ema, self._named_params(self._unwrapped().values()), out)
            # The models are saved above in their own format; Accelerate must not save them again.
            weights.clear()

        def load_hook(models, input_dir):
            # Under DeepSpeed ``models`` is empty: the engine restores its own weights.
            for name, model in zip(self.names, models):
                try:
                    load_module(acc.unwrap_model(model), Path(input_dir) / name)
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
        if sums.seen and not sums.kept and not self.warned_all_dropped:
            self.warned_all_dropped = True
            by = f" by {self.drop_rule}" if self.drop_rule else " by the loss's keep mask"
            self.accelerator.print(f"warning: step {step}: all {int(sums.seen)} samples of the step were dropped{by}: "
                                   f"the loss gives it no gradient (said once; {TRAIN_LOG} has each step's "
                                   f"dropped_fraction, {TRAIN_SUMMARY} the run's)")
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
        seen, kept = self.totals["seen"], self.totals["kept"]
        summary = TrainSummary(global_step=step, samples_seen=seen, samples_kept=kept,
                               dropped_fraction=1.0 - kept / seen if seen else 0.0,
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
