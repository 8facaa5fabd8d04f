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

    python bench/bench_detect.py --family sdxl                    # or sd, sd3, flux, pixart; all: a table
    python bench/bench_detect.py --family sd3 --arch full --device cuda --dtype fp16 --n_prompts 32 --ref_prompts 8

times any family's first step instead: (a) the family's own diffusers pipeline called for ONE guided inference
step, one prompt (G images) per call, output_type="latent" (what a user without diffmem runs to get the
first-step predictions; Flux: true CFG, true_cfg_scale with negative_prompt=""); (b) diffmem's batched
score_prompts(score_steps=1), --batch_size prompts per call; (c) (b) with --latents shared. Timed A B C C B A
after a warm-up of each. --arch tiny (default): the family's tiny random pipeline (common.t2i.pipelines.tiny),
built in a temporary folder (tiny Flux at 16x16 px unless --height/--width); --arch full: the released denoiser
shape (SD v1's UNet, SDXL base's UNet, SD3-medium's MMDiT) with random weights and shallow text encoders, for a
GPU; --model_id: a saved pipeline.

    python bench/bench_detect.py --profile --model_id data/lab

profiles the first-step metric (score_prompts, --batch_size prompts x G per call): the share of wall time in the
denoiser, in the text encoders and in the rest, with the denoiser's weights contiguous (A, as diffusers loads them
and the CLIs use them) and channels-last (B), timed A B B A per --repeats round; prints the median shares and
prompts/s of each, the ratio B/A, and the largest relative score difference between them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from benchlib import FULL_FAMILIES, add_model_args, bench_pipeline, family_pipeline, load_prompts, timed
from tqdm.auto import tqdm

from diffmem.common.t2i.detection import score_prompts
from diffmem.common.t2i.options import DETECTORS
from diffmem.common.t2i.pipelines import FAMILIES, denoiser_parts, family_of
from diffmem.common.t2i.pipelines.flux import DISTILLED_GUIDANCE
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
    uncond = parts.unconditional()
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


def pipeline_first_steps(pipe, family, prompts: list[str], G: int, scale: float) -> None:
    """(a): the family's own pipeline, one guided inference step per prompt, G images, latents out (no decode)."""
    call = dict(num_inference_steps=1, num_images_per_prompt=G, output_type="latent", **family.pipeline_kwargs())
    if family.key == "flux":  # dev's distilled-guidance input at its default; CFG proper is diffusers' true CFG
        call.update(true_cfg_scale=scale, negative_prompt="", guidance_scale=DISTILLED_GUIDANCE)
    else:
        call.update(guidance_scale=scale)
    for prompt in prompts:
        pipe(prompt, **call)


def _count(n: int) -> str:
    """A parameter count: 2.57B, 793k."""
    units = ((1e9, "B"), (1e6, "M"), (1e3, "k"))
    return next((f"{n / scale:.3g}{unit}" for scale, unit in units if n >= scale), str(n))


def bench_family(args, family_key: str | None) -> dict:
    """(a), (b) and (c) of one family (--family mode), timed A B C C B A after warm-ups; prints and returns them."""
    device = torch.device(args.device)
    pipe = family_pipeline(family_key, args.arch, args.device, args.dtype, args.model_id)
    found = family_of(pipe).key
    if family_key is not None and found != family_key:
        raise SystemExit(f"--model_id {args.model_id} is a {found} pipeline, not {family_key}")
    # Tiny Flux's default resolution (its pipeline's default_sample_size 128 x 2 = 256 px) is 16x slower than 16 px.
    small = 16 if found == "flux" and args.arch == "tiny" and not args.model_id else None
    parts = denoiser_parts(pipe, height=args.height or small, width=args.width or small)
    family = parts.family
    prompts = load_prompts(args.prompts, args.n_prompts)
    ref = prompts[: min(args.ref_prompts, len(prompts))]
    G, steps, scale, bs = args.num_images_per_prompt, args.num_inference_steps, args.guidance_scale, args.batch_size
    model = args.model_id or f"{args.arch} {found}"
    denoiser = sum(t.numel() for t in parts.unet.parameters())
    print(f"\n== {family.label}: {model} ({type(pipe).__name__}, denoiser {_count(denoiser)} params), "
          f"{family.height}x{family.width} px, latent {tuple(parts.latent_shape)}, device={device} "
          f"dtype={args.dtype} threads={torch.get_num_threads()}")
    if args.arch == "full" and not args.model_id:
        print(f"   full: {FULL_FAMILIES[found]}; random weights (the metric's cost is the denoiser's)")
    print(f"   (a) pipeline, 1 step, 1 prompt x G={G} per call, {len(ref)} prompts; (b) score_prompts(score_steps=1) "
          f"of a {steps}-step schedule, {bs} prompts x G per call, {len(prompts)} prompts; (c) (b), shared x_T")

    def batched(mode: str, subset: list[str]) -> None:
        uncond = parts.unconditional()
        for i in range(0, len(subset), bs):
            chunk = subset[i : i + bs]
            score_prompts(parts, chunk, list(range(i, i + len(chunk))), num_images_per_prompt=G,
                          num_inference_steps=steps, guidance_scale=scale, score_steps=1, latents_mode=mode,
                          uncond_embed=uncond)

    runs = {"a_pipeline": (lambda: pipeline_first_steps(pipe, family, ref, G, scale), len(ref)),
            "b_first_step": (lambda: batched("per_prompt", prompts), len(prompts)),
            "c_shared": (lambda: batched("shared", prompts), len(prompts))}
    pipeline_first_steps(pipe, family, ref[:1], G, scale)  # warm-ups: every shape each timed run uses
    for mode in ("per_prompt", "shared"):
        batched(mode, prompts[:bs] + prompts[: len(prompts) % bs])
    # --repeats rounds of A B C C B A; each run's best rate (timeit's rule: other jobs on a shared machine only
    # ever slow a run down) and its median are reported.
    samples = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in ("a_pipeline", "b_first_step", "c_shared", "c_shared", "b_first_step", "a_pipeline"):
            samples[name].append(runs[name][1] / timed(runs[name][0], device)[1])
    rate = {name: max(r) for name, r in samples.items()}
    median = {name: statistics.median(r) for name, r in samples.items()}
    result = {"family": found, "model": model, "height": family.height, "width": family.width,
              "latent_shape": list(parts.latent_shape), "denoiser_params": denoiser, "prompts_per_s": rate,
              "median_prompts_per_s": median, "samples_prompts_per_s": samples,
              "ratio_b_over_a": rate["b_first_step"] / rate["a_pipeline"],
              "ratio_c_over_a": rate["c_shared"] / rate["a_pipeline"],
              "median_ratio_b_over_a": median["b_first_step"] / median["a_pipeline"]}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for name in runs:
        print(f"{name:>14}: {rate[name]:10.2f} prompts/s best of {len(samples[name])} (median {median[name]:.2f})")
    print(f"(b)/(a) = {result['ratio_b_over_a']:.1f}x   (c)/(a) = {result['ratio_c_over_a']:.1f}x   "
          f"medians' (b)/(a) = {result['median_ratio_b_over_a']:.1f}x")
    return result


def compare_families(args) -> int:
    """--family: one family, or each in turn (all) and a table."""
    if args.family == "all" and args.model_id:
        raise SystemExit("--family all builds each family; name one --family with --model_id")
    keys = list(FAMILIES) if args.family == "all" else [args.family]
    if args.family == "all" and args.arch == "full":
        print(f"--arch full: {', '.join(k for k in keys if k not in FULL_FAMILIES)} skipped (no full-size build)")
        keys = [k for k in keys if k in FULL_FAMILIES]
    results = []
    for key in keys:
        results.append(bench_family(args, key))
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
    device = torch.device(args.device)
    out = {"config": vars(args), "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "families": results}
    if len(results) > 1:
        print(f"\n{'family':>8} {'image':>9} {'(a) pipe/s':>11} {'(b) diffmem/s':>14} {'(b)/(a)':>8} "
              f"{'(c) shared/s':>13} {'(c)/(a)':>8}")
        for r in results:
            rate, image = r["prompts_per_s"], f"{r['height']}x{r['width']}"
            print(f"{r['family']:>8} {image:>9} {rate['a_pipeline']:11.1f} {rate['b_first_step']:14.1f} "
                  f"{r['ratio_b_over_a']:7.1f}x {rate['c_shared']:13.1f} {r['ratio_c_over_a']:7.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(out if len(results) > 1 else {**out, **results[0]}, indent=2))
    return 0


def profile_first_step(args) -> int:
    """--profile: time shares (denoiser, text encoders, rest) of score_prompts, contiguous vs channels-last."""
    pipe = bench_pipeline(args)
    parts = denoiser_parts(pipe)
    prompts = load_prompts(args.prompts, args.n_prompts)
    G, steps, bs = args.num_images_per_prompt, args.num_inference_steps, args.batch_size
    spent = {"denoiser": 0.0, "text encoders": 0.0}

    def clocked(module, name):
        forward = module.forward

        def timed_forward(*a, **k):
            t0 = time.perf_counter()
            out = forward(*a, **k)
            spent[name] += time.perf_counter() - t0
            return out
        module.forward = timed_forward

    clocked(parts.unet, "denoiser")
    for enc in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, enc, None) is not None:
            clocked(getattr(pipe, enc), "text encoders")

    def one_pass() -> torch.Tensor:
        uncond = parts.unconditional()  # once per run, as the CLIs do
        scores = []
        for i in range(0, len(prompts), bs):
            chunk = prompts[i : i + bs]
            trace, _ = score_prompts(parts, chunk, list(range(i, i + len(chunk))), num_images_per_prompt=G,
                                     num_inference_steps=steps, guidance_scale=args.guidance_scale, score_steps=1,
                                     uncond_embed=uncond)
            scores.append(trace.score)
        return torch.cat(scores)

    layouts = {"A": torch.contiguous_format, "B": torch.channels_last}
    samples = {k: [] for k in layouts}
    scores = {}
    for k in layouts:  # warm-up of each layout
        parts.unet.to(memory_format=layouts[k])
        scores[k] = one_pass()
    for _ in range(args.repeats):
        for k in "ABBA":
            parts.unet.to(memory_format=layouts[k])
            for name in spent:
                spent[name] = 0.0
            t0 = time.perf_counter()
            one_pass()
            wall = time.perf_counter() - t0
            samples[k].append({"wall": wall, **{n: s / wall for n, s in spent.items()}})
    print(f"model={args.model_id or args.arch} prompts={len(prompts)} G={G} batch={bs} threads="
          f"{torch.get_num_threads()}; medians of {2 * args.repeats} passes per layout")
    med = {}
    for k, label in (("A", "contiguous"), ("B", "channels_last")):
        m = {n: statistics.median(s[n] for s in samples[k]) for n in samples[k][0]}
        med[k] = m
        print(f"{label:>14}: {len(prompts) / m['wall']:8.2f} prompts/s; denoiser {m['denoiser']:.1%}, text encoders "
              f"{m['text encoders']:.1%}, rest {1 - m['denoiser'] - m['text encoders']:.1%}")
    rel = ((scores["B"] - scores["A"]).abs() / scores["A"].abs()).max().item()
    print(f"channels_last / contiguous = {med['A']['wall'] / med['B']['wall']:.2f}x; max relative score "
          f"difference {rel:.2g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_prompts", type=int, help="prompts timed (default 500; --family: 64)")
    p.add_argument("--ref_prompts", type=int,
                   help="prompts timed with the slow reference loop or --family's pipeline (default 100; --family: 16)")
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, help="prompts per batched call (default 32; --family: 16)")
    p.add_argument("--detector", nargs="+", choices=DETECTORS,
                   help="time these detectors against each other instead of the reference comparison")
    p.add_argument("--family", choices=(*FAMILIES, "all"),
                   help="time the family's own one-step pipeline call against diffmem's batched first step")
    p.add_argument("--repeats", type=int, default=3, help="--family / --profile: rounds of timings")
    p.add_argument("--profile", action="store_true",
                   help="time shares of the first-step metric (denoiser, text encoders, rest), contiguous vs "
                        "channels-last weights")
    p.add_argument("--height", type=int, help="--family: image height (default: the family's; tiny Flux: 16)")
    p.add_argument("--width", type=int, help="--family: image width (default: the family's; tiny Flux: 16)")
    add_model_args(p, archs=("tiny", "sd-v1", "full"))
    args = p.parse_args(argv)
    family_mode = args.family is not None
    for name, default, family_default in (("n_prompts", 500, 64), ("ref_prompts", 100, 16), ("batch_size", 32, 16)):
        if getattr(args, name) is None:
            setattr(args, name, family_default if family_mode else default)
    if family_mode:
        if args.arch == "sd-v1":
            args.arch = "full"  # SD v1's shapes are the sd family's full build
        return compare_families(args)
    if args.arch == "full":
        p.error("--arch full takes --family (without it, SD v1's shapes are --arch sd-v1)")
    if args.detector:
        return compare_detectors(args)
    if args.profile:
        return profile_first_step(args)

    device = torch.device(args.device)
    pipe = bench_pipeline(args)
    parts = denoiser_parts(pipe)
    prompts = load_prompts(args.prompts, args.n_prompts)
    n_ref = min(args.ref_prompts, len(prompts))
    G, steps, scale = args.num_images_per_prompt, args.num_inference_steps, args.guidance_scale
    print(f"model={args.model_id or args.arch} device={device} dtype={args.dtype} prompts={len(prompts)} "
          f"(reference on {n_ref}) G={G} steps={steps} batch={args.batch_size}")

    def batched(mode: str, subset: list[str]) -> list[float]:
        uncond = parts.unconditional()
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
