"""Where a registry set's file lies — shipped under ``data/`` or fetched into the cache — and fetching it.

The cache folder is ``--cache_dir`` where a CLI takes one, else ``$DIFFMEM_PROMPT_SETS``, else
``$XDG_CACHE_HOME/diffmem/prompt_sets`` (``~/.cache/diffmem/prompt_sets``), as the Hub's cache sits under
``~/.cache``. A fetch reads the file from its pinned commit's URL, another URL (``file://`` too) or a local mirror
folder, checks its SHA-256 against the registry before anything is written, and writes it under a temporary name
that is renamed: a mismatch, a short read or a kill leaves the cache as it was. A file is hashed again whenever it
is read (these files are at most a few MB), so an edited or truncated copy is refused too.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from importlib.resources import files
from pathlib import Path

from diffmem.common.errors import DiffmemError
from diffmem.common.t2i.prompt_sets.registry import PROMPT_SETS, SET_PREFIX, PromptSet, unknown_set_message

CACHE_ENV = "DIFFMEM_PROMPT_SETS"
MAX_FETCH_BYTES = 64 * 2**20  # the largest registry file is 1.2 MB; anything this large is not the file
FETCH_TIMEOUT_S = 60


class PromptSetError(DiffmemError, ValueError):
    """A prompt set that cannot be found, fetched or read; str() is the one-line message for the user."""


def get_set(name: str) -> PromptSet:
    """The registry entry of NAME (a bare name or ``set:NAME``); one line naming the known sets otherwise."""
    name = name[len(SET_PREFIX):] if name.startswith(SET_PREFIX) else name
    if name not in PROMPT_SETS:
        raise PromptSetError(unknown_set_message(name))
    return PROMPT_SETS[name]


def shipped_dir() -> Path:
    """The folder of the shipped set files (package data of diffmem)."""
    return Path(str(files("diffmem.common.t2i.prompt_sets"))) / "data"


def cache_dir(override: str | Path | None = None) -> Path:
    """The folder fetched sets are written to and read from (see the module's docstring for the order)."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diffmem" / "prompt_sets"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_unverified(ps: PromptSet) -> None:
    if not ps.verified:
        raise PromptSetError(f"{SET_PREFIX}{ps.name}: no public file found (unverified entry: {ps.notes})")


def local_path(ps: PromptSet, cache: str | Path | None = None) -> Path:
    """Where the set's file is or would be: data/FILE when shipped, else CACHE/FILE."""
    return shipped_dir() / ps.shipped if ps.shipped else cache_dir(cache) / ps.file_name


def is_present(ps: PromptSet, cache: str | Path | None = None) -> bool:
    return ps.verified and local_path(ps, cache).is_file()


def locate(ps: PromptSet, cache: str | Path | None = None) -> Path:
    """The set's file, its SHA-256 checked; one line (with the fetch command) when it is not here or altered."""
    _refuse_unverified(ps)
    path = local_path(ps, cache)
    if not path.is_file():
        if ps.shipped:
            raise PromptSetError(f"{SET_PREFIX}{ps.name}: the shipped file {path} is missing from this installation; "
                                 f"reinstall diffmem")
        raise PromptSetError(f"{SET_PREFIX}{ps.name}: not fetched (not shipped, licence: {ps.licence}); run "
                             f"`{ps.fetch_command}` (into {path.parent}, ${CACHE_ENV} to change it)")
    digest = sha256_of(path.read_bytes())
    if digest != ps.sha256:
        again = "reinstall diffmem" if ps.shipped else f"delete it and run `{ps.fetch_command}`"
        raise PromptSetError(f"{path}: sha256 {digest[:16]}…, expected {ps.sha256[:16]}… for {SET_PREFIX}{ps.name}; "
                             f"{again}")
    return path


def _mirror_candidates(ps: PromptSet, mirror: Path) -> list[Path]:
    """A mirror folder holds the repository's tree (MIRROR/PATH, or MIRROR/OWNER+NAME/PATH for several
    repositories) or the file by its own name."""
    owner_name = ps.repo.replace("/", "+")
    return [mirror / ps.path, mirror / owner_name / ps.path, mirror / Path(ps.path).name, mirror / ps.file_name]


def _read_source(ps: PromptSet, mirror: str | Path | None, url: str | None) -> tuple[bytes, str]:
    """The bytes of the set's file and where they came from."""
    if mirror is not None:
        mirror = Path(mirror).expanduser()
        if not mirror.is_dir():
            raise PromptSetError(f"--mirror {mirror}: no such folder")
        found = next((p for p in _mirror_candidates(ps, mirror) if p.is_file()), None)
        if found is None:
            raise PromptSetError(f"--mirror {mirror}: holds neither {ps.path} nor {Path(ps.path).name} of "
                                 f"{SET_PREFIX}{ps.name}")
        if found.stat().st_size > MAX_FETCH_BYTES:
            raise PromptSetError(f"{found}: larger than {MAX_FETCH_BYTES >> 20} MB; not the file of "
                                 f"{SET_PREFIX}{ps.name}")
        return found.read_bytes(), str(found)
    source = url or ps.url
    try:
        with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(MAX_FETCH_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PromptSetError(f"{source}: cannot download {SET_PREFIX}{ps.name} ({reason}); pass --mirror DIR "
                             f"holding {ps.path}, or --url") from None
    if len(data) > MAX_FETCH_BYTES:
        raise PromptSetError(f"{source}: larger than {MAX_FETCH_BYTES >> 20} MB; not the file of "
                             f"{SET_PREFIX}{ps.name}")
    return data, source


def fetch(ps: PromptSet, cache: str | Path | None = None, mirror: str | Path | None = None,
          url: str | None = None) -> tuple[Path, bool]:
    """Bring the set's file into the cache, SHA-256 checked before anything is written; (path, whether it was
    written now). A shipped set, or one already fetched intact, is left as it is."""
    _refuse_unverified(ps)
    target = local_path(ps, cache)
    if ps.shipped or (target.is_file() and sha256_of(target.read_bytes()) == ps.sha256):
        return locate(ps, cache), False
    data, source = _read_source(ps, mirror, url)
    digest = sha256_of(data)
    if digest != ps.sha256:
        raise PromptSetError(f"{source}: sha256 {digest}, expected {ps.sha256} ({SET_PREFIX}{ps.name} at "
                             f"{ps.repo}@{ps.commit[:12]}); nothing written")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, True
