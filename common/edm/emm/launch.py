"""Running an EMM sweep's stage jobs: local subprocesses or submitit jobs, on their own GPUs and ports.

A size's job (:class:`SizeJob`) runs its unfinished stages in order as subprocesses and records the size's
status (``common.edm.emm.state``) as it goes; a job that was stopped resumes where it was on the next run.

- :class:`LocalLauncher` runs sizes in threads on this machine, at most ``parallel`` at once, each on a disjoint
  slice of the visible GPUs and, when it spans processes, its own rendezvous port. Each stage runs in a process
  group of its own so that Ctrl-C reaches the sweep alone and the sweep then ends each group (SIGTERM, SIGKILL
  after a grace period), accelerate's workers included.
- :class:`SubmititLauncher` submits one submitit job per size (Slurm, or submitit's local and debug executors);
  a Slurm job that is still running is re-attached to, not submitted twice; a timed-out or preempted job is
  requeued and resumes. Inside a job the stages stay in the job's process group, so cancelling the job ends them.

Training goes through ``accelerate launch`` when it spans processes (GPUs, nodes) or a config is given; the
measurement shards its seeds over node 0's GPUs on a port of its own.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit

from diffmem.common.edm.emm.state import JOBS_FILE, SUBMITIT_DIR, now, read_status, scan_size, size_paths, write_status
from diffmem.common.errors import ConfigError
from diffmem.common.results import append_results

REPO = Path(__file__).resolve().parents[3]  # common/edm/emm/launch.py: the repository (the diffmem package)
LAUNCHERS = ("local", "submitit")
CLUSTERS = ("slurm", "local", "debug")


@dataclass
class Stage:
    """One stage subprocess: the script and its arguments (no interpreter), its output and its log."""
    name: str
    argv: list[str]
    output: Path
    log: Path


@dataclass
class SizeJob:
    """Everything one size needs, picklable for submitit: its stages and how to launch them."""
    size: int
    outdir: Path
    stages: list[Stage]
    python: str
    cwd: str
    launcher: str  # local | submitit:<cluster>
    procs_per_node: int = 1  # training processes per node (GPUs, or 1 on the CPU)
    nodes: int = 1
    main_process_port: int | None = None
    accelerate_config: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class NodeInfo:
    """This process's place in a (possibly multi-node) job and the rendezvous of its training."""
    rank: int = 0
    num_nodes: int = 1
    main_host: str = "127.0.0.1"
    port: int | None = None


def port_for(job_id: str) -> int:
    """A rendezvous port every node of a job derives alike from the job id (29500..49499)."""
    return 29500 + zlib.crc32(job_id.encode()) % 20000


def job_node(job: SizeJob) -> NodeInfo:
    """Node rank, node count and main address: from submitit's view of the Slurm job when it spans nodes."""
    if job.nodes == 1:
        port = job.main_process_port
        if port is None and job.procs_per_node > 1 and (job_id := current_job_id()) is not None:
            port = port_for(job_id)  # two Slurm jobs may share a node: not both on accelerate's default port
        return NodeInfo(port=port)
    env = submitit.JobEnvironment()
    return NodeInfo(rank=env.node, num_nodes=env.num_nodes, main_host=env.hostnames[0],
                    port=job.main_process_port or port_for(str(env.job_id)))


def uses_accelerate(job: SizeJob, stage: Stage) -> bool:
    """Training goes through accelerate launch when it spans processes or a config is given; the measurement
    (node 0 only) when the node has several GPUs, to shard the seeds."""
    if stage.name == "train":
        return job.procs_per_node * job.nodes > 1 or job.accelerate_config is not None
    return stage.name == "mem" and job.procs_per_node > 1


def accelerate_flags(job: SizeJob, node: NodeInfo, stage: Stage) -> list[str]:
    """accelerate launch's flags: the config, and for several processes their count, machine rank and rendezvous."""
    if stage.name == "mem":  # one machine, its own port: the training's may still be in TIME_WAIT
        node = NodeInfo(port=node.port + 1 if node.port is not None else None)
    flags = ["--config_file", job.accelerate_config] if job.accelerate_config and stage.name == "train" else []
    total = job.procs_per_node * node.num_nodes
    if total > 1:
        flags += ["--multi_gpu", "--num_processes", str(total), "--num_machines", str(node.num_nodes)]
        if node.num_nodes > 1:
            flags += ["--machine_rank", str(node.rank), "--main_process_ip", node.main_host]
        if node.port is not None:
            flags += ["--main_process_port", str(node.port)]
    return flags


def stage_command(job: SizeJob, stage: Stage, node: NodeInfo) -> list[str]:
    """The full command line of a stage on this node."""
    if uses_accelerate(job, stage):
        return [job.python, "-m", "accelerate.commands.launch", *accelerate_flags(job, node, stage), *stage.argv]
    return [job.python, *stage.argv]


class StageInterrupted(Exception):
    """The sweep was stopped while this stage ran; the size resumes on the next run."""


# A stage runner: (argv, env, cwd, log, on_start(pid)) -> exit code. Tests inject fakes.
StageRunner = Callable[[list[str], dict, str, Path, Callable[[int], None]], int]


class StageProcesses:
    """Runs stage subprocesses (output appended to the stage log) and can stop those it started."""

    def __init__(self, new_session: bool = True):
        # A session of their own lets Ctrl-C reach the sweep alone; stop_all then ends each group cleanly.
        self.new_session = new_session
        self.stopping = False
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def __call__(self, argv: list[str], env: dict, cwd: str, log: Path, on_start: Callable[[int], None]) -> int:
        """Run one stage to its end; its exit code. StageInterrupted when stop_all ended it."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"# {now()} {shlex.join(argv)}\n")
            f.flush()
            with self._lock:
                if self.stopping:
                    raise StageInterrupted()
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                        start_new_session=self.new_session)
                self._procs[proc.pid] = proc
            on_start(proc.pid)
            rc = proc.wait()
            with self._lock:
                self._procs.pop(proc.pid, None)
        if self.stopping:
            raise StageInterrupted()
        return rc

    def stop_all(self, grace_s: float = 30.0) -> None:
        """Stop every running stage: SIGTERM to its process group, SIGKILL after grace_s."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs.values())
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)

    def _signal(self, proc: subprocess.Popen, sig: int) -> None:
        try:
            if self.new_session:
                os.killpg(proc.pid, sig)  # the stage's own group: accelerate's workers too
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return  # it has already exited: nothing to signal


def current_job_id() -> str | None:
    """The submitit job id when running inside a submitit job, else None."""
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return None


def log_stage(job: SizeJob, stage: str, command: list[str], log: Path, node: NodeInfo, **fields) -> None:
    """Append one row to SWEEP/jobs.jsonl."""
    append_results(job.outdir / JOBS_FILE, [{
        "time": now(), "size": job.size, "stage": stage, "command": shlex.join(command), "launcher": job.launcher,
        "node": node.rank, "log": str(log), **fields}])


def wait_for_output(path: Path, status: Path, poll_s: float = 5.0) -> bool:
    """Wait until path exists (True) or the size's status says failed (False): other nodes wait for node 0."""
    while not path.exists():
        if read_status(status).get("status") == "failed":
            return False
        time.sleep(poll_s)
    return True


def run_size_job(job: SizeJob, runner: StageRunner, owner: dict) -> dict:
    """Run the unfinished stages of one size in order; record the status; returns that status.

    Node 0 does everything; the other nodes of a multi-node job wait for its dataset, join the training
    and leave the measurement to it.
    """
    node = job_node(job)
    paths = size_paths(job.outdir, job.size)
    env = {**os.environ, **job.env}
    job_id = owner.get("job_id")
    status = {"status": "running", **owner}
    for stage in job.stages:
        if stage.output.exists():
            continue
        if node.rank > 0:
            if stage.name == "data" and not wait_for_output(stage.output, paths.status):
                return {"status": "failed", "stage": "data"}
            if stage.name != "train":
                continue
        argv = stage_command(job, stage, node)
        log = paths.log(stage.name, node.rank)
        status.update(stage=stage.name, log=str(log))
        if node.rank == 0:
            write_status(paths.status, **status)

        pids: list[int] = []

        def started(pid: int, stage=stage, argv=argv, log=log) -> None:
            pids.append(pid)
            if node.rank == 0:
                write_status(paths.status, **status, stage_pid=pid)
            log_stage(job, stage.name, argv, log, node, event="start", job_id=job_id or str(pid), pid=pid,
                      exit=None)

        t0 = time.monotonic()
        try:
            rc = runner(argv, env, job.cwd, log, started)
        except StageInterrupted:
            if node.rank == 0:
                write_status(paths.status, status="interrupted", stage=stage.name, log=str(log))
            pid = pids[0] if pids else None
            log_stage(job, stage.name, argv, log, node, event="end", job_id=job_id or (pid and str(pid)), pid=pid,
                      exit=None, interrupted=True)
            raise
        pid = pids[0] if pids else None
        log_stage(job, stage.name, argv, log, node, event="end", job_id=job_id or (pid and str(pid)), pid=pid,
                  exit=rc, elapsed_s=round(time.monotonic() - t0, 1))
        if node.rank > 0:
            return {"status": "done" if rc == 0 else "failed", "stage": stage.name, "exit": rc}
        if rc != 0 or not stage.output.exists():
            what = f"exited {rc}" if rc != 0 else f"exited 0 but wrote no {stage.output.name}"
            final = {**status, "status": "failed", "exit": rc,
                     "message": f"|D|={job.size}: {stage.name} {what}; see {log}"}
            write_status(paths.status, **final)
            return final
    final = {**status, "status": "done", "stage": None, "log": None}
    if node.rank == 0:
        write_status(paths.status, **final)
    return final


class SizeJobFunction(submitit.helpers.Checkpointable):
    """A size's submitit job; after a timeout or preemption submitit requeues it and the stages resume."""

    def __call__(self, job: SizeJob) -> dict:
        owner = {"launcher": job.launcher, "cluster": job.launcher.split(":")[-1], "job_id": current_job_id(),
                 "host": socket.gethostname(), "pid": os.getpid()}
        # Inside a job the stages stay in its process group, so cancelling the job ends them too.
        return run_size_job(job, StageProcesses(new_session=False), owner)


# ---------------------------------------------------------------------------------------------------- launchers

def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and not g.strip().startswith("-")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(gpus: list[str], per_job: int) -> list[list[str]]:
    """Disjoint groups of per_job GPUs (leftovers unused)."""
    return [gpus[i * per_job:(i + 1) * per_job] for i in range(len(gpus) // per_job)]


def pick_port(taken: set[int]) -> int:
    """A free TCP port on the loopback interface, with its successor (the measurement's), not yet handed out."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not {port, port + 1} & taken and port < 65535:
            taken.update((port, port + 1))
            return port


def slot_job(job: SizeJob, slot: list[str] | None, ports: set[int] | None) -> SizeJob:
    """The job bound to its GPUs (CUDA_VISIBLE_DEVICES) and, when it spans processes and ports are given, a port."""
    if slot is None:
        return replace(job, procs_per_node=1)
    port = pick_port(ports) if ports is not None and len(slot) > 1 else job.main_process_port
    return replace(job, procs_per_node=len(slot), env={**job.env, "CUDA_VISIBLE_DEVICES": ",".join(slot)},
                   main_process_port=port)


class LocalLauncher:
    """Runs sizes on this machine, at most `parallel` at once, each on its own GPUs (or the CPU)."""

    name = "local"
    can_attach = False

    def __init__(self, max_parallel: int, gpus_per_job: int, gpus: list[str] | None = None,
                 runner: StageRunner | None = None):
        gpus = visible_gpus() if gpus is None else gpus
        self.slots: list[list[str]] | None = gpu_slots(gpus, gpus_per_job) if gpus else None
        if gpus and not self.slots:
            raise ConfigError(f"--gpus_per_job {gpus_per_job}: only {len(gpus)} GPU(s) visible")
        if not gpus and gpus_per_job > 1:
            raise ConfigError(f"--gpus_per_job {gpus_per_job}: no GPU is visible (CPU runs use one process)")
        self.parallel = min(max_parallel, len(self.slots)) if self.slots else max_parallel
        self.processes = runner if runner is not None else StageProcesses()
        self.note = (f"local: {self.parallel} job(s) at once on {len(self.slots)} GPU slot(s) of {gpus_per_job}"
                     if self.slots else f"local: {self.parallel} job(s) at once on the CPU")

    def run(self, jobs: list[SizeJob], on_done: Callable[[int], None], attach: dict[int, str]) -> None:
        """Run the jobs in threads; call on_done(size) as each ends. Interrupted: stop the stages, re-raise."""
        owner = {"launcher": "local", "host": socket.gethostname(), "pid": os.getpid()}
        ports: set[int] = set()  # distinct rendezvous ports for the jobs running side by side
        with ThreadPoolExecutor(max_workers=max(len(jobs), 1)) as pool:
            futures = {}
            for i, job in enumerate(jobs):
                bound = slot_job(job, self.slots[i] if self.slots else None, ports)
                futures[pool.submit(run_size_job, bound, self.processes, owner)] = job.size
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        try:
                            fut.result()
                        except StageInterrupted:
                            continue
                        on_done(futures[fut])
            except BaseException:
                if isinstance(self.processes, StageProcesses):
                    self.processes.stop_all()
                raise


class SubmititLauncher:
    """One submitit job per size (Slurm, or submitit's local/debug executors); the same files as local runs."""

    name = "submitit"

    def __init__(self, outdir: Path, cluster: str, max_parallel: int, gpus_per_job: int, nodes_per_job: int,
                 timeout_min: int, slurm_partition: str | None = None, gpus: list[str] | None = None):
        self.folder = Path(outdir) / SUBMITIT_DIR
        self.cluster, self.gpus_per_job, self.nodes = cluster, gpus_per_job, nodes_per_job
        self.timeout_min, self.partition = timeout_min, slurm_partition
        self.can_attach = cluster == "slurm"
        # Slurm hands each job its GPUs; submitit's local executor would give every job the same ones.
        if cluster == "slurm":
            self.slots, self.parallel = [], max_parallel
        else:
            gpus = visible_gpus() if gpus is None else gpus
            self.slots = gpu_slots(gpus, gpus_per_job)
            if gpus and not self.slots:
                raise ConfigError(f"--gpus_per_job {gpus_per_job}: only {len(gpus)} GPU(s) visible")
            self.parallel = min(max_parallel, len(self.slots)) if self.slots else max_parallel
        where = {"slurm": f"Slurm partition {slurm_partition or '(default)'}", "local": "local processes",
                 "debug": "this process"}[cluster]
        per_job = (f"{gpus_per_job} GPU(s) × {nodes_per_job} node(s) each" if cluster == "slurm" or self.slots
                   else "on the CPU")
        self.note = f"submitit ({where}): up to {self.parallel} job(s) at once, {per_job}"

    def executor(self):
        """The AutoExecutor with the job's resources; the job processes import this checkout."""
        ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        setup = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        params = {"timeout_min": self.timeout_min, "nodes": self.nodes, "tasks_per_node": 1}
        if self.cluster == "slurm":
            params.update(gpus_per_node=self.gpus_per_job, slurm_partition=self.partition, slurm_setup=setup)
        elif self.cluster == "local":
            params.update(gpus_per_node=0, local_setup=setup)  # GPUs go per job through SizeJob.env
        ex.update_parameters(**params)
        return ex

    def run(self, jobs: list[SizeJob], on_done: Callable[[int], None], attach: dict[int, str]) -> None:
        """Submit the jobs (or re-attach to still-running Slurm jobs), wait for each; a crashed job is failed."""
        ex = self.executor()
        launcher = f"submitit:{self.cluster}"
        handles = []
        for i, job in enumerate(jobs):
            paths = size_paths(job.outdir, job.size)
            if job.size in attach:
                handles.append((job, submitit.SlurmJob(folder=self.folder, job_id=attach[job.size])))
                continue
            slot = self.slots[i] if self.slots else None
            bound = replace(slot_job(job, slot, ports=None), launcher=launcher)
            if self.cluster == "slurm":
                bound = replace(bound, procs_per_node=self.gpus_per_job)
            ex.update_parameters(name=f"emm-size-{job.size}")
            handle = ex.submit(SizeJobFunction(), bound)
            write_status(paths.status, status="running", stage="submitted", launcher=launcher,
                         cluster=self.cluster, job_id=str(handle.job_id), host=socket.gethostname(),
                         pid=os.getpid() if self.cluster == "debug" else int_or_none(handle.job_id),
                         log=str(handle.paths.stderr))
            append_results(job.outdir / JOBS_FILE, [{
                "time": now(), "size": job.size, "stage": "job", "event": "submit",
                "command": f"SizeJobFunction(size-{job.size}): {', '.join(s.name for s in job.stages)}",
                "launcher": launcher, "job_id": str(handle.job_id), "log": str(handle.paths.stdout), "exit": None}])
            handles.append((job, handle))
        for job, handle in handles:
            self._collect(job, handle)
            on_done(job.size)

    def _collect(self, job: SizeJob, handle) -> None:
        """Wait for one job; record a crash (not a stage failure, which the job records itself) as failed."""
        paths = size_paths(job.outdir, job.size)
        if self.cluster == "debug":
            # The debug executor runs the job in this process, inside results(): nothing is read from disk.
            try:
                handle.results()
                return
            except Exception as exc:  # whatever ended the job: the status must say so
                first = crash_line(exc)
        else:
            # Wait on the job's state and never unpickle its result file: a pickle in a sweep folder runs code in
            # whoever reads it (a sweep re-attached from a folder someone else wrote), and the job records its
            # outcome in the size's status file anyway. A crash is read from the job's error log, as text.
            handle.wait()
            if scan_size(job.outdir, job.size).status in ("done", "failed"):
                return
            first = crash_line(RuntimeError(handle.stderr() or f"no error log ({handle.state})"))
        if scan_size(job.outdir, job.size).status not in ("done", "failed"):
            write_status(paths.status, status="failed", stage="job", log=str(handle.paths.stderr),
                         job_id=str(handle.job_id),
                         message=f"|D|={job.size}: submitit job {handle.job_id} crashed ({first}); "
                                 f"see {handle.paths.stderr}")


def crash_line(exc: Exception) -> str:
    """The exception line of the job's traceback inside submitit's error (or the error's type)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    errors = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
    return (errors[-1] if errors else type(exc).__name__)[:300]


def int_or_none(text) -> int | None:
    """An integer id, or None (submitit's local job id is the controller's pid)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None

