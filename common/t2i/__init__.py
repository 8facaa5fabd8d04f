"""The text-to-image wing: Stable Diffusion pipelines, prompts, Wen et al.'s detection, explanation and
mitigation, text-to-image training data and the memorization lab.

- ``pipelines/``: the family room: SD 1/2, SDXL, SD3, Flux and PixArt, one module each (encoding, the unconditional
  branch, latents, the denoiser call, the metric space, scheduler steps, decoding), the loader, the conditioning and
  the denoiser parts the detectors use; tiny pipelines built offline. ``rectified_flow``: SD3's and Flux's flow math.
- ``tokenizer``, ``prompts``, ``groundtruth``: CLIP tokens, prompt files, ground-truth image folders.
- ``text_noise``: Wen et al.'s text-conditional noise magnitude ‖ε(x, c) − ε(x, ∅)‖ (ICLR 2024, Sec. 3).
- ``detection``: the batched detectors (Wen et al.; Asthana & Belagiannis's anisotropy, ICLR 2026; Jeon et al.'s
  sharpness, ICML 2025).
- ``explain``: token significance (Wen et al., Sec. 4). ``prompt_aug``: the random-token baselines.
- ``sampler``: classifier-free-guided DDIM sampling and decoding.
- ``text_image_data``, ``train``, ``finetune_settings``: fine-tuning data, the text-to-image arm of the trainer and
  its settings (torch-free). ``lab``: the lab's recipe.
- ``options``: the CLIs' shared choice lists and option fields.
- ``mitigation/``: every inference-time mitigation, one module per paper, and the harness (its ``__init__``).

It imports only from ``common`` itself (training, seeding, results, metrics, SSCD, errors, settings), never from
``common.edm``; what both wings need lives in ``common``.
"""
