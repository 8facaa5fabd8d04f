"""The benchmark room (detect/benchmark.py): the papers' detection protocols and running them.

- ``protocols``: the presets (model, prompt sets, steps, generations, latents, detectors, TPR rule) and the numbers
  each paper published, cited; torch-free.
- ``table``: a protocol's metrics by its TPR rule and the paper's table layout, ours beside theirs.
- ``run``: BenchmarkConfig and run_benchmark, every run of a preset through the detection harness (resumable).
"""

from diffmem.common.t2i.benchmark.protocols import PROTOCOLS, Protocol, ProtocolRun, Published, protocol

__all__ = ["PROTOCOLS", "Protocol", "ProtocolRun", "Published", "protocol"]
