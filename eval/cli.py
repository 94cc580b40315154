"""`dinov2-patho eval run --backbone PATH --benchmarks bach,crc --output-dir DIR [key=value ...]`;
`dinov2-patho eval slide --backbone PATH --tasks camelyon16,labels.csv --output-dir DIR [key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from dinov2_patho.cli import add_print_config, print_config
from dinov2_patho.config_files import instantiate, merge_structured, save_config
from dinov2_patho.data.folders import BACKBONE_HELP, TILES_HELP
from dinov2_patho.data.slides import SLIDES_HELP
from dinov2_patho.errors import UserError
from dinov2_patho.logging import setup_logging

ARCH_HELP = ("our backbone name (vit_small, ...), timm/<model name>, local-dir:PATH (timm's save_for_hf "
             "folder) or hf-hub:ORG/NAME (from the local Hugging Face cache, offline)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run_parser = sub.add_parser("run", help="evaluate a frozen backbone on benchmarks",
                                description="Extract features (cached), fit linear probe / kNN / logistic "
                                            "regression, write results.{csv,md,json,png}.")
    run_parser.add_argument("--backbone", help=BACKBONE_HELP)
    run_parser.add_argument("--arch", help=ARCH_HELP)
    run_parser.add_argument("--benchmarks", help="comma-separated: bach,crc,mhist,pcam,bracs,breakhis,"
                                                 "unitopatho,chaoyang,synthetic,folder,csv")
    run_parser.add_argument("--data-root", help="folder holding one folder per benchmark")
    run_parser.add_argument("--output-dir", type=Path,
                            help="results.{csv,md,json,png}, cached features, config.yaml, log (required but "
                                 "with --print-config)")
    run_parser.add_argument("--config-file", help="eval config over the defaults (every key: --print-config)")
    add_print_config(run_parser)
    run_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    run_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. "
                            "heads.linear.n_runs=3 datasets.bach.root=/data/BACH")
    slide = sub.add_parser("slide", help="evaluate a frozen backbone on slide-level tasks (attention-MIL)",
                           description="Extract bags of tile features (cached per slide), fit gated "
                                       "attention-MIL and a mean-pooling baseline, write "
                                       "results.{csv,md,json,png}.")
    slide.add_argument("--backbone", help=BACKBONE_HELP)
    slide.add_argument("--arch", help=ARCH_HELP)
    slide.add_argument("--tasks", help="comma-separated task names (synthetic, camelyon16, panda) or labels "
                                       "CSVs slide_id,label[,split][,patient_id]")
    slide.add_argument("--slides", help=f"for a labels CSV: {SLIDES_HELP}")
    slide.add_argument("--tiles", help=f"for a labels CSV: {TILES_HELP}")
    slide.add_argument("--features", help="for a labels CSV: a folder of <slide_id>.h5 feature files "
                                          "(trident/CLAM) to read the bags from, instead of a backbone")
    slide.add_argument("--data-root", help="folder holding one folder per named task")
    slide.add_argument("--output-dir", type=Path,
                       help="results, cached bags, config, log (required but with --print-config)")
    slide.add_argument("--config-file", help="config over the defaults (every key: --print-config)")
    add_print_config(slide)
    slide.add_argument("--no-progress", action="store_true", help="no progress bars")
    slide.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. "
                       "heads.abmil.n_runs=3 bags.max_tiles=1000 cross_validation.folds=5")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.backbones.load import backbone_record, load_backbone

    from .runner import OPEN_KEYS, EvalConfig, run_benchmarks

    if args.action == "slide":
        return run_slide(args)
    overrides = list(args.overrides)
    if args.backbone is not None:
        overrides.append(f"backbone.path={args.backbone}")
    if args.arch is not None:
        overrides.append(f"backbone.arch={args.arch}")
    if args.data_root is not None:
        overrides.append(f"data_root={args.data_root}")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = merge_structured(EvalConfig, ".", args.config_file, overrides, OPEN_KEYS)
    if args.benchmarks is not None:
        cfg.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if print_config(cfg, args):
        return 0
    instantiate(EvalConfig, cfg)  # the checks, before the backbone is built and moved to features.device
    setup_logging(args.output_dir)
    save_config(cfg, args.output_dir / "config.yaml")
    spec = cfg.backbone
    model_kwargs = OmegaConf.to_container(spec.model, resolve=True)
    backbone = load_backbone(spec.path, spec.arch, spec.weights_format, spec.seed, **model_kwargs)
    backbone = backbone.to(cfg.features.device)
    run_benchmarks(backbone, list(cfg.benchmarks), cfg, args.output_dir,
                   backbone_record(spec.path, spec.arch, spec.seed))
    print((args.output_dir / "results.md").read_text(), end="")
    return 0


def run_slide(args: argparse.Namespace) -> int:
    from dinov2_patho.backbones.load import backbone_record, load_backbone

    from .slide.runner import OPEN_KEYS, SlideEvalConfig, run_slide_tasks

    overrides = list(args.overrides)
    for key, value in (("backbone.path", args.backbone), ("backbone.arch", args.arch),
                       ("slides", args.slides), ("tiles", args.tiles), ("features", args.features),
                       ("data_root", args.data_root)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = merge_structured(SlideEvalConfig, ".", args.config_file, overrides, OPEN_KEYS)
    if args.tasks is not None:
        cfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if print_config(cfg, args):
        return 0
    if not cfg.tasks:
        raise UserError("eval slide: no task given (--tasks or tasks= in the config)")
    instantiate(SlideEvalConfig, cfg)  # the checks, before the backbone is built and moved to bags.device
    spec = cfg.backbone
    if cfg.features is not None and (spec.path is not None or args.arch is not None):
        raise UserError("eval slide: --features gives the bags; --backbone/--arch (backbone.*) do not apply")
    setup_logging(args.output_dir)
    save_config(cfg, args.output_dir / "config.yaml")
    if cfg.features is not None:
        run_slide_tasks(None, list(cfg.tasks), cfg, args.output_dir, f"features:{cfg.features}",
                        {"features": str(Path(cfg.features).resolve())})
        print((args.output_dir / "results.md").read_text(), end="")
        return 0
    backbone = load_backbone(spec.path, spec.arch, spec.weights_format, spec.seed,
                             **OmegaConf.to_container(spec.model, resolve=True))
    name = f"{spec.arch}:{spec.path}" if spec.path is not None else f"{spec.arch}:random-init"
    run_slide_tasks(backbone.to(cfg.bags.device), list(cfg.tasks), cfg, args.output_dir, name,
                    backbone_record(spec.path, spec.arch, spec.seed))
    print((args.output_dir / "results.md").read_text(), end="")
    return 0
