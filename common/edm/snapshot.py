"""Network snapshots of a training run: ``RUN/snapshot-{images_seen:09d}/``, each loadable on its own.

A snapshot holds the EMA network in ``save_pretrained`` format (its config carries the UNet layout, the
preconditioning constants, the skip mask and the embedding kind) and ``snapshot.json`` (images seen, kimg,
optimizer step, the training settings and the sampler defaults). EDM names snapshots by kimg; short runs need
the finer unit, so ours count images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from common.errors import DiffmemError
from common.results import write_json_atomic

SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_INFO = "snapshot.json"


class SnapshotError(DiffmemError, ValueError):
    """A path that is no snapshot or run folder; str() is the one-line message."""


def snapshot_name(images_seen: int) -> str:
    """``snapshot-{images_seen:09d}``: numeric order and string order agree up to a billion images."""
    return f"{SNAPSHOT_PREFIX}{images_seen:09d}"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(images seen, path) of the complete snapshots of a run, in numeric order."""
    root = Path(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(rf"{SNAPSHOT_PREFIX}(\d+)", p.name)
            if m and (p / SNAPSHOT_INFO).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_snapshot(path: str | Path) -> Path:
    """A snapshot folder, or a run folder's newest snapshot; SnapshotError when it is neither."""
    path = Path(path)
    if (path / SNAPSHOT_INFO).is_file():
        return path
    found = list_snapshots(path)
    if found:
        return found[-1][1]
    if not path.exists():
        raise SnapshotError(f"{path}: no such snapshot or run folder")
    raise SnapshotError(f"{path}: not a snapshot (no {SNAPSHOT_INFO}) and no {SNAPSHOT_PREFIX}* folder in it")


def read_snapshot_info(path: str | Path) -> dict:
    """The snapshot's ``snapshot.json``."""
    return json.loads((resolve_snapshot(path) / SNAPSHOT_INFO).read_text())


def load_network(path: str | Path, device=None):
    """The EDMNetwork of a snapshot (or of a run's newest snapshot), in eval mode."""
    from common.edm.network import EDMNetwork

    snap = resolve_snapshot(path)
    try:
        net = EDMNetwork.from_pretrained(snap)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SnapshotError(f"{snap}: cannot load the network ({first})") from None
    net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net


def save_snapshot(network, run_dir: str | Path, images_seen: int, info: dict) -> Path:
    """Write the network and ``snapshot.json`` into a temporary folder, then rename it into place."""
    root = Path(run_dir)
    final = root / snapshot_name(images_seen)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    network.save_pretrained(tmp)
    write_json_atomic(tmp / SNAPSHOT_INFO, {"images_seen": images_seen, "kimg": images_seen / 1000, **info})
    if final.exists():
        shutil.rmtree(final)  # a resumed run re-writes the snapshot it had reached when it was stopped
    os.replace(tmp, final)
    return final
