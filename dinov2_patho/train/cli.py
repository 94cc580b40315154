"""`dinov2-patho train --config-file F --output-dir D [key.path=value ...]`.

Under torchrun every rank runs this same command; a run resumes from D's latest
checkpoint unless `train.resume=false`. SIGTERM and SIGUSR2 make it checkpoint and exit
at the next iteration boundary.
"""

from __future__ import annotations

import argparse
import json

from dinov2_patho.train.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="YAML merged over the packaged configs/train/default.yaml")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="checkpoints, metrics.jsonl, logs; resumed from when it holds a checkpoint")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even when the config differs from the checkpoint's in a key that breaks "
                             "exact resume (the changed keys are logged)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.distributed import is_main_process
    from dinov2_patho.train.trainer import install_stop_handlers, run_training

    cfg = load_train_config(args.config_file, args.overrides)
    install_stop_handlers()
    summary = run_training(cfg, args.output_dir, force_resume=args.force_resume)
    if is_main_process():
        print(json.dumps(summary))
    return 0
