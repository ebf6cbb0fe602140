"""Data-parallel training on torch.distributed: one process per GPU, or per share of the CPU.

The model is wrapped in DistributedDataParallel, which averages the gradients of every
step across the processes (ranks) and keeps their weights identical. The data need no
sampler: every rank draws the same epoch (order, crops, flips; ``data.loader``) and takes
its contiguous share of each global batch, so the ranks together see exactly the batches
one process would. Batch norm normalizes each rank's share with that share's statistics
(as torchvision's reference scripts do without --sync-bn); the running statistics are
rank 0's, which DDP broadcasts before every forward.

Two ways in, one code path: ``densekit train --nproc N`` starts N copies of itself with
the environment torchrun sets (``launch``), and ``torchrun --nproc-per-node N -m densekit
train ...`` works as is. Backend: NCCL on CUDA, gloo on the CPU. Rank 0 writes the run
directory and prints; the other ranks only compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import checks
from .checks import ArgumentError
from .errors import UserError

log = logging.getLogger(__name__)

# A collective waits this long for a peer before failing. The launcher ends every rank as
# soon as one dies, so this only bounds a hang under an outside launcher.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands in a data-parallel job (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0     # the rank among the processes of this machine: picks cuda:N

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {raw!r}") from None


def from_env(environ: Mapping[str, str] | None = None) -> Dist:
    """The job this process belongs to, as torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK)."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={world}, "
                        f"LOCAL_RANK={local}")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; start the ranks with "
                            "`densekit train --nproc N` or torchrun")
    return Dist(rank=rank, world_size=world, local_rank=local)


def _joined() -> bool:
    """Whether this process is in a process group (torch builds without distributed never are)."""
    return dist.is_available() and dist.is_initialized()


def check_batch_split(batch_size: int, world_size: int) -> None:
    """The global batch must split evenly between the ranks: DDP averages the ranks' mean
    gradients, which is the batch's mean gradient only when their shares are equal."""
    if world_size > 1 and batch_size % world_size:
        raise ArgumentError(f"{{batch_size}} {batch_size} does not split evenly between {world_size} processes; "
                            f"pick a multiple of {world_size}")


def current() -> Dist:
    """The job of this process, once ``init`` has joined it (else a single process)."""
    if not _joined():
        return Dist()
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
                local_rank=_env_int(os.environ, "LOCAL_RANK", dist.get_rank()))


def init(job: Dist, device: torch.device) -> None:
    """Join the process group of ``job`` (a no-op for a single process or when joined)."""
    if not job.active or _joined():
        return
    if not dist.is_available():
        raise UserError(f"this torch build ({torch.__version__}) has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=job.rank, world_size=job.world_size,
                            timeout=TIMEOUT)


def shutdown() -> None:
    if _joined():
        dist.destroy_process_group()


@contextlib.contextmanager
def member(job: Dist, device: torch.device) -> Iterator[None]:
    """Inside the ``with``, this process is in ``job``'s process group; it leaves the group
    after, unless it had joined before (a caller's own group stays)."""
    joined = job.active and not current().active
    init(job, device)
    try:
        yield
    finally:
        if joined:
            shutdown()


def rank_device(device: torch.device, job: Dist) -> torch.device:
    """The device of this rank: ``device``, or with several ranks on CUDA, GPU LOCAL_RANK."""
    if job.active and device.type == "cuda":
        if job.local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {job.rank} needs GPU {job.local_rank}, but only {torch.cuda.device_count()} "
                            "CUDA device(s) exist; start fewer processes")
        return torch.device("cuda", job.local_rank)
    return device


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not _joined():
        return t
    buf = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (a copy on ``t``'s device); ``t`` itself when alone."""
    return _reduce(t, dist.ReduceOp.SUM)


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (e.g. a default run directory named by the clock)."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` when alone)."""
    if not _joined():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _joined():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when the job has several ranks, else itself."""
    if not current().active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # buffers are broadcast from rank 0 before each forward by default (the argument that says
    # so is deprecated in torch 2.14, and warns)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def share_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch norm's running statistics). DDP does so only at
    the start of each training forward, so after a step each rank holds its own update."""
    if not current().active:
        return
    with torch.no_grad():
        for b in model.buffers():
            buf = b.to(_collective_device())
            dist.broadcast(buf, src=0)
            if buf is not b:
                b.copy_(buf)


def check_in_sync(model: nn.Module) -> None:
    """Raise if the ranks' weights or buffers differ: DDP keeps them equal, so a difference is a bug
    (a rank that skipped a step, a gradient hook that did not fire) and must not be saved."""
    if not current().active:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().double().flatten() for t in (*model.parameters(), *model.buffers())])
        sums = torch.stack([flat.sum(), flat.abs().sum()]).cpu()
    low, high = _reduce(sums, dist.ReduceOp.MIN), _reduce(sums, dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"data-parallel ranks hold different weights (checksums {low.tolist()} to "
                           f"{high.tolist()}); the run directory was not updated")


# -- the launcher -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of rank ``rank`` of a job of ``nproc`` processes on this machine."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # N processes each using every core would oversubscribe the CPU N times over
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def launch(argv: Sequence[str], nproc: int, poll_seconds: float = 0.1) -> int:
    """Run ``python -m densekit *argv`` as ``nproc`` ranks on this machine; return the job's
    exit status: 0 when every rank succeeded, else that of the failure (``_wait``).

    Rank 0 keeps this process's stdout and stderr; the others print nothing unless they
    fail, and then their last line of stderr is logged. When one rank fails, the rest are
    ended soon after, rather than left waiting in a collective for a peer that is gone.
    """
    checks.positive_int("nproc", nproc)
    port = free_port()
    cmd = [sys.executable, "-m", "densekit", *argv]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="densekit-ranks-") as logs, _ending_on_signals():
        err_paths = [os.path.join(logs, f"rank{r}.stderr") for r in range(nproc)]
        try:
            for r in range(nproc):
                if r == 0:
                    procs.append(subprocess.Popen(cmd, env=rank_env(r, nproc, port), preexec_fn=_die_with_parent))
                else:
                    with open(err_paths[r], "wb") as err:
                        procs.append(subprocess.Popen(cmd, env=rank_env(r, nproc, port), preexec_fn=_die_with_parent,
                                                      stdout=subprocess.DEVNULL, stderr=err))
            status, culprit = _wait(procs, poll_seconds)
        except (KeyboardInterrupt, _Stopped):
            _end(procs)  # the ranks must not go on writing the run directory without us
            raise
        if culprit is not None and culprit > 0:  # rank 0's own message is already on stderr
            log.error("rank %d of %d failed (exit %d): %s", culprit, nproc, status,
                      _last_line(err_paths[culprit]) or "no message")
        return status


class _Stopped(Exception):
    """The launcher was asked to stop (SIGTERM, SIGHUP); carries the signal number."""


@contextlib.contextmanager
def _ending_on_signals():
    """Turn SIGTERM and SIGHUP into _Stopped while the ranks run (a `kill`, a scheduler or an
    IDE's stop button signals the launcher alone), so that they are ended too; then exit as
    the signal would have (128 + its number)."""
    def stop(signum, frame):
        raise _Stopped(signum)

    watched = [sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if sig]
    try:
        saved = {sig: signal.signal(sig, stop) for sig in watched}
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    except _Stopped as e:
        raise SystemExit(128 + e.args[0]) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """In a rank, before exec: on Linux, get SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the signal handlers above still end the ranks
        pass


def _wait(procs: list[subprocess.Popen], poll_seconds: float, settle: float = 3.0) -> tuple[int, int | None]:
    """Wait for every rank; returns (the job's exit status, the rank it comes from or None).

    When one rank fails, the rest get ``settle`` seconds to end by themselves (a user
    mistake stops every rank at the same point, and rank 0's message is the one to show),
    then they are ended. The status is rank 0's if it failed by itself, else the first
    failure's; a rank ended by a signal counts as 128 + the signal, as in a shell.
    """
    first, deadline = None, None
    while True:
        codes = [p.poll() for p in procs]
        if first is None:
            first = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if first is not None:
                deadline = time.monotonic() + settle
        if all(c is not None for c in codes) or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(poll_seconds)
    _end(procs)
    if first is None:
        return 0, None
    culprit = 0 if codes[0] not in (None, 0) else first
    code = codes[culprit]
    return (code if code > 0 else 128 - code), culprit


def _end(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
