"""Explain memorization token by token: the significance of each prompt token (Wen et al., ICLR 2024, Sec. 4).

    python detect/explain_tokens.py --model ID_OR_DIR (--prompt "..." | --data FILE) --out DIR [options]

Writes DIR/tokens.jsonl (one row per prompt: every token position as a string, raw and normalised scores,
BOS/EOS/padding flagged), DIR/heatmap.html (tokens shaded by significance, specials hidden) and one bar chart
per prompt under DIR/bars/. Rows are appended per batch; re-running the same command resumes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

from diffmem.common.cli import (
    ArgumentParser,
    add_settings_arguments,
    quiet_hub_logging,
    resolve_device,
    run_main,
    settings_from_args,
)
from diffmem.common.errors import ConfigError
from diffmem.common.hub import check_model_reference
from diffmem.common.results import (
    append_results,
    bind_run_settings,
    check_rows_match,
    check_run_settings,
    read_results,
    write_json_atomic,
)
from diffmem.common.settings import StepSpecError, device_option, option, option_flag, parse_step_indices, prompt_text
from diffmem.common.t2i.options import GEOMETRY_FIELDS, WRT_CHOICES, batch_size_option, shared_option
from diffmem.common.t2i.prompts import PromptFileError, PromptRecord, read_prompts, select_rows

# Arguments that change the numbers: a resumed run must use the values of the results already on disk.
RESULT_KEYS = ("model_id", "unet_id", "revision", "variant", "target_steps", "num_images_per_prompt",
               "num_inference_steps", "guidance_scale", "gen_seed", "latents", "wrt", "dtype")


@dataclass
class ExplainConfig:
    model_id: str = shared_option("model_id")
    out: str = option(aliases=("--output_dir",), help="the folder the run writes")
    prompt: str | None = option(None, type=prompt_text,
                                help="one prompt to explain (row 0: it uses --seed's latents)")
    dataset: str | None = option(None, type=str, flag="--data", aliases=("--dataset",),
                                 help=".jsonl / ;-separated .csv file, or Hugging Face dataset")
    unet_id: str | None = shared_option("unet_id")
    revision: str | None = shared_option("revision")
    variant: str | None = shared_option("variant")
    split: str = shared_option("split")
    column: str | None = shared_option("column")
    start: int = shared_option("start")
    end: int | None = shared_option("end")
    target_steps: str = option("0", joined=True, metavar="STEPS",
                               help="DDIM steps to average over: 0, 0-9, 0,5,10-12 (or 0 5 10-12) or all")
    num_images_per_prompt: int = shared_option("num_images_per_prompt")
    num_inference_steps: int = shared_option("num_inference_steps")
    guidance_scale: float = shared_option("guidance_scale")
    gen_seed: int = shared_option("gen_seed")
    latents: str = shared_option("latents")
    batch_size: int = batch_size_option(4)
    wrt: str = option("prompt_embeds", choices=WRT_CHOICES,
                      help="differentiate w.r.t. the text encoder output or the token embeddings entering it")
    dtype: str = shared_option("dtype")
    scheduler: str | None = shared_option("scheduler")
    height: int | None = shared_option("height")
    width: int | None = shared_option("width")
    device: str | None = device_option(indexed=True)
    overwrite: bool = option(False, help="discard earlier results in --out")

    @property
    def steps(self) -> list[int]:
        return parse_target_steps(self.target_steps, self.num_inference_steps)

    def validate(self) -> None:
        """Raise ConfigError with a one-line reason for inconsistent settings."""
        for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        self.steps  # noqa: B018  (parses and range-checks --target_steps)
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt must not be empty")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ConfigError(f"--start/--end must satisfy 0 <= start < end, got {self.start}/{self.end}")
        check_model_reference(self.model_id, option_flag(ExplainConfig, "model_id"), self.revision)


def parse_target_steps(spec: str, num_inference_steps: int) -> list[int]:
    """'0' / '0-9' / 'all' / '0,5,10-12' -> sorted DDIM step indices, each in 0..num_inference_steps-1."""
    text = spec.strip()
    if text == "all":
        return list(range(num_inference_steps))
    try:
        steps = set(parse_step_indices(text))
    except StepSpecError as exc:
        if exc.backwards:
            raise ConfigError(f"--target_steps range {exc.part!r} runs backwards") from None
        raise ConfigError(f"--target_steps expects N, N-M, a comma list of those, or 'all'; got {spec!r}") from None
    if max(steps) >= num_inference_steps:
        raise ConfigError(f"--target_steps must lie in 0..{num_inference_steps - 1} (--num_inference_steps "
                          f"{num_inference_steps}), got {spec!r}")
    return sorted(steps)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Token-wise significance of prompts for memorization (Wen et al. 2024).")
    src = p.add_mutually_exclusive_group(required=True)
    add_settings_arguments(src, ExplainConfig, only=("prompt", "dataset"))
    add_settings_arguments(p, ExplainConfig, exclude=("prompt", "dataset"))
    return p


def parse_config(argv: list[str] | None) -> ExplainConfig:
    return settings_from_args(ExplainConfig, build_parser().parse_args(argv))


def load_records(cfg: ExplainConfig) -> list[PromptRecord]:
    """The prompts to explain (validated completely, before any model is loaded)."""
    if cfg.prompt is not None:
        return [PromptRecord(row=0, prompt=cfg.prompt)]
    records = select_rows(read_prompts(cfg.dataset, split=cfg.split, column=cfg.column), cfg.start, cfg.end)
    if not records:
        raise PromptFileError(f"{cfg.dataset}: no rows in --start {cfg.start} --end {cfg.end}")
    return records


class ExplainFiles:
    """The files of one explanation run and the check that a resumed run computes the same numbers."""

    def __init__(self, cfg: ExplainConfig):
        self.root = Path(cfg.out)
        self.tokens = self.root / "tokens.jsonl"
        self.heatmap = self.root / "heatmap.html"
        self.bars = self.root / "bars"
        self.config_file = self.root / "config.json"
        self.result_config = {k: getattr(cfg, k) for k in RESULT_KEYS}
        self.result_config["target_steps"] = cfg.steps
        # Recorded only when given, so folders from before the options existed resume.
        self.result_config.update({k: getattr(cfg, k) for k in GEOMETRY_FIELDS if getattr(cfg, k) is not None})

    def prepare(self, overwrite: bool) -> None:
        """Clear the folder with overwrite; else refuse earlier results computed with other settings."""
        if overwrite:
            for f in (self.tokens, self.heatmap, self.config_file):
                f.unlink(missing_ok=True)
            shutil.rmtree(self.bars, ignore_errors=True)
        check_run_settings(self.config_file, self.result_config, self.has_results(), "another --out")

    def claim(self) -> None:
        """Create the folder and record the settings (once the model has loaded: a typo leaves no folder)."""
        self.bars.mkdir(parents=True, exist_ok=True)
        bind_run_settings(self.config_file, self.result_config, self.has_results(), "another --out")

    def has_results(self) -> bool:
        return bool(read_results(self.tokens))

    def done(self, records: list[PromptRecord]) -> dict[int, dict]:
        """Rows already explained (torn tail of an interrupted write cut); a changed prompt is an error."""
        done = read_results(self.tokens, repair=True)
        check_rows_match(self.tokens, done, {rec.row: {"prompt": rec.prompt} for rec in records}, "another --out")
        return {r["row"]: r for r in done}

    def bar_path(self, row: int, encoder: str | None = None, first: str | None = None) -> Path:
        """The bar chart of a row's first encoder (rowNNNNNN.png), or of another (rowNNNNNN-ENCODER.png)."""
        suffix = "" if encoder is None or encoder == first else f"-{encoder}"
        return self.bars / f"row{row:06d}{suffix}.png"


def group_by_prompt(results: list, n_prompts: int) -> list[list]:
    """explain_prompts' prompt-major results (every encoder of prompt 0, then of prompt 1, ...) per prompt."""
    per = len(results) // n_prompts
    return [results[b * per:(b + 1) * per] for b in range(n_prompts)]


def result_row(rec: PromptRecord, encoders: list) -> dict:
    """A row of tokens.jsonl: the first encoder's significance as before; a family with more encoders (SDXL, SD3,
    Flux) adds theirs under ``other_encoders``, one object each of the same fields."""
    row = {"row": rec.row, "index": rec.index if rec.index is not None else rec.row}
    if rec.label is not None:
        row["label"] = rec.label
    if rec.type is not None:
        row["type"] = rec.type
    row.update(encoders[0].to_json())
    if len(encoders) > 1:
        row["other_encoders"] = [res.to_json() for res in encoders[1:]]
    return row


def run(cfg: ExplainConfig) -> int:
    """Explain the selected prompts, resuming earlier work; returns the number explained now."""
    cfg.validate()
    records = load_records(cfg)
    out = ExplainFiles(cfg)
    out.prepare(cfg.overwrite)
    done = out.done(records)
    todo = [r for r in records if r.row not in done]

    from tqdm.auto import tqdm

    from diffmem.common.t2i.explain import (
        TokenSignificance,
        check_explainable,
        explain_prompts,
        heatmap_html,
        plot_token_bars,
    )
    from diffmem.common.t2i.pipelines import denoiser_parts, load_pipeline, parse_dtype

    explain_time = 0.0
    if todo:
        quiet_hub_logging()
        device = resolve_device(cfg.device)
        pipe = load_pipeline(cfg.model_id, cfg.unet_id, parse_dtype(cfg.dtype), device, cfg.revision, cfg.variant)
        parts = denoiser_parts(pipe, cfg.scheduler, cfg.height, cfg.width)
        check_explainable(parts, cfg.wrt)
        out.claim()
        uncond = parts.unconditional()
        t0 = time.perf_counter()
        with tqdm(total=len(todo), desc="explain", unit="prompt") as bar:
            for i in range(0, len(todo), cfg.batch_size):
                batch = todo[i : i + cfg.batch_size]
                results = explain_prompts(
                    parts, [r.prompt for r in batch], [r.row for r in batch],
                    num_images_per_prompt=cfg.num_images_per_prompt, gen_seed=cfg.gen_seed,
                    num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    target_steps=cfg.steps, wrt=cfg.wrt, latents_mode=cfg.latents, uncond_embed=uncond,
                    all_encoders=True)
                per_prompt = group_by_prompt(results, len(batch))
                append_results(out.tokens, [result_row(rec, res) for rec, res in zip(batch, per_prompt)])
                for encoders in per_prompt:
                    for res in encoders:
                        plot_token_bars(res, out.bar_path(res.row, res.encoder, encoders[0].encoder))
                bar.update(len(batch))
        explain_time = time.perf_counter() - t0

    out.claim()
    # Every row in the folder, in row order: the file is rewritten sorted, the pictures are redrawn as needed.
    rows = sorted(read_results(out.tokens), key=lambda r: r["row"])
    write_json_atomic(out.tokens, rows, jsonl=True)
    keys = {f.name for f in fields(TokenSignificance)}
    results = []
    for r in rows:  # the first encoder's fields at the top of a row, the others' under other_encoders
        encoders = [TokenSignificance(**{k: v for k, v in e.items() if k in keys})
                    for e in (r, *r.get("other_encoders", []))]
        results += encoders
        for res in encoders:
            path = out.bar_path(res.row, res.encoder, encoders[0].encoder)
            if not path.exists():
                plot_token_bars(res, path)
    out.heatmap.write_text(heatmap_html(results, title=f"Token-wise significance: {cfg.model_id}"), encoding="utf-8")
    rate = f", {len(todo) / explain_time:.2f} prompts/s" if todo else ""
    print(f"{out.tokens}: {len(rows)} prompts ({len(todo)} explained now, {len(records) - len(todo)} resumed"
          f"{rate}); heatmap {out.heatmap}, bar charts {out.bars}/")
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    return run_main("explain_tokens", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())
