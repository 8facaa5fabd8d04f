"""Off-screen matplotlib figures for the PNGs diffmem writes.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so writing a plot never switches the
global backend or leaks figures: the same functions work in scripts, headless CI and notebooks (where
``IPython.display`` can show the returned figure). A wing's own figures live in its rooms (the EMM curve in
``common.edm.emm.plot``).
"""

from __future__ import annotations


def new_axes(figsize: tuple[float, float]):
    """(figure, axes) of a standalone figure that needs no pyplot and no display."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()
