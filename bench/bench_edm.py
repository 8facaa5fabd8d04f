"""EDM training and sampling throughput: the diffmem trainer vs a plain EDM-style loop, and the Heun sampler.

    python bench/bench_edm.py                                          # tiny config, CPU
    python bench/bench_edm.py --preset diffmemorize --device cuda      # DiffMemorize's basic DDPM++, batch 512
    python bench/bench_edm.py --preset diffmemorize --device cuda --mixed_precision bf16

Both training variants train the same randomly initialised EDMNetwork (VP preconditioning, Adam, EMA, LR
ramp-up) on the same random images, in one process, interleaved over --rounds (best round reported):
  plain   - a loop as NVlabs/edm's training_loop writes it: torch.rand/randn_like noise for the whole batch, the
            VP loss summed over pixels, backward, per-step LR, Adam, EMA by lerp; no Accelerate, no trainer;
  trainer - common.training.loop.Trainer with common.edm.train.EDMTrainingLoss (per-sample seeded draws, masked
            mean, one all-reduce per micro-batch, the EMA through diffusers' EMAModel).
images/s is the batch over the median step time. Prints both, trainer/plain (target >= 0.95), sampler
images/s (Heun, --sample_steps) and, on a GPU, peak memory of each. No timing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import Timer, sync

PRESETS = {
    # The digits-sized CPU toy of docs/edm-training.md (231 k parameters).
    "tiny": dict(resolution=8, channels=1, num_channels=16, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(),
                 batch=64),
    # DiffMemorize's basic setup: DDPM++, 128 channels, mult 2,2,2, 2 blocks, attention at 16, CIFAR 32×32.
    "diffmemorize": dict(resolution=32, channels=3, num_channels=128, channel_mult=(2, 2, 2), num_blocks=2,
                         attn_resolutions=(16,), batch=512),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--batch", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sample_batch", type=int, default=None, help="default: the training batch")
    p.add_argument("--sample_steps", type=int, default=18)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    if args.device == "cpu" and args.mixed_precision == "fp16":
        p.error("fp16 mixed precision needs --device cuda")
    return args


def build(args):
    from diffmem.common.edm.networks.build import ArchConfig, build_network
    from diffmem.common.edm.precond import Preconditioning

    preset = {k: v for k, v in PRESETS[args.preset].items() if k != "batch"}
    torch.manual_seed(0)
    return build_network(ArchConfig(dropout=0.13, **preset), Preconditioning("vp"))


def autocast(args, device):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def run_plain(args, master, images, batch, device):
    """NVlabs/edm's training loop in its essentials (VPLoss, Adam, LR ramp-up, EMA lerp)."""
    net = copy.deepcopy(master).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)  # the trainer's optimizer
    pre = net.pre
    gen = torch.Generator().manual_seed(0)
    timer = Timer(device, args.warmup, batch)
    for step in range(args.warmup + args.steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        y = images[idx].to(device)
        u = torch.rand(batch, device=device)
        sigma = pre.training_sigma(u)
        n = torch.randn_like(y) * sigma.view(-1, 1, 1, 1)
        with autocast(args, device):
            d = net(y + n, sigma)
        loss = (pre.weight(sigma).view(-1, 1, 1, 1) * (d.float() - y) ** 2).sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = 2e-4 * min(step * batch / 1e7, 1)
        opt.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.copy_(pn.detach().lerp(pe, 0.999))
        timer.step()
    return timer.samples_per_s()


def run_trainer(args, master, images, batch, device, workdir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from diffmem.common.edm.dataset.edm_zip import DatasetArrays, ImageDataset, collate_image_batch
    from diffmem.common.edm.schedule import resolve_schedule
    from diffmem.common.edm.train import EDMTrainingLoss
    from diffmem.common.training.config import TrainConfig
    from diffmem.common.training.loop import StepSchedule, Trainer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=args.mixed_precision)
    net = copy.deepcopy(master).train()
    raw = ((images.numpy() + 1) * 127.5).round().astype(np.uint8)
    dataset = ImageDataset(DatasetArrays(raw, None, [str(i) for i in range(len(raw))]))
    schedule = resolve_schedule("edm", duration_mimg=1.0, ema_mimg=0.5, dataset_size=len(raw), batch=batch)
    cfg = TrainConfig(output_dir=str(workdir), train_batch_size=batch, max_train_steps=args.warmup + args.steps,
                      learning_rate=2e-4, optimizer="adam", adam_weight_decay=0.0, max_grad_norm=0.0,
                      use_ema=True, checkpointing_steps=10**9, report_to="none", show_progress=False)
    timer = Timer(acc.device, args.warmup, batch)
    Trainer(acc, cfg, {"net": net}, EDMTrainingLoss(net.pre, acc.device, conditional=False), dataset,
            collate_image_batch, on_step_end=timer.step,
            schedule=StepSchedule(lr=schedule.lr, ema_beta=schedule.ema)).train()
    return timer.samples_per_s()


def run_sampler(args, master, device):
    from diffmem.common.edm.sampler import SamplerSettings, generate_images

    net = copy.deepcopy(master).to(device).eval().requires_grad_(False)
    n = args.sample_batch or (args.batch or PRESETS[args.preset]["batch"])
    settings = SamplerSettings(num_steps=args.sample_steps)
    list(generate_images(net, list(range(n)), n, settings, device=device))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    list(generate_images(net, list(range(n, 2 * n)), n, settings, device=device))
    sync(device)
    return n / (time.perf_counter() - t0)


def peak_memory(device, fn):
    if device.type != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    return out, torch.cuda.max_memory_allocated(device) / 2**30


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    batch = args.batch or PRESETS[args.preset]["batch"]
    master = build(args)
    c, r = PRESETS[args.preset]["channels"], PRESETS[args.preset]["resolution"]
    images = torch.rand(max(4 * batch, 256), c, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results, memory = {"plain": [], "trainer": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name in ("plain", "trainer"):
                fn = (lambda: run_plain(args, master, images, batch, device)) if name == "plain" else \
                     (lambda: run_trainer(args, master, images, batch, device, Path(tmp) / f"run{i}"))
                value, mem = peak_memory(device, fn)
                results[name].append(value)
                memory[name] = mem
    sampling, memory["sampler"] = peak_memory(device, lambda: run_sampler(args, master, device))
    best = {k: max(v) for k, v in results.items()}
    figures = {
        "preset": args.preset, "device": args.device, "mixed_precision": args.mixed_precision, "batch": batch,
        "train_images_per_s": {k: round(v, 2) for k, v in best.items()},
        "trainer_over_plain": round(best["trainer"] / best["plain"], 3),
        "sampler_images_per_s": round(sampling, 2), "sample_steps": args.sample_steps,
        "peak_memory_gib": {k: (round(v, 2) if v is not None else None) for k, v in memory.items()},
        "rounds": {k: [round(x, 2) for x in v] for k, v in results.items()},
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
