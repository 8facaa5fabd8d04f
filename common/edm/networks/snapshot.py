"""Network snapshots of a training run: ``RUN/snapshot-{images_seen:09d}/``, each loadable on its own.

Every function here also takes the field's own snapshots: an EDM / DiffMemorize / Zhang et al. network pickle
(``X.pkl``), or a run folder of ``network-snapshot-NNNNNN.pkl`` (EDM names them by kimg), read without running
their code (``common.edm.networks.edm_pickle``).

A snapshot holds the EMA network in ``save_pretrained`` format (its config carries the UNet layout, the
preconditioning constants, the skip mask and the embedding kind) and ``snapshot.json`` (images seen, kimg,
optimizer step, the training settings and the sampler defaults). EDM names snapshots by kimg; short runs need
the finer unit, so ours count images.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.errors import DiffmemError
from diffmem.common.results import write_json_atomic
from diffmem.common.settings import option

SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_INFO = "snapshot.json"
PICKLE_SUFFIX = ".pkl"
EDM_SNAPSHOT_RE = re.compile(r"network-snapshot-(\d+)\.pkl")  # EDM names its snapshots by kimg


class SnapshotError(DiffmemError, ValueError):
    """A path that is no snapshot or run folder; str() is the one-line message."""


def parameter_count(text: str) -> int:
    """An option type: a whole number of parameters >= 1, written plainly or in float notation (2e9, 3.5e8)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of parameters, e.g. 2e9, got {text!r}") from None
    if not 1 <= value <= 1e15 or value != int(value):  # NaN fails the range, inf too (before int() sees it)
        raise argparse.ArgumentTypeError(f"expected a whole number of parameters from 1 to 1e15, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class NetworkLimits:
    """What a network pickle may claim before it is built: the --max_params and --allow_nonfinite options of
    every command that loads a network (``load_network``)."""

    max_params: int = option(2_000_000_000, type=parameter_count, metavar="N",
                             help="refuse an EDM network pickle whose constructor arguments describe more "
                                  "parameters than this, counted before any weight is read in (the largest "
                                  "published EDM network, ImageNet-64 ADM, has 296 M; 2e9 is 8 GiB in float32)")
    allow_nonfinite: bool = option(False, help="load an EDM network pickle whose weights hold NaN or ±inf "
                                               "(refused by default, naming the first such tensor)")


# The limits load_network applies when its caller gives none: a CLI whose library loads the snapshots itself
# (mem_ratio measures each snapshot of a run) sets them for the run with ``network_limits``.
_LIMITS: contextvars.ContextVar[NetworkLimits] = contextvars.ContextVar("network_limits", default=NetworkLimits())


@contextlib.contextmanager
def network_limits(limits: NetworkLimits):
    """Within the block, ``load_network`` without limits of its own applies ``limits``."""
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def snapshot_name(images_seen: int) -> str:
    """``snapshot-{images_seen:09d}``: numeric order and string order agree up to a billion images."""
    return f"{SNAPSHOT_PREFIX}{images_seen:09d}"


def is_edm_pickle_path(path: str | Path) -> bool:
    """A path naming a network pickle (by its suffix), as opposed to one of our snapshot folders."""
    path = Path(path)
    return path.suffix == PICKLE_SUFFIX and not path.is_dir()


def edm_snapshot_images(path: str | Path) -> int | None:
    """Images seen of ``network-snapshot-NNNNNN.pkl`` (NNNNNN is kimg); None for any other name."""
    m = EDM_SNAPSHOT_RE.fullmatch(Path(path).name)
    return int(m.group(1)) * 1000 if m else None


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(images seen, path) of the complete snapshots of a run, in numeric order: our snapshot folders and EDM's
    ``network-snapshot-NNNNNN.pkl`` (numeric order, not DiffMemorize's string order, which 7-digit kimg breaks)."""
    root = Path(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(rf"{SNAPSHOT_PREFIX}(\d+)", p.name)
            if m and (p / SNAPSHOT_INFO).is_file():
                found.append((int(m.group(1)), p))
            elif p.is_file() and (images := edm_snapshot_images(p)) is not None:
                found.append((images, p))
    return sorted(found)


def snapshot_label(path: str | Path) -> str:
    """A snapshot's name in reports: the folder name, or the pickle's name without ``.pkl``."""
    path = Path(path)
    return path.stem if is_edm_pickle_path(path) else path.name


def resolve_snapshot(path: str | Path) -> Path:
    """A snapshot folder, an EDM network pickle, or a run folder's newest snapshot; SnapshotError otherwise."""
    path = Path(path)
    if is_edm_pickle_path(path):
        if not path.is_file():
            raise SnapshotError(f"{path}: no such network pickle")
        return path
    if (path / SNAPSHOT_INFO).is_file():
        return path
    found = list_snapshots(path)
    if found:
        return found[-1][1]
    if not path.exists():
        raise SnapshotError(f"{path}: no such snapshot or run folder")
    if path.is_file():
        raise SnapshotError(f"{path}: expected a snapshot folder, a run folder or an EDM network pickle (*.pkl)")
    raise SnapshotError(f"{path}: not a snapshot (no {SNAPSHOT_INFO}) and no {SNAPSHOT_PREFIX}* folder or "
                        "network-snapshot-*.pkl in it")


def read_snapshot_info(path: str | Path) -> dict:
    """The snapshot's ``snapshot.json``; for an EDM pickle, what its name tells (images seen, kimg) and its path."""
    snap = resolve_snapshot(path)
    if is_edm_pickle_path(snap):
        images = edm_snapshot_images(snap)
        return {"images_seen": images, "kimg": None if images is None else images / 1000, "source": str(snap)}
    return json.loads((snap / SNAPSHOT_INFO).read_text())


def saved_class_name(snap: Path) -> str:
    """The ``_class_name`` of the network config saved in a snapshot folder (EDMNetwork when absent)."""
    try:
        return json.loads((snap / "config.json").read_text()).get("_class_name") or "EDMNetwork"
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SnapshotError(f"{snap}: cannot read the network config ({first})") from None


def check_saved_config(snap: Path, class_name: str, limits: NetworkLimits) -> None:
    """A snapshot folder's config.json for one of EDM's preconditioners, checked as a pickle's init kwargs are
    (types, ranges, the parameter count on the meta device within ``limits.max_params``) before from_pretrained
    builds it: a config claiming a huge network would otherwise be built until the process is killed."""
    from diffmem.common.edm.networks.edm_preconditioners import edm_parameter_count, saved_init_kwargs

    try:
        config = json.loads((snap / "config.json").read_text())
        count = edm_parameter_count(class_name, saved_init_kwargs(config))
    except (OSError, ValueError, AttributeError) as exc:  # our DiffmemErrors are ValueErrors: one line each
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SnapshotError(f"{snap}/config.json: {first}") from None
    if count > limits.max_params:
        raise SnapshotError(f"{snap}/config.json: describes a {class_name} of {count:,} parameters "
                            f"({count * 4 / 2**30:.1f} GiB in float32), more than --max_params {limits.max_params:,}")


def load_network(path: str | Path, device=None, limits: NetworkLimits | None = None):
    """The network of a snapshot folder, of an EDM network pickle (converted in memory, within ``limits``: by
    default those ``network_limits`` set, else NetworkLimits()), or of a run's newest snapshot, in eval mode: an
    ``EDMNetwork`` or one of EDM's preconditioned networks (``common.edm.networks.edm_preconditioners``), as its
    saved config's ``_class_name`` says."""
    from diffmem.common.edm.networks.edm_preconditioners import PRECOND_CLASSES
    from diffmem.common.edm.networks.unet2d import EDMNetwork
    from diffmem.common.safe_load import torch_failure, verify_checkpoint_files

    snap = resolve_snapshot(path)
    if is_edm_pickle_path(snap):
        from diffmem.common.edm.networks.edm_pickle import load_edm_pickle

        return load_edm_pickle(snap, device, limits or _LIMITS.get())[0]
    name = saved_class_name(snap)
    classes = {"EDMNetwork": EDMNetwork, **PRECOND_CLASSES}
    if name not in classes:
        raise SnapshotError(f"{snap}: unknown network class {name!r} in config.json; expected one of "
                            f"{', '.join(classes)}")
    if name in PRECOND_CLASSES:
        check_saved_config(snap, name, limits or _LIMITS.get())
    # A pickle-format weights file (.bin) is checked weights-only first: diffusers reads it weights-only too,
    # but reports a refusal as "Unable to load weights", and a torch error would pass on torch's own advice.
    verify_checkpoint_files(snap)
    try:
        net = classes[name].from_pretrained(snap)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SnapshotError(f"{snap}: cannot load the network ({torch_failure(exc)})") from None
    net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net


def write_snapshot_folder(network, final: str | Path, info: dict) -> Path:
    """Write the network and ``snapshot.json`` into a temporary folder beside ``final``, then rename it into
    place (replacing an older one): a reader never sees half a snapshot."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    network.save_pretrained(tmp)
    write_json_atomic(tmp / SNAPSHOT_INFO, info)
    if final.exists():
        shutil.rmtree(final)  # a resumed run re-writes the snapshot it had reached when it was stopped
    os.replace(tmp, final)
    return final


def save_snapshot(network, run_dir: str | Path, images_seen: int, info: dict) -> Path:
    """A training run's snapshot ``RUN/snapshot-{images_seen:09d}/``, written atomically."""
    return write_snapshot_folder(network, Path(run_dir) / snapshot_name(images_seen),
                                 {"images_seen": images_seen, "kimg": images_seen / 1000, **info})


def convert_edm_pickle(path: str | Path, out: str | Path, overwrite: bool = False,
                       limits: NetworkLimits | None = None) -> tuple[Path, dict]:
    """Write an EDM pickle's network as one of our snapshot folders (``load_network`` reads it); returns the
    folder and its ``snapshot.json``. An existing folder converted from the same file (same SHA-256) is kept;
    any other existing ``out`` is refused unless ``overwrite``; the pickle is read within ``limits``."""
    # Local imports: this module stays torch-free for the sweep, which reads snapshot names only.
    from diffmem.common.edm.networks.edm_pickle import EDMPickleError, load_edm_pickle
    from diffmem.common.edm.sampler import SamplerSettings

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EDMPickleError(f"{out}: expected --out to be a folder, it is a file")
    info_file = out / SNAPSHOT_INFO
    net, snap = load_edm_pickle(path, limits=limits or _LIMITS.get())
    if out.exists() and any(out.iterdir()) and not overwrite:
        try:
            earlier = json.loads(info_file.read_text()).get("converted_from", {}).get("sha256")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier == snap.sha256:
            return out, json.loads(info_file.read_text())
        raise EDMPickleError(f"{out}: exists and holds something else (not a conversion of {snap.path.name}); "
                             "choose another --out or pass --overwrite")
    images = edm_snapshot_images(snap.path)
    info = {"images_seen": images, "kimg": None if images is None else images / 1000,
            "converted_from": snap.metadata(), "architecture": snap.init_kwargs.get("model_type", "SongUNet"),
            "preconditioning": snap.class_name,
            "sampler_defaults": SamplerSettings().for_network(net).to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_snapshot_folder(net, out, info), info
