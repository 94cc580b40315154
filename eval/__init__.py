"""Frozen-backbone evaluation: features, eva's linear probe, kNN, logistic regression,
benchmark adapters. `run_benchmarks` is what the CLI and the trainer call."""

from dinov2_patho.eval.runner import eval_config, run_benchmarks

__all__ = ["eval_config", "run_benchmarks"]
