"""The replication–alignment trade-off of mitigation methods: which runs a sweep makes, its points and its plot.

Each method is swept over its knob (:class:`common.t2i.mitigation.options.MethodInfo`) or run once at the given
setting; an item ``METHOD:FIELD=V,...`` sets the method's own settings for its runs (a curve of its own). A point
carries MemBench's metrics (Hong et al.: per prompt the max SSCD over generations × ground-truth images, the mean of
the top-3 generations, the share of generations above 0.5; averaged over prompts), the mean SSCD and CLIP score,
the cost (seconds and extra UNet evaluations per image) and, when a general prompt set was run, the CLIP score on
it (a mitigation must not hurt ordinary prompts).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, get_args, get_type_hints

from diffmem.common.errors import ConfigError
from diffmem.common.t2i.mitigation.options import METHOD_INFO  # torch-free: mitigate/tradeoff.py plans before torch


def _short(field: str) -> str:
    return {"optim_target_loss": "target", "repeat_num": "repeat"}.get(field, field.split("_", 1)[1])


def _value_text(value) -> str:
    if isinstance(value, str):  # a choice (guard_orthogonalize=off, clip_pad_mode=ratio)
        return value
    return str(int(value)) if isinstance(value, bool) else f"{value:g}"


def run_series(method: str, overrides: dict | None = None) -> str:
    """Name of one curve of the plot: the method and the settings given with it (``jain_stp``,
    ``jain_stp_early_scale-2_tau650``, ``ours_mask1``)."""
    return "_".join([method, *(f"{_short(name)}{_value_text(v)}" for name, v in (overrides or {}).items())])


def run_label(method: str, knob: str | None, value, overrides: dict | None = None) -> str:
    """Folder name of one run: its series and its knob's value (``ours_target3``, ``jain_stp_tau500``,
    ``ours_mask1_target3``)."""
    series = run_series(method, overrides)
    return series if knob is None or knob in (overrides or {}) else f"{series}_{_short(knob)}{_value_text(value)}"


def knob_value(settings):
    """The value of the knob of ``settings.method`` (None for a method without one; jain's early scale resolved)."""
    knob = METHOD_INFO[settings.method].knob
    if knob is None:
        return None
    return settings.jain_early(settings.method) if knob == "jain_early_scale" else getattr(settings, knob)


def run_label_of(settings) -> str:
    """The label a sweep would give a run at these settings: its method and its knob's value (``ours_target3``)."""
    value = knob_value(settings)
    return run_label(settings.method, None if value is None else METHOD_INFO[settings.method].knob, value)


class PlannedRun(NamedTuple):
    """One run of a comparison: its folder name, the plot curve it belongs to, and its settings."""

    label: str
    series: str
    settings: object


def _coerce(settings, item: str, name: str, text: str):
    """The value of one ``FIELD=VALUE`` of a --methods item, typed as the settings field."""
    hint = get_type_hints(type(settings))[name]
    kind = next((t for t in (bool, int, float, str) if t is hint or t in get_args(hint)), str)
    try:
        if kind is bool:
            return {"1": True, "true": True, "0": False, "false": False}[text.strip().lower()]
        value = kind(text)
    except (KeyError, ValueError):
        raise ConfigError(f"--methods {item!r}: {name} expects {'0 or 1' if kind is bool else 'a number'}, "
                          f"got {text!r}") from None
    # float() takes nan/inf: a NaN setting runs, writes NaN into the points and makes an identical rerun differ.
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"--methods {item!r}: {name} expects a finite number, got {text!r}")
    return value


def parse_method(item: str, settings) -> tuple[str, dict]:
    """(method, {field: value}) from ``METHOD`` or ``METHOD:FIELD=V,FIELD=V`` (fields the method reads), so that one
    comparison holds one method at several of its papers' settings (Jain et al.'s τ 500 / scale 0 and opposite
    guidance τ 650 / scale −2; ``ours`` with and without --be_mask)."""
    method, colon, spec = item.partition(":")
    if method not in METHOD_INFO:
        raise ConfigError(f"--methods: unknown method {method!r}; expected some of {', '.join(METHOD_INFO)} "
                          "(each optionally as METHOD:FIELD=VALUE,...)")
    reads = METHOD_INFO[method].reads
    overrides: dict = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, text = pair.partition("=")
        if not sep or name not in reads:
            raise ConfigError(f"--methods {item!r}: expected {method}:FIELD=VALUE,... with FIELD one of "
                              f"{', '.join(reads) or '(none: ' + method + ' has no settings)'}")
        overrides[name] = _coerce(settings, item, name, text)
    if colon and not overrides:
        raise ConfigError(f"--methods {item!r}: no FIELD=VALUE after the colon")
    return method, overrides


def plan_runs(base, methods: list[str], knob_values: dict[str, list]) -> list[PlannedRun]:
    """Every run: each --methods item once per value of its knob in knob_values (unless the item sets the knob
    itself), else once at the base settings' value; an item's own FIELD=VALUE apply to all its runs."""
    runs = []
    for item in methods:
        method, overrides = parse_method(item, base)
        knob = METHOD_INFO[method].knob
        settings = replace(base, method=method, **overrides)
        series = run_series(method, overrides)
        if knob is None or knob in overrides:
            runs.append(PlannedRun(series, series, settings))
            continue
        values = knob_values.get(knob) or [knob_value(settings)]
        runs += [PlannedRun(run_label(method, knob, v, overrides), series, replace(settings, **{knob: v}))
                 for v in values]
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods/--sweep: runs with the same label ({', '.join(labels)})")
    return runs


def parse_sweeps(items: list[str]) -> dict[str, list[float]]:
    """{knob: values} from ``KNOB=V1,V2,...`` items (knobs of METHOD_INFO); ConfigError on a bad item."""
    knobs = {s.knob for s in METHOD_INFO.values() if s.knob}
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in knobs:
            raise ConfigError(f"--sweep {item!r}: expected KNOB=V1,V2,... with KNOB one of {', '.join(sorted(knobs))}")
        try:
            parsed = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--sweep {item!r}: the values must be numbers separated by commas") from None
        if not parsed:
            raise ConfigError(f"--sweep {item!r}: no values")
        bad = next((v for v in parsed if not math.isfinite(v)), None)
        if bad is not None:  # float() takes nan/inf, which no knob can be set to (NaN points, a NaN-named run)
            raise ConfigError(f"--sweep {item!r}: expected finite numbers, got {bad!r}")
        out[name] = [int(v) if name == "repeat_num" else v for v in parsed]
    return out


def tradeoff_point(run: PlannedRun, summary: dict, general: dict | None = None) -> dict:
    """One point of a run: the knob's value, MemBench's SSCD metrics, mean SSCD and CLIP, cost, and the general
    set's CLIP."""
    label, settings = run.label, run.settings
    knob, value = METHOD_INFO[settings.method].knob, knob_value(settings)
    sscd, clip, cost = summary.get("sscd") or {}, summary.get("clip") or {}, summary.get("cost") or {}
    point = {"label": label, "method": settings.method, "series": run.series, "knob_name": knob, "knob": value,
             "sscd_mean": sscd.get("mean"), "sscd_rate_gt_0.5": sscd.get("rate_gt_0.5"),
             "membench_sscd": sscd.get("max_mean"), "membench_top3_sscd": sscd.get("top3_mean"),
             "membench_rate_gt_0.5": sscd.get("membench_rate_gt_0.5"),
             "clip_score_mean": clip.get("mean"), "clip_calibrated": clip.get("calibrated"),
             "seconds_per_image": cost.get("seconds_per_image"),
             "extra_unet_calls_per_image": cost.get("extra_unet_calls_per_image"),
             "loss_final_mean": summary["loss"]["final_mean"], "prompts": summary["counts"]["prompts"],
             "sscd_prompts": sscd.get("prompts"), "sscd_over": sscd.get("over")}
    if general is not None:
        point["general_clip_score_mean"] = (general.get("clip") or {}).get("mean")
        point["general_prompts"] = general["counts"]["prompts"]
        point["general_seconds_per_image"] = (general.get("cost") or {}).get("seconds_per_image")
    return point


def plot_tradeoff(points: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG of mean SSCD to ground truth (lower = less replication) against mean CLIP score, one curve per method
    (seconds per image in the legend); a second panel against the general prompts' CLIP score when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    general = any(p.get("general_clip_score_mean") is not None for p in points)
    fig, axes = plt.subplots(1, 2 if general else 1, figsize=(12.8 if general else 6.4, 4.8), squeeze=False)
    by_series: dict = {}
    for p in points:
        if p["sscd_mean"] is not None:  # a curve per method and the settings given with it (older files: method)
            by_series.setdefault(p.get("series") or p["method"], []).append(p)
    panels = [("clip_score_mean", "CLIP score on the mitigated prompts (mean)")]
    if general:
        panels.append(("general_clip_score_mean", "CLIP score on the general prompts (mean)"))
    for ax, (key, xlabel) in zip(axes[0], panels):
        for series, pts in by_series.items():
            pts = sorted((p for p in pts if p.get(key) is not None), key=lambda p: (p["knob"] is None, p["knob"] or 0))
            if not pts:
                continue
            secs = [p["seconds_per_image"] for p in pts if p.get("seconds_per_image") is not None]
            name = f"{series} ({sum(secs) / len(secs):.3g} s/image)" if secs else series
            xs, ys = [p[key] for p in pts], [p["sscd_mean"] for p in pts]
            single = len(pts) == 1
            none = pts[0]["method"] == "none"
            ax.plot(xs, ys, marker="*" if none else "o", markersize=12 if none else 6,
                    linestyle="none" if single else "-", label=name)
            for p, x, y in zip(pts, xs, ys):
                if p["knob"] is not None:
                    ax.annotate(f"{p['knob']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        calibrated = all(p.get("clip_calibrated") is not False for p in points)
        ax.set_xlabel(xlabel + ("" if calibrated else " — UNCALIBRATED, random CLIP weights"))
        overs = {p.get("sscd_over") for p in points if p.get("sscd_over")}
        ax.set_ylabel("SSCD similarity to ground truth (mean)" + (f"\n{overs.pop()}" if len(overs) == 1 else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Replication vs prompt alignment (labels: each method's knob)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
