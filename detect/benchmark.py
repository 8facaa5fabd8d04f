"""Run a paper's memorization-detection protocol and print its table, ours beside the published numbers.

    python detect/benchmark.py --protocol wen24|jeon25|asthana26|early26|membench --out DIR [--model_id M]
        [--memorized FILE --non_memorized FILE] [--runs RUN ...] [--limit N]
    python detect/benchmark.py --protocol jeon25 --runs list       # the protocol's runs
    accelerate launch detect/benchmark.py ...                       # each detection run sharded over processes

Each preset (common/t2i/benchmark/protocols.py, docs/benchmark.md) fixes the model, the prompt sets (registry sets,
``diffmem-prompt-sets``), steps, generations, latents, detectors and TPR rule. Writes DIR/runs/ (the detection
runs, resumable: re-running the same command picks up where it stopped), DIR/{run}.json per run and
DIR/benchmark.json.
"""

from __future__ import annotations

from diffmem.common.cli import ArgumentParser, add_settings_arguments, quiet_hub_logging, run_main, settings_from_args
from diffmem.common.t2i.benchmark.run import BenchmarkConfig, run_benchmark


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Run a paper's memorization-detection protocol (its model, prompt sets, steps, "
                                   "generations, detectors and TPR rule) and print its table beside the published "
                                   "numbers.")
    add_settings_arguments(p, BenchmarkConfig)
    return p


def parse_config(argv: list[str] | None) -> BenchmarkConfig:
    return settings_from_args(BenchmarkConfig, build_parser().parse_args(argv))


def run(cfg: BenchmarkConfig) -> list[dict] | None:
    if cfg.runs == ["list"]:
        for r in cfg.preset.runs:
            print(f"{r.key}: {r.detector}, {r.num_images_per_prompt} generation(s), target steps {r.target_steps}"
                  + "".join(f", {k} {v}" for k, v in r.options))
        return None
    quiet_hub_logging()
    return run_benchmark(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_main("benchmark", run, parse_config(argv))


if __name__ == "__main__":
    raise SystemExit(main())
