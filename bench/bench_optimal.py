"""The optimal denoiser D(x; σ) = Σᵢ softmaxᵢ(−‖x − yᵢ‖²/2σ²) yᵢ three ways: speed, answers and peak memory.

    python bench/bench_optimal.py                       # CIFAR-shaped 3×32×32, N = 1024, batch 16, CPU: seconds
    python bench/bench_optimal.py --device cuda --n 50000 --batch 64 --no_broadcast

  ours       - common.edm.networks.optimal.OptimalDenoiser: float64 per-pair distances, chunked online softmax
               (memory B × chunk);
  ours_mm    - the same with matmul=True: float64 ‖x‖² + ‖y‖² − 2x·y by GEMM;
  optimedm   - Gu et al.'s OptimEDM style: fp32 torch.cdist² / 2σ² over the whole set, softmax, weighted sum
               (memory B × N);
  broadcast  - Zhang et al.'s style: fp32 (x[:, None] − y[None]) — a B × N × C × H × W tensor — squared and
               summed, softmax, weighted sum.
The training set has planted near-duplicates (pairs one uint8 level apart in one pixel) and each query sits
between a pair with float64 weights sigmoid(±1.5) at σ = 0.002, where fp32 distances (error ~1e-4 on ‖·‖² ≈ 300,
×1/2σ² = 125 000) get the weights wrong. Answers: max |D − D_ref| against a float64 broadcast reference, per σ.
calls/s: the median of --repeats timed calls at σ = 0.002. Peak memory: on CPU the peak RSS during one call of
that method in a fresh process (sampled by a thread), minus its RSS just before the call (a fresh process: freed
heap that one method leaves resident would otherwise hide the next one's); on CUDA torch.cuda.max_memory_allocated
above the memory in use before the call. Prints JSON. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.common.edm.networks.optimal import OptimalDenoiser

METHODS = ("ours", "ours_mm", "optimedm", "broadcast")
SIGMAS = (0.002, 0.05, 1.0)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n", type=int, default=1024, help="training images (default 1024)")
    p.add_argument("--batch", type=int, default=16, help="queries per denoiser call (default 16)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="ours: training images per chunk")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no_broadcast", action="store_true", help="skip the B×N×D method (it needs B·N·D·4 bytes)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.add_argument("--memory_of", choices=METHODS, default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    if args.n < 2 * args.batch:
        p.error(f"expected --n >= 2 × --batch (each query has its own planted pair), got {args.n} and {args.batch}")
    return args


def problem(n: int, batch: int, shape: tuple[int, int, int], sigma: float = 0.002, logit: float = 1.5):
    """uint8 training images with `batch` planted twin pairs, and one query between each pair (float64)."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, 255, (n, *shape), dtype=np.uint8)
    u.reshape(n, -1)[batch:2 * batch] = u.reshape(n, -1)[:batch]
    u.reshape(n, -1)[batch:2 * batch, 0] += 1
    y = torch.from_numpy(u).double().reshape(n, -1) / 127.5 - 1
    a, b = y[:batch], y[batch:2 * batch]
    diff = b - a
    noise = torch.from_numpy(rng.normal(0, 0.3, a.shape))
    noise -= (noise * diff).sum(1, keepdim=True) / (diff * diff).sum(1, keepdim=True) * diff
    # ‖x − a‖² − ‖x − b‖² = 2 (x − midpoint)·diff: this offset makes log w_b − log w_a = logit at σ.
    x = 0.5 * (a + b) + noise + logit * sigma**2 / (diff * diff).sum(1, keepdim=True) * diff
    return torch.from_numpy(u), x.reshape(batch, *shape)


def reference(x: torch.Tensor, sigma: float, y: torch.Tensor) -> torch.Tensor:
    """Float64, all N at once, one query at a time (N × D differences each)."""
    y = y.reshape(len(y), -1).double().cpu()
    rows = []
    for q in x.reshape(len(x), -1).double().cpu():
        logw = -(q[None] - y).square().sum(1) / (2 * sigma**2)
        rows.append(torch.softmax(logw, 0) @ y)
    return torch.stack(rows)


def optimedm(x: torch.Tensor, sigma: float, y32: torch.Tensor) -> torch.Tensor:
    """fp32 cdist² / 2σ² + softmax over the whole set (OptimEDM)."""
    logw = -torch.cdist(x.reshape(len(x), -1).float(), y32).square() / (2 * sigma**2)
    return torch.softmax(logw, dim=1) @ y32


def broadcast(x: torch.Tensor, sigma: float, y32: torch.Tensor) -> torch.Tensor:
    """fp32 differences of every query with every image, B × N × D at once (Zhang et al.)."""
    d2 = (x.reshape(len(x), 1, -1).float() - y32[None]).square().sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ y32


def methods(u: torch.Tensor, chunk: int, device, no_broadcast: bool) -> dict:
    """name → call(x, σ) on the device, each with its training set prepared once."""
    ours = OptimalDenoiser(u, chunk_size=chunk).to(device)
    ours_mm = OptimalDenoiser(u, chunk_size=chunk, matmul=True).to(device)
    y32 = (u.to(device).float() / 127.5 - 1).reshape(len(u), -1)
    fns = {"ours": lambda x, s: ours(x, s), "ours_mm": lambda x, s: ours_mm(x, s),
           "optimedm": lambda x, s: optimedm(x, s, y32),
           "broadcast": lambda x, s: broadcast(x, s, y32)}
    if no_broadcast:
        fns.pop("broadcast")
    return fns


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_cuda_bytes(fn, x, device) -> int:
    """torch.cuda.max_memory_allocated during one call, above what was allocated before it."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(x, 0.002)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_rss_child(method: str, argv: list[str]) -> int:
    """Peak RSS of one call of `method` in a fresh process (ru_maxrss after − RSS before the call)."""
    res = subprocess.run([sys.executable, __file__, *argv, "--memory_of", method], capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed: {res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1])


def peak_rss_during(fn) -> int:
    """The highest RSS seen while fn() runs (sampled every 0.2 ms by a thread; torch ops release the GIL)."""
    peak, done = [rss_bytes()], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(2e-4)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], rss_bytes())


def memory_child(args) -> None:
    u, x = problem(args.n, args.batch, (args.channels, args.resolution, args.resolution))
    fn = methods(u, args.chunk, "cpu", False)[args.memory_of]
    x = x.float()
    fn(x[:1], 0.002)  # warm up kernels and thread pools outside the measurement
    before = rss_bytes()
    print(peak_rss_during(lambda: fn(x, 0.002)) - before)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_child(args)
        return 0
    device = torch.device(args.device)
    shape = (args.channels, args.resolution, args.resolution)
    u, x = problem(args.n, args.batch, shape)
    # Every method gets the same fp32 query (what the fp32 methods take); the reference is exact on that query.
    xd = x.float().to(device)
    refs = {s: reference(xd, s, u.double() / 127.5 - 1) for s in SIGMAS}
    fns = methods(u, args.chunk, device, args.no_broadcast)
    report = {"device": str(device), "n": args.n, "batch": args.batch, "shape": list(shape), "chunk": args.chunk,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "methods": {}}
    child_argv = [a for a in argv if a != "--out"] if args.out is None else \
        [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    for name, fn in fns.items():
        errors = {str(s): float((fn(xd, s).double().cpu().reshape(len(x), -1) - refs[s]).abs().max()) for s in SIGMAS}
        fn(xd, 0.002)  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            fn(xd, 0.002)
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = peak_cuda_bytes(fn, xd, device) if device.type == "cuda" else peak_rss_child(name, child_argv)
        report["methods"][name] = {"calls_per_s": 1 / statistics.median(times),
                                   "images_per_s": args.batch / statistics.median(times),
                                   "max_abs_err_vs_float64": errors,
                                   "peak_mib": round(peak / 2**20, 1),
                                   "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "RSS"}
    ours = report["methods"]["ours"]["calls_per_s"]
    report["speed_vs_ours"] = {k: v["calls_per_s"] / ours for k, v in report["methods"].items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
