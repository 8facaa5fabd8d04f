"""Training throughput: the diffmem trainer vs a minimal diffusers-example loop, and the --hard_threshold cost.

    python bench/bench_train.py                                   # tiny model, CPU
    python bench/bench_train.py --arch sd-v1 --device cuda --mixed_precision fp16 \\
        --gradient_checkpointing --batch_size 8                  # SD-v1-sized random UNet on a GPU

Three variants train the same randomly initialised model on the same images, in one process, interleaved over
--rounds (the best round of each is reported, which damps noise from other jobs on the machine):
  example   - the diffusers text-to-image example's loop (torchvision transforms, shuffled DataLoader,
              randn_like noise, accelerator.accumulate/backward/clip, loss gathered for logging every step);
  trainer   - common.training.loop.Trainer with common.t2i.train.TextToImageLoss (per-sample seeded draws, masked
              mean, one all-reduce per micro-batch);
  threshold - the same with --hard_threshold (one extra no-grad UNet forward per batch).
samples/s is batch size over the median optimizer-step time. Prints samples/s, peak GPU memory, trainer/example
(target >= 0.95), threshold/trainer, and the threshold
overhead in units of one no-grad UNet forward on the batch (target <= 1). No timing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchlib import Timer, sync

RESOLUTION = {"tiny": 16, "sd-v1": 512}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("tiny", "sd-v1"), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n_images", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on --device cpu, where a shared machine's spare cores make "
                        "multi-threaded timings erratic; torch's default on cuda)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    if args.device == "cpu" and args.mixed_precision == "fp16":
        p.error("fp16 mixed precision needs --device cuda")
    if min(args.batch_size, args.steps, args.rounds, args.n_images) < 1 or args.warmup < 1:
        p.error("--batch_size, --steps, --rounds, --n_images and --warmup must be >= 1")
    return args


def write_images(folder: Path, n: int, res: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
        (folder / f"{i:04d}.txt").write_text(f"a photo of object number {i} on a table")


def fresh_accelerator(args):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)


def run_example(args, parts, master_unet, folder, res):
    """The diffusers text-to-image example's training loop, minus its argument parsing and saving."""
    from diffusers.optimization import get_scheduler

    acc = fresh_accelerator(args)
    wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    unet = copy.deepcopy(master_unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    tok, vae, te, sched = parts["tokenizer"], parts["vae"], parts["text_encoder"], parts["scheduler"]
    try:
        from torchvision import transforms

        tf = transforms.Compose([
            transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomCrop(res), transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
        ])
    except ImportError:  # a torch-only environment: the same operations through PIL
        from diffmem.common.t2i.text_image_data import ImageTransformConfig, transform_image

        rng = np.random.default_rng(0)

        def tf(image):
            return transform_image(image, ImageTransformConfig(res), rng)
    files = sorted(folder.glob("*.jpg"))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            from PIL import Image

            with Image.open(files[i]) as im:
                pixels = tf(im.convert("RGB"))
            ids = tok(files[i].with_suffix(".txt").read_text(), max_length=tok.model_max_length,
                      padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": pixels, "input_ids": ids}

    def collate(items):
        return {"pixel_values": torch.stack([x["pixel_values"] for x in items]).contiguous().float(),
                "input_ids": torch.stack([x["input_ids"] for x in items])}

    loader = torch.utils.data.DataLoader(DS(), shuffle=True, batch_size=args.batch_size, collate_fn=collate)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    total = args.warmup + args.steps
    lr_sched = get_scheduler("constant", optimizer=opt, num_warmup_steps=0, num_training_steps=total)
    unet, opt, loader, lr_sched = acc.prepare(unet, opt, loader, lr_sched)
    timer = Timer(acc.device, args.warmup, args.batch_size)
    step = 0
    while step < total:
        for batch in loader:
            with acc.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(wdt)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
                noisy = sched.add_noise(latents, noise, t)
                enc = te(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, t, enc, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                acc.gather(loss.repeat(args.batch_size)).mean().item()
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
                lr_sched.step()
                opt.zero_grad()
            if acc.sync_gradients:
                step += 1
                timer.step()
                if step >= total:
                    break
    acc.end_training()
    del unet, opt
    return timer.samples_per_s()


def run_trainer(args, parts, master_unet, records, res, workdir, threshold):
    from diffmem.common.t2i.text_image_data import (
        CaptionConfig,
        ImageTransformConfig,
        TextImageCollator,
        TextImageDataset,
    )
    from diffmem.common.t2i.train import TextToImageLoss
    from diffmem.common.training.config import TrainConfig
    from diffmem.common.training.loop import Trainer

    acc = fresh_accelerator(args)
    wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    unet = copy.deepcopy(master_unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    cfg = TrainConfig(output_dir=str(workdir), train_batch_size=args.batch_size,
                      max_train_steps=args.warmup + args.steps, learning_rate=1e-5, lr_warmup_steps=0,
                      checkpointing_steps=10 ** 9, report_to="none", show_progress=False)
    dataset = TextImageDataset(records, ImageTransformConfig(res), CaptionConfig(), seed=0,
                               tokenizer=parts["tokenizer"])
    loss_fn = TextToImageLoss(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                              noise_scheduler=parts["scheduler"], weight_dtype=wdt, device=acc.device,
                              unwrap=acc.unwrap_model, hard_threshold=threshold)
    timer = Timer(acc.device, args.warmup, args.batch_size)
    Trainer(acc, cfg, {"unet": unet}, loss_fn, dataset, TextImageCollator(parts["tokenizer"]),
            on_step_end=timer.step).train()
    del unet
    return timer.samples_per_s()


def no_grad_forward_seconds(args, parts, master_unet, res, repeats=10):
    """Seconds of one no-grad UNet forward on a training batch (the unit of the threshold's cost)."""
    acc = fresh_accelerator(args)
    wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    unet = acc.prepare(copy.deepcopy(master_unet))
    unet = acc.unwrap_model(unet)
    down = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    x = torch.randn(args.batch_size, 4, res // down, res // down, device=acc.device, dtype=wdt)
    t = torch.randint(0, 1000, (args.batch_size,), device=acc.device)
    emb = torch.randn(args.batch_size, 77, unet.config.cross_attention_dim, device=acc.device, dtype=wdt)
    with torch.no_grad():
        for _ in range(2):
            unet(x, t, emb)
        sync(acc.device)
        start = time.perf_counter()
        for _ in range(repeats):
            unet(x, t, emb)
        sync(acc.device)
    acc.end_training()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers import DDPMScheduler

    from diffmem.common.t2i.pipelines import build_components
    from diffmem.common.t2i.text_image_data import read_image_folder

    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    res = RESOLUTION[args.arch]
    device = torch.device(args.device)
    wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.n_images, res)
        records = read_image_folder(tmp / "images")
        comps = build_components(args.arch, seed=0, tokenizer_dir=tmp / "tokenizer")
        parts = {
            "tokenizer": comps["tokenizer"],
            "vae": comps["vae"].requires_grad_(False).to(device, wdt),
            "text_encoder": comps["text_encoder"].requires_grad_(False).to(device, wdt),
            "scheduler": DDPMScheduler.from_config(comps["scheduler"].config),
        }
        master = comps["unet"]
        n_params = sum(p.numel() for p in master.parameters())
        results = {"example": [], "trainer": [], "threshold": []}
        peak = {}
        for r in range(args.rounds):
            for name in results:
                # Accelerator objects hold reference cycles to the previous run's model and optimizer:
                # collect them, or their memory is counted in this run's peak.
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                if name == "example":
                    sps = run_example(args, parts, master, tmp / "images", res)
                else:
                    sps = run_trainer(args, parts, master, records, res, tmp / f"run-{name}-{r}",
                                      threshold=1e9 if name == "threshold" else None)
                results[name].append(sps)
                if device.type == "cuda":
                    peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2 ** 30)
                print(f"round {r}: {name:9s} {sps:8.2f} samples/s", file=sys.stderr, flush=True)
        fwd = no_grad_forward_seconds(args, parts, master, res)

    best = {k: max(v) for k, v in results.items()}
    step_plain = args.batch_size / best["trainer"]
    step_thr = args.batch_size / best["threshold"]
    figures = {
        "arch": args.arch, "unet_params_M": round(n_params / 1e6, 1), "device": args.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "samples_per_s": {k: round(v, 3) for k, v in best.items()},
        "samples_per_s_all_rounds": {k: [round(x, 3) for x in v] for k, v in results.items()},
        "median_samples_per_s": {k: round(statistics.median(v), 3) for k, v in results.items()},
        "trainer_over_example": round(best["trainer"] / best["example"], 3),
        "threshold_over_trainer": round(best["threshold"] / best["trainer"], 3),
        "no_grad_forward_s": round(fwd, 5),
        "threshold_overhead_in_forwards": round((step_thr - step_plain) / fwd, 3),
    }
    if peak:
        figures["peak_memory_GiB"] = {k: round(v, 2) for k, v in peak.items()}
    print(f"{args.arch} ({figures['unet_params_M']}M UNet params) on {figures['device_name']}, "
          f"mixed_precision={args.mixed_precision}, gradient_checkpointing={args.gradient_checkpointing}, "
          f"batch {args.batch_size}, best of {args.rounds} rounds x {args.steps} steps")
    for k in results:
        mem = f"   peak {peak[k]:.2f} GiB" if k in peak else ""
        print(f"  {k:9s} {best[k]:9.2f} samples/s{mem}")
    print(f"  trainer / example            {figures['trainer_over_example']:.3f}  (target >= 0.95)")
    print(f"  threshold / trainer          {figures['threshold_over_trainer']:.3f}")
    print(f"  threshold overhead           {figures['threshold_overhead_in_forwards']:.2f} no-grad forwards "
          f"(one forward = {fwd * 1e3:.1f} ms; target <= 1)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
