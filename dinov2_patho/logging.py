"""One logging setup, rank-aware: rank 0 prints, every rank may write its own file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dinov2_patho.distributed import get_rank

LOGGER_NAME = "dinov2_patho"
_FORMAT = "%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"


def setup_logging(output_dir: str | Path | None = None, *, level: int = logging.INFO,
                  all_ranks: bool = False, rank: int | None = None) -> logging.Logger:
    """Configure the package logger once (calling again replaces its handlers).

    Console (stderr): rank 0 only unless `all_ranks`. File: `output_dir/log.txt` on rank 0,
    `log.rank{r}.txt` on other ranks when `all_ranks`.
    """
    rank = get_rank() if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    if rank == 0 or all_ranks:
        console = logging.StreamHandler(sys.stderr)  # with the progress bars: stdout is results (--json)
        console.setFormatter(formatter)
        logger.addHandler(console)
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            name = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
            file_handler = logging.FileHandler(Path(output_dir) / name)
            file_handler.setFormatter(formatter)
            logger.addHandler(file_handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the package logger: `get_logger(__name__)`."""
    if name != LOGGER_NAME and not name.startswith(LOGGER_NAME + "."):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)
