"""`dinov2-patho`: one command line, a subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; the module is imported only when its subcommand runs, so
`--help` stays instant and a broken optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from dinov2_patho import __version__
from dinov2_patho.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dinov2_patho.demo.cli", "curate, train, evaluate and report on a synthetic cohort"),
    "cohort": ("dinov2_patho.demo.cohort_cli", "generate a synthetic pyramidal-TIFF cohort"),
    "index": ("dinov2_patho.data.index.cli", "build or inspect a tile index from clustering CSVs"),
    "tiles": ("dinov2_patho.data.cli", "extract tiles into per-slide HDF5 stores, or preview them"),
    "curate": ("dinov2_patho.curation.cli", "curation: tissue tiles, embeddings, k-means tree, subsets"),
    "sampler": ("dinov2_patho.samplers.cli", "dump a sampler's batches and telemetry; its cache"),
    "train": ("dinov2_patho.train.cli", "DINOv2 pretraining (torchrun-aware)"),
    "export": ("dinov2_patho.backbones.cli", "export a teacher backbone to DINOv2 hub / timm format"),
    "eval": ("dinov2_patho.eval.cli", "linear probe, kNN, logreg on tile benchmarks; MIL on slide tasks"),
    "launch": ("dinov2_patho.run.cli", "submit train, eval or curate jobs to SLURM with submitit"),
    "report": ("dinov2_patho.report.cli", "a run's report as one self-contained HTML page (no server)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """A subcommand takes its options and `key.path=value` overrides in any order: argparse alone
    fills a `nargs="*"` positional once, so `a=1 --dry-run b=2` would leave `b=2` unrecognized.
    An argument nobody knows is the subcommand's error, shown with its own usage."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        leaf = self._subparsers is None and not any(
            a.nargs in (argparse.REMAINDER, argparse.PARSER) for a in self._actions)
        if not leaf or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back here
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_print_config(parser: argparse.ArgumentParser) -> None:
    """`--print-config` of a command whose defaults are config dataclasses; its `--output-dir` is then
    optional: `print_config` says whether the command is done."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the config (the defaults <- --config-file <- overrides: every key and "
                             "its value) as YAML, and exit")


def print_config(cfg, args: argparse.Namespace) -> bool:
    """With `--print-config`, print `cfg` and say so (the command is done); else --output-dir is required."""
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return True
    if args.output_dir is None:  # argparse's words, as when --output-dir was required=True
        raise UserError("the following arguments are required: --output-dir")
    return False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="dinov2-patho",
        description="DINOv2 pretraining for pathology on cluster-curated data.",
    )
    parser.add_argument("--version", action="version", version=f"dinov2_patho {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    try:
        args = build_parser(command).parse_args(argv)
        status = int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return status
    except UserError as e:
        print(f"dinov2-patho {command}: error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # an output path that is a file, under a file, a directory, or not ours: the path is the message
        print(f"dinov2-patho {command}: error: {e.filename}: {e.strerror.lower()}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dinov2-patho index info IDX | head`: the reader is gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and nothing left to flush
        return 1


if __name__ == "__main__":
    sys.exit(main())
