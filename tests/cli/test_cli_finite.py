"""Every float option of every CLI refuses nan and inf on one line with exit code 2 (a NaN guidance scale used to run
and write NaN scores, not JSON, and an identical rerun was then refused since NaN != NaN); the few documented
opt-outs (``option(finite=False)``) take inf but still refuse nan. Floats a CLI parses out of a string of its own
(tradeoff's ``--sweep KNOB=V,...`` and ``--methods METHOD:FIELD=V``) are refused as ConfigErrors."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import pytest

from diffmem.common import cli
from diffmem.common.errors import ConfigError
from diffmem.common.settings import float_list

PACKAGES = ("diffmem.detect", "diffmem.data", "diffmem.finetune", "diffmem.mitigate")
BUILDERS = ("build_parser", "build_plot_parser", "parse_args", "parse_config")
# Float options where an infinity is documented to mean something: the sampler's S_max = inf (no upper bound).
OPT_OUTS = {"--S_max"}


def cli_modules() -> list[str]:
    """Every module of the CLI packages that builds a parser (by the builder names the CLIs use)."""
    found = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.ispkg:
                continue
            name = f"{pkg_name}.{info.name}"
            if any(hasattr(importlib.import_module(name), b) for b in BUILDERS):
                found.append(name)
    return sorted(found)


def parsers_of(module_name: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """Every ArgumentParser the module's builders construct (subcommand parsers included)."""
    made: list[argparse.ArgumentParser] = []
    init = argparse.ArgumentParser.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", recording_init)
    module = importlib.import_module(module_name)
    for builder in BUILDERS:
        fn = getattr(module, builder, None)
        if fn is None:
            continue
        try:
            fn() if builder.startswith("build") else fn(["--help"])
        except SystemExit:
            pass
    monkeypatch.setattr(argparse.ArgumentParser, "__init__", init)
    return made


def is_float_option(action: argparse.Action) -> bool:
    default = action.default
    listed = isinstance(default, (list, tuple)) and default and all(isinstance(v, float) for v in default)
    return (action.type in (float, cli.finite_float, cli.extended_float, float_list) or isinstance(default, float)
            or bool(listed)) and not isinstance(default, bool)


def float_options(module_name: str, monkeypatch):
    for parser in parsers_of(module_name, monkeypatch):
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and is_float_option(action):
                yield parser, action


def refusal(parser, action, text: str, capsys) -> str | None:
    """The error line parsing ``OPTION text`` gives, or None when the value is taken."""
    n = action.nargs if isinstance(action.nargs, int) else 1
    flag = action.option_strings[0]
    # OPTION=VALUE: argparse would read a separate '-inf' as an unknown option, not as the value
    argv = [f"{flag}={text}"] if n == 1 else [flag, *[text] * n]
    with pytest.raises(SystemExit) as exc:  # taken or not, the required options missing end it
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    about = [line for line in err.splitlines() if f"argument {action.option_strings[0]}" in line and text in line]
    return about[0] if about else None


def test_the_walk_finds_the_clis():
    names = cli_modules()
    for expected in ("diffmem.detect.detect_mem", "diffmem.detect.generate", "diffmem.detect.similarity",
                     "diffmem.mitigate.tradeoff", "diffmem.data.dataset_tool", "diffmem.finetune.train_unconditional"):
        assert expected in names


@pytest.mark.parametrize("module_name", cli_modules())
def test_every_float_option_refuses_nan_and_inf(module_name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    opted_out = set()
    for parser, action in float_options(module_name, monkeypatch):
        flag = action.option_strings[0]
        assert action.type in (cli.finite_float, cli.extended_float, float_list), \
            f"{module_name} {flag}: a float option not built through common.cli.option (type {action.type})"
        nan = refusal(parser, action, "nan", capsys)
        assert nan is not None and len(nan.splitlines()) == 1, f"{module_name} {flag} took nan"
        for text in ("inf", "-inf") if action.nargs in (None, 1, "?", "*", "+") else ("inf",):
            line = refusal(parser, action, text, capsys)
            if action.type is cli.extended_float:
                assert line is None, f"{module_name} {flag} is documented to take {text}: {line}"
            else:
                assert line is not None and "expected a finite number" in line, f"{module_name} {flag} took {text}"
        if action.type is cli.extended_float:
            opted_out.add(flag)
        assert refusal(parser, action, "0.5", capsys) is None
    assert opted_out <= OPT_OUTS, f"undocumented opt-outs of the finite rule: {opted_out - OPT_OUTS}"


def test_guidance_scale_nan_is_one_line(capsys):
    from diffmem.detect import detect_mem

    with pytest.raises(SystemExit) as exc:
        detect_mem.parse_config(["--guidance_scale", "nan"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.strip().endswith(": error: argument --guidance_scale: expected a finite number, got 'nan' (see --help)")


def test_s_max_takes_inf():
    from diffmem.common.edm.sampler import SamplerSettings

    p = cli.ArgumentParser(prog="toy")
    cli.add_settings_arguments(p, SamplerSettings)
    assert p.parse_args(["--S_max", "inf"]).S_max == float("inf")


def test_finite_float():
    assert cli.finite_float("1e-3") == 1e-3
    for text in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a finite number"):
            cli.finite_float(text)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number, got 'x'"):
        cli.finite_float("x")
    assert cli.extended_float("inf") == float("inf")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.extended_float("nan")


@pytest.mark.parametrize("item", ["jain_tau=300,nan", "optim_target_loss=inf", "ren_c=1.1,-inf"])
def test_tradeoff_sweep_refuses_non_finite(item):
    from diffmem.common.t2i.mitigation.tradeoff import parse_sweeps

    with pytest.raises(ConfigError, match="expected finite numbers"):
        parse_sweeps([item])


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_tradeoff_methods_refuse_non_finite(text):
    from diffmem.common.t2i.mitigation.run import MitigationSettings
    from diffmem.common.t2i.mitigation.tradeoff import plan_runs

    with pytest.raises(ConfigError, match="jain_tau expects a finite number"):
        plan_runs(MitigationSettings(method="none"), [f"jain_stp:jain_tau={text}"], {})
