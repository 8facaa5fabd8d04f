"""Screening a training-caption set at scale (``detect/screen.py``): which captions does the model regurgitate?

- ``captions``: reading parquet/jsonl/csv/txt/🤗 caption sets streamed, normalising, the caption seed, deduplicating.
- ``config``: the run's settings (ScreenConfig) and which of them bind a resumed run.
- ``files``: the run folder's files.
- ``prepare``: the main process's first stage: bind the settings, write each set's unique captions.
- ``score``: a worker's share of the first-step detector scores.
- ``threshold``: the score threshold at a false-positive rate on calibration captions.
- ``merge``: scores joined to captions, ranked (screen.jsonl, screen.parquet).
- ``cliques``: near-duplicate cliques of a caption's generations (Carlini et al.'s confirmation on SSCD).
- ``confirm``: full generations of the top captions, their pairwise SSCD and SSCD to ground truth; verdicts.
- ``launch``: the Slurm arrays (submitit).
- ``report``: the self-contained report.html.
- ``run``: the stages in order, under accelerate, locally or on Slurm.
"""
