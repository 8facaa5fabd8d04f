"""What a settings dataclass is made of: ``option()`` fields (each default written once, its help beside it) and
the value types of their command-line form. Library code builds its dataclasses from these alone; the CLI plumbing
that reads them (``common.cli``) is for the CLIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from diffmem.common.errors import ConfigError
from diffmem.common.textfiles import surrogate_problem


def finite_float(text: str) -> float:
    """An option type: a float that is finite. NaN compares unequal to itself (an identical rerun would be refused
    as different settings) and is not JSON; an infinity is no usable scale, weight or rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def extended_float(text: str) -> float:
    """An option type for the few fields where an infinity is documented to mean something (``option(finite=False)``,
    e.g. the sampler's S_max = inf: no upper bound): any float but NaN, which means nothing anywhere."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}")
    return value


def prompt_text(text: str) -> str:
    """An option type for a prompt given on the command line: a byte that is not UTF-8 reaches Python as a lone
    surrogate (the surrogateescape of argv), which the tokenizer fails on only after the model has loaded."""
    escaped = next((ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF), None)
    if escaped is not None:  # what surrogateescape makes of the byte
        raise argparse.ArgumentTypeError(f"the text holds the byte 0x{escaped:02x}, which is not UTF-8; expected UTF-8 "
                                         f"text")
    problem = surrogate_problem(text, "the text")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def option(default=dataclasses.MISSING, *, help: str, choices=None, type=None, metavar=None, flag: str | None = None,
           aliases: tuple[str, ...] = (), legacy: dict | None = None, legacy_metavar: str | None = None,
           joined: bool = False, default_factory=dataclasses.MISSING, nargs=None, action: str | None = None,
           positional: bool = False, finite: bool = True):
    """A settings-dataclass field that is also a command-line option: the default is written here once, and
    ``add_settings_arguments`` reads the help, choices, type (needed where the default cannot tell it: None,
    lists) and metavar from the field. ``flag`` is the option's canonical name where it is not ``--FIELD`` (the
    house vocabulary: ``--model``, ``--data``, ``--out``, ``--batch_size``, ``--seed``; ``--no_progress`` for a
    True boolean); ``aliases`` are the other spellings it answers to (the anchors' and our earlier ones), listed
    by ``--help``; ``legacy`` maps an old spelling whose value reads differently to (converter to this field's
    value, help). A list field takes ``nargs="+"`` (space-separated values, repeats extend; the type may split
    commas); ``joined`` keeps a comma-spec string field (``--seeds 0-9,20``) whose space-separated parts are
    joined with commas. ``positional`` makes the field a positional argument instead of ``--FIELD``. A float
    option must be finite (``finite_float``); ``finite=False`` lets it take ±inf too, for a field whose help says
    what an infinity means."""
    metadata = {k: v for k, v in dict(help=help, choices=choices, type=type, metavar=metavar, flag=flag,
                                      aliases=tuple(aliases) or None, legacy=legacy, legacy_metavar=legacy_metavar,
                                      joined=joined or None, nargs=nargs, action=action,
                                      positional=positional or None, finite=None if finite else False).items()
                if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def device_option(default: str | None = None, *, indexed: bool = False):
    """The ``--device`` field of a settings dataclass: cpu or cuda, None (not given) for ``resolve_device``'s rule.
    ``indexed``: any name ``resolve_device`` takes (cuda:N, auto too), for the CLIs that have always taken those."""
    if indexed:
        return option(default, type=str, metavar="DEVICE",
                      help="cpu, cuda or cuda:N; auto or None: cuda when available, else cpu")
    return option(default, choices=("cpu", "cuda"), help="None: cuda when available, else cpu")


def int_list(text: str) -> list[int]:
    """An option type: '1,1,0' or '16' -> [1, 1, 0] / [16]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """An option type: '1,2.5' or '3' -> [1.0, 2.5] / [3.0], each finite."""
    return [finite_float(t) for t in text.split(",") if t.strip()]


class StepSpecError(ValueError):
    """A text outside the one step syntax: ``part`` is the piece that is wrong, ``backwards`` whether it is a range
    A-B with A > B (each caller words the line with its option's name)."""

    def __init__(self, part: str, backwards: bool):
        super().__init__(part)
        self.part, self.backwards = part, backwards


def parse_step_indices(text: str) -> list[int]:
    """The one step syntax's index part: 'K', 'A-B' (inclusive) or a comma list of those -> the indices in order;
    StepSpecError for anything else."""
    steps: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise StepSpecError(part.strip(), backwards=False)
        a, b = int(lo), int(hi) if sep else int(lo)
        if a > b:
            raise StepSpecError(part.strip(), backwards=True)
        steps.extend(range(a, b + 1))
    return steps


def step_indices(text: str) -> list[int]:
    """An option type: ``parse_step_indices``, its refusal argparse's one line."""
    try:
        return parse_step_indices(text)
    except StepSpecError as exc:
        if exc.backwards:
            raise argparse.ArgumentTypeError(f"the step range {exc.part!r} runs backwards") from None
        raise argparse.ArgumentTypeError(f"expected step indices K, A-B or a comma list of those, "
                                         f"got {text!r}") from None


def first_steps(text: str) -> str:
    """The old ``--score_steps N`` (the first N steps, or all) in the one step syntax: '3' -> '0-2'."""
    if text.strip() == "all":
        return "all"
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive step count or 'all', got {text!r}")
    return f"0-{int(text) - 1}" if int(text) > 1 else "0"


def prefix_step_count(spec: str, num_steps: int, flag: str = "--target_steps") -> int:
    """How many steps from the first a step spec names, for the detectors that score a prefix of the trajectory
    (``0`` -> 1, ``0-9`` -> 10, ``all`` -> num_steps); ConfigError (one line) for any other set."""
    if spec == "all":
        return num_steps
    try:
        steps = parse_step_indices(spec)
    except StepSpecError:
        steps = None
    if not steps or steps != list(range(len(steps))):
        raise ConfigError(f"{flag} must be a prefix of the trajectory (0, 0-K or all): the noise magnitude averages "
                          f"the first steps, got {spec!r}")
    if len(steps) > num_steps:
        raise ConfigError(f"{flag} must lie in 0..{num_steps - 1} (--num_inference_steps), got {spec}")
    return len(steps)


def field_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a settings field: its ``option(flag=...)``, else ``--FIELD``."""
    return f.metadata.get("flag") or f"--{f.name}"


def option_flag(settings_class, name: str) -> str:
    """The command-line flag of a settings dataclass's field ``name`` (``field_flag``)."""
    for f in dataclasses.fields(settings_class):
        if f.name == name:
            return field_flag(f)
    raise KeyError(f"{settings_class.__name__} has no field {name!r}")
