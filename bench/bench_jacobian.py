"""Seconds per denoiser Jacobian: common.edm.measure.jacobian against torch.autograd.functional.jacobian's default.

    python bench/bench_jacobian.py                                  # 3×8×8 and 3×32×32, small DDPM++-like net, CPU
    python bench/bench_jacobian.py --preset ddpmpp --device cuda    # DiffMemorize's basic DDPM++ network

For each resolution one randomly initialised EDMNetwork (EDM preconditioning) at one x, σ = 1:
  vmap      - ``denoiser_jacobian(method="vmap")`` as detect/jacobian.py runs it: torch.func.jacrev over --chunk
              unit rows per vmapped backward, diffusers attention swapped to the plain processor, plus its one-VJP
              autograd check;
  batch     - ``method="batch"``: --chunk rows as a real batch (x repeated, one forward, one backward);
  reference - ``torch.autograd.functional.jacobian`` with its defaults (one backward pass per output). Where D is
              larger than --reference_rows, only that many outputs are differentiated (one forward, that many
              backward passes) and the time is scaled by D / rows: "reference_extrapolated" says so.
Each figure is the best of --rounds. Rows of the three agree (max_abs_diff, on the rows the reference computed).
Prints one JSON object; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchlib import timed

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
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    return args


def build(resolution: int, preset: str, device):
    """A seeded random EDMNetwork for 3×R×R with attention at R/2, eval mode, on device."""
    from diffmem.common.edm.networks.build import ArchConfig, build_network
    from diffmem.common.edm.precond import Preconditioning

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
    from diffmem.common.edm.measure import jacobian as J

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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench_resolution(int(r), args) for r in args.resolutions.split(",") if r.strip()]
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
