"""The unconditional (EDM) wing: Karras et al. 2022's preconditioning, schedule and sampler, EDM's and diffusers'
networks with DiffMemorize's skip masks, EDM dataset zips, and what Gu et al. 2023 and Zhang et al. (ICML 2024)
measure on the trained models.

- ``precond``: Karras et al.'s Table 1 (c_skip, c_out, c_in, c_noise, the loss weight) as pure functions.
- ``schedule``: EDM's training schedule (LR ramp, EMA half-life, snapshots). ``sampler``: Algorithm 2 and the
  seed rule. ``images``: every image file read and written (PNG folders, npz, grids). ``train``: the training run.
- ``networks/``: the denoisers and their one builder. ``dataset/``: EDM zips and MoLRG. ``measure/``: nearest
  neighbours, the memorization ratio, reproducibility scores, the Jacobian. ``emm/``: Effective Model
  Memorization and its sweep. Each room's ``__init__`` names its modules.

It imports only from ``common`` itself (training, seeding, results, errors, settings), never from ``common.t2i``;
what both wings need lives in ``common``.
"""
