"""Caption screening throughput and memory (detect/screen.py), measured in one run.

    python bench/bench_screen.py                       # the lab on this machine: 1 vs 2 processes, memory
    python bench/bench_screen.py --captions 4000 --read_captions 1000000 --gpus 8 --total 2000000

(1) Reading and deduplicating --read_captions synthetic captions from a parquet file (the prepare stage):
    the peak of Python's allocations (tracemalloc) per million captions read, and the seconds per million.
(2) Screening --captions unique captions on --model (default: the shipped lab) with the first-step detector,
    once as one process and once under ``accelerate launch --num_processes 2`` (no confirmation): captions/s
    of each (captions / the screen stage's wall time in summary.json, all processes together) and the ratio.
(3) The projected wall time of --total captions on --gpus devices from (2)'s one-process figure when it ran on a
    GPU (--device is taken from the machine; on a CPU the projection is not printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
WORDS = ("red blue ship stone cloud river piano violin ocean tower green lamp fox whale car tree city forest beach "
         "moon star sun dog cat bird house road bridge glass metal").split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + f" {i}" for i in range(n)]


def bench_read(folder: Path, n: int) -> dict:
    from diffmem.common.t2i.screen.captions import CaptionSource, deduplicate

    path = folder / "read.parquet"
    pq.write_table(pa.table({"caption": synthetic_captions(n)}), path, row_group_size=65536)
    tracemalloc.start()
    t0 = time.perf_counter()
    unique, rows = deduplicate(CaptionSource(path).rows())
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"captions": rows, "unique": len(unique), "peak_mib_per_million": peak / 2 ** 20 / (n / 1e6),
            "seconds_per_million": seconds / (n / 1e6)}


def bench_screen(folder: Path, model: str, n: int, processes: int, batch_size: int) -> dict:
    path = folder / "screen.parquet"
    if not path.exists():
        pq.write_table(pa.table({"caption": synthetic_captions(n, seed=1)}), path)
    out = folder / f"out-{processes}"
    args = [str(REPO / "detect/screen.py"), "--model", model, "--captions", str(path), "--out", str(out),
            "--confirm", "none", "--batch_size", str(batch_size), "--no_progress"]
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1
              else [sys.executable])
    res = subprocess.run(launch + args, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    t = json.loads((out / "summary.json").read_text())["throughput"]
    return {"processes": processes, "captions": n, "screen_stage_s": t["screen stage (s)"],
            "captions_per_s": n / t["screen stage (s)"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "data" / "lab"))
    p.add_argument("--captions", type=int, default=4000, help="captions screened by each run of (2)")
    p.add_argument("--read_captions", type=int, default=1_000_000, help="captions read and deduplicated in (1)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--total", type=int, default=2_000_000)
    a = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        read = bench_read(folder, a.read_captions)
        print(f"read+dedup: {read['captions']:,} captions, peak {read['peak_mib_per_million']:.0f} MiB per million, "
              f"{read['seconds_per_million']:.1f} s per million")
        one = bench_screen(folder, a.model, a.captions, 1, a.batch_size)
        two = bench_screen(folder, a.model, a.captions, 2, a.batch_size)
    for r in (one, two):
        print(f"screen, {r['processes']} process(es): {r['captions_per_s']:.1f} captions/s "
              f"({r['captions']:,} in {r['screen_stage_s']:.1f} s)")
    print(f"scaling 2 vs 1 process: {two['captions_per_s'] / one['captions_per_s']:.2f}x "
          f"(on {os.cpu_count()} CPU cores{'' if not torch.cuda.is_available() else ', GPUs'})")
    if torch.cuda.is_available():
        hours = a.total / (one["captions_per_s"] * a.gpus) / 3600
        print(f"projected: {a.total:,} captions on {a.gpus} x {torch.cuda.get_device_name()}: {hours:.2f} h")
    else:
        print("projected GPU wall time: not printed (no GPU here)")


if __name__ == "__main__":
    main()
