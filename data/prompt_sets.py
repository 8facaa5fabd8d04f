"""The literature's prompt sets by name: list them, show one, fetch one (SHA-256 checked), count its ground truth.

    diffmem prompt-sets list
    diffmem prompt-sets show webster_sd1_500_labels
    diffmem prompt-sets fetch membench_sd1_final [--mirror DIR | --url URL]
    diffmem prompt-sets groundtruth webster_sd1_500 --gt_dir sdv1_500_mem_groundtruth

Every text-to-image CLI then takes ``--data set:NAME``. Sets whose licence allows it ship with diffmem; the others
are fetched from their source repository at the pinned commit (or from ``--url``, ``file://`` too, or a local
``--mirror`` folder holding the repository's tree or the file) into the cache (``--cache_dir``, else
``$DIFFMEM_PROMPT_SETS``, else ``~/.cache/diffmem/prompt_sets``); a file whose SHA-256 differs from the registry's is
refused and nothing is written. ``groundtruth`` counts the prompts with images under ``--gt_dir`` (``{index}/``
folders, or a folder holding ``gt_images/``). The table with sources, commits and licences: docs/prompt_sets.md.
Bad input: one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from diffmem.common.cli import ArgumentParser, add_settings_arguments, run_main, settings_from_args
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option
from diffmem.common.t2i.groundtruth import coverage
from diffmem.common.t2i.prompt_sets import (
    CACHE_ENV,
    PROMPT_SETS,
    SET_PREFIX,
    PromptSet,
    cache_dir,
    fetch,
    get_set,
    is_present,
    local_path,
    read_prompt_set,
)

COMMANDS = ("list", "show", "fetch", "groundtruth")
NAMED = ("show", "fetch", "groundtruth")  # the commands that take a set's NAME


@dataclass
class PromptSetsConfig:
    command: str = option(positional=True, choices=COMMANDS,
                          help="list: the table; show NAME: one entry and its first rows; fetch NAME: download and "
                               "verify; groundtruth NAME: how many prompts have ground-truth images under --gt_dir")
    name: str | None = option(None, positional=True, nargs="?", type=str, metavar="NAME",
                              help="the set (as in `list`; set:NAME is taken too)")
    cache_dir: str | None = option(None, type=str, metavar="DIR",
                                   help=f"where fetched sets are kept (None: ${CACHE_ENV}, else "
                                        f"$XDG_CACHE_HOME/diffmem/prompt_sets, i.e. ~/.cache/diffmem/prompt_sets)")
    mirror: str | None = option(None, type=str, metavar="DIR",
                                help="fetch: read the file from this folder (the source repository's tree, "
                                     "OWNER+NAME/ subfolders of several, or the file itself) instead of the network")
    url: str | None = option(None, type=str, help="fetch: download from this URL (file:// too) instead of the "
                                                  "source's pinned commit")
    gt_dir: str | None = option(None, type=str, metavar="DIR",
                                help="groundtruth: a folder of {index}/ image folders, or one holding gt_images/")
    rows: int = option(5, help="show: how many of the set's first rows to print")

    def validate(self) -> None:
        """Argument-level checks; raises ConfigError."""
        if self.command in NAMED and not self.name:
            raise ConfigError(f"{self.command}: expected the name of a set (`diffmem-prompt-sets list` names them)")
        if self.command == "list" and self.name:
            raise ConfigError(f"list: takes no NAME, got {self.name!r} (did you mean `show {self.name}`?)")
        if self.name:
            get_set(self.name)
        if self.command != "fetch" and (self.mirror or self.url):
            raise ConfigError(f"--{'mirror' if self.mirror else 'url'}: only for fetch, not {self.command}")
        if self.mirror and self.url:
            raise ConfigError("--mirror and --url: give one of them, not both")
        if self.command == "groundtruth":
            if self.gt_dir is None:
                raise ConfigError("groundtruth: expected --gt_dir DIR, the folder of the ground-truth images")
            if not Path(self.gt_dir).expanduser().is_dir():
                raise ConfigError(f"--gt_dir {self.gt_dir}: no such folder")
        elif self.gt_dir is not None:
            raise ConfigError(f"--gt_dir: only for groundtruth, not {self.command}")
        if self.rows < 0:
            raise ConfigError(f"--rows {self.rows}: expected 0 or more")


def parse_args(argv=None) -> PromptSetsConfig:
    p = ArgumentParser(prog="prompt_sets", description=__doc__.split("\n\n")[0])
    add_settings_arguments(p, PromptSetsConfig)
    return settings_from_args(PromptSetsConfig, p.parse_args(argv))


def status(ps: PromptSet, cache: str | None) -> str:
    if not ps.verified:
        return "unverified"
    if ps.shipped:
        return "shipped"
    return "fetched" if is_present(ps, cache) else "not fetched"


def print_table(cache: str | None) -> None:
    header = ("name", "rows", "label", "status", "licence", "source")
    table = [header] + [(ps.name, str(ps.rows or "?"), "mem" if ps.label else "non-mem", status(ps, cache),
                         ps.licence.split(" (")[0].split(":")[0], ps.source) for ps in PROMPT_SETS.values()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"fetched sets are kept in {cache_dir(cache)}; a set is used as --data {SET_PREFIX}NAME")


def show(ps: PromptSet, cache: str | None, n_rows: int) -> None:
    fields = [("set", f"{SET_PREFIX}{ps.name}"), ("description", ps.description), ("paper", ps.paper),
              ("source", f"{ps.repo or '?'} at {ps.commit or '?'}: {ps.path or '?'}"), ("url", ps.url or "none"),
              ("sha256", ps.sha256 or "unknown"), ("licence", ps.licence), ("rows", ps.rows or "unknown"),
              ("label", f"{ps.label} ({'memorized' if ps.label else 'not memorized'})"),
              ("columns", f"caption {ps.caption_column!r}, Webster type {ps.type_column!r}, "
                          f"ground-truth index {ps.index_column!r} ({ps.format})"),
              ("model", ps.model), ("status", status(ps, cache)),
              ("file", local_path(ps, cache) if ps.verified else "none")]
    if ps.notes:
        fields.append(("notes", ps.notes))
    for key, value in fields:
        print(f"{key + ':':13}{value}")
    if ps.verified and not is_present(ps, cache):
        print(f"not fetched: run `{ps.fetch_command}`")
        return
    if ps.verified and n_rows:
        for r in read_prompt_set(ps, cache)[:n_rows]:
            extra = "".join(f" {k}={v}" for k, v in (("type", r.type), ("index", r.index)) if v is not None)
            print(f"  row {r.row}{extra}: {r.prompt}")


def run(cfg: PromptSetsConfig) -> None:
    cfg.validate()
    if cfg.command == "list":
        print_table(cfg.cache_dir)
        return
    ps = get_set(cfg.name)
    if cfg.command == "show":
        show(ps, cfg.cache_dir, cfg.rows)
    elif cfg.command == "fetch":
        path, written = fetch(ps, cfg.cache_dir, mirror=cfg.mirror, url=cfg.url)
        how = "fetched, sha256 verified" if written else "shipped with diffmem" if ps.shipped else "already fetched"
        print(f"{SET_PREFIX}{ps.name}: {path} ({how}; {ps.rows} rows)")
    else:
        report = coverage(ps.name, cfg.gt_dir, cfg.cache_dir)
        others = ", ".join(f"{k} {v}" for k, v in sorted(report.statuses.items()) if k != "ok")
        print(f"{SET_PREFIX}{ps.name}: {report.present} of {report.total} prompts have ground-truth images under "
              f"{report.root}" + (f" ({others})" if others else ""))
        if report.lacking:
            shown = ", ".join(report.lacking[:10]) + (", …" if len(report.lacking) > 10 else "")
            print(f"lacking: {shown}")


def main(argv=None) -> int:
    return run_main("prompt_sets", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
