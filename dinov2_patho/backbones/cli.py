"""`dinov2-patho export`: the flags of `backbones.teacher.export_teacher`, parsed; torch is imported
once the command runs."""

from __future__ import annotations

import argparse

FORMATS = ("dinov2", "timm")  # teacher.FORMATS, without importing torch for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a checkpoint directory (iter_N) or a training output directory (its latest)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="where teacher_backbone_dinov2.pth / teacher_backbone_timm.pth go")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="dinov2: DINOv2 hub layout (our ViT, torch.hub's dinov2 models); timm: timm's "
                             "VisionTransformer, with timm_model_kwargs.json (default: both)")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.backbones.teacher import export_teacher

    for kind, path in export_teacher(args.checkpoint, args.output_dir, tuple(args.format)).items():
        print(f"{kind}: {path}")
    return 0
