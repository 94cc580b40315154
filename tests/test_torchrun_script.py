"""launch/torchrun_train.sh runs the project's venv python without the venv being activated."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "torchrun_train.sh"


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").is_file(), reason="no project .venv")
def test_torchrun_script_finds_the_venv_python_without_activation(tmp_path):
    # a PATH without the venv (nor pyenv shims): only the system python3, which has no torch
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NPROC": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "cfg.yaml", str(tmp_path / "out"), "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--dry-run" in out.stdout  # `dinov2-patho train --help`, through torch.distributed.run
