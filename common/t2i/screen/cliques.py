"""Confirmation without ground truth: a caption is memorized when its generations form a cluster of near-duplicates.

Carlini et al. (2023) call a caption extracted when, among its generations, a clique of near-duplicates forms (every
pair closer than a threshold). Here the similarity is SSCD's cosine, the near-duplicate threshold is a quantile of
the pairwise similarities among the generations of known non-memorized captions (each caption's own generations:
how alike a caption's images are when nothing is copied), and the cluster is the largest clique of the graph whose
edges join generations above it (networkx's exact maximum clique: a caption has tens of generations).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch


def pairwise_upper(sim: torch.Tensor) -> list[float]:
    """The entries above the diagonal of a square similarity matrix, row by row: each pair once."""
    n = sim.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return sim[i, j].double().tolist()


def square_from_upper(upper, n: int) -> np.ndarray:
    """The symmetric [n, n] matrix (diagonal 1) of :func:`pairwise_upper`'s list."""
    m = np.ones((n, n), dtype=np.float64)
    i, j = np.triu_indices(n, k=1)
    m[i, j] = m[j, i] = np.asarray(upper, dtype=np.float64)
    return m


def largest_clique(sim: np.ndarray, threshold: float) -> list[int]:
    """The generations (indices) of a largest set whose every pair has similarity > threshold (ties: networkx's)."""
    n = sim.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    i, j = np.triu_indices(n, k=1)
    keep = sim[i, j] > threshold
    graph.add_edges_from(zip(i[keep].tolist(), j[keep].tolist()))
    clique, _ = nx.max_weight_clique(graph, weight=None)
    return sorted(clique)


def near_duplicate_threshold(calibration_pairs, quantile: float) -> float:
    """The quantile of the calibration captions' within-caption pairwise similarities (linear interpolation)."""
    pairs = np.asarray(calibration_pairs, dtype=np.float64)
    if pairs.size == 0:
        raise ValueError("the near-duplicate threshold needs pairwise similarities of at least one caption")
    return float(np.quantile(pairs, quantile))


def median_pairwise(upper) -> float | None:
    """The median of a caption's pairwise similarities (None with fewer than two generations)."""
    return float(np.median(np.asarray(upper, dtype=np.float64))) if len(upper) else None
