"""`dinov2-patho train --config-file F --output-dir D [key.path=value ...]`.

Under torchrun every rank runs this same command; a run resumes from D's latest
checkpoint unless `train.resume=false`. SIGTERM and SIGUSR2 make it checkpoint and exit
at the next iteration boundary. `--dry-run` checks the config, the data and the slides,
prints what training would use, and exits before any model is built. `--print-config` prints the
config (every key, with its value) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from dinov2_patho.cli import add_print_config, print_config
from dinov2_patho.train.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="YAML merged over the defaults (every key: --print-config)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="checkpoints, metrics.jsonl, logs; resumed from when it holds a checkpoint "
                             "(required but with --print-config)")
    add_print_config(parser)
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even when the config differs from the checkpoint's in a key that breaks "
                             "exact resume (the changed keys are logged)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, the first batch's sampler telemetry and the data "
                             "source (backend, mpp, tile size), check every slide, and exit")
    parser.add_argument("--json", action="store_true", help="print the final summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the slide preflight)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A training summary for people: what ran, how long, the final losses, where things are."""
    ran = summary["iteration"] - summary.get("start_iteration", 0)
    minutes, seconds = divmod(round(summary.get("seconds", 0.0)), 60)
    state = "stopped early" if summary.get("stopped") else "done"
    head = f"training {state}: iteration {summary['iteration']}"
    head += f" ({ran} run in {minutes}m{seconds:02d}s)" if ran else " (nothing left to run)"
    losses = "  ".join(f"{k} {v:.4f}" for k, v in sorted(summary["losses"].items()) if k.endswith("loss"))
    return [head, f"final losses: {losses or 'none logged'}",
            f"checkpoint:   {summary.get('checkpoint') or 'none written'}",
            f"metrics:      {summary.get('metrics')}"]


def dry_run(cfg, progress: bool = True) -> int:
    """Check and describe what `train` would do with `cfg`; 2 when a slide would fail it."""
    from omegaconf import OmegaConf

    from dinov2_patho.data.dataset import build_tile_source
    from dinov2_patho.data.preflight import PreflightError
    from dinov2_patho.data.readers import TILE_PX, SlideTileSource
    from dinov2_patho.distributed import uses_cuda
    from dinov2_patho.samplers.telemetry import NO_LEVELS, telemetry_table
    from dinov2_patho.train.config import global_batch_size, validate_config
    from dinov2_patho.train.trainer import open_training_data, slide_preflight

    validate_config(cfg)
    uses_cuda(str(cfg.train.device))  # the run's distributed_context checks it first
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    index, sampler = open_training_data(cfg, global_batch_size(cfg, world_size))
    batch = sampler.next_batch()
    print("# resolved config")
    print(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"# first batch: {len(batch)} tiles over {world_size} rank(s), sampler {sampler.name}")
    print(telemetry_table({"clusters": NO_LEVELS, **sampler.telemetry(batch, 0)}))  # a tree's count wins
    print(f"\n# data: {index!r}")
    source = build_tile_source(cfg.data)
    try:
        if isinstance(source, SlideTileSource):
            slide_id, _, _ = index.tile(int(batch[0]))
            g = source.probe(slide_id)
            print(f"backend      {cfg.data.backend} (fallback {cfg.data.fallback})")
            print(f"slides       {source.registry.source} ({len(source.registry)} known)")
            print(f"first slide  {slide_id}: mpp {g.mpp:g}, {g.width}x{g.height} px; a tile is {g.size0} px "
                  f"at level 0, read at pyramid level {g.level} ({g.read_px} px), resized to {TILE_PX}")
        else:
            print(f"backend      {cfg.data.backend}: tile store {cfg.data.tile_store}")
    finally:
        source.close()
    report = slide_preflight(cfg, index, progress=progress)
    if report is not None and cfg.data.on_error != "skip":
        raise PreflightError(report)
    print(f"preflight    {report or 'every slide opens and holds its tiles'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.distributed import is_main_process
    from dinov2_patho.train.trainer import install_stop_handlers, run_training

    cfg = load_train_config(args.config_file, args.overrides)
    if print_config(cfg, args):
        return 0
    if args.dry_run:
        return dry_run(cfg, progress=not args.no_progress)
    install_stop_handlers()
    summary = run_training(cfg, args.output_dir, force_resume=args.force_resume,
                           progress=not args.no_progress)
    if is_main_process():
        print(json.dumps(summary) if args.json else "\n".join(summary_lines(summary)))
    return 0
