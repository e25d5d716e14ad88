"""Data-parallel training of one job in several processes on one machine (training.processes > 1).

torch.distributed DDP, over gloo on CPU (the cores shared among the processes) and NCCL on CUDA
(one process per GPU). The recipe's process is rank 0: it keeps the hooks (events, stop requests,
checkpoint uploads, the adapter) and so the job's lease, database session and trackers, and it
starts ranks 1..N-1 as fresh interpreters (worker.training.rank_process) that run the same recipe
on the same local files with PassiveHooks and write nothing. Rank 0 as the task's own process,
rather than a supervisor that spawns every rank, keeps the hooks where they already run: no
protocol to relay events, stop requests and checkpoints from a rank-0 child back to the lease
holder. The price is process-wide state (the default process group, accelerate's singletons,
environment variables that accelerate reads, torch's thread count) that rank 0 must put back when
the job ends, so the next job of the same worker process trains in one process as before:
RankGroup.close does that.

Rank 0 decides every stop (StopAndCheckpoint asks agree() at the points where it decides) and the
others follow, so all ranks leave the training loop at the same step; a rank that decided alone
would leave the others waiting in a collective. A rank that dies closes its sockets and the
others' next collective fails at once (gloo); a rank that hangs fails them after COLLECTIVE_TIMEOUT.
The children ask the kernel for SIGKILL when their parent dies (PR_SET_PDEATHSIG), so no rank
outlives the job's process.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
import torch.distributed as dist

from worker.training.hooks import StopReason
from worker.training.model import DeviceUnavailable

T = TypeVar("T")
log = logging.getLogger("tuneforge.worker")

# How long a collective waits for a rank that stopped answering. The longest wait between two
# collectives is rank 0 handing a checkpoint to hooks.on_checkpoint (an upload) while the others wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)
# How long the children have to start an interpreter, import torch and join (seconds).
STARTUP_SECONDS = 180.0
# How long rank 0 waits for the children to exit after a finished run before killing them (seconds).
EXIT_SECONDS = 60.0
# What rank 0 sets in its own environment for the job, for accelerate (PartialState reads them) and
# restores afterwards.
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "OMP_NUM_THREADS")


@dataclass(frozen=True)
class RankInputs:
    """What a rank ≥ 1 runs: the recipe's inputs (local paths it only reads) and where to join.

    work_dir is the rank's Trainer output folder, which it never creates: only rank 0 writes
    checkpoints (worker.training.trainer.RowTrainer gathers the ranks' RNG states to it). parent_pid: rank 0's process.
    """

    spec: dict[str, Any]
    base_model_path: str
    train_file: str
    validation_file: str | None
    work_dir: str
    resume_from: str | None
    init_adapter: str | None
    rank: int
    world_size: int
    port: int
    threads: int
    parent_pid: int


class RankFailed(RuntimeError):
    """A training rank other than 0 exited with an error; the message holds the end of its output."""


class PassiveHooks:
    """The hooks of ranks ≥ 1: they record nothing and never ask to stop, because rank 0 decides
    (see agree) and writes every event and checkpoint."""

    def on_event(self, type: str, message: str, data: dict[str, Any] | None) -> None:
        return None

    def should_stop(self) -> StopReason | None:
        return None

    def cancel_requested(self) -> bool:
        return False

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        return None


def active() -> bool:
    """Whether this process trains as one rank of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(value: T) -> T:
    """Rank 0's value, on every rank (a broadcast); the value itself outside distributed training."""
    if not active():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank is here (nothing outside distributed training)."""
    if active():
        dist.barrier()


def check_processes(device: str, processes: int) -> None:
    """Raise DeviceUnavailable when `processes` CUDA ranks are asked of fewer GPUs."""
    if device == "cuda" and processes > torch.cuda.device_count():
        raise DeviceUnavailable(
            f"The job asks for training.processes {processes}, one per GPU, and this worker has "
            f"{torch.cuda.device_count()} CUDA device(s). Ask for at most that many processes, or run it on a "
            "worker with more GPUs.")


class RankGroup:
    """The distributed side of one job in one process: the process group, and on rank 0 the children.

    start() (rank 0) and join() (a child) set the process up as its rank; close() tears it down and
    restores what it changed. Not reusable after close().
    """

    def __init__(self, rank: int, world_size: int, device: str, saved_env: dict[str, str | None],
                 saved_threads: int, children: list[tuple[subprocess.Popen[bytes], IO[bytes]]] | None = None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self._saved_env, self._saved_threads = saved_env, saved_threads
        self.children = children if children is not None else []

    @classmethod
    def start(cls, inputs: RankInputs, device: str) -> RankGroup:
        """As rank 0: start ranks 1..world_size-1 (inputs gives theirs: rank, port, threads and parent
        aside, and work_dir, rank 0's, under which each gets rank-<r>, never created), wait until all
        have joined and set up the process group. Raises RankFailed when a child exits or does
        not join within STARTUP_SECONDS; the children are then killed."""
        world = inputs.world_size
        threads = max(1, torch.get_num_threads() // world) if device == "cpu" else torch.get_num_threads()
        # Port 0: the store binds a free port itself, so no other program can take it in between.
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=COLLECTIVE_TIMEOUT)
        children: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        group = cls(0, world, device, _set_env(0, world, store.port, threads), torch.get_num_threads(), children)
        try:
            for rank in range(1, world):
                child_inputs = RankInputs(**{**asdict(inputs), "rank": rank, "port": store.port,
                                             "threads": threads, "parent_pid": os.getpid(),
                                             "work_dir": str(Path(inputs.work_dir) / f"rank-{rank}")})
                children.append(_spawn(child_inputs))
            group._wait_for_children(store)
            _init_process_group(store, 0, world, device, threads)
        except BaseException:
            group.close(finished=False)
            raise
        return group

    @classmethod
    def join(cls, inputs: RankInputs, device: str) -> RankGroup:
        """As a child rank: connect to rank 0's store and join the process group."""
        store = dist.TCPStore("127.0.0.1", inputs.port, inputs.world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=STARTUP_SECONDS))
        group = cls(inputs.rank, inputs.world_size, device, _set_env(inputs.rank, inputs.world_size, inputs.port,
                                                                     inputs.threads), torch.get_num_threads())
        store.set(f"tuneforge/joined/{inputs.rank}", "1")
        _init_process_group(store, inputs.rank, inputs.world_size, device, inputs.threads)
        return group

    def _wait_for_children(self, store: dist.TCPStore) -> None:
        keys = [f"tuneforge/joined/{rank}" for rank in range(1, self.world_size)]
        deadline = time.monotonic() + STARTUP_SECONDS
        while not store.check(keys):
            self.raise_if_failed()
            if time.monotonic() > deadline:
                raise RankFailed(f"the training ranks did not start within {STARTUP_SECONDS:.0f} s"
                                 f"{self._outputs()}")
            time.sleep(0.05)

    def raise_if_failed(self, cause: BaseException | None = None, wait_seconds: float = 0.0) -> None:
        """Raise RankFailed (from cause) when a child has exited with an error, waiting up to
        wait_seconds for one to exit: a collective that failed because a rank died may fail before
        that rank's exit is seen."""
        deadline = time.monotonic() + wait_seconds
        while True:
            for rank, (proc, output) in enumerate(self.children, start=1):
                code = proc.poll()
                if code not in (None, 0):
                    raise RankFailed(f"Training rank {rank} of {self.world_size} failed (exit status {code}):\n"
                                     f"{_tail(output)}") from cause
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _outputs(self) -> str:
        return "".join(f"\nrank {rank}:\n{_tail(output)}" for rank, (_, output) in enumerate(self.children, start=1))

    def close(self, *, finished: bool) -> None:
        """End the children (rank 0): waited for (EXIT_SECONDS) after a finished run, killed at once
        otherwise (they write nothing, so nothing is lost). Then leave the process group, reset
        accelerate's process-wide state and restore the environment and thread count, so the next
        job in this process trains in one process."""
        for proc, output in self.children:
            if not finished:
                proc.kill()
            try:
                proc.wait(timeout=EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("training rank (pid %d) did not exit within %.0f s of the end of training; killed it:\n%s",
                            proc.pid, EXIT_SECONDS, _tail(output))
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        _reset_accelerate()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        torch.set_num_threads(self._saved_threads)
        for _, output in self.children:
            output.close()
        self.children = []


def _set_env(rank: int, world: int, port: int, threads: int) -> dict[str, str | None]:
    """Set what accelerate's PartialState reads to detect this rank; return the previous values."""
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       # Set, so accelerate does not pick its own thread count (physical cores / ranks).
                       "OMP_NUM_THREADS": str(threads)})
    return saved


def _init_process_group(store: dist.TCPStore, rank: int, world: int, device: str, threads: int) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)  # the model loads onto the current device (model.load_base)
    else:
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state (PartialState, AcceleratorState, GradientState), which
    a distributed run filled in: TrainingArguments rebuilds it from the environment for the next job."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _spawn(inputs: RankInputs) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start one child rank; its output goes to an unnamed temporary file (read back on failure)."""
    output = tempfile.TemporaryFile()
    env = {**os.environ, "OMP_NUM_THREADS": str(inputs.threads)}
    # A session of its own: a terminal's Ctrl-C (SIGINT to the worker's process group) reaches rank 0,
    # which stops the job for every rank; the children die with it (PR_SET_PDEATHSIG) in any case.
    proc = subprocess.Popen([sys.executable, "-m", "worker.training.rank_process"],
                            stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(asdict(inputs)).encode())
    proc.stdin.close()
    return proc, output


def _tail(output: IO[bytes], limit: int = 1500) -> str:
    """The end of a child's output, where its traceback ends (a job's error message keeps 2,000 characters)."""
    output.flush()
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - limit))
    return output.read().decode(errors="replace")
