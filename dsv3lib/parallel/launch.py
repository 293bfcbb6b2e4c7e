"""Starting N processes, and ending them all when one fails (chapter 5).

Two ways in, one process group each:

- :func:`launch` for notebooks and tests: runs ``fn(rank, world_size, *args)`` in ``nprocs`` spawned processes
  (gloo on CPU, NCCL when every rank has a GPU) and returns what rank 0 returned;
- :func:`init_distributed` for scripts started by ``torchrun``, whose elastic agent already ends the job.

A distributed job must not hang when one rank dies: its peers sit in a collective that never completes.
So each rank records its step (:func:`heartbeat`); the first failure is written once, as one line
("rank 2 failed during step 3: ValueError: boom"); the parent watches every exit code, SIGTERMs the survivors
as soon as one rank fails (each prints ``rank R: stopping: <that line>`` and exits), SIGKILLs any still there
after a grace period, and raises :class:`JobFailed` with the line.

A rank that *stalls* (stuck, or stopped, without exiting) is harder: nothing exits. Process groups always get a
timeout (:data:`DEFAULT_TIMEOUT` seconds unless told otherwise), so its peers' collectives fail; each peer then
leaves a note ("I timed out"), waits a moment for the others' notes, and the ranks that left none are the ones
that stopped answering: the record names them ("rank 1 stopped answering during step 3: ranks 0, 2 timed out
after 30 s waiting for it"). Notes and heartbeats live in files under :func:`launch` and in the process group's
own key-value store under torchrun.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DEFAULT_TIMEOUT", "JobFailed", "device", "heartbeat", "init_distributed", "launch", "pick_backend"]

DEFAULT_TIMEOUT = 45.0  # seconds a collective may wait: a stalled rank then ends the job in under a minute

STATUS_ENV = "DSV3_STATUS_DIR"  # set by launch() in its children: where heartbeats and the failure record go
_RECORD = "failure"  # the one-line failure record, created once (O_EXCL): first writer wins
_GRACE = 5.0  # seconds survivors get to exit after SIGTERM before SIGKILL
_RECORD_WAIT = 10.0  # seconds a rank whose collective failed waits for the record naming the peer that caused it
_NOTE_WAIT = 3.0  # seconds a rank whose collective timed out waits for its peers' notes before naming suspects
_me = {"rank": None, "step": None, "world": None, "timeout": None}  # this process, its last heartbeat, its job
_stopping = threading.Lock()  # one goodbye per process, whichever path (error, SIGTERM) gets there first


class JobFailed(RuntimeError):
    """A rank of a :func:`launch` job failed; the message names the rank and its step. ``exitcodes`` (per rank;
    negative: killed by that signal) and ``pids`` describe the ended processes; ``traceback`` is the failed rank's
    (also printed to the children's stderr, which a notebook does not show), or "" when it was killed."""

    def __init__(self, message: str, exitcodes: list | None = None, pids: list | None = None, traceback: str = ""):
        super().__init__(message)
        self.exitcodes, self.pids, self.traceback = exitcodes or [], pids or [], traceback


def job_timeout() -> float:
    """The timeout this process's job was started with (:data:`DEFAULT_TIMEOUT` outside one)."""
    return _me["timeout"] or DEFAULT_TIMEOUT


def pick_backend(nprocs_on_this_host: int) -> str:
    """'nccl' when CUDA is available and there are at least that many GPUs, else 'gloo'."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs_on_this_host:
        return "nccl"
    return "gloo"


def device() -> torch.device:
    """This process's device once the process group is up: cuda:<local rank> under nccl, else cpu."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def heartbeat(step: int) -> None:
    """Record that this rank is starting ``step``, so a failure report can say which step. Kept in memory, and
    under :func:`launch` also in a tiny per-rank file the parent reads if the rank is killed."""
    _me["step"] = step
    if _me["rank"] is not None:
        _put(f"step.{_me['rank']}", str(step))


# ------------------------------------------------------------------ notes between ranks (files or the c10d store)
def _store():
    """The default process group's key-value store under torchrun; None under launch() (files) or outside a job."""
    if os.environ.get(STATUS_ENV) is not None or not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def _put(key: str, value: str) -> None:
    folder = os.environ.get(STATUS_ENV)
    if folder is not None:
        path = os.path.join(folder, key)
        with open(path + ".tmp", "w") as f:
            f.write(value)
        os.replace(path + ".tmp", path)  # atomic: a reader never sees half a value
    elif (store := _store()) is not None:
        try:
            store.set("dsv3/" + key, value)
        except Exception:  # the store's host may be the one that is gone; notes are best-effort
            pass


def _get(key: str) -> str | None:
    folder = os.environ.get(STATUS_ENV)
    if folder is not None:
        return _read(os.path.join(folder, key)) or None
    store = _store()
    try:
        if store is not None and store.check(["dsv3/" + key]):
            return store.get("dsv3/" + key).decode()
    except Exception:
        pass
    return None


def _timed_out(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def _stalled_peers() -> str | None:
    """After this rank's collective timed out: leave a note, wait for the peers' notes, and describe the ranks
    that left none (they stopped answering), e.g. "rank 1 stopped answering during step 3: ranks 0, 2 timed
    out after 30 s waiting for it". None when every peer timed out too, or outside a job."""
    rank, world = _me["rank"], _me["world"]
    if rank is None or not world:
        return None
    _put(f"timedout.{rank}", "1")
    end = time.monotonic() + _NOTE_WAIT
    while True:
        waiting = [r for r in range(world) if _get(f"timedout.{r}")]
        if len(waiting) == world or time.monotonic() >= end:
            break
        time.sleep(0.1)
    silent = [r for r in range(world) if r not in waiting]
    if not silent:
        return None
    steps = sorted({_get(f"step.{r}") for r in silent} - {None}, key=int)
    when = _when(steps[0] if len(steps) == 1 else None) if steps else "before its first step"
    if len(steps) > 1:
        when = "during steps " + ", ".join(steps)
    who = f"rank {silent[0]}" if len(silent) == 1 else "ranks " + ", ".join(map(str, silent))
    them = "it" if len(silent) == 1 else "them"
    after = f" after {_me['timeout']:g} s" if _me["timeout"] else ""
    return (f"{who} stopped answering {when}: " + ("rank " if len(waiting) == 1 else "ranks ")
            + ", ".join(map(str, waiting)) + f" timed out{after} waiting for {them}")


# ------------------------------------------------------------------ the failure record
def _when(step) -> str:
    return "before its first step" if step is None else f"during step {step}"


def _write_record(folder: str, line: str) -> str:
    """Create the failure record with ``line`` unless one exists; return the record that stands."""
    try:
        fd = os.open(os.path.join(folder, _RECORD), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return _read_record(folder, wait=1.0) or line  # the other writer may still be writing
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    return line


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _read_record(folder: str | None, wait: float = 0.0) -> str | None:
    """The failure record, polling up to ``wait`` seconds for it to appear (the parent writes it a moment
    after it notices a killed rank)."""
    end = time.monotonic() + wait
    while folder is not None:
        if line := _read(os.path.join(folder, _RECORD)):
            return line
        if time.monotonic() >= end:
            break
        time.sleep(0.05)
    return None


def _is_comm_error(e: BaseException) -> bool:
    """A collective failed (a peer closed its connection, or the timeout passed): usually a consequence."""
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "connection", "nccl", "timed out"))


def _one_line(e: BaseException) -> str:
    """``Type: first line``, without gloo's ``[file.cc:553]`` prefix and cut at 160 characters."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])
    return f"{type(e).__name__}: {first[:160]}"


def _goodbye(message: str) -> None:
    """Print one line to the real stderr (torch's excepthook swaps sys.stderr for a buffer) and leave now, with
    no cleanup: the main thread may be blocked in a collective."""
    _stopping.acquire()
    sys.stdout.flush()
    sys.__stderr__.write(message + "\n")
    sys.__stderr__.flush()
    os._exit(1)


def _fail(e: BaseException) -> None:
    """A rank's exception: the first failure (record it) or a consequence of a peer's failure (say whose)."""
    rank, folder, comm = _me["rank"], os.environ.get(STATUS_ENV), _is_comm_error(e)
    record = _read_record(folder, wait=_RECORD_WAIT if comm and not _timed_out(e) else 0.0)
    line = f"rank {rank} failed {_when(_me['step'])}: {_one_line(e)}"
    if record is None and comm and _timed_out(e):  # nobody failed: a peer stopped answering; name it
        stalled = _stalled_peers()
        record = _read_record(folder)  # a peer may have written it meanwhile
        if record is None and stalled and folder:
            record = _write_record(folder, stalled)
    if record is None:
        record = _write_record(folder, line) if folder else line
    if record == line or not comm:
        traceback.print_exc(file=sys.__stderr__)
    if record == line and folder:
        with open(os.path.join(folder, "traceback"), "w") as f:
            f.write(traceback.format_exc())
    _goodbye(line if record == line else f"rank {rank}: stopping: {record} (here: {_one_line(e)})")


# ------------------------------------------------------------------ SIGTERM: the launcher ends this rank
def _stop_on_sigterm(wakeup: int) -> None:
    while os.read(wakeup, 1) != bytes([signal.SIGTERM]):  # other signals with Python handlers land here too
        pass
    record = _read_record(os.environ.get(STATUS_ENV)) or f"the launcher sent SIGTERM {_when(_me['step'])}"
    _goodbye(f"rank {_me['rank']}: stopping: {record}")


def _install_stop_handler() -> None:
    """Answer SIGTERM from a thread: the main thread may be blocked inside a collective (GIL released), where
    a Python signal handler would not run until the collective returns. The C-level handler that Python
    installs writes the signal number to the wakeup fd (from whichever thread the kernel picked), and the
    thread reading it says goodbye. Call from the main thread."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the thread does the work
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_stop_on_sigterm, args=(r,), name="dsv3-sigterm", daemon=True).start()


# ------------------------------------------------------------------ torchrun
def _excepthook(kind, e, tb) -> None:
    """Under torchrun: one line naming this rank and step after the traceback. A failed collective is usually
    a peer's failure: wait for the agent's SIGTERM first, so that its summary blames the rank that failed."""
    if not issubclass(kind, Exception):
        return sys.__excepthook__(kind, e, tb)
    if _is_comm_error(e):
        if _timed_out(e) and (stalled := _stalled_peers()):
            _goodbye(f"rank {_me['rank']}: stopping: {stalled}")  # the agent then ends the others
        time.sleep(_GRACE)  # the SIGTERM thread ends this process if the agent saw another rank fail
        _goodbye(f"rank {_me['rank']}: stopping {_when(_me['step'])}: {_one_line(e)} (a peer may have failed)")
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler
    try:
        raise e  # record_exception reads the traceback of the exception being handled
    except Exception:
        get_error_handler().record_exception(e)  # torchrun's summary shows it for this rank
    traceback.print_exception(kind, e, tb, file=sys.__stderr__)
    _goodbye(f"rank {_me['rank']} failed {_when(_me['step'])}: {_one_line(e)}")


def init_distributed(timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """For processes started by torchrun: read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, pick the backend,
    set the CUDA device under nccl, init the process group (timeout in seconds), stop cleanly on SIGTERM and
    print one line naming this rank and step on an uncaught exception. Returns (rank, world_size)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if key not in os.environ:
            raise RuntimeError(f"init_distributed: {key} is not set; start this under torchrun "
                               f"(torchrun --nproc-per-node N script.py) or use launch()")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = pick_backend(int(os.environ["LOCAL_WORLD_SIZE"]))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    _me.update(rank=rank, world=world, timeout=timeout)
    _install_stop_handler()
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    sys.excepthook = _excepthook  # after init_process_group, which wraps the hook it finds in its own
    return rank, world


# ------------------------------------------------------------------ launch
def _child(rank, world, fn, args, backend, folder, timeout, threads) -> None:
    """Runs in each spawned process: process group up, fn, rank 0's result saved, process group down."""
    os.environ[STATUS_ENV], os.environ["LOCAL_RANK"] = os.path.join(folder, "status"), str(rank)
    _me.update(rank=rank, world=world, timeout=timeout)
    _install_stop_handler()
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world, *args)
        if rank == 0:
            torch.save(out, os.path.join(folder, "result.pt"))
        dist.destroy_process_group()
    except Exception as e:
        _fail(e)


def _killed_record(status: str, rank: int, code: int) -> str:
    """The record the parent writes for a rank that died without writing one (killed, or exited non-zero)."""
    path = os.path.join(status, f"step.{rank}")
    step = _read(path) or None  # the rank's last heartbeat
    if code >= 0:
        return f"rank {rank} exited with code {code} {_when(step)}"
    name = next((s.name for s in signal.Signals if s == -code), f"signal {-code}")  # SIGKILL, SIGSEGV, ...
    return f"rank {rank} was killed by {name} {_when(step)}"


def launch(fn, nprocs: int, args: tuple = (), *, timeout: float = DEFAULT_TIMEOUT, threads: int = 1):
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` new processes with a process group already up (gloo on
    CPU, nccl when every rank has a GPU; ``timeout`` seconds for its collectives) and ``threads`` intra-op
    threads each; return what ``fn`` returned on rank 0. ``fn`` must be a module-level function (the spawned
    processes import it). If a rank raises or dies, every process is ended and :class:`JobFailed` is raised."""
    if nprocs < 1:
        raise ValueError(f"launch: nprocs must be >= 1, got {nprocs}")
    backend = pick_backend(nprocs)
    with tempfile.TemporaryDirectory(prefix="dsv3-launch-") as folder:
        status = os.path.join(folder, "status")
        os.mkdir(status)
        ctx = mp.start_processes(
            _child, args=(nprocs, fn, tuple(args), backend, folder, timeout, threads), nprocs=nprocs,
            join=False, start_method="spawn")
        procs = ctx.processes
        try:
            while True:
                codes = [p.exitcode for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    break
                if all(c == 0 for c in codes):
                    return torch.load(os.path.join(folder, "result.pt"), weights_only=False)
                multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.5)
            # a rank that raised wrote the record before exiting; else the first one killed (or lowest) gets it
            rank = min(failed, key=lambda r: (codes[r] >= 0, r))
            record = _read_record(status) or _write_record(status, _killed_record(status, rank, codes[rank]))
            for p in procs:
                if p.exitcode is None:
                    p.terminate()  # SIGTERM: the rank prints "rank R: stopping: <record>" and exits
            end = time.monotonic() + _GRACE
            for p in procs:
                p.join(max(0.0, end - time.monotonic()))
                if p.exitcode is None:
                    p.kill()  # blocked where even the SIGTERM thread cannot run
                    p.join()
            tb = _read(os.path.join(status, "traceback"))
            raise JobFailed(record, [p.exitcode for p in procs], [p.pid for p in procs], tb)
        finally:  # also on KeyboardInterrupt in the parent: leave no process behind
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()
