"""Mitigation throughput: prompt-embedding optimisation batched vs one prompt at a time, and SSCD images/s.

    python bench/bench_mitigate.py                                  # tiny pipeline, CPU
    python bench/bench_mitigate.py --arch sd-v1 --device cuda --dtype fp16 --n_prompts 64 --batch_size 16

(a) one prompt at a time (the reference's structure: each prompt's AdamW loop alone) and (b) batches of
--batch_size prompts, each stopping on its own, with the same target loss, iterations and latents. Prints
prompts/s of each, the ratio, and how far (b)'s results are from (a)'s (iterations, final loss, embedding).
Then one batch's generation (DDIM + VAE) in UNet evaluations/s with torch's threads and, on CPU, with one
thread, alternated, with their ratio and image difference (``--gen_reps 0`` skips it; on the lab model use
``--model_id data/lab --batch_size 4 --num_images_per_prompt 2``, a mitigation run's batch there).
Then SSCD descriptor throughput (images/s) on images of the model's output size, for --sscd_model.
Without --optim_target_loss the target is 0.7 × the median initial loss (random models have no natural scale),
so prompts stop after different numbers of updates, as they do on a real model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from benchlib import add_model_args, bench_pipeline, load_prompts, timed

from diffmem.common.t2i.detection import encode_prompts
from diffmem.common.t2i.mitigation.prompt_embedding import optimise_prompt_embeds, prompt_losses
from diffmem.common.t2i.pipelines import denoiser_parts
from diffmem.common.t2i.text_noise import initial_latents


def generation_throughput(pipe, parts, embeds, uncond, latents, args, device) -> dict:
    """UNet evaluations/s of one batch's generation (sampling + VAE decode, as a mitigation run does it) with
    torch's current intra-op threads and, on CPU, with one thread, timed alternately (A, B, A, B) so that load
    from other processes falls on both; plus whether the two give the same images.

    On a small model and a shared CPU the thread count, not the sampling loop, decides the speed: each of the
    few hundred kernels of a UNet call is an OpenMP region whose threads wait for one another, and a thread that
    another process has descheduled stalls them all.
    """
    from diffmem.common.t2i.sampler import decode_latents, sample_latents

    B = min(args.batch_size, len(embeds))
    G = latents.shape[1]
    evals = 2 * B * G * args.num_inference_steps  # classifier-free guidance: two per sample and step

    def generate():
        return decode_latents(pipe.vae, sample_latents(parts, embeds[:B], uncond, latents[:B],
                                                       num_inference_steps=args.num_inference_steps,
                                                       guidance_scale=args.guidance_scale))

    threads = torch.get_num_threads()
    counts = [threads] + ([1] if device.type == "cpu" and threads > 1 else [])
    times: dict = {n: [] for n in counts}
    images: dict = {}
    try:
        for rep in range(args.gen_reps + 1):  # the first round warms up each thread count and is not timed
            for n in counts:
                torch.set_num_threads(n)
                images[n], seconds = timed(generate, device)
                if rep:
                    times[n].append(seconds)
    finally:
        torch.set_num_threads(threads)
    result = {"batch": [B, G], "unet_evals": evals,
              "evals_per_s": {str(n): evals / statistics.median(times[n]) for n in counts},
              "seconds": {str(n): times[n] for n in counts}}
    print(f"generation of {B} prompts x {G} (+ VAE), {args.num_inference_steps} steps, median of "
          f"{args.gen_reps}:", end="")
    for n in counts:
        print(f"  {n} thread(s) {result['evals_per_s'][str(n)]:.0f} UNet evals/s", end="")
    if len(counts) == 2:
        a, b = images[threads], images[1]
        result["ratio_1_thread_over_current"] = statistics.median(times[threads]) / statistics.median(times[1])
        result["max_abs_diff_images"] = float((a - b).abs().max())
        result["uint8_pixels_differing"] = int(((a * 255).round() != (b * 255).round()).sum())
        print(f"  speed 1 thread / {threads} = {result['ratio_1_thread_over_current']:.2f}x; images max |Δ| "
              f"{result['max_abs_diff_images']:.2g}, {result['uint8_pixels_differing']} uint8 values differ", end="")
    print()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_prompts", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--optim_target_steps", type=int, nargs="+", default=[0])
    p.add_argument("--optim_iters", type=int, default=10)
    p.add_argument("--optim_lr", type=float, default=0.05)
    p.add_argument("--optim_target_loss", type=float, help="default: 0.7 x median initial loss")
    p.add_argument("--sscd_model", default="default", help="'default', a TorchScript/ONNX file, or 'none'")
    p.add_argument("--sscd_images", type=int, default=64)
    p.add_argument("--gen_reps", type=int, default=3, help="timed generations per thread count")
    add_model_args(p)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    pipe = bench_pipeline(args)
    parts = denoiser_parts(pipe)
    prompts = load_prompts(args.prompts, args.n_prompts)
    G = args.num_images_per_prompt
    objective = dict(num_inference_steps=args.num_inference_steps, target_steps=args.optim_target_steps,
                     guidance_scale=args.guidance_scale)
    uncond = parts.unconditional()
    embeds = torch.cat([encode_prompts(parts, prompts[i:i + 64]).embeds for i in range(0, len(prompts), 64)])
    latents = initial_latents(list(range(len(prompts))), G, parts.latent_shape, 0, "per_prompt",
                              float(parts.scheduler.init_noise_sigma))
    target = args.optim_target_loss
    if target is None:
        initial = []
        for i in range(0, len(prompts), args.batch_size):
            initial += prompt_losses(parts, embeds[i:i + args.batch_size], uncond,
                                     latents[i:i + args.batch_size], **objective)
        target = 0.7 * statistics.median(initial)
    kw = dict(target_loss=target, iters=args.optim_iters, lr=args.optim_lr, **objective)
    print(f"model={args.model_id or args.arch} device={device} dtype={args.dtype} prompts={len(prompts)} G={G} "
          f"batch={args.batch_size} iters<={args.optim_iters} target={target:.4g} steps={args.optim_target_steps}")

    def one_by_one():
        return [optimise_prompt_embeds(parts, embeds[i:i + 1], uncond, latents[i:i + 1], **kw)
                for i in range(len(prompts))]

    def batched():
        return [optimise_prompt_embeds(parts, embeds[i:i + args.batch_size], uncond,
                                       latents[i:i + args.batch_size], **kw)
                for i in range(0, len(prompts), args.batch_size)]

    # warm-up of each batch shape (allocator, kernel choice)
    optimise_prompt_embeds(parts, embeds[:1], uncond, latents[:1], **{**kw, "iters": 1})
    optimise_prompt_embeds(parts, embeds[:args.batch_size], uncond, latents[:args.batch_size], **{**kw, "iters": 1})
    single, t_single = timed(one_by_one, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch, t_batch = timed(batched, device)
    its_a = [r.iterations[0] for r in single]
    its_b = [n for r in batch for n in r.iterations]
    loss_a = [r.final_loss[0] for r in single]
    loss_b = [v for r in batch for v in r.final_loss]
    emb_a = torch.cat([r.embeds for r in single]).float()
    emb_b = torch.cat([r.embeds for r in batch]).float()
    result = {
        "config": vars(args),
        "target_loss": target,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "prompts_per_s": {"a_one_by_one": len(prompts) / t_single, "b_batched": len(prompts) / t_batch},
        "ratio_b_over_a": t_single / t_batch,
        "iterations_mean": statistics.mean(its_a),
        "reached_target": sum(r.reached_target[0] for r in single),
        "iterations_equal": its_a == its_b,
        "max_rel_diff_final_loss": max(abs(a - b) / abs(a) for a, b in zip(loss_a, loss_b)),
        "max_abs_diff_embeds": float((emb_a - emb_b).abs().max()),
    }
    if device.type == "cuda":
        result["peak_memory_gib_batched"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"(a) one by one: {result['prompts_per_s']['a_one_by_one']:8.3f} prompts/s")
    print(f"(b) batched   : {result['prompts_per_s']['b_batched']:8.3f} prompts/s   (b)/(a) = "
          f"{result['ratio_b_over_a']:.2f}x")
    print(f"same results: iterations equal = {result['iterations_equal']} (mean {result['iterations_mean']:.2f}, "
          f"{result['reached_target']}/{len(prompts)} reached the target), max rel |Δ final loss| = "
          f"{result['max_rel_diff_final_loss']:.2g}, max |Δ embedding| = {result['max_abs_diff_embeds']:.2g}")
    if args.gen_reps > 0:
        result["generation"] = generation_throughput(pipe, parts, embeds, uncond, latents, args, device)

    if args.sscd_model != "none":
        from diffmem.common.similarity import SimilarityModelError, SSCDModel
        from diffmem.common.t2i.sampler import decode_latents, to_pil

        try:
            sscd = SSCDModel(args.sscd_model, device=device)
        except SimilarityModelError as exc:
            print(f"SSCD: skipped ({exc})")
        else:
            n = args.sscd_images
            with torch.no_grad():
                imgs = decode_latents(pipe.vae, torch.randn(min(n, 8), *parts.latent_shape))
            images = (to_pil(imgs) * (n // len(imgs) + 1))[:n]
            sscd.embed(images[: min(8, n)])  # warm-up
            _, t_sscd = timed(lambda: sscd.embed(images), device)
            result["sscd"] = {"model": sscd.description, "image_size": list(images[0].size),
                              "images_per_s": n / t_sscd}
            print(f"SSCD {sscd.description}: {n / t_sscd:.1f} images/s ({images[0].size[0]}x{images[0].size[1]} "
                  f"inputs, incl. preprocessing)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
