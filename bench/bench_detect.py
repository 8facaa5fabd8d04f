"""Detection throughput: the reference per-prompt loop vs diffmem's batched first-step scoring.

    python bench/bench_detect.py                                  # tiny pipeline, CPU
    python bench/bench_detect.py --arch sd-v1 --device cuda --dtype fp16 --n_prompts 256 --ref_prompts 8

(a) reference: one prompt at a time, G generations, the full guided trajectory, VAE decode (the way Wen et
    al.'s detect_mem.py works); (b) diffmem with --score_steps 1; (c) (b) with --latents shared.
Prints prompts/s of each, the ratios, and how far (a)'s first-step scores are from (b)'s.

    python bench/bench_detect.py --detector wen anisotropy sharpness --model_id data/lab --prompts FILE

times the batched detectors instead, one after the other in the same process on the same prompts and latents
(no reference loop): wen = (b), anisotropy = two batched UNet calls on x_T, sharpness = one forward + one JVP
through the math attention kernel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchlib import add_model_args, bench_pipeline, load_prompts, timed
from tqdm.auto import tqdm

from diffmem.common.t2i.detection import DETECTORS, encode_prompts, score_prompts
from diffmem.common.t2i.pipeline import denoiser_parts
from diffmem.common.t2i.text_noise import classifier_free_guidance, text_noise_norm


@torch.no_grad()
def reference_first_step_scores(pipe, prompts: list[str], G: int, steps: int, scale: float, gen_seed: int,
                                 device: torch.device) -> list[float]:
    """Wen et al.'s loop: each prompt alone through every guided step, norms recorded, then a VAE decode."""
    from diffusers import DDIMScheduler

    dtype = pipe.unet.dtype
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    scores = []
    for i, prompt in enumerate(tqdm(prompts, desc="(a) reference", unit="prompt")):
        ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        emb = pipe.text_encoder(ids)[0]
        cond_uncond = torch.cat([emb[1:2].expand(G, -1, -1), emb[0:1].expand(G, -1, -1)])
        torch.manual_seed(i + gen_seed)
        latents = (torch.randn((G, *shape)) * scheduler.init_noise_sigma).to(device, dtype)
        scheduler.set_timesteps(steps, device=device)
        first = None
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out_u, out_c = pipe.unet(x_in, t, encoder_hidden_states=cond_uncond).sample.chunk(2)
            norms = text_noise_norm(out_c, out_u)
            if first is None:
                first = norms.mean().item()
            latents = scheduler.step(classifier_free_guidance(out_u, out_c, scale), t, latents).prev_sample
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.float().cpu()
        scores.append(first)
    return scores



def compare_detectors(args) -> int:
    """prompts/s of each --detector on the same prompts, rows and latents, after a warm-up of every batch shape."""
    device = torch.device(args.device)
    parts = denoiser_parts(bench_pipeline(args))
    prompts = load_prompts(args.prompts, args.n_prompts)
    uncond = encode_prompts(parts, [""]).embeds
    G = args.num_images_per_prompt
    print(f"model={args.model_id or args.arch} device={device} dtype={args.dtype} prompts={len(prompts)} G={G} "
          f"batch={args.batch_size} threads={torch.get_num_threads()}")

    def run(detector: str, subset: list[str]) -> list[float]:
        scores = []
        for i in range(0, len(subset), args.batch_size):
            chunk = subset[i : i + args.batch_size]
            terms, _ = score_prompts(parts, chunk, list(range(i, i + len(chunk))), num_images_per_prompt=G,
                                     num_inference_steps=args.num_inference_steps,
                                     guidance_scale=args.guidance_scale, uncond_embed=uncond, detector=detector)
            scores += terms.score.tolist()
        return scores

    rate = {}
    for detector in args.detector:
        run(detector, prompts[: args.batch_size] + prompts[: len(prompts) % args.batch_size])  # warm-up
        _, seconds = timed(lambda: run(detector, prompts), device)
        rate[detector] = len(prompts) / seconds
        print(f"{detector:>12}: {rate[detector]:10.2f} prompts/s")
    result = {"config": vars(args), "prompts_per_s": rate,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_prompts", type=int, default=500)
    p.add_argument("--ref_prompts", type=int, default=100, help="prompts timed with the slow reference loop")
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--detector", nargs="+", choices=DETECTORS,
                   help="time these detectors against each other instead of the reference comparison")
    add_model_args(p)
    args = p.parse_args(argv)
    if args.detector:
        return compare_detectors(args)

    device = torch.device(args.device)
    pipe = bench_pipeline(args)
    parts = denoiser_parts(pipe)
    prompts = load_prompts(args.prompts, args.n_prompts)
    n_ref = min(args.ref_prompts, len(prompts))
    G, steps, scale = args.num_images_per_prompt, args.num_inference_steps, args.guidance_scale
    print(f"model={args.model_id or args.arch} device={device} dtype={args.dtype} prompts={len(prompts)} "
          f"(reference on {n_ref}) G={G} steps={steps} batch={args.batch_size}")

    def batched(mode: str, subset: list[str]) -> list[float]:
        uncond = encode_prompts(parts, [""]).embeds
        scores = []
        for i in tqdm(range(0, len(subset), args.batch_size), desc=f"diffmem {mode}", unit="batch"):
            chunk = subset[i : i + args.batch_size]
            trace, _ = score_prompts(parts, chunk, list(range(i, i + len(chunk))), num_images_per_prompt=G,
                                     num_inference_steps=steps, guidance_scale=scale, score_steps=1,
                                     latents_mode=mode, uncond_embed=uncond)
            scores += trace.score.tolist()
        return scores

    for mode in ("per_prompt", "shared"):  # warm-up every batch shape each mode uses (allocator, kernel choice)
        batched(mode, prompts[: args.batch_size] + prompts[: len(prompts) % args.batch_size])
    reference_first_step_scores(pipe, prompts[:1], G, steps, scale, 0, device)
    ref_scores, t_ref = timed(lambda: reference_first_step_scores(pipe, prompts[:n_ref], G, steps, scale, 0,
                                                                  device), device)
    per_scores, t_per = timed(lambda: batched("per_prompt", prompts), device)
    _, t_shared = timed(lambda: batched("shared", prompts), device)

    rate = {"a_reference": n_ref / t_ref, "b_first_step": len(prompts) / t_per, "c_shared": len(prompts) / t_shared}
    diffs = [abs(a - b) for a, b in zip(ref_scores, per_scores)]
    rel = [d / abs(a) for d, a in zip(diffs, ref_scores)]
    result = {
        "config": vars(args),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "prompts_per_s": rate,
        "ratio_b_over_a": rate["b_first_step"] / rate["a_reference"],
        "ratio_c_over_b": rate["c_shared"] / rate["b_first_step"],
        "max_abs_diff_a_vs_b": max(diffs),
        "max_rel_diff_a_vs_b": max(rel),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for name, r in rate.items():
        print(f"{name:>14}: {r:10.2f} prompts/s")
    print(f"(b)/(a) = {result['ratio_b_over_a']:.1f}x   (c)/(b) = {result['ratio_c_over_b']:.2f}x")
    print(f"first-step scores, (a) vs (b) on {n_ref} prompts: max |diff| = {result['max_abs_diff_a_vs_b']:.3g}, "
          f"max relative = {result['max_rel_diff_a_vs_b']:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
