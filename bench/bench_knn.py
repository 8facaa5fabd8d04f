"""Nearest training images: common.edm.measure.knn.exact_knn vs DiffMemorize's torch.cdist + topk(k=2), on planted data.

    python bench/bench_knn.py                                              # 1000 × 5000 × 3072, CPU, seconds
    OMP_NUM_THREADS=2 python bench/bench_knn.py --n_queries 10000 --n_train 50000    # CIFAR-sized, 2 cores
    python bench/bench_knn.py --n_queries 10000 --n_train 50000 --device cuda

Data (uint8, seeded): a training set of random images of which --twins are near-identical pairs (a copy one grey
level off in one pixel) and --dups exact duplicates (ties); queries of which half are training images moved by one
or two grey levels in 0.2 % of their pixels, 5 % exact copies and the rest fresh images. Both methods get the same
arrays:
  exact - exact_knn(k=2): fp32 shortlist on centred data, float64 re-ranking, certificate, exact fallback;
  cdist - DiffMemorize's mem_ratio.py: torch.cdist on fp32 values (default matmul mode) + topk(2, largest=False),
          --cdist_batch queries at a time against the whole training set.
The truth for --check_queries of the queries (all when fewer) is a float64 matmul on the integer values, which is
exact (every product and partial sum is an integer below 2**53), ties to the lowest index. Reported per method:
samples/s, seconds, peak memory (process RSS sampled every 5 ms on the CPU: the peak and the peak above the level
before the call; torch.cuda.max_memory_allocated on a GPU), wrong neighbours (a picked neighbour farther than the
true one at that rank: not a tie), wrong indices (any index differing from the lowest-index rule) and the largest
distance error. Prints JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.common.edm.measure.knn import exact_knn

GIB = 1 << 30


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_queries", type=int, default=1000)
    p.add_argument("--n_train", type=int, default=5000)
    p.add_argument("--dim", type=int, default=3072, help="values per image (3072 = 3×32×32)")
    p.add_argument("--twins", type=float, default=0.1, help="fraction of training images with a near-identical twin")
    p.add_argument("--dups", type=float, default=0.01, help="fraction of training images duplicated exactly")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, OMP_NUM_THREADS)")
    p.add_argument("--shortlist", type=int, default=16)
    p.add_argument("--query_chunk", type=int, default=2048)
    p.add_argument("--ref_chunk", type=int, default=8192)
    p.add_argument("--cdist_batch", type=int, default=512, help="queries per torch.cdist call")
    p.add_argument("--check_queries", type=int, default=1000, help="queries checked against the exact truth")
    p.add_argument("--methods", default="exact,cdist", help="comma-separated subset of exact,cdist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    if not set(args.methods.split(",")) <= {"exact", "cdist"}:
        p.error("--methods takes exact and/or cdist")
    return args


def planted(args) -> tuple[np.ndarray, np.ndarray]:
    """(queries, training set) as uint8 rows, with the near-duplicates and ties described above."""
    rng = np.random.default_rng(args.seed)
    n_twins, n_dups = int(args.twins * args.n_train), int(args.dups * args.n_train)
    n_base = args.n_train - n_twins - n_dups
    train = np.empty((args.n_train, args.dim), dtype=np.uint8)
    train[:n_base] = rng.integers(0, 256, (n_base, args.dim), dtype=np.uint8)
    twins = train[rng.integers(0, n_base, n_twins)].copy()
    pix = rng.integers(0, args.dim, n_twins)
    rows = np.arange(n_twins)
    twins[rows, pix] = np.where(twins[rows, pix] < 255, twins[rows, pix] + 1, 254)
    train[n_base : n_base + n_twins] = twins
    train[n_base + n_twins :] = train[rng.integers(0, n_base, n_dups)]
    train = train[rng.permutation(args.n_train)]
    n_near, n_copy = args.n_queries // 2, args.n_queries // 20
    queries = np.empty((args.n_queries, args.dim), dtype=np.uint8)
    for start in range(0, n_near, 1024):  # in blocks: int16 temporaries of all queries would be large
        stop = min(n_near, start + 1024)
        q = train[rng.integers(0, args.n_train, stop - start)].astype(np.int16)
        q += (rng.integers(-2, 3, q.shape) * (rng.random(q.shape) < 0.002)).astype(np.int16)
        queries[start:stop] = q.clip(0, 255)
    queries[n_near : n_near + n_copy] = train[rng.integers(0, args.n_train, n_copy)]
    queries[n_near + n_copy :] = rng.integers(0, 256, (args.n_queries - n_near - n_copy, args.dim), dtype=np.uint8)
    return queries, train


def truth(queries: np.ndarray, train: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 squared distances (matmul form on integers: no rounding) of every training row; top 2."""
    r = torch.as_tensor(train, device=device).to(torch.float64)
    r_sq = (r * r).sum(1)
    sq, idx = [], []
    for start in range(0, len(queries), 64):
        q = torch.as_tensor(queries[start : start + 64], device=device).to(torch.float64)
        s = (q * q).sum(1)[:, None] + r_sq[None, :] - 2 * (q @ r.T)
        order = s.argsort(dim=1, stable=True)[:, :2]
        sq.append(s.gather(1, order).cpu().numpy())
        idx.append(order.cpu().numpy())
    return np.concatenate(sq), np.concatenate(idx)


def run_cdist(queries: np.ndarray, train: np.ndarray, device, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """DiffMemorize's neighbours: fp32 torch.cdist (matmul mode for large sets) + topk(2, largest=False)."""
    r = torch.as_tensor(train, device=device).to(torch.float32)
    dist, idx = [], []
    for start in range(0, len(queries), batch):
        q = torch.as_tensor(queries[start : start + batch], device=device).to(torch.float32)
        d, i = torch.cdist(q, r).topk(2, dim=1, largest=False)
        dist.append(d.double().cpu().numpy())
        idx.append(i.cpu().numpy())
    return np.concatenate(dist) ** 2, np.concatenate(idx)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn, device):
    """(fn(), seconds, peak memory dict): RSS sampled by a thread on the CPU, the allocator's peak on a GPU."""
    stop, peak = threading.Event(), [rss_bytes()]
    base = peak[0]

    def watch():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss_bytes())

    watcher = threading.Thread(target=watch, daemon=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    watcher.start()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    peak[0] = max(peak[0], rss_bytes())
    mem = {"peak_rss_gib": round(peak[0] / GIB, 3), "peak_rss_above_start_gib": round((peak[0] - base) / GIB, 3)}
    if device.type == "cuda":
        mem["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        mem["peak_gpu_above_start_gib"] = round((torch.cuda.max_memory_allocated(device) - before) / GIB, 3)
    return out, seconds, mem


def errors(sq: np.ndarray, idx: np.ndarray, checked: np.ndarray, true_sq: np.ndarray, true_idx: np.ndarray,
           queries: np.ndarray, train: np.ndarray) -> dict:
    """Wrong neighbours (farther than the truth at their rank), wrong indices, largest distance error."""
    sq, idx = sq[checked], idx[checked]
    q = queries[checked].astype(np.float64)
    # The exact squared distance of each picked neighbour.
    picked = np.stack([((q - train[idx[:, j]].astype(np.float64)) ** 2).sum(1) for j in range(2)], 1)
    wrong = picked != true_sq
    return {"checked_queries": int(len(checked)), "wrong_neighbours": int(wrong.sum()),
            "queries_with_a_wrong_nearest": int(wrong[:, 0].sum()), "wrong_indices": int((idx != true_idx).sum()),
            "max_abs_distance_error": float(np.abs(np.sqrt(np.maximum(sq, 0)) - np.sqrt(true_sq)).max())}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    queries, train = planted(args)
    setup_s = time.perf_counter() - t0
    report = {"n_queries": args.n_queries, "n_train": args.n_train, "dim": args.dim, "device": str(device),
              "threads": torch.get_num_threads(), "data_seconds": round(setup_s, 2)}
    found = {}
    for method in args.methods.split(","):
        if method == "exact":
            res, seconds, mem = measured(lambda: exact_knn(queries, train, 2, args.shortlist, args.query_chunk,
                                                           args.ref_chunk, device), device)
            found[method], extra = (res.sqdist, res.index), {"fallbacks": res.fallbacks}
        else:
            found[method], seconds, mem = measured(lambda: run_cdist(queries, train, device, args.cdist_batch),
                                                   device)
            extra = {}
        report[method] = {"seconds": round(seconds, 2), "samples_per_s": round(args.n_queries / seconds, 1), **mem,
                          **extra}
    # The truth last, so that its float64 copy of the training set does not count in the methods' peaks.
    rng = np.random.default_rng(args.seed + 1)
    checked = np.sort(rng.choice(len(queries), min(args.check_queries, len(queries)), replace=False))
    if len(checked):
        true_sq, true_idx = truth(queries[checked], train, device)
        for method, (sq, idx) in found.items():
            report[method].update(errors(sq, idx, checked, true_sq, true_idx, queries, train))
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
