"""Running a screen's workers on Slurm: one submitit array of --shards tasks per stage (screen, then confirm).

Each task calls the worker function (:func:`common.t2i.screen.run.run_worker`) with its shard; it writes only its
own part files, so tasks never contend, and a task that reaches its time limit is requeued (submitit's
Checkpointable) and resumes where its part file ends.
submitit's local and debug executors run the same arrays without Slurm.
"""

from __future__ import annotations

import submitit

from diffmem.common.errors import DiffmemError
from diffmem.common.t2i.screen.config import ScreenConfig
from diffmem.common.t2i.screen.files import ScreenFiles


class ShardJobError(DiffmemError):
    """A Slurm task failed; str() names it and its log."""


class ShardTask(submitit.helpers.Checkpointable):
    """One array task: a stage's share (its shard) of the run; requeued on timeout or preemption."""

    def __init__(self, worker):
        self.worker = worker  # common.t2i.screen.run.run_worker (a module-level function: it pickles by name)

    def __call__(self, cfg: ScreenConfig, stage: str, shard: int, shards: int) -> int:
        return self.worker(cfg, stage, shard, shards)


def slurm_parameters(cfg: ScreenConfig, stage: str) -> dict:
    """The executor's parameters: one task per node, its GPUs, the partition, the array's parallelism."""
    params = {"name": f"diffmem-screen-{stage}", "timeout_min": cfg.timeout_min, "nodes": 1, "tasks_per_node": 1}
    if cfg.submitit_cluster == "slurm":
        params.update(gpus_per_node=cfg.slurm_gpus_per_task, slurm_partition=cfg.slurm_partition)
        if cfg.slurm_parallelism is not None:
            params["slurm_array_parallelism"] = cfg.slurm_parallelism
    return params


def executor(cfg: ScreenConfig, files: ScreenFiles, stage: str):
    ex = submitit.AutoExecutor(folder=files.submitit, cluster=cfg.submitit_cluster)
    ex.update_parameters(**slurm_parameters(cfg, stage))
    return ex


def run_array(cfg: ScreenConfig, files: ScreenFiles, stage: str, worker, say=print) -> int:
    """Submit the stage's array of --shards tasks and wait for all; returns the captions done now."""
    ex = executor(cfg, files, stage)
    shards = list(range(cfg.shards))
    jobs = ex.map_array(ShardTask(worker), [cfg] * cfg.shards, [stage] * cfg.shards, shards, [cfg.shards] * cfg.shards)
    say(f"screen: submitted {stage} array {jobs[0].job_id.split('_')[0]} ({cfg.shards} tasks, "
        f"{cfg.submitit_cluster}); logs in {files.submitit}")
    done = 0
    for job in jobs:
        try:
            done += job.result()
        except Exception as exc:  # submitit wraps the task's exception (FailedJobError, UncompletedJobError)
            first = next((ln for ln in reversed(str(exc).strip().splitlines()) if ln.strip()), type(exc).__name__)
            raise ShardJobError(f"{stage} task {job.job_id} failed ({first.strip()[:200]}); its log: "
                                f"{job.paths.stderr}; the same command resumes") from None
    return done
