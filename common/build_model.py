"""Write a randomly initialised Stable-Diffusion-shaped pipeline folder: ``python -m common.build_model``.

This is the offline stand-in for a Hub checkpoint used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import argparse

from common.models import ARCHS, build_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--out", required=True, help="folder to write (model_index.json and components)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_pipeline(args.out, arch=args.arch, seed=args.seed)
    print(f"wrote {args.arch} pipeline to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
