"""Effective Model Memorization (EMM, Gu et al. 2023) and its bisection on a grid of training-set sizes |D|.

Gu et al. define EMM as the largest |D| at which the maximum memorization ratio over a run's training snapshots
is still >= a threshold (90 % in the paper), all else fixed, and find it by hand. The ratio falls with |D|, so on
an increasing grid of sizes EMM lies between adjacent sizes a < b with ratio(a) >= threshold > ratio(b); the
functions here pick which sizes to measure next so that as few as possible are measured (``plan_round``), and
turn the measurements so far into an answer with the line a sweep ends on (``estimate``). When even the smallest
size is below the threshold, that size's own trajectory over its snapshots (``ratio_trend``) tells an under-trained
run — memorizing nothing yet, or still rising at its last snapshot — from a grid that starts too high.

Everything here is pure: a measurement is a ``{size: max ratio}`` dict, with None for a size whose run failed
(it never counts as a result). Running the runs is ``common.edm.emm.sweep``'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

EXIT_BRACKETED, EXIT_FAILED, EXIT_NOT_BRACKETED = 0, 1, 3  # detect/emm.py's exit codes by outcome


def effective_model_memorization(results: dict[int, float | None], threshold: float) -> int | None:
    """EMM (Gu et al. 2023): the largest measured |D| whose max ratio is >= threshold; None if none is."""
    return max((n for n, r in results.items() if r is not None and r >= threshold), default=None)


@dataclass
class Plan:
    """The sizes to measure next, and the needed sizes that cannot be measured because they failed."""
    next: list[int]
    blocked: list[int]


@dataclass
class Estimate:
    """The search's answer: EMM (Gu et al. 2023; largest measured size >= threshold), its bracket, one line."""
    outcome: str  # bracketed | below_grid | above_grid | blocked | searching
    emm: int | None
    bracket: tuple[int | None, int | None]
    message: str
    warnings: list[str]

    @property
    def exit_code(self) -> int:
        """0 bracketed, 3 when the grid must be extended, 1 when a needed size failed (or is unfinished)."""
        if self.outcome == "bracketed":
            return EXIT_BRACKETED
        return EXIT_NOT_BRACKETED if self.outcome in ("below_grid", "above_grid") else EXIT_FAILED


def bracket_indices(sizes: list[int], results: dict[int, float | None], threshold: float) -> tuple[int, int]:
    """(lo, hi) on the grid: lo = index of EMM (Gu et al. 2023; -1 if none), hi = the next measured index."""
    measured = [i for i, n in enumerate(sizes) if results.get(n) is not None]
    emm = effective_model_memorization({n: results.get(n) for n in sizes}, threshold)
    lo = sizes.index(emm) if emm is not None else -1
    hi = min((i for i in measured if i > lo), default=len(sizes))
    return lo, hi


def spread(candidates: list, k: int) -> list:
    """k of the candidates evenly inside them (the middle one for k = 1: bisection for Gu et al. 2023's EMM)."""
    m, k = len(candidates), min(k, len(candidates))
    return [candidates[(j * (m + 1)) // (k + 1) - 1] for j in range(1, k + 1)]


def plan_round(sizes: list[int], results: dict[int, float | None], threshold: float, k: int = 1) -> Plan:
    """The next round of the EMM bisection (Gu et al. 2023): k sizes spread over the open bracket; failed ones block."""
    lo, hi = bracket_indices(sizes, results, threshold)
    picks = spread(sizes[lo + 1:hi], k)
    blocked = [n for n in picks if n in results]  # in results but no ratio: failed
    return Plan(next=[n for n in picks if n not in results], blocked=blocked)


def order_warnings(sizes: list[int], results: dict[int, float | None], threshold: float) -> list[str]:
    """One warning per size below the threshold yet smaller than one above it (Gu et al. 2023 assume a fall)."""
    done = [(n, results[n]) for n in sizes if results.get(n) is not None]
    out = []
    for n, r in done:
        above = [(m, q) for m, q in done if m > n and q >= threshold]
        if r < threshold and above:
            larger = ", ".join(f"|D|={m} ({q:.1%})" for m, q in above)
            out.append(f"non-monotone: |D|={n} is below the threshold ({r:.1%}) but larger {larger} "
                       f"are not; EMM takes the largest size at or above it")
    return out


RISE_MIN = 0.01  # one percentage point: a last-snapshot rise at least this large counts as "still rising"
TRAIN_LONGER = 'train longer (--train_args "--duration ...", in a new sweep folder)'


def ratio_trend(ratios: Sequence[float], rise_min: float = RISE_MIN) -> str | None:
    """How one run's memorization ratio moved over its snapshots (ratios in training order), for the line a sweep
    ends on when no size reaches the threshold. A deliberately simple rule on the trajectory alone:

    * ``"never"``: at least one snapshot and every ratio is 0 — no sample was memorized at any point of the run.
      At the smallest size of the grid, where Gu et al.'s ratio is highest, that is the mark of a run too short to
      memorize anything (under-trained), not of a grid that starts too high;
    * ``"rising"``: at least two snapshots, the last one is the run's maximum and it is at least ``rise_min`` above
      the snapshot before — the maximum came at the very end of training while still climbing, so a longer run
      would likely raise it;
    * None otherwise (a single snapshot, or a ratio that levelled off or fell: the maximum is the run's own).
    """
    ratios = [float(r) for r in ratios]
    if ratios and all(r == 0 for r in ratios):
        return "never"
    if len(ratios) >= 2 and ratios[-1] >= max(ratios) and ratios[-1] - ratios[-2] >= rise_min:
        return "rising"
    return None


def below_grid_message(size: int, ratio: float, threshold_text: str, measured: str,
                       trajectory: Sequence[float] = ()) -> str:
    """The line of a grid whose smallest size is already below the threshold: extend --sizes downwards, unless that
    size's own run says it was under-trained (``ratio_trend``), where training longer comes first."""
    head = "the grid does not bracket EMM:"
    trend = ratio_trend(trajectory)
    if trend == "rising":
        return (f"{head} the smallest size |D|={size} is below {threshold_text} ({ratio:.1%}), but its ratio was still "
                f"rising at its last snapshot (from {trajectory[-2]:.1%} to {trajectory[-1]:.1%}): {TRAIN_LONGER} "
                f"before extending --sizes downwards ({measured})")
    if trend == "never":
        return (f"{head} no sample of the smallest size |D|={size} was memorized at any of its {len(trajectory)} "
                f"snapshots (0.0%), so its run looks under-trained: {TRAIN_LONGER} before extending --sizes "
                f"downwards (e.g. {max(size // 2, 1)}) ({measured})")
    return (f"{head} the smallest size |D|={size} is already below {threshold_text} ({ratio:.1%}); extend --sizes "
            f"downwards (e.g. {max(size // 2, 1)}) ({measured})")


def estimate(sizes: list[int], results: dict[int, float | None], threshold: float, k: int = 1,
             failures: dict[int, str] | None = None,
             trajectories: dict[int, Sequence[float]] | None = None) -> Estimate:
    """EMM (Gu et al. 2023) from the measurements so far, its bracket on the grid and the line a sweep ends on.

    trajectories: per measured size, its ratio at each snapshot in training order (``ratio_trend`` reads the
    smallest size's when no size reaches the threshold)."""
    lo, hi = bracket_indices(sizes, results, threshold)
    plan = plan_round(sizes, results, threshold, k)
    a = sizes[lo] if lo >= 0 else None
    b = sizes[hi] if hi < len(sizes) else None
    warnings = order_warnings(sizes, results, threshold)
    count = sum(r is not None for n, r in results.items() if n in sizes)
    measured = f"{count} of {len(sizes)} sizes measured"
    if plan.next:
        return Estimate("searching", a, (a, b), f"searching: next |D| {', '.join(map(str, plan.next))}", warnings)
    if plan.blocked:
        why = "; ".join((failures or {}).get(n, f"|D|={n} failed") for n in plan.blocked)
        return Estimate("blocked", a, (a, b), f"stopped: the bisection needs |D|={', '.join(map(str, plan.blocked))}"
                        f", which failed: {why}; fix it and rerun with --retry_failed", warnings)
    t = f"{threshold:.0%}"
    if a is None:
        return Estimate("below_grid", None, (None, b),
                        below_grid_message(b, results[b], t, measured, (trajectories or {}).get(b, ())), warnings)
    if b is None:
        return Estimate("above_grid", a, (a, None), f"the grid does not bracket EMM: the largest size |D|={a} is "
                        f"still at or above {t} ({results[a]:.1%}), so EMM >= {a}; extend --sizes upwards "
                        f"(e.g. {2 * a}) ({measured})", warnings)
    return Estimate("bracketed", a, (a, b), f"EMM = {a}: max ratio {results[a]:.1%} >= {t} at |D|={a}, "
                    f"{results[b]:.1%} < {t} at |D|={b} ({measured})", warnings)


def bisect_sizes(sizes: list[int], threshold: float, measure: Callable[[list[int]], dict[int, float | None]],
                 k: int = 1, results: dict[int, float | None] | None = None) -> tuple[Estimate, dict]:
    """The EMM bisection (Gu et al. 2023): measure(sizes) -> {size: max ratio or None} until nothing is left."""
    results = dict(results or {})
    while True:
        plan = plan_round(sizes, results, threshold, k)
        if not plan.next:
            return estimate(sizes, results, threshold, k), results
        got = measure(plan.next)
        results.update({n: got.get(n) for n in plan.next})  # a size measure() left out counts as failed
