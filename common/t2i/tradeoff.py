"""The replication–alignment trade-off of mitigation methods: which runs a sweep makes, its points and its plot.

Each method is swept over its knob (:class:`common.t2i.mitigation_methods.MethodSpec`) or run once at the given
setting. A point carries MemBench's metrics (Hong et al.: per prompt the max SSCD over generations × ground-truth
images, the mean of the top-3 generations, the share of generations above 0.5; averaged over prompts), the mean
SSCD and CLIP score, the cost (seconds and extra UNet evaluations per image) and, when a general prompt set was
run, the CLIP score on it (a mitigation must not hurt ordinary prompts).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from diffmem.common.errors import ConfigError
from diffmem.common.t2i.mitigation_methods import METHOD_SPECS


def run_label(method: str, knob: str | None, value) -> str:
    """Folder name of one run: the method and its knob's value (``ours_target3``, ``jain_stp_tau500``)."""
    if knob is None:
        return method
    short = {"optim_target_loss": "target", "repeat_num": "repeat"}.get(knob, knob.split("_", 1)[1])
    return f"{method}_{short}{value:g}"


def plan_runs(base, methods: list[str], knob_values: dict[str, list]) -> list[tuple[str, object]]:
    """(label, settings) of every run: each method once per value of its knob in knob_values, else once at the
    base settings' value."""
    runs = []
    for method in methods:
        if method not in METHOD_SPECS:
            raise ConfigError(f"--methods: unknown method {method!r}; expected some of {', '.join(METHOD_SPECS)}")
        knob = METHOD_SPECS[method].knob
        settings = replace(base, method=method)
        if knob is None:
            runs.append((method, settings))
            continue
        values = knob_values.get(knob)
        if not values:
            value = settings.jain_early(method) if knob == "jain_early_scale" else getattr(settings, knob)
            values = [value]
        runs += [(run_label(method, knob, v), replace(settings, **{knob: v})) for v in values]
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods/--sweep: runs with the same label ({', '.join(labels)})")
    return runs


def parse_sweeps(items: list[str]) -> dict[str, list[float]]:
    """{knob: values} from ``KNOB=V1,V2,...`` items (knobs of METHOD_SPECS); ConfigError on a bad item."""
    knobs = {s.knob for s in METHOD_SPECS.values() if s.knob}
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
        out[name] = [int(v) if name == "repeat_num" else v for v in parsed]
    return out


def tradeoff_point(label: str, settings, summary: dict, general: dict | None = None) -> dict:
    """One point: the knob's value, MemBench's SSCD metrics, mean SSCD and CLIP, cost, and the general set's CLIP."""
    spec = METHOD_SPECS[settings.method]
    knob = spec.knob
    value = None if knob is None else (settings.jain_early(settings.method) if knob == "jain_early_scale"
                                       else getattr(settings, knob))
    sscd, clip, cost = summary.get("sscd") or {}, summary.get("clip") or {}, summary.get("cost") or {}
    point = {"label": label, "method": settings.method, "knob_name": knob, "knob": value,
             "sscd_mean": sscd.get("mean"), "sscd_rate_gt_0.5": sscd.get("rate_gt_0.5"),
             "membench_sscd": sscd.get("max_mean"), "membench_top3_sscd": sscd.get("top3_mean"),
             "membench_rate_gt_0.5": sscd.get("membench_rate_gt_0.5"),
             "clip_score_mean": clip.get("mean"), "clip_calibrated": clip.get("calibrated"),
             "seconds_per_image": cost.get("seconds_per_image"),
             "extra_unet_calls_per_image": cost.get("extra_unet_calls_per_image"),
             "loss_final_mean": summary["loss"]["final_mean"], "prompts": summary["counts"]["prompts"]}
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
    by_method: dict = {}
    for p in points:
        if p["sscd_mean"] is not None:
            by_method.setdefault(p["method"], []).append(p)
    panels = [("clip_score_mean", "CLIP score on the mitigated prompts (mean)")]
    if general:
        panels.append(("general_clip_score_mean", "CLIP score on the general prompts (mean)"))
    for ax, (key, xlabel) in zip(axes[0], panels):
        for method, pts in by_method.items():
            pts = sorted((p for p in pts if p.get(key) is not None), key=lambda p: (p["knob"] is None, p["knob"] or 0))
            if not pts:
                continue
            secs = [p["seconds_per_image"] for p in pts if p.get("seconds_per_image") is not None]
            name = f"{method} ({sum(secs) / len(secs):.3g} s/image)" if secs else method
            xs, ys = [p[key] for p in pts], [p["sscd_mean"] for p in pts]
            single = len(pts) == 1
            ax.plot(xs, ys, marker="*" if method == "none" else "o", markersize=12 if method == "none" else 6,
                    linestyle="none" if single else "-", label=name)
            for p, x, y in zip(pts, xs, ys):
                if p["knob"] is not None:
                    ax.annotate(f"{p['knob']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        calibrated = all(p.get("clip_calibrated") is not False for p in points)
        ax.set_xlabel(xlabel + ("" if calibrated else " — UNCALIBRATED, random CLIP weights"))
        ax.set_ylabel("SSCD similarity to ground truth (mean)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Replication vs prompt alignment (labels: each method's knob)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
