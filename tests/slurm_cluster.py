"""A real single-node SLURM on 127.0.0.1 for the tests (no mock).

`local_slurm()` uses a SLURM that already answers `sinfo`; otherwise it installs the
Debian packages when they are missing, starts munged, slurmctld and slurmd from a
config in a temporary directory, and on exit stops exactly the daemons it started (by
PID) and removes that directory. Concurrent test sessions take turns on a file lock,
since they would share the daemons' ports. Job state comes from squeue/scontrol
(sacct needs slurmdbd, which we do not run).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
LOCK_PATH = Path(tempfile.gettempdir()) / "dinov2_patho_slurm.lock"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here; the message says why."""


class SlurmStartError(RuntimeError):
    """SLURM is installed but a daemon did not come up: a failure, not a reason to skip."""


@dataclass
class SlurmCluster:
    partition: str
    cpus: int
    env: dict[str, str]  # environment for SLURM commands and submissions (SLURM_CONF)
    workdir: Path | None  # our daemons' state and logs; None for a SLURM we did not start

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(cmd, env=self.env if env is None else env, capture_output=True, text=True,
                             timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def job_state(self, job_id: str) -> str | None:
        """PENDING/RUNNING/COMPLETED/... from scontrol; None once SLURM forgot the job."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env,
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"\bJobState=(\S+)", out.stdout)
        return match.group(1) if match else None

    def wait_state(self, job_id: str, states: set[str], timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s, waited for {states}\n"
                           f"{self.diagnostics()}")

    def diagnostics(self) -> str:
        """The tails of our daemons' logs, to explain a failure."""
        if self.workdir is None:
            return ""
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _answers(env: dict[str, str]) -> str | None:
    """The default partition of a responding SLURM, else None."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], env=env, capture_output=True,
                             text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        name, _, state = line.partition(" ")
        if name.endswith("*") and state.rstrip("*~#") in {"idle", "mixed", "allocated"}:
            return name.rstrip("*")
    return None


def _install_packages() -> None:
    missing = [p for p in ("slurmctld", "slurmd", "sinfo", "munged") if shutil.which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and we are not root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing), no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]
    for cmd in (apt + ["update"], apt + ["install", "-y", "--no-install-recommends", *PACKAGES]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")


def _munge_works() -> bool:
    if shutil.which("munge") is None:
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _wait(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise SlurmStartError(f"{what} did not come up (exit code {proc.poll()}); log {log}:\n{tail}")


def _start_munged(workdir: Path) -> subprocess.Popen:
    munge = pwd.getpwnam("munge")
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    os.chown(MUNGE_SOCKET_DIR, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_SOCKET_DIR, 0o755)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(128))
    os.chown(MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_KEY.parent, 0o700)
    os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)
    log = workdir / "munged.log"
    log.touch()
    os.chown(log, munge.pw_uid, munge.pw_gid)
    os.chown(workdir, munge.pw_uid, munge.pw_gid)  # munged writes its pid file here
    proc = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--log-file={log}", f"--pid-file={workdir / 'munged.pid'}"],
        user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _wait(_munge_works, "munged", proc, log)
    return proc


def _node_line() -> tuple[str, int]:
    """Our node's hardware line (CPUs, sockets, cores...) as `slurmd -C` measures it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    line = out.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split())
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    hardware = " ".join(f"{k}={fields[k]}" for k in keys if k in fields)
    return hardware, int(fields["CPUs"])


def _write_conf(workdir: Path, node: str, hardware: str, partition: str) -> Path:
    conf = workdir / "slurm.conf"
    conf.write_text(f"""\
ClusterName=dinov2patho
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# a job whose begin time passes is picked up by the periodic pass (default every 60 s)
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
SlurmdTimeout=30
KillWait=5
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    (workdir / "state").mkdir()
    (workdir / "spool").mkdir()
    return conf


def _start_daemon(cluster: SlurmCluster, daemon: str, flags: list[str], started: list[subprocess.Popen],
                  ready: Callable[[], bool]) -> None:
    assert cluster.workdir is not None
    with open(cluster.workdir / f"{daemon}.stderr.log", "w") as stderr:
        proc = subprocess.Popen([daemon, "-D", "-f", cluster.env["SLURM_CONF"], *flags], env=cluster.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    started.append(proc)
    _wait(ready, daemon, proc, cluster.workdir / f"{daemon}.log", timeout=90)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _cancel_jobs(cluster: SlurmCluster) -> None:
    """Our own cluster: cancel whatever the tests left, so no job step outlives the daemons.
    Repeated, since a job caught between runs (being requeued) ignores a cancel."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not cluster.run("squeue", "-h", "-o", "%i", check=False).strip():
            return
        cluster.run("scancel", "--partition", cluster.partition, check=False)
        time.sleep(1)


@contextlib.contextmanager
def local_slurm(partition: str = "debug") -> Iterator[SlurmCluster]:
    """A running SLURM for the duration of the block; SlurmUnavailable when it cannot be installed."""
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = _answers(dict(os.environ))
        if existing is not None:
            cpus = int(subprocess.run(["sinfo", "-h", "-p", existing, "-o", "%c"], capture_output=True,
                                      text=True, timeout=20).stdout.split()[0])
            yield SlurmCluster(existing, cpus, dict(os.environ), None)
            return
        _install_packages()
        workdir = Path(tempfile.mkdtemp(prefix="dinov2_patho_slurm_"))
        started: list[subprocess.Popen] = []
        cluster = None
        try:
            if not _munge_works():
                started.append(_start_munged(workdir))
            node = socket.gethostname().split(".")[0]
            hardware, cpus = _node_line()
            conf = _write_conf(workdir, node, hardware, partition)
            env = {**os.environ, "SLURM_CONF": str(conf)}
            cluster = SlurmCluster(partition, cpus, env, workdir)
            _start_daemon(cluster, "slurmctld", ["-c"], started,  # -c: no state from an earlier run
                          ready=lambda: "UP" in cluster.run("scontrol", "ping", check=False))
            _start_daemon(cluster, "slurmd", [], started, ready=lambda: _answers(env) == partition)
            yield cluster
        finally:
            if cluster is not None and any(p.poll() is None for p in started):
                _cancel_jobs(cluster)
            for proc in reversed(started):
                _stop(proc)
            shutil.rmtree(workdir, ignore_errors=True)
