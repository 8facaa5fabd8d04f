"""diffmem's public API for notebooks and scripts (text-to-image): the shipped memorization lab, loading a model,
scoring prompts for memorization, explaining them token by token, and reading and evaluating results.

    from diffmem.common import api

    out = api.output_dir("my_outputs")                       # the one folder written below
    model = api.load_model()                                 # the shipped lab; or a Hub id / pipeline folder
    rows = api.score_prompts(model, api.lab_dir() / "memorized.jsonl", num_inference_steps=10)
    api.write_results(out / "scores.jsonl", rows)
    report = api.evaluate(out / "scores.jsonl", out)        # AUC, TPR@FPR; roc.png, scores_kde.png in out
    (tokens,) = api.explain_tokens(model, [rows[0]["prompt"]], [rows[0]["row"]])

Each function wraps the library code a CLI runs, so the numbers are the CLI's for the same settings:
``score_prompts`` is ``detect/detect_mem.py``'s loop and rows, ``explain_tokens`` is ``detect/explain_tokens.py``'s,
``evaluate`` is ``detect/evaluate.py``'s metrics and plots. Nothing here writes anywhere but into a folder or file
it is given. This module sits above the text-to-image wing (``common.t2i``), which it wraps; it imports torch, and
``import diffmem`` does not import it. docs/api.md documents it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffmem.common import resources
from diffmem.common.cli import quiet_hub_logging
from diffmem.common.errors import ConfigError
from diffmem.common.metrics import (
    DEFAULT_FPR_TARGETS,
    ResultsFileError,
    check_both_classes,
    evaluate_splits,
    format_table,
    plot_roc,
    plot_score_kde,
    read_scored_rows,
    score_groups,
)
from diffmem.common.results import read_results as _read_results
from diffmem.common.results import write_json_atomic
from diffmem.common.t2i import detection, explain
from diffmem.common.t2i.explain import TokenSignificance
from diffmem.common.t2i.pipelines import DenoiserParts, denoiser_parts, load_pipeline, parse_dtype
from diffmem.common.t2i.prompts import PromptRecord
from diffmem.common.t2i.prompts import read_prompts as _read_prompts

__all__ = ["lab_dir", "output_dir", "read_prompts", "load_model", "score_prompts", "write_results", "read_results",
           "Evaluation", "evaluate", "explain_tokens", "token_heatmap", "plot_token_bars"]


def lab_dir() -> Path:
    """The shipped memorization lab, in this installation (a wheel or a checkout alike): a 14 MB
    Stable-Diffusion-shaped pipeline folder trained to memorize 12 captioned images, with ``memorized.jsonl``,
    ``unmemorized.jsonl`` (labelled captions), ``gt_images/`` and ``manifest.json`` (its measured figures)."""
    return resources.lab_dir()


def output_dir(path: str | Path) -> Path:
    """The folder ``path``, created if needed, for a notebook's or script's outputs. A folder inside an installed
    diffmem package is refused (ConfigError): the installation is not a place to write."""
    out = Path(path).expanduser().resolve()
    root = resources.package_root().resolve()
    installed = not (root / "setup.cfg").is_file()  # a checkout's package root is the repository
    if installed and (out == root or root in out.parents):
        raise ConfigError(f"{path}: inside the installed diffmem package ({root}); give a folder of your own")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{path}: expected a folder, it is a file")
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_prompts(source: str | Path) -> list[PromptRecord]:
    """The prompts of a .jsonl / .csv file (or a Hugging Face dataset name): records with ``row`` (the position,
    which seeds the latents), ``prompt``, ``label`` (1 memorized, 0 not, or None) and ``type``. A bad row is a
    PromptFileError naming ``FILE:LINE``."""
    return _read_prompts(source)


def load_model(model: str | Path | None = None, *, dtype: str = "fp32", device: str | None = None,
               scheduler: str = "ddim") -> DenoiserParts:
    """What scoring and explaining need of a Stable Diffusion pipeline (its UNet, text encoder, tokenizer, a DDIM
    scheduler and the latent shape), loaded as the CLIs load it. ``model``: a Hub id or a pipeline folder
    (None: the shipped lab); ``dtype`` fp32 / fp16 / bf16; ``device`` None: cuda when available, else cpu;
    ``scheduler`` "ddim" (Wen et al.) or "pipeline" (as saved). A model that cannot be loaded is a ModelLoadError
    with a one-line reason."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quiet_hub_logging()
    pipe = load_pipeline(str(model if model is not None else lab_dir()), dtype=parse_dtype(dtype), device=device)
    return denoiser_parts(pipe, scheduler)


def _records(prompts: str | Path | Sequence[str] | Sequence[PromptRecord]) -> list[PromptRecord]:
    if isinstance(prompts, (str, Path)):
        return _read_prompts(prompts)
    return [p if isinstance(p, PromptRecord) else PromptRecord(row, p) for row, p in enumerate(prompts)]


def score_prompts(model: DenoiserParts, prompts: str | Path | Sequence[str] | Sequence[PromptRecord], *,
                  num_images_per_prompt: int = 4, gen_seed: int = 0, num_inference_steps: int = 50,
                  guidance_scale: float = 7.5, score_steps: int = 1, detector: str = "wen",
                  latents: str = "per_prompt", batch_size: int = 32, progress: bool = True) -> list[dict]:
    """Memorization scores of prompts, as ``detect/detect_mem.py`` computes them with the same settings: one
    results row per prompt, in order, in detect_mem's layout (``row``, ``index``, ``prompt``, ``label`` and
    ``type`` where known, ``score``, ``detector``, the detector's terms such as ``text_noise_norm``
    [generation][step], ``truncated``). Higher score = more likely memorized.

    ``prompts``: a prompt file (its rows seed their latents by position, as one detect_mem run on that file),
    records of :func:`read_prompts`, or plain strings (rows 0, 1, …). ``detector``: wen (Wen et al.'s text-noise
    magnitude over the first ``score_steps`` DDIM steps), anisotropy or sharpness (zero-step scores)."""
    records = _records(prompts)
    uncond = model.unconditional()
    rows = []
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
        terms, truncated = detection.score_prompts(
            model, [r.prompt for r in batch], [r.row for r in batch], num_images_per_prompt=num_images_per_prompt,
            gen_seed=gen_seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            score_steps=score_steps, latents_mode=latents, uncond_embed=uncond, detector=detector)
        scores = terms.score.tolist()
        rows += [detection.result_row(rec, detector, terms.row_terms(b), scores[b], truncated[b])
                 for b, rec in enumerate(batch)]
    return rows


def write_results(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write results rows as a .jsonl file (atomically: a kill leaves the old file or the new one); returns the
    path. ``detect/evaluate.py`` and :func:`evaluate` read it."""
    write_json_atomic(path, list(rows), jsonl=True)
    return Path(path)


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results .jsonl (of ``detect/detect_mem.py``, :func:`write_results`, ...). A missing file or a
    corrupt line is a ResultsFileError naming it."""
    if not Path(path).is_file():
        raise ResultsFileError(f"{path}: no such results file")
    return _read_results(path)


@dataclass
class Evaluation:
    """What :func:`evaluate` found: metrics per split ("all", then each Webster type of the positives), its text
    table and the figures written (None where not drawn); ``note`` says why there is no ROC (one class only)."""

    metrics: dict[str, dict]
    table: str
    roc_png: Path | None
    scores_kde_png: Path | None
    note: str | None = None


def evaluate(results: str | Path | Sequence[str | Path], out_dir: str | Path | None = None, *,
             fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS) -> Evaluation:
    """Detection metrics of labelled results files, as ``detect/evaluate.py`` computes them: AUC, best balanced
    accuracy, TPR at each FPR target (the largest TPR with FPR strictly below it), per split. With ``out_dir``
    it draws ``roc.png`` and ``scores_kde.png`` there. Rows without a 0/1 ``label`` are a ResultsFileError; rows of
    one class only give no metrics (``note`` says so) but still their score distribution."""
    paths = [results] if isinstance(results, (str, Path)) else list(results)
    rows = [r for p in paths for r in read_scored_rows(p)]
    out = Path(out_dir) if out_dir is not None else None
    metrics, note, roc = {}, None, None
    try:
        check_both_classes(rows, paths)
    except ResultsFileError as exc:
        note = str(exc)
    else:
        metrics, curves = evaluate_splits(rows, fpr_targets)
        if out is not None:
            roc = out / "roc.png"
            plot_roc(curves, metrics, roc)
    kde = None
    if out is not None:
        kde = out / "scores_kde.png"
        plot_score_kde(score_groups(rows), kde, xlabel="detection score")
    return Evaluation(metrics, format_table(metrics) if metrics else f"no ROC: {note}", roc, kde, note)


def explain_tokens(model: DenoiserParts, prompts: Sequence[str], rows: Sequence[int] | None = None, *,
                   wrt: str = "prompt_embeds", num_images_per_prompt: int = 4, gen_seed: int = 0,
                   num_inference_steps: int = 50, guidance_scale: float = 7.5, target_steps: Sequence[int] = (0,),
                   batch_size: int = 4) -> list[TokenSignificance]:
    """Token-wise significance of each prompt (Wen et al., Sec. 4), as ``detect/explain_tokens.py`` computes it:
    ‖∂L/∂e_k‖₂ of the text-noise magnitude L with respect to token k's embedding, averaged over ``target_steps``
    (DDIM step indices, 0 the first). ``rows`` seed the latents (None: 0, 1, …; pass a results row's ``row`` to
    explain it on the latents it was scored on). ``wrt``: "prompt_embeds" (the text encoder's output) or
    "token_embeds" (its input). Each result has ``tokens``, ``kinds`` (bos/token/eos/pad), ``scores``,
    ``normalized`` (1 = the prompt's most significant token), ``ranking()`` and ``objective`` (L per step)."""
    rows = list(range(len(prompts))) if rows is None else list(rows)
    if len(rows) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts for {len(rows)} rows")
    uncond = model.unconditional()
    results = []
    for i in range(0, len(prompts), batch_size):
        results += explain.explain_prompts(
            model, list(prompts[i : i + batch_size]), rows[i : i + batch_size], wrt=wrt,
            num_images_per_prompt=num_images_per_prompt, gen_seed=gen_seed, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, target_steps=list(target_steps), uncond_embed=uncond)
    return results


def token_heatmap(results: Sequence[TokenSignificance], title: str | None = None) -> str:
    """HTML of the prompts' tokens shaded by significance (BOS/EOS/padding hidden): a fragment to display in a
    notebook, or with ``title`` a standalone page to write to a .html file."""
    if title is None:
        return explain.heatmap_fragment(list(results))
    return explain.heatmap_html(list(results), title)


def plot_token_bars(result: TokenSignificance, path: str | Path | None = None):
    """Bar chart of a prompt's tokens' normalized significance (a matplotlib figure); saved as PNG at ``path``
    when given, else a pyplot figure that a notebook displays."""
    return explain.plot_token_bars(result, path)
