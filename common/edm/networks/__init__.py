"""The networks room: every denoiser the unconditional wing trains, loads or compares with.

- ``build``: the training architectures (``--arch``) and their widths, EDM's own families built here.
- ``unet2d``: EDM denoisers on diffusers' ``UNet2DModel`` (Karras et al. 2022 preconditioning, DiffMemorize's
  skip masks).
- ``edm_unets``: EDM's backbones ``SongUNet`` (DDPM++ / NCSN++, Song et al. 2021) and ``DhariwalUNet`` (ADM,
  Dhariwal & Nichol 2021).
- ``edm_preconditioners``: EDM's VP, VE, iDDPM and EDM preconditioned denoisers around them.
- ``optimal``: the optimal (empirical) denoiser of a finite training set (Zhang et al., ICML 2024).
- ``snapshot``: a training run's network snapshots, each loadable on its own.
- ``edm_pickle``: NVlabs/EDM network pickles read without running the code they carry.
"""
