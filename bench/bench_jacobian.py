"""Seconds per denoiser Jacobian: common.edm.measure.jacobian against torch.autograd.functional.jacobian's default;
with --ranks, the randomized rank against the full Jacobian's across σ.

    python bench/bench_jacobian.py                                  # 3×8×8 and 3×32×32, small DDPM++-like net, CPU
    python bench/bench_jacobian.py --preset ddpmpp --device cuda    # DiffMemorize's basic DDPM++ network
    python bench/bench_jacobian.py --ranks --denoiser net,molrg+net --resolutions 32 --threads 1

For each resolution one randomly initialised EDMNetwork (EDM preconditioning) at one x, σ = 1:
  vmap      - ``denoiser_jacobian(method="vmap")`` as detect/jacobian.py runs it: torch.func.jacrev over --chunk
              unit rows per vmapped backward, diffusers attention swapped to the plain processor, plus its one-VJP
              autograd check;
  batch     - ``method="batch"``: --chunk rows as a real batch (x repeated, one forward, one backward);
  reference - ``torch.autograd.functional.jacobian`` with its defaults (one backward pass per output). Where D is
              larger than --reference_rows, only that many outputs are differentiated (one forward, that many
              backward passes) and the time is scaled by D / rows: "reference_extrapolated" says so.
Each figure is the best of --rounds. Rows of the three agree (max_abs_diff, on the rows the reference computed).

--ranks: at x = σ·z (seed 0's latent) for each of --sigmas, ``point_rank_row`` with rank method "full" (J by
vmapped VJPs, its autograd check, the SVD: what ``detect/jacobian.py --method full`` does) and "randomized" (the
default, falling back to full where it does not decide), timed in ABBA order (full, randomized, randomized, full)
--rounds times; the medians of wall and of process CPU seconds, their ratios, both ranks and the randomized row's
method, subspace and bounds.
--denoiser: ``net`` (the --preset net, random weights) or ``molrg+net``: Zhang et al.'s ideal MoLRG denoiser
(2 classes of d = 7 at 3×R×R, rank ≤ 14) plus --noise_scale × the same net, a low-rank Jacobian with a full-rank
noise floor at the net's cost per product.
Prints one JSON object; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from benchlib import timed

from diffmem.common.edm.dataset.molrg import MoLRGRecipe, molrg_bases, molrg_denoiser
from diffmem.common.edm.measure import jacobian as J
from diffmem.common.edm.networks.build import ArchConfig, build_network
from diffmem.common.edm.precond import Preconditioning

PRESETS = {
    # Small enough for a CPU: 16 channels, three levels, attention at half the resolution (DDPM++'s 16 of 32).
    "small": dict(num_channels=16, channel_mult=(1, 2, 2), num_blocks=1),
    # DiffMemorize's basic setup: DDPM++, 128 channels, mult 2,2,2, 2 blocks, attention at 16 (at 32×32).
    "ddpmpp": dict(num_channels=128, channel_mult=(2, 2, 2), num_blocks=2),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="small")
    p.add_argument("--resolutions", default="8,32", help="comma-separated image sides (3 channels)")
    p.add_argument("--chunk", type=int, default=64, help="Jacobian rows per backward of ours")
    p.add_argument("--reference_rows", type=int, default=192,
                   help="at most this many reference rows are timed (then extrapolated to D)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--ranks", action="store_true", help="randomized rank against the full Jacobian's across σ")
    p.add_argument("--denoiser", default="net,molrg+net", help="with --ranks: net and/or molrg+net")
    p.add_argument("--sigmas", default="80,5,1,0.1,0.002", help="with --ranks: comma-separated σ")
    p.add_argument("--noise_scale", type=float, default=1e-3, help="with --ranks: the net's weight in molrg+net")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    return args


def build(resolution: int, preset: str, device):
    """A seeded random EDMNetwork for 3×R×R with attention at R/2, eval mode, on device."""
    torch.manual_seed(0)
    arch = ArchConfig(resolution=resolution, channels=3, attn_resolutions=(resolution // 2,), dropout=0.0,
                      **PRESETS[preset])
    return build_network(arch, Preconditioning("edm")).eval().requires_grad_(False).to(device)


def best(fn, device, rounds: int):
    """(result of the last round, fewest seconds over the rounds)."""
    times, out = [], None
    for _ in range(rounds):
        out, seconds = timed(fn, device)
        times.append(seconds)
    return out, min(times)


def bench_resolution(resolution: int, args) -> dict:
    """Seconds per Jacobian of the three ways at one resolution, and how far their rows are apart."""
    device = torch.device(args.device)
    net = build(resolution, args.preset, device)
    shape = (3, resolution, resolution)
    dim = 3 * resolution * resolution
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    sigma = torch.tensor(1.0, dtype=torch.float64, device=device)
    vmap, t_vmap = best(lambda: J.denoiser_jacobian(net, x, sigma, chunk_size=args.chunk, method="vmap"),
                        device, args.rounds)
    batch, t_batch = best(lambda: J.denoiser_jacobian(net, x, sigma, chunk_size=args.chunk, method="batch",
                                                      check=False), device, args.rounds)
    rows = min(dim, args.reference_rows)
    # Evenly spread rows: the cost of a backward pass does not depend on which output it starts from.
    idx = torch.linspace(0, dim - 1, rows, device=device).round().long()
    f = J.flat_denoiser(net, shape, sigma)
    ref, t_ref = best(lambda: torch.autograd.functional.jacobian(lambda v: f(v)[idx], x.reshape(-1)), device,
                      args.rounds)
    t_full = t_ref * dim / rows
    return {"resolution": resolution, "dim": dim, "chunk": args.chunk,
            "vmap_s": round(t_vmap, 4), "batch_s": round(t_batch, 4), "reference_s": round(t_full, 4),
            "reference_rows_timed": rows, "reference_extrapolated": rows < dim,
            "speedup_vmap": round(t_full / t_vmap, 2), "speedup_batch": round(t_full / t_batch, 2),
            "max_abs_diff": float(max((vmap[idx] - ref).abs().max(), (batch[idx] - ref).abs().max()))}


class MoLRGPlusNet(torch.nn.Module):
    """D(x; σ) = the ideal MoLRG denoiser + scale × net(x; σ): a low-rank Jacobian with the net's noise floor."""

    def __init__(self, net, resolution: int, scale: float):
        super().__init__()
        self.net, self.scale = net, scale
        self.register_buffer("bases", torch.as_tensor(molrg_bases(MoLRGRecipe(res=resolution, classes=2, dim=7))))

    def forward(self, x, sigma, class_labels=None):
        ideal = molrg_denoiser(x.reshape(len(x), -1), sigma, self.bases).reshape(x.shape)
        return ideal + self.scale * self.net(x, sigma, class_labels).to(torch.float64)


def bench_ranks(resolution: int, kind: str, args) -> list[dict]:
    """Per σ: both ranks, the medians of ABBA-ordered seconds of full and randomized, and their ratio."""
    device = torch.device(args.device)
    net = build(resolution, args.preset, device)
    denoise = MoLRGPlusNet(net, resolution, args.noise_scale).to(device) if kind == "molrg+net" else net
    shape = (3, resolution, resolution)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    out = []
    for sigma in [float(s) for s in args.sigmas.split(",") if s.strip()]:
        x = z * sigma
        times = {"full": [], "randomized": []}
        cpu = {"full": [], "randomized": []}  # process CPU seconds: less swayed than wall time by other jobs
        rows = {}
        for _ in range(args.rounds):
            for method in ("full", "randomized", "randomized", "full"):
                start, start_cpu = time.perf_counter(), time.process_time()
                rows[method] = J.point_rank_row(denoise, 0, sigma, x, None, 0.99, method, args.chunk)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[method].append(time.perf_counter() - start)
                cpu[method].append(time.process_time() - start_cpu)
        full, rand = statistics.median(times["full"]), statistics.median(times["randomized"])
        full_cpu, rand_cpu = statistics.median(cpu["full"]), statistics.median(cpu["randomized"])
        r = rows["randomized"]
        out.append({"denoiser": kind, "resolution": resolution, "sigma": sigma, "dim": r.dim,
                    "rank_full": rows["full"].rank, "rank_randomized": r.rank,
                    "equal": rows["full"].rank == r.rank, "method": r.method, "fallback": r.fallback,
                    "subspace": r.subspace, "rank_bounds": [r.rank_lo, r.rank_hi],
                    "fro_full": rows["full"].fro, "fro_bounds": [r.fro_lo, r.fro_hi],
                    "full_s": round(full, 3), "randomized_s": round(rand, 3), "speedup": round(full / rand, 2),
                    "full_cpu_s": round(full_cpu, 3), "randomized_cpu_s": round(rand_cpu, 3),
                    "speedup_cpu": round(full_cpu / rand_cpu, 2),
                    "timings": {k: [round(t, 3) for t in v] for k, v in times.items()},
                    "cpu_timings": {k: [round(t, 3) for t in v] for k, v in cpu.items()}})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    if args.ranks:
        results = [row for r in resolutions for kind in args.denoiser.split(",") if kind.strip()
                   for row in bench_ranks(r, kind.strip(), args)]
        report = {"preset": args.preset, "device": args.device, "threads": torch.get_num_threads(),
                  "noise_scale": args.noise_scale, "rounds": args.rounds, "results": results}
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    results = [bench_resolution(r, args) for r in resolutions]
    report = {"preset": args.preset, "preset_arch": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in PRESETS[args.preset].items()},
              "device": args.device, "threads": torch.get_num_threads(), "sigma": 1.0, "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
