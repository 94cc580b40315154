"""`dinov2-patho launch train|eval|curate`: submit a training, evaluation or curation job to SLURM.

    dinov2-patho launch train --nodes 2 --gpus-per-node 8 --partition gpu --timeout 1440 \
        --config-file configs/train/vitl14_t1_bs.yaml train.iterations=125000
    dinov2-patho launch eval --partition gpu --gpus-per-node 1 -- <dinov2-patho eval arguments>
    dinov2-patho launch curate --nodes 4 --gpus-per-node 8 -- embed --tiles T --out E --backbone uni.bin ...

The job runs one task per GPU (or `--tasks-per-node` tasks on a CPU partition) with
torch.distributed's variables set from SLURM's; its output directory is
`<output-root>/<name>_<jobid>`. Preempted or out of time, it checkpoints and requeues
itself, and the training resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dinov2_patho.cli import build_parser
from dinov2_patho.logging import setup_logging
from dinov2_patho.run.jobs import CommandJob, TrainJob
from dinov2_patho.run.submit import (
    LaunchError,
    SlurmResources,
    output_dir_pattern,
    parse_sbatch_options,
    submit,
)


def _add_slurm_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    group = parser.add_argument_group("SLURM resources")
    group.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    group.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (default: 0, CPU job)")
    group.add_argument("--tasks-per-node", type=int, default=None,
                       help="tasks per node on a CPU partition (default: --gpus-per-node, or 1)")
    group.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 with GPUs, 1 without")
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    group.add_argument("--timeout", type=int, default=60, metavar="MIN", help="time limit in minutes")
    group.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    group.add_argument("--account", default=None, help="SLURM account to charge")
    group.add_argument("--qos", default=None, help="SLURM quality of service")
    group.add_argument("--constraint", default=None, help="SLURM node features, e.g. a100")
    group.add_argument("--signal-delay", type=int, default=120, metavar="S",
                       help="send the checkpoint signal S seconds before the time limit")
    group.add_argument("--max-timeouts", type=int, default=10,
                       help="how many times a job that hits its time limit is requeued")
    group.add_argument("--sbatch", action="append", default=[], metavar="OPTION=VALUE",
                       help="any other sbatch option, e.g. --sbatch mail-type=END (repeatable)")
    parser.add_argument("--output-root", default="runs/slurm",
                        help="the job's output directory is OUTPUT_ROOT/NAME_JOBID")
    parser.add_argument("--name", default=default_name, help=f"SLURM job name (default: {default_name})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    train = sub.add_parser("train", help="DINOv2 pretraining", description="Submit `dinov2-patho train`.")
    _add_slurm_arguments(train, "dinov2-patho-train")
    train.add_argument("--config-file", default=None,
                       help="training config, merged over the defaults (`dinov2-patho train --print-config`)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. train.iterations=10")
    evaluate = sub.add_parser("eval", help="evaluation", description="Submit `dinov2-patho eval ARGS`; "
                              "`%j` in an argument becomes the job id; without --output-dir, the "
                              "results go to the job's output directory.")
    _add_slurm_arguments(evaluate, "dinov2-patho-eval")
    evaluate.add_argument("eval_args", nargs=argparse.REMAINDER, metavar="-- EVAL_ARGS",
                          help="arguments of `dinov2-patho eval`, after `--`")
    curate = sub.add_parser("curate", help="curation", description="Submit `dinov2-patho curate ARGS` "
                            "on every task (`curate embed` shards the tiles over them and resumes when "
                            "requeued); `%j` in an argument becomes the job id.")
    _add_slurm_arguments(curate, "dinov2-patho-curate")
    curate.add_argument("curate_args", nargs=argparse.REMAINDER, metavar="-- CURATE_ARGS",
                        help="arguments of `dinov2-patho curate`, after `--`")


def resources_from_args(args: argparse.Namespace) -> SlurmResources:
    return SlurmResources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, timeout_min=args.timeout,
        mem_gb=args.mem_gb, account=args.account, qos=args.qos, constraint=args.constraint,
        signal_delay_s=args.signal_delay, max_timeouts=args.max_timeouts,
        extra=parse_sbatch_options(args.sbatch),
    )


def _after_dashes(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else list(args)


def checked_command(command: str, args: list[str]) -> list[str]:
    """`COMMAND ARGS`, checked now by that command's parser, so a typo fails here, not in the queue."""
    if not args:
        raise LaunchError(f"launch {command}: give the `dinov2-patho {command}` arguments after `--`")
    argv = [command, *args]
    try:
        build_parser(command).parse_args(argv)
    except SystemExit as e:  # argparse printed the reason
        raise LaunchError(f"launch {command}: `dinov2-patho {shlex.join(argv)}` is not a valid "
                          "command") from e
    return argv


def eval_command(eval_args: list[str], output_dir: Path) -> list[str]:
    """`eval ARGS`, checked now by the eval parser; the job's output directory unless
    ARGS name one."""
    eval_args = _after_dashes(eval_args)
    if eval_args and not any(a == "--output-dir" or a.startswith("--output-dir=") for a in eval_args):
        eval_args += ["--output-dir", str(output_dir)]
    return checked_command("eval", eval_args)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    resources = resources_from_args(args)
    pattern = output_dir_pattern(args.output_root, args.name)
    if args.job == "train":
        from dinov2_patho.config_files import to_container
        from dinov2_patho.train.config import load_train_config, validate_config

        # resolved and checked now, so a bad key or path fails here rather than in the queue
        cfg = load_train_config(args.config_file, args.overrides)
        validate_config(cfg)
        job, output_dir = submit(TrainJob(to_container(cfg), pattern), resources, args.output_root, args.name,
                                 config=cfg, argv=sys.argv)
    else:
        argv = eval_command(args.eval_args, pattern) if args.job == "eval" else \
            checked_command("curate", _after_dashes(args.curate_args))
        job, output_dir = submit(CommandJob(argv), resources, args.output_root, args.name, argv=sys.argv)
    print(f"submitted job {job.job_id}: output {output_dir}")
    return 0
