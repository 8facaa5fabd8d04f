"""Running a protocol: every detector setting of the preset on its memorized and non-memorized sets through the
detection harness (common.t2i.detect_run: resumable per run, sharded under accelerate), then the paper's metrics.

DIR/runs/ holds the detection runs ({run}.memorized.jsonl, {run}.non_memorized.jsonl and their parts), DIR/{run}.json
one record per run (ours and the published numbers), DIR/benchmark.json the table's records and the table printed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffmem.common.errors import ConfigError
from diffmem.common.results import read_results, write_json_atomic
from diffmem.common.settings import option
from diffmem.common.t2i.benchmark.protocols import PROTOCOLS, Protocol, ProtocolRun, protocol
from diffmem.common.t2i.benchmark.table import format_table, run_metrics, run_record
from diffmem.common.t2i.detect_run import DetectConfig, run_detection
from diffmem.common.t2i.options import shared_option
from diffmem.common.t2i.prompt_sets import SET_PREFIX
from diffmem.common.t2i.prompts import read_prompts

ROLES = (("memorized", 1), ("non_memorized", 0))


@dataclass
class BenchmarkConfig:
    protocol: str = option(choices=tuple(PROTOCOLS), help="the paper whose protocol is run (docs/benchmark.md)")
    model_id: str | None = option(None, flag="--model", aliases=("--model_id",), type=str,
                                  help="a Hub id or pipeline folder (None: the protocol's own model)")
    output_dir: str = option("benchmark", flag="--out", help="the folder the runs and the tables go to")
    memorized: str | None = option(None, type=str, help="positives: a prompt file or set:NAME (None: the "
                                   "protocol's set)")
    non_memorized: str | None = option(None, type=str, help="negatives: a prompt file or set:NAME (None: the "
                                       "protocol's set)")
    runs: list[str] | None = option(None, type=str, nargs="+", metavar="RUN",
                                    help="only these runs of the protocol (None: all; `--runs list` prints them)")
    limit: int | None = option(None, type=int, help="score only the first N prompts of each set (a smoke run: "
                               "the table says so)")
    num_inference_steps: int | None = option(None, type=int, help="override the protocol's step count (None: its "
                                             "own; the table says so)")
    batch_size: int = option(16, help="prompts per denoiser call")
    revision: str | None = shared_option("revision")
    dtype: str = shared_option("dtype")
    height: int | None = shared_option("height")
    width: int | None = shared_option("width")

    @property
    def preset(self) -> Protocol:
        return protocol(self.protocol)

    def selected_runs(self) -> list[ProtocolRun]:
        keys = [r.key for r in self.preset.runs]
        unknown = [k for k in self.runs or () if k not in keys]
        if unknown:
            raise ConfigError(f"--runs {' '.join(unknown)}: not a run of {self.protocol} (its runs: {', '.join(keys)})")
        return [r for r in self.preset.runs if self.runs is None or r.key in self.runs]

    def validate(self) -> None:
        self.selected_runs()
        for name in ("limit", "num_inference_steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")

    def source(self, role: str) -> str:
        given = getattr(self, role)
        return given if given is not None else SET_PREFIX + getattr(self.preset, role)

    def deviations(self) -> list[str]:
        """What differs from the paper's protocol in this run (printed under the table)."""
        out = []
        if self.model_id not in (None, self.preset.model_id):
            out.append(f"model {self.model_id} (the protocol's: {self.preset.model_id})")
        out += [f"{role} {getattr(self, role)}" for role, _ in ROLES if getattr(self, role) is not None]
        if self.limit is not None:
            out.append(f"only the first {self.limit} prompts of each set")
        if self.num_inference_steps is not None:
            out.append(f"{self.num_inference_steps} inference steps (the protocol's: "
                       f"{self.preset.num_inference_steps})")
        return out


def detect_config(cfg: BenchmarkConfig, run: ProtocolRun, role: str, label: int) -> DetectConfig:
    """The detection run of one protocol run on one set, in DIR/runs/."""
    p = cfg.preset
    base = DetectConfig(model_id=cfg.model_id or p.model_id, dataset=cfg.source(role), run_name=f"{run.key}.{role}",
                        output_dir=str(Path(cfg.output_dir) / "runs"))
    return replace(base, revision=cfg.revision, dtype=cfg.dtype, height=cfg.height, width=cfg.width,
                   num_images_per_prompt=run.num_images_per_prompt,
                   num_inference_steps=cfg.num_inference_steps or p.num_inference_steps,
                   guidance_scale=p.guidance_scale, score_steps=run.target_steps, latents=p.latents,
                   detector=run.detector, batch_size=cfg.batch_size, label=label, end=cfg.limit,
                   **dict(run.options))


def run_benchmark(cfg: BenchmarkConfig) -> list[dict]:
    """Every selected run of the protocol on both sets (resuming what is done), its record written as it finishes;
    returns the records in the protocol's order. Prints the table at the end (main process)."""
    cfg.validate()
    runs = cfg.selected_runs()
    configs = {(run.key, role): detect_config(cfg, run, role, label) for run in runs for role, label in ROLES}
    for dc in configs.values():  # every run's settings checked before any model is loaded
        dc.validate()
    for role, _ in ROLES:  # and both sets read (a set not fetched yet is one line), before anything is written
        read_prompts(cfg.source(role))
    out = Path(cfg.output_dir)
    records = []
    for run in runs:
        for role, _ in ROLES:
            run_detection(configs[run.key, role])
        if not is_main_process():  # only the main process merges a run's parts into its jsonl
            continue
        scores = {role: run_scores(configs[run.key, role]) for role, _ in ROLES}
        metrics = run_metrics(cfg.preset, scores["memorized"], scores["non_memorized"])
        settings = {"benchmark": asdict(cfg), "detect": asdict(configs[run.key, "memorized"])}
        record = run_record(cfg.preset, run, metrics, settings)
        write_json_atomic(out / f"{run.key}.json", record)
        records.append(record)
    if is_main_process():
        notes = [f"differs from the protocol: {d}" for d in cfg.deviations()] + [f"note: {n}" for n in cfg.preset.notes]
        text = "\n".join([format_table(cfg.preset, records), *notes]) + "\n"
        write_json_atomic(out / "benchmark.json", {"protocol": cfg.protocol, "records": records,
                                                    "deviations": cfg.deviations(), "table": text})
        print(text, end="")
    return records


def run_scores(dc: DetectConfig) -> list[float]:
    """The scores of a finished detection run, in dataset order (its merged jsonl)."""
    return [r["score"] for r in read_results(Path(dc.output_dir) / f"{dc.run_name}.jsonl")]


def is_main_process() -> bool:
    """Whether this is accelerate's main process (the detection runs have set the process state up)."""
    from accelerate import PartialState

    return PartialState().is_main_process
