"""The EMM curve (Gu et al. 2023, Fig. 2 style): max memorization ratio against |D|, one curve per sweep.

Both a sweep's report (:mod:`common.edm.emm.sweep`) and the comparison of several sweeps (``detect/emm.py plot``)
draw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffmem.common.plotting import new_axes


@dataclass
class EMMCurve:
    """One EMM sweep on a figure: measured sizes and max ratios, its threshold and EMM."""
    label: str
    sizes: list[int]
    ratios: list[float]
    threshold: float
    emm: int | None


def plot_emm_curves(curves: list[EMMCurve], out: str | Path, title: str | None = None) -> Path:
    """Max memorization ratio (%) vs |D| (log x), one curve per sweep, threshold lines, EMM starred."""
    from matplotlib.ticker import NullLocator

    fig, ax = new_axes((6.4, 4.2))
    for c in curves:
        label = f"{c.label} (EMM {c.emm if c.emm is not None else '?'})"
        (line,) = ax.plot(c.sizes, [100 * r for r in c.ratios], marker="o", label=label)
        if c.emm is not None and c.emm in c.sizes:
            ax.plot([c.emm], [100 * c.ratios[c.sizes.index(c.emm)]], marker="*", markersize=16,
                    color=line.get_color(), zorder=3)
    for t in sorted({c.threshold for c in curves}):
        ax.axhline(100 * t, linestyle="--", color="grey", linewidth=1, label=f"threshold {100 * t:g} %")
    ticks = sorted({n for c in curves for n in c.sizes})
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())  # log-2 minor ticks would get labels of their own
    ax.set_ylim(-3, 103)
    ax.set_xlabel("|D| (training images)")
    ax.set_ylabel("max memorization ratio over snapshots (%)")
    ax.set_title(title or "Effective model memorization")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)
