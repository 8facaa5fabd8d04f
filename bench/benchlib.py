"""What the inference benchmarks share: the model they time, their prompts and a synchronised timer."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffmem.common.cli import quiet_hub_logging
from diffmem.common.t2i.pipeline import assemble_pipeline, build_components, load_pipeline, parse_dtype
from diffmem.common.t2i.prompts import read_prompts

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sdv1_500_memorized.jsonl"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every inference benchmark takes: which model, where, in what precision, which prompts."""
    p.add_argument("--arch", choices=("tiny", "sd-v1"), default="tiny", help="random-weight model to build")
    p.add_argument("--model_id", help="benchmark a saved pipeline instead of building one")
    p.add_argument("--prompts", help="prompt file (default: ../shared/data/sdv1_500_memorized.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--out", help="also write the figures to this JSON file")


def bench_pipeline(args: argparse.Namespace):
    """The pipeline to time: --model_id loaded through from_pretrained, or a random --arch one built here."""
    quiet_hub_logging()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.model_id:
        pipe = load_pipeline(args.model_id, dtype=dtype, device=device)
    else:
        with tempfile.TemporaryDirectory() as tok_dir:
            pipe = assemble_pipeline(build_components(args.arch, seed=0, tokenizer_dir=tok_dir)).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_prompts(path: str | None, n: int) -> list[str]:
    """n prompts from a file (the shared 500 memorized prompts by default), cycled; generated if absent."""
    source = Path(path) if path else SHARED_PROMPTS
    if source.exists():
        prompts = [r.prompt for r in read_prompts(source)]
    else:  # no shared data on this machine: generated captions of LAION-like length
        words = "vintage poster of a red house near the lake at dawn with mountains and a small boat".split()
        prompts = [" ".join(words[(i + k) % len(words)] for k in range(6 + i % 10)) for i in range(n)]
    return (prompts * (n // len(prompts) + 1))[:n]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), synchronised with the device on both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class Timer:
    """Timestamps of optimizer steps; samples/s over the steps after warmup."""

    def __init__(self, device, warmup, batch):
        self.device, self.warmup, self.batch, self.times = device, warmup, batch, []

    def step(self, *_):
        sync(self.device)
        self.times.append(time.perf_counter())

    def samples_per_s(self):
        # The median step: robust to the stalls other jobs on a shared machine cause in single steps.
        timed = self.times[self.warmup - 1:]
        return self.batch / statistics.median(b - a for a, b in zip(timed, timed[1:]))
