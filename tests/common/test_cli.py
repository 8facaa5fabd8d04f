"""The CLI plumbing every diffmem command shares: options built from settings dataclasses, defaults in --help,
one device rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from diffmem.common.cli import ArgumentParser, add_settings_arguments, resolve_device, settings_from_args
from diffmem.common.errors import ConfigError
from diffmem.common.settings import option


@dataclass
class Toy:
    data: Path = option(help="input file", type=Path)
    steps: int = option(18, help="sampler steps")
    rho: float = option(7.0, help="schedule exponent")
    solver: str = option("heun", help="solver", choices=("heun", "euler"))
    batch: int | None = option(None, help="micro-batch", type=int)
    overwrite: bool = option(False, help="replace earlier results")
    progress: bool = option(True, help="hide the progress bars", flag="--no_progress")


def parse(*argv):
    p = ArgumentParser(prog="toy")
    add_settings_arguments(p, Toy)
    return p, settings_from_args(Toy, p.parse_args(list(argv)))


def test_options_take_the_dataclass_defaults_and_types():
    _, cfg = parse("--data", "x.zip")
    assert cfg == Toy(data=Path("x.zip"))
    _, cfg = parse("--data", "x.zip", "--steps", "4", "--rho", "3", "--solver", "euler", "--batch", "8",
                   "--overwrite", "--no_progress")
    assert cfg == Toy(Path("x.zip"), 4, 3.0, "euler", 8, True, False)


def test_help_shows_every_default(capsys):
    p, _ = parse("--data", "x")
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("sampler steps (default: 18)", "schedule exponent (default: 7.0)", "(default: heun)",
                  "micro-batch (default: None)", "hide the progress bars (default: True)"):
        assert shown in text


def test_bad_values_are_one_line_exit_2(capsys):
    for argv in ([], ["--data", "x", "--steps", "many"], ["--data", "x", "--solver", "rk4"]):
        with pytest.raises(SystemExit) as info:
            parse(*argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("toy: error:")


def test_resolve_device():
    import torch

    assert resolve_device(None) == resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@dataclass
class Lists:
    out: str = option(help="run folder")
    files: list[Path] = option(default_factory=list, positional=True, nargs="*", type=Path, help="inputs")
    extra: list[Path] = option(default_factory=list, nargs="+", action="extend", type=Path, help="more inputs")
    steps: list[int] = option(default_factory=lambda: [0], nargs="+", type=int, help="target steps")
    pair: list[float] | None = option(None, nargs=2, type=float, metavar=("A", "B"), help="two weights")


def test_list_fields_positional_and_a_cli_s_own_default(capsys):
    p = ArgumentParser(prog="lists")
    add_settings_arguments(p, Lists, defaults={"out": "runs"})
    cfg = settings_from_args(Lists, p.parse_args(["a", "b", "--extra", "c", "--extra", "d", "e", "--steps", "1", "2",
                                                  "--pair", "1", "0.5"]))
    assert cfg == Lists("runs", [Path("a"), Path("b")], [Path("c"), Path("d"), Path("e")], [1, 2], [1.0, 0.5])
    # defaults are fresh lists per parse, and the CLI's own default makes the field optional
    assert settings_from_args(Lists, p.parse_args([])) == Lists("runs")
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("run folder (default: runs)", "inputs (default: [])", "target steps (default: [0])",
                  "two weights (default: None)"):
        assert shown in text
