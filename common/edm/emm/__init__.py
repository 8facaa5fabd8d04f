"""The EMM room: Effective Model Memorization (Gu et al. 2023) and the sweep that finds it.

- ``search``: the definition and its bisection on a grid of training-set sizes |D| (pure).
- ``sweep``: the orchestration of a sweep's stages (dataset, train, mem).
- ``state``: a sweep folder's files and what they say.
- ``launch``: running the stage jobs, locally or through submitit (Slurm).
- ``plot``: the EMM curve of one or several sweeps.
"""
