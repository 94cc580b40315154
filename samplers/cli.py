"""`dinov2-patho sampler dump`: a sampler's first batches as an (N, B) int64 .npy, and telemetry.

    dinov2-patho sampler dump --index DIR --batch-size 2048 --steps 100 --out b.npy \\
        sampler.name=cluster_stratified sampler.level=4 sampler.seed=0
    ... --save-state s.pt                        # the sampler state after those batches
    ... --resume-from s.pt --start-step 100      # the next batches, from that state
    ... data.subset=subset.npy                   # draw from these rows only (`curate sample`)
    dinov2-patho sampler cache --index DIR --list  # the cached strata of an index (--clear: remove them)
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from dinov2_patho.config_files import parse_overrides, to_container
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path

from .base import SamplerError
from .build import build_sampler
from .strata import cache_entries, clear_cache
from .telemetry import TelemetrySummary, telemetry_table
from .views import CACHE_DIRNAME, subset_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    dump = sub.add_parser("dump", help="write the first N global batches and print telemetry")
    dump.add_argument("--index", required=True, help="tile index directory")
    dump.add_argument("--batch-size", type=int, required=True, help="global batch size B")
    dump.add_argument("--steps", type=int, required=True, help="number of batches N")
    dump.add_argument("--out", required=True, help="output .npy, an (N, B) int64 array of global row ids")
    dump.add_argument("--world-size", type=int, default=1, help="check B splits over this many ranks")
    dump.add_argument("--resume-from", help="a sampler state saved by --save-state")
    dump.add_argument("--start-step", type=int, help="first step to dump (must match --resume-from's state; "
                      "without it, the batches before are drawn and discarded)")
    dump.add_argument("--save-state", help="write the sampler state after the dumped batches here")
    dump.add_argument("--json", action="store_true", help="print the telemetry as JSON instead of a table")
    dump.add_argument("overrides", nargs="*", help="sampler options as a dot-list: sampler.name=uniform ... "
                      "and data.subset=ROWS.npy")
    cache = sub.add_parser("cache", help="list or clear the strata cached in <index>/.sampler_cache")
    cache.add_argument("--index", required=True, help="tile index directory")
    what = cache.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print each entry, most recently used first")
    what.add_argument("--clear", action="store_true", help="remove every entry")


def sampler_config(overrides: list[str]) -> tuple[dict, str | None]:
    """The sampler section and `data.subset` of the overrides."""
    cfg = to_container(parse_overrides(overrides)) if overrides else {}
    extra = sorted(set(cfg) - {"sampler", "data"})
    if extra:
        raise UserError(f"override {extra[0]!r}: only sampler.* options and data.subset are accepted here")
    section, data = cfg.get("sampler", {}), cfg.get("data", {})
    if not isinstance(section, dict):
        raise UserError("sampler options must be given as sampler.KEY=VALUE")
    if not isinstance(data, dict) or set(data) - {"subset"}:
        raise UserError("of the data section, only data.subset=ROWS.npy is accepted here")
    return section, data.get("subset")


def run(args: argparse.Namespace) -> int:
    return cache(args) if args.action == "cache" else dump(args)


def cache(args: argparse.Namespace) -> int:
    directory = Path(args.index) / CACHE_DIRNAME
    if not Path(args.index).is_dir():
        raise UserError(f"--index {args.index}: not a directory")
    if args.clear:
        print(f"removed {clear_cache(directory)} cached strata from {directory}")
        return 0
    entries = cache_entries(directory)
    if not entries:
        print(f"no cached strata in {directory}")
    for entry in entries:
        size = sum(f.stat().st_size for f in entry.iterdir())
        used = datetime.fromtimestamp(entry.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"{entry.name}  {size / 2**20:10.1f} MiB  last used {used}")
    return 0


def dump(args: argparse.Namespace) -> int:
    from dinov2_patho.data.index import TileIndex

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    section, subset = sampler_config(args.overrides)
    index = TileIndex.open(args.index)
    if subset is not None:
        index = subset_view(index, subset)
    sampler = build_sampler(section, index, args.batch_size)
    sampler.rank_slice(np.empty(args.batch_size), 0, args.world_size)  # B must split over the ranks
    if args.resume_from:
        try:
            state = torch.load(args.resume_from, weights_only=True)
        except (OSError, RuntimeError) as e:
            raise UserError(f"--resume-from {args.resume_from}: cannot read a sampler state: {e}") from e
        except Exception as e:  # text or another pickle: torch.load's errors vary with the bytes
            raise UserError(f"--resume-from {args.resume_from}: not a sampler state (a file of "
                            f"--save-state): {type(e).__name__}") from e
        if not isinstance(state, dict) or not {"fingerprint", "step"} <= state.keys():
            found = f"keys {', '.join(map(str, state))}" if isinstance(state, dict) else type(state).__name__
            raise UserError(f"--resume-from {args.resume_from}: not a sampler state (a file of "
                            f"--save-state); it holds {found}")
        sampler.load_state_dict(state)
        if args.start_step is not None and args.start_step != sampler.step:
            raise SamplerError(f"--start-step {args.start_step} but the state in {args.resume_from} "
                               f"is at step {sampler.step}")
    elif args.start_step:
        for _ in range(args.start_step):
            sampler.next_batch()
    first = sampler.step
    batches = np.empty((args.steps, args.batch_size), dtype=np.int64)
    summary = TelemetrySummary(sampler)
    for t in range(args.steps):
        batches[t] = sampler.next_batch()
        summary.update(batches[t])
    with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
        np.save(f, batches)
    if args.save_state:
        with atomic_path(args.save_state) as tmp:
            torch.save(sampler.state_dict(), tmp)
    report = {"sampler": sampler.name, "steps": f"{first}..{sampler.step - 1}", "batch_size": args.batch_size,
              "world_size": args.world_size, **summary.summary()}
    print(json.dumps(report, indent=1) if args.json else telemetry_table(report))
    return 0
