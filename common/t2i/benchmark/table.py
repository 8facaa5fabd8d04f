"""A protocol's results as the paper lays them out: per detector setting, AUC and TPR at the protocol's FPRs by its
TPR rule, ours beside the paper's published numbers.

Torch-free (numpy and scikit-learn through common.metrics).
"""

from __future__ import annotations

from diffmem.common.metrics import detection_metrics, fpr_key
from diffmem.common.t2i.benchmark.protocols import Protocol, ProtocolRun


def run_metrics(protocol: Protocol, positive: list[float], negative: list[float]) -> dict:
    """AUC, TPR at the protocol's FPR targets by its rule, and the class sizes of one run's scores."""
    scores = list(positive) + list(negative)
    labels = [1] * len(positive) + [0] * len(negative)
    return detection_metrics(scores, labels, protocol.fpr_targets, protocol.tpr_rule)


def run_record(protocol: Protocol, run: ProtocolRun, metrics: dict, settings: dict) -> dict:
    """What DIR/{run}.json holds: the protocol, the run's settings, our metrics and the paper's numbers."""
    return {"protocol": protocol.name, "paper": protocol.paper, "run": run.key, "detector": run.detector,
            "num_images_per_prompt": run.num_images_per_prompt, "target_steps": run.target_steps,
            "options": dict(run.options), "tpr_rule": protocol.tpr_rule,
            "fpr_targets": list(protocol.fpr_targets), "ours": metrics, "settings": settings,
            "published": [{"model": p.model, "auc": p.auc, f"tpr_at_{fpr_key(protocol.fpr_targets[0])}_fpr": p.tpr,
                           "source": p.source} for p in run.published]}


def format_table(protocol: Protocol, records: list[dict]) -> str:
    """The paper's layout: one line per run (ours), each followed by the paper's published lines for it."""
    fprs = [fpr_key(t) for t in protocol.fpr_targets]
    head = ["run", "detector", "G", "steps", "n+/n-", "AUC", *(f"TPR@{k}" for k in fprs), "source"]
    lines = []
    for rec in records:
        ours = rec["ours"]
        lines.append([rec["run"], rec["detector"], str(rec["num_images_per_prompt"]), rec["target_steps"],
                      f"{ours['n_pos']}/{ours['n_neg']}", f"{ours['auc']:.3f}",
                      *(f"{ours['tpr_at_fpr'][k]:.3f}" for k in fprs), "ours"])
        first = f"tpr_at_{fprs[0]}_fpr"
        for pub in rec["published"]:
            lines.append(["", "", "", "", pub["model"], f"{pub['auc']:.3f}", f"{pub[first]:.3f}",
                          *("–" for _ in fprs[1:]), pub["source"]])
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head) - 1)]
    out = [f"{protocol.name}: {protocol.paper}",
           f"TPR rule {protocol.tpr_rule}; published rows list the paper's model"]
    for row in [head, *lines]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(out)
