"""The training room: the one Accelerate loop both wings train with.

- ``config``: the loop's settings (``TrainConfig``) and the choices they take; torch-free.
- ``checkpoints``: a run folder's files (torch-free names the EMM sweep reads), finding the checkpoint to resume,
  binding a run's settings, and a checkpoint's files read and written without running code.
- ``builders``: the Accelerator, optimizer, LR schedule and EMA the loop is built from.
- ``loop``: the loop itself (``Trainer``): data order, micro-steps, logging, checkpoints, snapshots, the export.
- ``loss``: per-sample loss math: Min-SNR weights (Hang et al. 2023) and Wen et al.'s thresholded loss.
"""
