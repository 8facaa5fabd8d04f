"""The optimal denoiser D(x; σ) = Σᵢ softmaxᵢ(−‖x − yᵢ‖²/2σ²) yᵢ: ours against OptimEDM-style fp32, speed and answers.

    python bench/bench_optimal.py                                   # 3×32×32, N = 1024, batch 16, CPU
    python bench/bench_optimal.py --n 50000 --batch 64 --repeats 3  # CIFAR-10-sized
    python bench/bench_optimal.py --device cuda --n 50000 --batch 64

  ours        - common.edm.networks.optimal.OptimalDenoiser (the default, screened path): fp32 GEMM distances
                with a rigorous error bound screen the images, float64 (or exact int8-digit GEMMs where every
                image weighs) computes the ones that can weigh; chunked (memory B × chunk);
  float64     - the same class with screen=False: the float64 reference, per-pair distances, chunked;
  float64_mm  - matmul=True: the float64 reference with ‖x‖² + ‖y‖² − 2x·y by a float64 GEMM;
  optimedm    - Gu et al.'s OptimEDM style: fp32 torch.cdist² / 2σ² over the whole set, softmax, weighted sum
                (memory B × N plus cdist's own copies);
  broadcast   - Zhang et al.'s style: fp32 (x[:, None] − y[None]) — a B × N × C × H × W tensor — squared and
                summed, softmax, weighted sum (only with --broadcast: it needs B·N·D·4 bytes).
The training set is synthetic uint8 with planted near-duplicates (pairs one uint8 level apart in one pixel) and
each query sits between a pair with float64 weights sigmoid(±1.5) at σ = 0.002, where fp32 distances (error ~1e-4
on ‖·‖² ≈ 300, ×1/2σ² = 125 000) get the weights wrong. Answers: max |D − D_ref| / max |D_ref| per σ against
float64 truth: a broadcast float64 softmax for N ≤ --exact_n, else the float64 per-pair reference (screen=False).
Speed: for each σ, --repeats rounds of ours and optimedm in ABBA order (ours, optimedm, optimedm, ours), the ratio
optimedm seconds / ours seconds per round, and its median (> 1: ours faster); calls/s of each are medians too.
Peak memory: on CPU the peak RSS during one call at σ = 0.002 and one at σ = 80 in a fresh process (sampled by a
thread) minus its RSS just before the calls; on CUDA torch.cuda.max_memory_allocated above what was allocated
before. Prints JSON. No timing is asserted.
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

import torch

from diffmem.common.edm.dataset.planted import planted_near_duplicates
from diffmem.common.edm.networks.optimal import OptimalDenoiser

METHODS = ("ours", "float64", "float64_mm", "optimedm", "broadcast")
SIGMAS = (0.002, 0.1, 1.0, 80.0)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n", type=int, default=1024, help="training images (default 1024)")
    p.add_argument("--batch", type=int, default=16, help="queries per denoiser call (default 16)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="ours and the float64 references: images per chunk")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--repeats", type=int, default=5, help="ABBA rounds per σ (each: 2 calls of each method)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--time_references", action="store_true", help="also time float64 and float64_mm (slow)")
    p.add_argument("--broadcast", action="store_true", help="also run the B×N×D method (it needs B·N·D·4 bytes)")
    p.add_argument("--exact_n", type=int, default=4096, help="broadcast float64 truth up to this N (default 4096)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.add_argument("--memory_of", choices=METHODS, default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    if args.n < 2 * args.batch:
        p.error(f"expected --n >= 2 × --batch (each query has its own planted pair), got {args.n} and {args.batch}")
    return args


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


def methods(u: torch.Tensor, chunk: int, device, names) -> dict:
    """name → call(x, σ) on the device, each with its training set prepared once (ours: before the first call)."""
    fns = {}
    if {"ours", "float64", "float64_mm"} & set(names):
        # One module holds the float64 images; the reference paths are the same class with other switches.
        od = OptimalDenoiser(u, chunk_size=chunk).to(device)
        od.screened_images(0)  # prepared once, as a sampling run does before its first step

        def with_switches(screen, matmul):
            def call(x, s):
                od.screen, od.matmul = screen, matmul
                return od(x, s)
            return call

        fns.update(ours=with_switches(True, False), float64=with_switches(False, False),
                   float64_mm=with_switches(False, True))
    if {"optimedm", "broadcast"} & set(names):
        y32 = (u.to(device).float() / 127.5 - 1).reshape(len(u), -1)
        fns.update(optimedm=lambda x, s: optimedm(x, s, y32), broadcast=lambda x, s: broadcast(x, s, y32))
    return {k: v for k, v in fns.items() if k in names}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, x, sigma, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(x, sigma)
    sync(device)
    return time.perf_counter() - t0


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_cuda_bytes(fn, x, device) -> int:
    """torch.cuda.max_memory_allocated during a call at σ = 0.002 and one at 80, above what was allocated before."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(x, 0.002)
    fn(x, 80.0)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_rss_child(method: str, argv: list[str]) -> int:
    """Peak RSS of the calls of `method` in a fresh process (peak during − RSS before the calls)."""
    res = subprocess.run([sys.executable, __file__, *argv, "--memory_of", method], capture_output=True, text=True,
                         timeout=1800)
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
    u, x = planted_near_duplicates(args.n, args.batch, (args.channels, args.resolution, args.resolution))
    fn = methods(u, args.chunk, "cpu", [args.memory_of])[args.memory_of]
    x = x.float()
    fn(x[:1], 0.002)  # warm up kernels and thread pools outside the measurement
    fn(x[:1], 80.0)
    before = rss_bytes()
    print(peak_rss_during(lambda: (fn(x, 0.002), fn(x, 80.0))) - before)


def relative_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.double().cpu().reshape(truth.shape) - truth).abs().max() / truth.abs().max())


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
    u, x = planted_near_duplicates(args.n, args.batch, shape)
    names = ["ours", "float64", "float64_mm", "optimedm"] + (["broadcast"] if args.broadcast else [])
    fns = methods(u, args.chunk, device, names)
    # Every method gets the same fp32 query (what the fp32 methods take); the truth is exact on that query.
    xd = x.float().to(device)
    exact = args.n <= args.exact_n
    report = {"device": str(device), "n": args.n, "batch": args.batch, "shape": list(shape), "chunk": args.chunk,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "truth": "float64 broadcast softmax" if exact else "float64 per-pair reference (screen=False)",
              "sigmas": {}}
    for s in args.sigmas:
        truth = reference(xd, s, u.double() / 127.5 - 1) if exact else \
            fns["float64"](xd, s).double().cpu().reshape(len(x), -1)
        row = {"rel_err": {k: relative_error(fn(xd, s), truth) for k, fn in fns.items()}}
        ratios, t_ours, t_base = [], [], []
        for _ in range(args.repeats):  # ABBA: ours, optimedm, optimedm, ours
            a1 = timed(fns["ours"], xd, s, device)
            b1 = timed(fns["optimedm"], xd, s, device)
            b2 = timed(fns["optimedm"], xd, s, device)
            a2 = timed(fns["ours"], xd, s, device)
            ratios.append((b1 + b2) / (a1 + a2))
            t_ours += [a1, a2]
            t_base += [b1, b2]
        row["speedup_vs_optimedm"] = statistics.median(ratios)
        row["ratios"] = [round(r, 3) for r in ratios]
        row["calls_per_s"] = {"ours": 1 / statistics.median(t_ours), "optimedm": 1 / statistics.median(t_base)}
        if args.time_references:
            for k in ("float64", "float64_mm"):
                row["calls_per_s"][k] = 1 / statistics.median(timed(fns[k], xd, s, device) for _ in range(2))
        report["sigmas"][str(s)] = row
        print(json.dumps({str(s): row}), flush=True)
    if not args.no_memory:
        child_argv = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
        report["peak_mib"] = {}
        for name in ("ours", "optimedm"):
            peak = peak_cuda_bytes(fns[name], xd, device) if device.type == "cuda" else peak_rss_child(name, child_argv)
            report["peak_mib"][name] = round(peak / 2**20, 1)
        report["peak_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "RSS above start of calls"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
