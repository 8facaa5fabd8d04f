"""The prompt-set room: the literature's prompt sets by name, where their files come from, and reading them.

- ``registry``: every set (``PROMPT_SETS``: source repository, commit, path, SHA-256, licence, rows, columns, the
  model it was selected on, whether diffmem ships it); ``set:NAME`` is how a CLI's ``--data`` names one.
- ``store``: where a set's file lies (shipped under ``data/`` or fetched into the cache) and fetching it with its
  SHA-256 checked before anything is written.
- ``reader``: a set's file as typed rows (prompt, label, Webster's type, ground-truth index).
- ``data/``: the shipped files, each under its source's MIT licence (``LICENSE.<source>`` beside them).

Torch-free: the CLIs resolve ``set:NAME`` in their argument checks. docs/prompt_sets.md is the table.
"""

from diffmem.common.t2i.prompt_sets.reader import SetRow, read_prompt_set, read_set_file
from diffmem.common.t2i.prompt_sets.registry import PROMPT_SETS, SET_PREFIX, PromptSet, set_name
from diffmem.common.t2i.prompt_sets.store import (
    CACHE_ENV,
    PromptSetError,
    cache_dir,
    fetch,
    get_set,
    is_present,
    local_path,
    locate,
    sha256_of,
    shipped_dir,
)

__all__ = ["CACHE_ENV", "PROMPT_SETS", "SET_PREFIX", "PromptSet", "PromptSetError", "SetRow", "cache_dir", "fetch",
           "get_set", "is_present", "local_path", "locate", "read_prompt_set", "read_set_file", "set_name",
           "sha256_of", "shipped_dir"]
