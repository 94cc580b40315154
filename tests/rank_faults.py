"""Fault injection across ranks: a `dinov2-patho` command run as W gloo ranks (one process each, env://
rendezvous on a free port, as torchrun or SLURM start them), where rank k fails at the n-th call of a
function: a full disk (OSError ENOSPC), an exception (in a DataLoader worker when the function runs
there), SIGKILL, or a call that never returns. `launch` returns every rank's exit code, output and end
time, and when the fault struck."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_CHILD = r"""
import errno, faulthandler, importlib, json, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # a rank still running at the limit: its stacks
specs, argv = json.loads(sys.argv[1]), sys.argv[2:]
for spec in specs:
    if int(os.environ["RANK"]) != spec["rank"]:
        continue
    module, _, attr = spec["target"].partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)

    def faulty(*args, real=getattr(owner, name), calls=[0], spec=spec, **kwargs):
        calls[0] += 1
        if calls[0] != spec["at"]:
            return real(*args, **kwargs)
        if spec["stamp"]:
            with open(spec["stamp"], "w") as f:
                f.write(repr(time.time()))
        if spec["kind"] == "hang":
            time.sleep(3600)
        if spec["kind"] == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if spec["kind"] == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise ValueError(spec["message"])

    setattr(owner, name, faulty)
from dinov2_patho.cli import main
sys.exit(main(argv))
"""

FAULT_ENV = {"DINOV2_PATHO_RANK_TIMEOUT": "4", "DINOV2_PATHO_COLLECTIVE_TIMEOUT": "50",
             "OMP_NUM_THREADS": "1"}


@dataclass
class Rank:
    code: int
    output: str
    ended: float  # time.time() when it was seen ended


@dataclass
class Outcome:
    ranks: list[Rank]
    fault_at: float | None  # time.time() when the fault struck; None if it never did

    def lines(self, rank: int) -> list[str]:
        return self.ranks[rank].output.splitlines()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], tmp: Path, *, world: int = 2, rank: int, target: str, at: int, kind: str,
           message: str = "injected fault", limit: float = 150.0,
           hang: tuple[int, str] | None = None) -> Outcome:
    """Run `dinov2-patho ARGV` as `world` ranks; rank `rank` fails (`kind`: enospc, raise, sigkill) at
    the `at`-th call of `target` ("module:attr.path"); with `hang` = (rank, target), that rank's first
    call of that target never returns. Ranks still running after `limit` seconds are killed (and the
    test fails on their exit code)."""
    stamp = tmp / f"fault_{rank}_{kind}.time"
    stamp.unlink(missing_ok=True)
    specs = [{"rank": rank, "target": target, "at": at, "kind": kind, "message": message,
              "stamp": str(stamp)}]
    if hang is not None:
        specs.append({"rank": hang[0], "target": hang[1], "at": 1, "kind": "hang", "stamp": None})
    spec = json.dumps(specs)
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, **FAULT_ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(tmp / f"rank{r}_{kind}.log", "w+")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, "-c", _CHILD, spec, *argv], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    ended: dict[int, float] = {}
    deadline = time.time() + limit
    while len(ended) < world and time.time() < deadline:
        for r, (proc, _) in enumerate(procs):
            if r not in ended and proc.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.1)
    ranks = []
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
    time.sleep(1 if len(ended) < world else 0)
    for r, (proc, log) in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        ranks.append(Rank(proc.returncode, log.read(), ended.get(r, time.time())))
        log.close()
    fault_at = float(stamp.read_text()) if stamp.is_file() else None
    return Outcome(ranks, fault_at)


def check(outcome: Outcome, failing: int, cause: str, *, within: float = 60.0) -> None:
    """Every rank ended non-zero within `within` s of the fault; every rank that could still speak
    (all but a SIGKILLed one) printed one error line naming rank `failing` and holding `cause`."""
    assert outcome.fault_at is not None, "the fault never struck: " + outcome.ranks[failing].output[-3000:]
    for r, rank in enumerate(outcome.ranks):
        assert rank.code != 0, f"rank {r} exited 0:\n{rank.output[-3000:]}"
        late = rank.ended - outcome.fault_at
        assert late < within, f"rank {r} ended {late:.0f} s after the fault:\n{rank.output[-5000:]}"
        if rank.code == -9:
            continue
        errors = [line for line in outcome.lines(r)
                  if line.startswith("dinov2-patho") and ": error: " in line]
        assert len(errors) == 1, f"rank {r}: {errors}\n{rank.output[-3000:]}"
        assert f"rank {failing} of {len(outcome.ranks)}: " in errors[0] and cause in errors[0], errors[0]
