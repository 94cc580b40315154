"""Has a training run reached its last iteration? For batch scripts that requeue themselves.

    python -m dinov2_patho.run.status OUTPUT_DIR   # exit 0: finished; 3: not yet; 2: not a run

`launch/sbatch_train.sh` requeues its job when the training stopped cleanly (preemption
signal) before its last iteration.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dinov2_patho.config_files import read_yaml
from dinov2_patho.errors import UserError

NOT_FINISHED = 3


def training_progress(output_dir: str | Path) -> tuple[int, int]:
    """(iteration of the latest checkpoint, 0 without one; train.iterations of the run)."""
    from dinov2_patho.checkpoint_files import CHECKPOINTS, find_latest, iteration_of

    output_dir = Path(output_dir)
    config = output_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{output_dir} is not a training output directory: {config} is missing")
    total = int(read_yaml(config).train.iterations)
    latest = find_latest(output_dir / CHECKPOINTS)
    return (iteration_of(latest) if latest is not None else 0), total


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dinov2_patho.run.status OUTPUT_DIR", file=sys.stderr)
        return 2
    try:
        done, total = training_progress(argv[0])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{argv[0]}: iteration {done} of {total}")
    return 0 if done >= total else NOT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
