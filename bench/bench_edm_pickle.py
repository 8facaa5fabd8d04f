"""Loading an EDM network pickle of CIFAR-10 DDPM++ size: seconds and peak memory against the file's size.

    python bench/bench_edm_pickle.py [--edm_repo PATH] [--repeats 3]

Builds EDM's CIFAR-10 DDPM++ network (VPPrecond + SongUNet, 128 channels, mult 2,2,2, 4 blocks, attention at 16;
55.7 M parameters) with random weights, writes it in EDM's snapshot format (``write_edm_pickle``) and loads it in
fresh processes with ``load_edm_pickle`` (restricted unpickler, meta-device build), printing the wall time and
the peak resident memory the load added, as a multiple of the file size. With ``--edm_repo`` (a local
NVlabs/edm checkout; nothing of it is shipped) the same file is also loaded with plain ``pickle.load`` and NVlabs'
code on the path, the loader their generate.py uses, for the ratio of the two in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# EDM's train.py settings for --arch=ddpmpp --precond=vp on CIFAR-10 32×32.
DDPMPP_CIFAR = dict(img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=128,
                    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
                    embedding_type="positional", encoder_type="standard", decoder_type="standard",
                    channel_mult_noise=1, resample_filter=[1, 1])

# One load in a fresh process: peak RSS added by the load (ru_maxrss after minus the RSS before), seconds.
PROBE = r"""
import json, resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
import torch
if mode == "ours":
    from diffmem.common.edm.networks.edm_pickle import load_edm_pickle
    import accelerate, common.edm.networks.edm_preconditioners  # noqa: F401  (imported first: the load alone is
    measured)
    load = lambda: load_edm_pickle(path)[0]
else:
    import pickle
    import torch_utils.persistence  # noqa: F401  (their loader needs it importable)
    load = lambda: pickle.load(open(path, "rb"))["ema"]
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
t0 = time.perf_counter()
net = load()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "added": peak - before, "params": sum(p.numel() for p in net.parameters())}))
"""


# EDM's own snapshot of that network (module source included), written by NVlabs' code in a fresh process.
WRITE_WITH_EDM = r"""
import json, pickle, sys, torch
from training.networks import VPPrecond
torch.manual_seed(0)
net = VPPrecond(**json.loads(sys.argv[2])).eval().requires_grad_(False)
with open(sys.argv[1], "wb") as f:
    pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
"""


def write_pickle(path: Path, edm_repo: str | None) -> Path:
    """The benchmark's pickle: by NVlabs' code when a checkout is given (both loaders can read it), else ours."""
    if edm_repo:
        subprocess.run([sys.executable, "-c", WRITE_WITH_EDM, str(path), json.dumps(DDPMPP_CIFAR)],
                       check=True, env=child_env(edm_repo))
        return path
    import torch

    from diffmem.common.edm.networks.edm_pickle import write_edm_pickle
    from diffmem.common.edm.networks.edm_preconditioners import build_from_edm

    torch.manual_seed(0)
    return write_edm_pickle(build_from_edm("VPPrecond", DDPMPP_CIFAR), path)


def child_env(edm_repo: str | None = None) -> dict:
    """One thread; this checkout importable, and NVlabs' checkout too for the processes that run its code."""
    paths = [str(REPO), *([edm_repo] if edm_repo else []), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def probe(mode: str, path: Path, edm_repo: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(path)], capture_output=True, text=True,
                         env=child_env(edm_repo if mode == "nvlabs" else None), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edm_repo", default=None, help="a local NVlabs/edm checkout, for its loader's figures")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process loads per loader (interleaved)")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_pickle(Path(tmp) / "network-snapshot-000000.pkl", a.edm_repo)
        size = path.stat().st_size
        written = "NVlabs' code" if a.edm_repo else "write_edm_pickle"
        if a.edm_repo is None:
            print("--edm_repo not given: NVlabs' loader not measured (pass a local NVlabs/edm checkout)")
        modes = ["ours"] + (["nvlabs"] if a.edm_repo else [])
        runs = {m: [] for m in modes}
        for _ in range(a.repeats):
            for m in modes:  # interleaved, so drifting load on a shared machine hits both alike
                runs[m].append(probe(m, path, a.edm_repo))
        params = runs["ours"][0]["params"]
        print(f"EDM CIFAR-10 DDPM++ (VP): {params:,} parameters, pickle {size / 2**20:.0f} MiB written by {written}")
        for m in modes:
            secs = statistics.median(r["seconds"] for r in runs[m])
            peak = statistics.median(r["added"] for r in runs[m]) / size
            assert all(r["params"] == params for r in runs[m])
            print(f"{m:>7}: load {secs:.2f} s (median of {a.repeats}), peak memory added {peak:.2f}x the file size")
        if a.edm_repo:
            ratio = statistics.median(r["seconds"] for r in runs["nvlabs"]) / statistics.median(
                r["seconds"] for r in runs["ours"])
            print(f"speed ratio NVlabs' pickle.load / ours: {ratio:.2f}x")


if __name__ == "__main__":
    main()
