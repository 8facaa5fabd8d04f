"""Seconds per image of every inference-time mitigation, timed alternately on one batch.

    python bench/bench_mitigation_methods.py --model_id data/lab --prompts data/lab/memorized.jsonl
    python bench/bench_mitigation_methods.py --arch sd-v1 --device cuda --dtype fp16 --num_images_per_prompt 4

Each round generates the same batch (--n_prompts prompts × --num_images_per_prompt generations, same starting
noise) once with every method, in turn, conditioning (ours) + sampling + VAE decode, as a mitigation run does;
methods alternate within a round so load from other processes falls on all of them. Prints, per method, the
median seconds per image over --rounds rounds, the ratio to ``none`` and the extra UNet evaluations per image
(the load-independent cost). Method settings are the library defaults (the papers'), except ``ours``, whose
target loss is 0.7 × the batch's median initial loss (random models have no natural scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from benchlib import add_model_args, bench_pipeline, load_prompts, timed

from diffmem.common.t2i.mitigation.methods import METHODS, generate_batch
from diffmem.common.t2i.mitigation.prompt_embedding import prompt_losses
from diffmem.common.t2i.mitigation.run import MitigationSettings, condition_batch
from diffmem.common.t2i.pipelines import denoiser_parts
from diffmem.common.t2i.sampler import decode_latents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--n_prompts", type=int, default=4)
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    pipe = bench_pipeline(args)
    parts = denoiser_parts(pipe)
    device = torch.device(args.device)
    prompts = load_prompts(args.prompts, args.n_prompts)
    rows = list(range(len(prompts)))
    uncond = parts.unconditional()
    base = dict(num_images_per_prompt=args.num_images_per_prompt, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale)
    probe = condition_batch(parts, uncond, prompts, rows, MitigationSettings(method="none", **base))
    initial = prompt_losses(parts, probe["embeds"], uncond, probe["latents"],
                            num_inference_steps=args.num_inference_steps, target_steps=[0],
                            guidance_scale=args.guidance_scale)
    target = 0.7 * statistics.median(initial)
    times: dict = {m: [] for m in args.methods}
    extra: dict = {}
    images = len(prompts) * args.num_images_per_prompt
    for _ in range(args.rounds):
        for method in args.methods:
            settings = MitigationSettings(method=method, optim_target_loss=target, **base)

            def run():
                cond = condition_batch(parts, uncond, prompts, rows, settings)
                gen = generate_batch(parts, cond["embeds"], uncond, cond["latents"], rows, cond["prompts_used"],
                                     settings)
                decode_latents(pipe.vae, gen.latents)
                calls = [cond["extra_unet_calls"][b] + e for b, r in enumerate(gen.extra_unet_calls) for e in r]
                return sum(calls) / len(calls)

            extra[method], seconds = timed(run, device)
            times[method].append(seconds / images)
    result = {m: {"seconds_per_image": statistics.median(t), "extra_unet_calls_per_image": extra[m]}
              for m, t in times.items()}
    ref = result.get("none", {}).get("seconds_per_image")
    print(f"{len(prompts)} prompts × {args.num_images_per_prompt} images, {args.num_inference_steps} steps, "
          f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    for m, r in result.items():
        ratio = f"{r['seconds_per_image'] / ref:5.2f}× none" if ref else ""
        print(f"{m:18s} {r['seconds_per_image']:8.4f} s/image  {ratio}  extra UNet evals/image "
              f"{r['extra_unet_calls_per_image']:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
