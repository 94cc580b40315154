"""torch.distributed in one place: the rank of this process, and the process group a job joins.

The rank questions import torch only when it is already loaded: logging (which asks for the
rank) must not cost a torch import in commands that never use it, like `index build`. The
process group is joined by `distributed_context` with env:// rendezvous (torchrun, submitit),
NCCL on GPU, gloo on CPU; it is a no-op for a single process.

A failure on one rank ends every rank, each with the same one line naming that rank and the cause:
- a risky local step (a rank writing a checkpoint or a level while the others wait) runs inside
  `ranks_agree`: every rank then reduces an ok flag, and all raise the failing rank's one line
  (`RankFailure`) instead of leaving it alone while they wait at the next collective;
- any other exception leaving `distributed_context` on one rank (a bug, a CUDA error) is published
  through the rendezvous store, and a rank killed outright (SIGKILL, OOM killer, a lost node) is
  seen by its neighbour's `Watchdog` (heartbeats in the store; no beat for $DINOV2_PATHO_RANK_TIMEOUT
  seconds, default 30): the other ranks raise that rank's line, or, stuck in a collective that never
  returns (NCCL), print it and exit;
- a rank alive but stuck (a deadlock) is ended by the process group's collective timeout,
  $DINOV2_PATHO_COLLECTIVE_TIMEOUT seconds (default 1800, torch's);
- a rank whose teardown after a failure hangs exits TEARDOWN_SECONDS after its failure was decided,
  printing the line itself if it had not left the distributed block yet. (The hang seen, on gloo in about
  one run in ten under load: a DDP reducer kept alive by the exception's frames holds the group's last
  reference and destroys it with the GIL held, against a gloo thread that needs the GIL. The trainer
  drops its DDP wrappers before leaving the block, so a run that succeeds no longer meets it.)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dinov2_patho.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "cpu")
COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT = "DINOV2_PATHO_COLLECTIVE_TIMEOUT", 1800.0
RANK_TIMEOUT_ENV, DEFAULT_RANK_TIMEOUT = "DINOV2_PATHO_RANK_TIMEOUT", 30.0
TEARDOWN_SECONDS = 15.0  # after a failure, a rank still alive this long is ended (exit status 2)


def is_initialized() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from e


def uses_cuda(device: str, key: str = "train.device") -> bool:
    """Whether `device` (one of DEVICES, from config key `key`) means CUDA here; a UserError for a
    device that is not one of them, or cuda where no CUDA device is visible (also for --dry-run)."""
    import torch

    if device not in DEVICES:
        raise UserError(f"{key}: {device!r} is not one of {', '.join(DEVICES)}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA device is visible")
    return use_cuda


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"environment variable {name}={value!r} is not a positive number of seconds")
    return seconds


def collective_timeout() -> float:
    """Seconds a collective waits for a rank that is alive but never joins it (then it fails)."""
    return _env_seconds(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT)


def rank_timeout() -> float:
    """Seconds without a heartbeat after which a rank counts as gone (killed, its host down)."""
    return _env_seconds(RANK_TIMEOUT_ENV, DEFAULT_RANK_TIMEOUT)


@contextlib.contextmanager
def distributed_context(device: str = "auto", key: str = "train.device") -> Iterator[DistContext]:
    """Join the process group named by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT when
    WORLD_SIZE > 1 (unless the caller already did), and leave it on exit if we joined. `key`:
    the config key `device` came from, named by its errors. A group joined here has the collective
    timeout of `collective_timeout()` and a `Watchdog`; an exception leaving the block on one rank
    is told to the others (see the module doc), and this process then ends within TEARDOWN_SECONDS
    whatever its caller does with the exception: a rank that lost its group has nothing left to run."""
    import torch
    import torch.distributed as dist

    use_cuda = uses_cuda(device, key)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    owned, watchdog, teardown = False, None, None
    if world_size > 1 and not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UserError(f"WORLD_SIZE={world_size} but {name} is not set (launch with torchrun)")
        timeout, patience = collective_timeout(), rank_timeout()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))
        owned = True
        watchdog = Watchdog.for_env(dist.get_rank(), dist.get_world_size(), patience, timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    try:
        yield DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    except Exception as e:
        if watchdog is None:
            raise
        failure = watchdog.failure(e)
        teardown = _end_if_stuck(f"dinov2-patho: error: {failure}", TEARDOWN_SECONDS)
        if failure is e:
            raise
        raise failure from e
    except KeyboardInterrupt:
        if watchdog is not None:  # the others learn why this rank left
            watchdog.handled.set()
            watchdog.publish_safely(f"rank {rank} of {world_size}: interrupted (KeyboardInterrupt)")
        raise
    else:
        if watchdog is not None:
            watchdog.leave("done")
    finally:
        if watchdog is not None:
            watchdog.leave("stopped")  # KeyboardInterrupt, SystemExit: no verdict, but not gone either
            watchdog.close()
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        if teardown is not None:
            teardown.set()  # left the block: the caller prints the line (the timer still ends a hang)


def _end_if_stuck(line: str, seconds: float) -> threading.Event:
    """A daemon timer that ends this process (status 2) `seconds` from now, printing `line` unless the
    returned event was set (the caller then reported the failure). A process that exits in time
    takes the timer with it."""
    left = threading.Event()

    def end() -> None:
        if not left.is_set():
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
    return left


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """`obj` from rank `src` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]



# --- one failure, every rank told ------------------------------------------------------------

class RankFailure(UserError):
    """A failure on one rank, raised on every rank: "rank K of W: the cause" (one line)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def describe(error: BaseException) -> str:
    """`error` as one line: its message (a DataLoader worker's: the first and last line of the
    worker's traceback), prefixed by its type unless it is a UserError or an OSError with a path."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        text = f"{lines[0]} {lines[-1]}" if "Traceback" in text else " ".join(lines)
    if isinstance(error, UserError):
        return text or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _group(ctx: DistContext | None):
    """(rank, world size, device of a collective's tensors) of the default group, or None when
    there is no group of more than one rank."""
    if ctx is not None:
        return (ctx.rank, ctx.world_size, ctx.device) if ctx.distributed else None
    if not is_initialized():
        return None
    import torch
    import torch.distributed as dist

    if dist.get_world_size() < 2:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else (
        torch.device("cpu"))
    return dist.get_rank(), dist.get_world_size(), device


def agree(error: BaseException | None, ctx: DistContext | None = None) -> None:
    """Collective (every rank calls it, ok or not): returns when no rank failed; else every rank
    raises the same RankFailure, the lowest failing rank's `describe(error)`. One all-reduce of
    one integer when all went well. A single process re-raises its own `error`."""
    group = _group(ctx)
    if group is None:
        if error is not None:
            raise error
        return
    import torch
    import torch.distributed as dist

    rank, world, device = group
    failed = torch.tensor([rank if error is not None else world], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    first = int(failed.item())
    if first == world:
        return
    box = [f"rank {rank} of {world}: {describe(error)}" if rank == first else None]
    dist.broadcast_object_list(box, src=first, device=device)
    if rank == first and not isinstance(error, (UserError, OSError)):
        traceback.print_exception(error)  # a bug: its traceback, on its rank only
    raise RankFailure(box[0], first) from error


@contextlib.contextmanager
def ranks_agree(ctx: DistContext | None = None) -> Iterator[None]:
    """Run a risky local step (a write on rank 0 while the others wait) then `agree`: a failure on
    any rank is raised on every rank. The block must hold no collective."""
    try:
        yield
    except Exception as e:
        agree(e, ctx)
        raise
    agree(None, ctx)


def _collective_error(error: BaseException) -> bool:
    """Whether `error` is a collective that failed (a peer gone, a timeout), not a local failure."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", ())
    text = str(error)
    return isinstance(error, dist_error) or (isinstance(error, RuntimeError) and (
        "gloo" in text or "NCCL" in text or "Connection closed by peer" in text or "Timed out" in text))


class Watchdog:
    """Heartbeats in the rendezvous store, a thread per rank: every `interval` a rank counts its own
    beat and reads its neighbour's (rank + 1, skipping ranks that left), so the store's load does
    not grow with the world. A neighbour whose count has not moved for `patience` seconds, without
    having left, is declared gone in the store's "verdict"; a rank failing with an exception writes
    its own verdict (and waits until the others have read it: rank 0 may host the store). Every rank
    reads the verdict: its main thread raises it when its collective fails (gloo: at once); a main
    thread still stuck after `grace` (NCCL waits for its timeout) is ended by the watchdog, which
    prints the verdict first."""

    def __init__(self, connect, rank: int, world: int, patience: float, agent_store: bool, where: str,
                 wait_limit: float):
        self._connect, self.store = connect, connect()
        self.rank, self.world, self.patience = rank, world, patience
        self.agent_store, self.where, self.wait_limit = agent_store, where, wait_limit
        self.hosts_store = rank == 0 and not agent_store  # env:// without torchrun: rank 0 serves it
        self.interval = min(1.0, max(0.05, patience / 10))
        self.grace = 3 * self.interval + 5.0
        self.verdict: str | None = None
        self.verdict_at = 0.0
        self.leaving = threading.Event()
        self.handled = threading.Event()  # the main thread has a failure in hand: it reports it
        self._closed = threading.Event()
        self._lock = threading.Lock()  # the store client: one operation at a time
        self._failed_at: float | None = None  # since when the store has not answered
        self._retried_at = 0.0
        self._thread = threading.Thread(target=self._run, name="dinov2_patho-watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def for_env(cls, rank: int, world: int, patience: float, timeout: float) -> Watchdog | None:
        """A watchdog on its own client of the env:// store (MASTER_ADDR:MASTER_PORT), keys under
        a prefix of this run (torchrun's run id and restart count); None when it cannot connect."""
        import torch.distributed as dist

        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        prefix = (f"dinov2_patho/watchdog/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")

        def connect():
            client = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=max(2.0, min(10.0, patience / 3))))
            return dist.PrefixStore(prefix, client)

        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        try:
            return cls(connect, rank, world, patience, agent, f"{host}:{port}", wait_limit=timeout)
        except Exception as e:  # noqa: BLE001 - no watchdog is not a reason to stop a run
            # the package logger by name: dinov2_patho.logging imports this module (get_rank)
            log = logging.getLogger(__name__)
            log.warning("no rank watchdog (cannot reach the store at %s:%d: %s)", host, port, describe(e))
            return None

    # store operations, one at a time
    def _op(self, name: str, *args):
        """One store operation. Once one failed, the watchdog tries the store once more, on a new
        connection, patience / 2 seconds later (a blip); otherwise ConnectionError at once (each
        failure logs a C++ stack)."""
        with self._lock:
            now = time.monotonic()
            if self._failed_at is not None:
                if (self._retried_at > self._failed_at or now - self._failed_at < self.patience / 2
                        or threading.current_thread() is not self._thread or self.handled.is_set()):
                    raise ConnectionError(f"the rendezvous store at {self.where} does not answer")
                self._retried_at = now
                self.store = self._connect()
            try:
                result = getattr(self.store, name)(*args)
            except Exception:
                if self._failed_at is None:
                    self._failed_at, self._retried_at = now, 0.0
                raise
            self._failed_at = None
            return result

    def _has(self, key: str) -> bool:
        return bool(self._op("check", [key]))

    def _get(self, key: str) -> str:
        return self._op("get", key).decode(errors="replace")

    def _decide(self, verdict: str) -> None:
        if self.verdict is None:
            self.verdict, self.verdict_at = verdict, time.monotonic()

    def _publish(self, verdict: str) -> None:
        """Make `verdict` the run's, unless another rank's came first; then take the run's."""
        if int(self._op("add", "failures", 1)) == 1:
            self._op("set", "verdict", verdict)
        else:
            deadline = time.monotonic() + 2.0
            while not self._has("verdict") and time.monotonic() < deadline:
                time.sleep(0.01)
        self._decide(self._get("verdict") if self._has("verdict") else verdict)

    def _run(self) -> None:
        watched, count, moved = (self.rank + 1) % self.world, -1, time.monotonic()
        acked = False
        while not self._closed.wait(self.interval):
            try:
                self._op("add", f"beat/{self.rank}", 1)
                if self.verdict is None and self._has("verdict"):
                    self._decide(self._get("verdict"))
                if self.verdict is not None and not acked:
                    self._op("add", "acks", 1)
                    acked = True
                while self.verdict is None and watched != self.rank and self._has(f"left/{watched}"):
                    watched, count = (watched + 1) % self.world, -1  # it finished: watch the next one
                if self.verdict is None and watched != self.rank:
                    now, beats = time.monotonic(), int(self._op("add", f"beat/{watched}", 0))
                    if beats != count:
                        count, moved = beats, now
                    elif now - moved > self.patience and not self._has(f"left/{watched}"):
                        self._publish(f"rank {watched} of {self.world}: no sign of life for "
                                      f"{now - moved:.0f} s (killed, or its host went down)")
            except Exception as e:  # noqa: BLE001 - the store is gone
                if self.leaving.is_set() or self._closed.is_set():
                    return
                moved = time.monotonic()  # the neighbour's beats were not read: it gets a full patience
                if self.verdict is None and self._failed_at is not None and (
                        time.monotonic() - self._failed_at > self.patience):  # not a blip: gone
                    who = "torchrun's agent: gone" if self.agent_store else f"rank 0 of {self.world}: gone"
                    self._decide(f"{who} (the rendezvous store at {self.where} stopped answering: "
                                 f"{describe(e)})")
            if self.verdict is not None and not self.handled.is_set() and (
                    time.monotonic() - self.verdict_at > self.grace):
                print(f"dinov2-patho: error: {self.verdict} (rank {self.rank} stops)", file=sys.stderr,
                      flush=True)
                os._exit(1)

    def failure(self, error: Exception) -> Exception:
        """What the main thread raises for `error` leaving the distributed block: a RankFailure (the
        run's verdict) for a failed collective, this rank's own for a local failure, told to the
        others first; `error` itself for a RankFailure (every rank raises it) or a UserError."""
        self.handled.set()
        try:
            if isinstance(error, RankFailure):
                return error
            if _collective_error(error):
                deadline = time.monotonic() + 1.25 * self.patience + 10 + 3 * self.interval
                while self.verdict is None and time.monotonic() < deadline:
                    time.sleep(self.interval / 2)
                if self.verdict is None:
                    return RankFailure(f"rank {self.rank} of {self.world}: lost another rank, which named no "
                                       f"cause ({describe(error)})")
                self._wait_for_acks()
                return RankFailure(self.verdict)
            mine = f"rank {self.rank} of {self.world}: {describe(error)}"
            self.publish_safely(mine)
            self._wait_for_acks()
            if isinstance(error, UserError):
                return error
            if not isinstance(error, OSError):
                traceback.print_exception(error)  # a bug: its traceback, on its rank only
            return RankFailure(mine, self.rank)
        finally:
            self.leave("failed")

    def publish_safely(self, verdict: str) -> None:
        try:
            self._publish(verdict)
        except Exception:  # noqa: BLE001 - the store is gone: this rank still reports its own cause
            self._decide(verdict)

    def _wait_for_acks(self) -> None:
        """Until every other rank has read the verdict (or left), at most a few heartbeats: the store
        may live in this process."""
        deadline = time.monotonic() + 3 * self.interval + 1
        try:
            while time.monotonic() < deadline:
                left = sum(self._has(f"left/{r}") for r in range(self.world) if r != self.rank)
                if int(self._op("add", "acks", 0)) + left >= self.world - 1:
                    return
                time.sleep(self.interval / 4)
        except Exception:  # noqa: BLE001 - the store is gone: nobody left to tell
            return

    def leave(self, how: str) -> None:
        """Say this rank leaves (`how`: done, failed, stopped); after a success, the rank hosting the
        store waits until every rank has left (or a verdict, or `wait_limit`), so that the store
        outlives their watchdogs."""
        if self.leaving.is_set():
            return
        self.handled.set()
        try:
            self._op("set", f"left/{self.rank}", how)
            if self.hosts_store and how == "done":
                deadline = time.monotonic() + (self.wait_limit if self.verdict is None else self.grace)
                while time.monotonic() < deadline:
                    if all(self._has(f"left/{r}") for r in range(self.world)):
                        break
                    if self.verdict is not None:
                        deadline = min(deadline, self.verdict_at + self.grace)
                    time.sleep(self.interval / 4)
        except Exception:  # noqa: BLE001 - the store is gone: nothing to say to anyone
            pass
        finally:
            self.leaving.set()

    def close(self) -> None:
        self.leaving.set()
        self._closed.set()
        self._thread.join(timeout=5)
