"""Our EDM networks against NVlabs/edm's own: forward and forward+backward time, same weights, same batch.

    python bench/bench_edm_unet.py --edm_repo PATH [--batch 8] [--repeats 5] [--threads 2] [--archs ddpmpp,ncsnpp]

For each architecture in --archs the bench builds NVlabs' preconditioned network (fp32, CPU unless --device says
otherwise) from a local NVlabs/edm checkout (imported from --edm_repo at run time only; nothing of it is
shipped), copies its state dict into ours (``build_from_edm`` + ``load_state_dict(strict=True)``) and compares
the backbones (``.model``: SongUNet / DhariwalUNet) on one batch (c_in-scaled noisy images, c_noise labels):
max |ours − theirs| / max |theirs| of the output and of all parameter gradients (eval mode), then the time of
the forward (eval, no_grad) and of the forward+backward of a mean-square loss (train mode: dropout on, as in
training), ours and theirs alternating in ABBA order so that drifting load on a shared machine hits both alike.
It prints the medians and the ratio EDM time / our time (>= 1.0: ours is at least as fast), the machine's load
averages at the start and the end, and the parameter counts both ways of:

  ddpmpp        EDM CIFAR-10 32×32 DDPM++ (train.py --arch=ddpmpp --precond=vp, augment on: augment_dim 9)
  ncsnpp        EDM CIFAR-10 32×32 NCSN++ (train.py --arch=ncsnpp --precond=ve, augment_dim 9)
  adm           EDM ImageNet-64 ADM (train.py --cond=1 --arch=adm --augment=0 --dropout=0.10, EDMPrecond,
                label_dim 1000)
  diffmemorize  DiffMemorize's basic CIFAR-10 run (their train.py --arch=ddpmpp --precond=vp --num-blocks=2
                --num-channels=128 --augment=0.0: augment_dim 0, attention at 16, an all-ones skip mask). Their
                fork with an all-ones mask is EDM's SongUNet, so EDM's is the network compared (ours gets the mask).

The CIFAR-10 networks are the unconditional ones (label_dim 0). Without --edm_repo the bench says so and prints
our parameter counts only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from diffmem.common.edm.networks.edm_preconditioners import build_from_edm

# NVlabs/edm train.py's network_kwargs: --arch=ddpmpp / ncsnpp / adm, dropout 0.13 (0.10 for ImageNet), the
# augment pipe on (augment_dim 9) for CIFAR-10 and off for ImageNet; use_fp16 False (fp32 is benchmarked).
_SONG = dict(model_type="SongUNet", model_channels=128, channel_mult=[2, 2, 2], dropout=0.13, use_fp16=False)
ARCHS = {
    "ddpmpp": ("VPPrecond", dict(img_resolution=32, img_channels=3, label_dim=0, **_SONG, augment_dim=9,
                                 embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                 channel_mult_noise=1, resample_filter=[1, 1])),
    "ncsnpp": ("VEPrecond", dict(img_resolution=32, img_channels=3, label_dim=0, **_SONG, augment_dim=9,
                                 embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                                 channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "adm": ("EDMPrecond", dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                               model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10, use_fp16=False)),
    # DiffMemorize's train.py: attn_resolutions=[16], num_blocks 2, skip mask of (num_blocks + 1) * 3 ones.
    "diffmemorize": ("VPPrecond", dict(img_resolution=32, img_channels=3, label_dim=0, **_SONG,
                                       embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                       channel_mult_noise=1, resample_filter=[1, 1], attn_resolutions=[16],
                                       num_blocks=2, skip_connections=[1] * 9)),
}
DEFAULT_TIMED = ("ddpmpp", "ncsnpp")


def edm_kwargs(kwargs: dict) -> dict:
    """EDM's keywords: its SongUNet has no skip mask (an all-ones mask, DiffMemorize's default, is EDM's net)."""
    return {k: v for k, v in kwargs.items() if k != "skip_connections"}


def import_edm(path: str):
    """NVlabs' training.networks module from a local checkout (run time only); one line and exit 2 otherwise.

    Its packages (dnnlib, torch_utils, training) are registered by file location rather than by putting the checkout
    on sys.path, so nothing else of it can shadow our modules."""
    root = Path(path).resolve()
    if not (root / "training" / "networks.py").is_file():
        print(f"error: --edm_repo {path}: no training/networks.py there (pass a local NVlabs/edm checkout)",
              file=sys.stderr)
        sys.exit(2)
    for package in ("dnnlib", "torch_utils", "training"):
        spec = importlib.util.spec_from_file_location(package, root / package / "__init__.py",
                                                      submodule_search_locations=[str(root / package)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module("training.networks")


def build_pair(edm, arch: str, device: torch.device):
    """(ours, theirs): NVlabs' network with seeded random weights, and ours holding exactly its state dict."""
    class_name, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    theirs = getattr(edm, class_name)(**edm_kwargs(kwargs)).to(device)
    ours = build_from_edm(class_name, kwargs).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def inputs(arch: str, ours, batch: int, device: torch.device) -> dict:
    """One batch for the backbone: noisy images at σ from EDM's training distribution, scaled by c_in, the noise
    labels c_noise(σ) of the preconditioning, and augment / class labels as the net takes them."""
    _, kw = ARCHS[arch]
    g = torch.Generator().manual_seed(1)
    res, ch = kw["img_resolution"], kw["img_channels"]
    sigma = (torch.randn(batch, 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
    _, _, k_in, k_noise = ours.coefficients(sigma)
    images = torch.randn(batch, ch, res, res, generator=g)
    args = dict(x=k_in * (images + sigma * torch.randn(images.shape, generator=g)), noise_labels=k_noise.flatten(),
                class_labels=None)  # EDM's backbones take class_labels positionally, None when unconditional
    if kw.get("label_dim"):
        args["class_labels"] = torch.nn.functional.one_hot(
            torch.randint(kw["label_dim"], (batch,), generator=g), kw["label_dim"]).float()
    if kw.get("augment_dim"):
        args["augment_labels"] = torch.zeros(batch, kw["augment_dim"])  # what the pipe gives unaugmented images
    return {k: v if v is None else v.to(device) for k, v in args.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def agreement(ours, theirs, args: dict) -> tuple[float, float]:
    """Max relative error of the output and of all parameter gradients (one global scale), in eval mode."""
    ours.eval(), theirs.eval()
    outs = []
    for net in (ours, theirs):
        net.zero_grad(set_to_none=True)
        out = net(**args)
        out.square().mean().backward()
        outs.append(out.detach())
    grads_ours = torch.cat([p.grad.flatten() for p in ours.parameters()])
    names = dict(ours.named_parameters())
    grads_theirs = torch.cat([dict(theirs.named_parameters())[n].grad.flatten() for n in names])
    for net in (ours, theirs):
        net.zero_grad(set_to_none=True)
    return rel_err(outs[0], outs[1]), rel_err(grads_ours, grads_theirs)


def load_average() -> str:
    """The machine's 1/5/15-minute load averages: timings on a shared CPU mean little without them."""
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_s(net, args: dict, device: torch.device) -> float:
    net.eval()
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        net(**args)
        sync(device)
    return time.perf_counter() - t0


def forward_backward_s(net, args: dict, device: torch.device) -> float:
    net.train()
    net.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    net(**args).square().mean().backward()
    sync(device)
    seconds = time.perf_counter() - t0
    net.zero_grad(set_to_none=True)
    return seconds


def interleaved(step, ours, theirs, args: dict, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds (ours, theirs) of `step`, after one warm-up each, in ABBA order."""
    step(ours, args, device), step(theirs, args, device)
    times = {"ours": [], "theirs": []}
    for r in range(repeats):
        order = (("ours", ours), ("theirs", theirs))
        for name, net in order if r % 2 == 0 else order[::-1]:
            times[name].append(step(net, args, device))
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--edm_repo", default=None, help="a local NVlabs/edm checkout, whose networks are compared")
    p.add_argument("--batch", type=int, default=8, help="images per forward")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per network and mode (median)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (torch's default if not given)")
    p.add_argument("--archs", default=",".join(DEFAULT_TIMED), help=f"architectures to time, of {', '.join(ARCHS)}")
    p.add_argument("--device", default="cpu", help="device to time on")
    a = p.parse_args()
    archs = [s for s in a.archs.split(",") if s]
    unknown = [s for s in archs if s not in ARCHS]
    if unknown or a.batch < 1 or a.repeats < 1 or (a.threads is not None and a.threads < 1):
        p.error(f"unknown --archs {','.join(unknown)} (of {', '.join(ARCHS)})" if unknown
                else "--batch, --repeats and --threads must be positive")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {device}, fp32, {torch.get_num_threads()} threads, batch {a.batch}, "
          f"median of {a.repeats}, {load_average()}")

    if a.edm_repo is None:
        print("--edm_repo not given: NVlabs/edm's networks not compared (pass a local NVlabs/edm checkout); "
              "our parameter counts:")
        for arch, (class_name, kwargs) in ARCHS.items():
            print(f"  {arch:<13} {count(build_from_edm(class_name, kwargs)):>12,}")
        return
    edm = import_edm(a.edm_repo)

    print(f"{'arch':<13} {'params ours':>12} {'params EDM':>12}")
    for arch, (class_name, kwargs) in ARCHS.items():
        ours, theirs = build_pair(edm, arch, torch.device("cpu"))
        print(f"{arch:<13} {count(ours):>12,} {count(theirs):>12,}", flush=True)
        del ours, theirs

    print(f"\n{'arch':<8} {'out err':>8} {'grad err':>8} | {'fwd ours':>9} {'fwd EDM':>9} {'ratio':>6} | "
          f"{'f+b ours':>9} {'f+b EDM':>9} {'ratio':>6}   (seconds; ratio = EDM / ours)")
    for arch in archs:
        ours, theirs = build_pair(edm, arch, device)
        args = inputs(arch, ours, a.batch, device)
        ours, theirs = ours.model, theirs.model  # the backbones: SongUNet / DhariwalUNet
        out_err, grad_err = agreement(ours, theirs, args)
        fwd = interleaved(forward_s, ours, theirs, args, a.repeats, device)
        fb = interleaved(forward_backward_s, ours, theirs, args, a.repeats, device)
        print(f"{arch:<8} {out_err:>8.1e} {grad_err:>8.1e} | {fwd[0]:>9.3f} {fwd[1]:>9.3f} {fwd[1] / fwd[0]:>6.2f} | "
              f"{fb[0]:>9.3f} {fb[1]:>9.3f} {fb[1] / fb[0]:>6.2f}", flush=True)
        del ours, theirs
    print(f"at the end: {load_average()}")


if __name__ == "__main__":
    main()
