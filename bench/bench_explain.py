"""Token-wise significance throughput: prompts batched (one forward and backward per step) vs one at a time.

    python bench/bench_explain.py                                   # tiny pipeline, CPU, 64 prompts
    python bench/bench_explain.py --arch sd-v1 --device cuda --dtype fp16 --batch_size 16

Both runs use the same rows (hence the same latents) and settings; prints prompts/s of each, the ratio, and
the largest difference between their scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import add_model_args, bench_pipeline, load_prompts
from tqdm.auto import tqdm

from diffmem.common.t2i.explain import WRT_CHOICES, explain_prompts
from diffmem.common.t2i.pipelines import denoiser_parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_prompts", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64, help="prompts per batch in the batched run")
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--target_steps", type=int, nargs="+", default=[0])
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--wrt", choices=WRT_CHOICES, default="prompt_embeds")
    add_model_args(p)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    pipe = bench_pipeline(args)
    parts = denoiser_parts(pipe)
    prompts = load_prompts(args.prompts, args.n_prompts)
    rows = list(range(len(prompts)))
    uncond = parts.unconditional()
    settings = dict(num_images_per_prompt=args.num_images_per_prompt, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, target_steps=args.target_steps, wrt=args.wrt,
                    uncond_embed=uncond)
    print(f"model={args.model_id or args.arch} device={device} dtype={args.dtype} prompts={len(prompts)} "
          f"G={args.num_images_per_prompt} target_steps={args.target_steps} wrt={args.wrt} "
          f"batch={args.batch_size}")

    def run(batch_size: int, desc: str):
        explain_prompts(parts, prompts[:1], rows[:1], **settings)  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        results = []
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            results += explain_prompts(parts, prompts[i : i + batch_size], rows[i : i + batch_size], **settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return results, time.perf_counter() - t0

    batched, t_batched = run(args.batch_size, "batched")
    single, t_single = run(1, "one at a time")
    a = torch.tensor([r.scores for r in batched])
    b = torch.tensor([r.scores for r in single])
    max_diff = float((a - b).abs().max())
    rel_diff = max_diff / float(b.abs().max())
    figures = {
        "prompts": len(prompts), "batch_size": args.batch_size,
        "batched_prompts_per_s": len(prompts) / t_batched, "single_prompts_per_s": len(prompts) / t_single,
        "speedup": t_single / t_batched, "max_abs_score_diff": max_diff, "max_rel_score_diff": rel_diff,
    }
    print(f"batched ({args.batch_size}/batch): {figures['batched_prompts_per_s']:.2f} prompts/s")
    print(f"one at a time:        {figures['single_prompts_per_s']:.2f} prompts/s")
    print(f"ratio batched/one-at-a-time: {figures['speedup']:.1f}x")
    print(f"max |score difference|: {max_diff:.3g} (relative to the largest score: {rel_diff:.3g})")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
