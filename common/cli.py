"""Command-line plumbing shared by every diffmem CLI."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from collections.abc import Callable

from diffmem.common.errors import ConfigError, DiffmemError
from diffmem.common.settings import extended_float, field_flag, finite_float

# EDM's and DiffMemorize's click switches take a value (--cond=1, --xflip=0); ours are given or left out.
SWITCH_VALUES = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
HYPHEN_NOTE = ("Every --name_with_underscores option also answers to --name-with-underscores (EDM's and "
               "DiffMemorize's spelling); abbreviations are not taken. Aliases follow an option's canonical name; "
               "docs/vocabulary.md lists them all.")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help; a required option says "(required)" instead of "(default: None)"; an
    option's aliases beside its name with the metavar once (``--model, --model_id ID``)."""

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return f"{action.help or ''} (required)".strip()
        if action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {args}"


class ListAction(argparse.Action):
    """The one list syntax: ``--x A B``, ``--x A --x B`` and, where the item type splits commas (numbers, ranges),
    ``--x A,B`` all give [A, B]; the first use replaces the default instead of extending it (argparse's
    ``extend`` would append to a non-empty default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v for value in values for v in (value if isinstance(value, list) else [value])]
        current = getattr(namespace, self.dest, None)
        fresh = current is self.default or current is None
        setattr(namespace, self.dest, items if fresh else [*current, *items])


class JoinedSpecAction(argparse.Action):
    """A spec option written as one comma string (``--seeds 0-9,20``): space-separated parts and repeats join into
    that one string (``--seeds 0-9 20`` is ``0-9,20``), so lists read the same in every command."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        parts = [] if current is self.default or current is None else [current]
        setattr(namespace, self.dest, ",".join([*parts, *values]))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus exit code 2) instead of the usage block, whose
    ``--help`` shows every option's default, that takes no abbreviation (``--out`` is never ``--outdir``), answers
    an unknown option with the closest known one, and takes ``--a-b`` for ``--a_b``."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("prog"):
            kwargs["prog"] = program_name(kwargs["prog"])
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("epilog", HYPHEN_NOTE)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # argparse names an option by all its spellings (--model/--model_id/--pretrained_model_name_or_path): the
        # canonical one says it.
        message = re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        args = self._underscored(sys.argv[1:] if args is None else list(args))
        if not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            # An unknown option is named before argparse's "the following arguments are required", which a typo of
            # a required option's name would otherwise produce instead (a parser with subcommands leaves this to
            # the subcommand's parser, which knows their options).
            unknown = next((t for t in args[:args.index("--") if "--" in args else len(args)]
                            if t.startswith("--") and " " not in t  # argparse reads "--a b" as a value
                            and t.partition("=")[0] not in self._option_string_actions), None)
            if unknown is not None:
                self.error(self._unrecognized([unknown]))
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return namespace

    def _underscored(self, args: list[str]) -> list[str]:
        """``--knn-ref X`` as ``--knn_ref X`` where only the underscored spelling is an option of this parser, and
        EDM's switches with a value (``--cond=1``, ``--xflip=0``) as our switches given or left out."""
        out = []
        for i, token in enumerate(args):
            if token == "--":
                return [*out, *args[i:]]
            name, eq, value = token.partition("=")
            if name.startswith("--") and "-" in name[2:] and name not in self._option_string_actions:
                candidate = "--" + name[2:].replace("-", "_")
                if candidate in self._option_string_actions:
                    name = candidate
                    token = name + eq + value
            action = self._option_string_actions.get(name)
            if eq and isinstance(action, argparse._StoreTrueAction) and value.lower() in SWITCH_VALUES:
                if SWITCH_VALUES[value.lower()]:
                    out.append(name)
                continue
            out.append(token)
        return out

    def _unrecognized(self, extras: list[str]) -> str:
        """The first unknown option and the closest known spelling, or argparse's own words for stray values."""
        flag = next((e.partition("=")[0] for e in extras if e.startswith("-")), None)
        if flag is None:
            return f"unrecognized arguments: {' '.join(extras)}"
        known = sorted(set(option_strings(self)))
        # Compared without the dashes (every long option shares "--") and with hyphens read as underscores.
        bare = {k.lstrip("-").replace("-", "_"): k for k in known}
        close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), list(bare), n=1, cutoff=0.6)
        hint = f" (did you mean {bare[close[0]]}?)" if close else ""
        return f"unrecognized argument {flag}{hint}"


def given_settings(parser: ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings (argparse dests) an argv sets explicitly, in any spelling: what a value equal to its default
    cannot tell (a CLI refuses an option that its other choices make inert)."""
    args = parser._underscored(sys.argv[1:] if argv is None else list(argv))
    actions = parser._option_string_actions
    return {actions[t.partition("=")[0]].dest for t in args if t.startswith("--") and t.partition("=")[0] in actions}


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of a parser and of its subcommands' parsers."""
    found = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(option_strings(sub))
    return found


def add_settings_arguments(parser, settings_class, exclude=(), only=None, defaults=None) -> None:
    """One ``--FIELD`` option per field of a settings dataclass (except ``exclude``; with ``only``, those fields
    alone, e.g. the two of a mutually exclusive group), with the dataclass's default,
    so defaults are written once: a field without a default is a required option, a boolean a switch (its
    ``flag``, e.g. ``--no_progress``, turns a True default off), the type from the field's metadata or else its
    default's (a float one parsed by ``finite_float``, or ``extended_float`` for ``finite=False``). ``defaults``
    gives a CLI's own default for a field of a library dataclass whose default suits its other callers (or that
    has none)."""
    defaults = defaults or {}
    for f in dataclasses.fields(settings_class):
        if f.name in exclude or (only is not None and f.name not in only):
            continue
        md = f.metadata
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        required = (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    and f.name not in defaults)
        common = dict(help=md.get("help"))
        if md.get("positional"):
            names = [f.name]
        else:
            names = [field_flag(f), *md.get("aliases", ())]
            common["dest"] = f.name
        if isinstance(default, bool) and "action" not in md:
            parser.add_argument(*names, action="store_false" if default else "store_true", default=default, **common)
            continue
        kind = md.get("type", type(default) if default is not None and not isinstance(default, (list, tuple))
                      else None)
        if kind is None and (default is not None or required):
            kind = str
        if kind is float:  # nan/inf would pass float() and reach the run (NaN scores, a refused identical rerun)
            kind = extended_float if md.get("finite") is False else finite_float
        extra = {k: md[k] for k in ("nargs", "action") if k in md}
        if md.get("joined"):
            extra.update(nargs="+", action=JoinedSpecAction)
        elif extra.get("nargs") in ("+", "*") and "action" not in extra:
            extra["action"] = ListAction
        if not md.get("positional"):
            extra["required"] = required
        metavar = md.get("metavar")
        if metavar is None and "flag" in md and md.get("choices") is None:  # --model MODEL, not MODEL_ID
            metavar = md["flag"].lstrip("-").upper()
        parser.add_argument(*names, type=kind, default=default, choices=md.get("choices"), metavar=metavar,
                            **extra, **common)
        for legacy, (legacy_type, legacy_help) in md.get("legacy", {}).items():
            # An old spelling whose value reads differently (detect_mem's --score_steps N: the first N steps)
            # converts to the canonical option's value; it sets the same field.
            parser.add_argument(legacy, dest=f.name, type=legacy_type, default=argparse.SUPPRESS,
                                help=f"{legacy_help} (sets {names[0]})", metavar=md.get("legacy_metavar"))


def add_settings_groups(parser, groups, exclude=()) -> None:
    """add_settings_arguments for each (title or None, settings dataclass, fields to leave out) of ``groups``: a
    titled one in an argument group of its own."""
    for title, settings_class, leave_out in groups:
        target = parser.add_argument_group(title) if title else parser
        add_settings_arguments(target, settings_class, exclude=(*exclude, *leave_out))


def settings_from_args(settings_class, namespace: argparse.Namespace, **values):
    """The settings dataclass filled from the parsed options of its fields (``values`` take precedence)."""
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(settings_class)
             if hasattr(namespace, f.name)}
    return settings_class(**{**given, **values})


def resolve_device(name: str | None) -> str:
    """The torch device a CLI runs on: ``cuda`` when available where none is named (None or ``auto``); a named
    ``cuda`` without a GPU, or a name torch has no device for, is a ConfigError (one line), not a traceback later."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if not (name == "cpu" or name.startswith(("cuda", "mps", "xpu"))):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def quiet_hub_logging() -> None:
    """Silence the per-component loading bars and warnings of diffusers/transformers (our own bars remain)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def program_name(own: str) -> str:
    """The name a CLI's messages give it: ``diffmem <verb>`` when the diffmem command runs it (its dispatcher sets
    argv[0] so, as argparse reads argv[0] for a parser without a name), else the CLI's own (``generate``)."""
    head = sys.argv[0] if sys.argv else ""
    if not head.startswith("diffmem ") or own.startswith(head):
        return own
    # A subcommand's parser (similarity features) is named by its parent's name plus its own word.
    return f"{head} {own.split(' ', 1)[1]}" if " " in own else head


def run_main(prog: str, body: Callable[..., object], *args) -> int:
    """Run a CLI's body: 0 when it returns; a DiffmemError becomes one line ``prog: error: …`` and exit code 2."""
    try:
        body(*args)
    except DiffmemError as exc:
        print(f"{program_name(prog)}: error: {exc}", file=sys.stderr)
        return 2
    return 0
