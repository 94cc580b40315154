"""`dinov2-patho eval run --backbone PATH --benchmarks bach,crc --output-dir DIR [key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from dinov2_patho.config import load_config, save_config
from dinov2_patho.logging import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run_parser = sub.add_parser("run", help="evaluate a frozen backbone on benchmarks",
                                description="Extract features (cached), fit linear probe / kNN / logistic "
                                            "regression, write results.{csv,md,json,png}.")
    run_parser.add_argument("--backbone", help="a training run or checkpoint directory (its teacher, at "
                                               "its own size: no --arch needed), or a weights file (ours, "
                                               "DINOv2 hub or timm); omit for a random-init baseline")
    run_parser.add_argument("--arch", help="our backbone name (vit_small, ...) or timm/<model name>")
    run_parser.add_argument("--benchmarks", help="comma-separated: bach,crc,mhist,pcam,bracs,breakhis,"
                                                 "unitopatho,chaoyang,synthetic,folder,csv")
    run_parser.add_argument("--data-root", help="folder holding one folder per benchmark")
    run_parser.add_argument("--output-dir", required=True, type=Path,
                            help="results.{csv,md,json,png}, cached features, config.yaml, log")
    run_parser.add_argument("--config-file", help="eval config over configs/eval/default.yaml")
    run_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. "
                            "heads.linear.n_runs=3 datasets.bach.root=/data/BACH")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.eval.backbone import load_backbone
    from dinov2_patho.eval.runner import DEFAULTS, OPEN_KEYS, run_benchmarks

    overrides = list(args.overrides)
    if args.backbone is not None:
        overrides.append(f"backbone.path={args.backbone}")
    if args.arch is not None:
        overrides.append(f"backbone.arch={args.arch}")
    if args.data_root is not None:
        overrides.append(f"data_root={args.data_root}")
    cfg = load_config(DEFAULTS, args.config_file, overrides, open_keys=OPEN_KEYS)
    if args.benchmarks is not None:
        cfg.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    setup_logging(args.output_dir)
    save_config(cfg, args.output_dir / "config.yaml")
    spec = cfg.backbone
    model_kwargs = OmegaConf.to_container(spec.model, resolve=True)
    backbone = load_backbone(spec.path, spec.arch, spec.weights_format, **model_kwargs)
    backbone = backbone.to(cfg.features.device)
    run_benchmarks(backbone, list(cfg.benchmarks), cfg, args.output_dir)
    print((args.output_dir / "results.md").read_text(), end="")
    return 0
