"""SIGKILL at seeded-random points of `curate kmeans` and `curate embed`: mid-Lloyd inside a k-means
resampling step, mid-shard between tile reads, at an atomic write, at a clean-up after one; the rerun
resumes and its files are the uninterrupted run's, sha256 for sha256 (timings aside)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import sigkill
from omegaconf import OmegaConf
from test_curation_embed import SMALL, clean_run, curate_embed, tiles_dir  # noqa: F401 - fixtures

from dinov2_patho.cli import main
from dinov2_patho.curation import hierarchy

SEED = 25
# the functions whose calls are the kill points: every read of k-means points (the init's sample, a run's
# rows), every Lloyd pass and reassignment, every tile read, every atomic write's rename, every file or
# directory removal
WRITES = ["os:replace", "pathlib:Path.unlink", "shutil:rmtree"]
KMEANS_TARGETS = ["dinov2_patho.curation.kmeans:read_rows", "dinov2_patho.curation.kmeans:assign", *WRITES]
EMBED_TARGETS = ["dinov2_patho.data.dataset:TileDataset._item", *WRITES]
pytestmark = pytest.mark.slow  # a child interpreter per kill point


def pick(labels: list[str], kinds: dict[str, str], rng: random.Random) -> list[int]:
    """One call number (1-based) per kind: a seeded-random call among those whose label matches its regex."""
    points = []
    for kind, pattern in kinds.items():
        matching = [i + 1 for i, label in enumerate(labels) if re.search(pattern, label)]
        assert matching, f"no call is {kind}: {sorted(set(labels))}"
        points.append(rng.choice(matching))
    return points


def small_tree_inputs(tmp_path: Path, seed: int, level_2_steps: int) -> Path:
    """tmp_path/x.npy (400 x 8 float16) and the config of a small two-level resampled tree, returned."""
    np.save(tmp_path / "x.npy", np.random.default_rng(seed).standard_normal((400, 8)).astype(np.float16))
    config = tmp_path / "levels.yaml"
    config.write_text(OmegaConf.to_yaml({"kmeans": {"engine": "torch", "device": "cpu", "chunk_rows": 64,
                                                    "levels": [
                                                        {"clusters": 16, "resampling_steps": 4,
                                                         "sample_per_cluster": 6},
                                                        {"clusters": 4, "resampling_steps": level_2_steps,
                                                         "sample_per_cluster": 2}]}}))
    return config


def test_curate_kmeans_killed_anywhere_resumes_byte_identical(tmp_path, monkeypatch):
    config = small_tree_inputs(tmp_path, seed=5, level_2_steps=3)

    def argv(out: Path) -> list[str]:
        return ["curate", "kmeans", "--embeddings", str(tmp_path / "x.npy"), "--out", str(out),
                "--config-file", str(config), "--no-progress"]

    step = ["before level 1"]
    real = hierarchy.LevelBuilder.kmeans

    def tracked(self, points, k, seed, desc, centroids=None):
        step[0] = desc
        return real(self, points, k, seed, desc, centroids)

    monkeypatch.setattr(hierarchy.LevelBuilder, "kmeans", tracked)
    labels = sigkill.calls(lambda: main(argv(tmp_path / "clean")), KMEANS_TARGETS,
                           lambda target: f"{step[0]} {target}")
    monkeypatch.undo()
    points = pick(labels, {"mid-Lloyd in a resampled step": r"step [1-9]\d* \S+:assign$",
                           "an atomic write": r"os:replace", "a clean-up": r"unlink|rmtree"},
                  random.Random(SEED))
    # and the clean-up right after level 1's done.json: its step checkpoints' removal
    points.append(labels.index("level 1 step 3 shutil:rmtree") + 1)
    skip = ("done.json", "kmeans_summary.json", ".lock")  # timings (and the lock's pid)
    clean = sigkill.sha256s(tmp_path / "clean", skip)
    for n in points:
        out = tmp_path / f"killed_at_{n}"
        sigkill.run_killed_at_call(n, KMEANS_TARGETS, argv(out))
        assert not (out / "kmeans_summary.json").exists(), f"call {n} ({labels[n - 1]}): the run finished"
        assert main(argv(out)) == 0
        assert sigkill.sha256s(out, skip) == clean, f"killed at call {n} ({labels[n - 1]})"


def test_curate_embed_killed_anywhere_resumes_byte_identical(tiles_dir, clean_run, tmp_path):  # noqa: F811
    def argv(out: Path) -> list[str]:
        return ["curate", "embed", "--tiles", str(tiles_dir), "--out", str(out), "--no-progress", *SMALL]

    labels = sigkill.calls(lambda: main(argv(tmp_path / "count")), EMBED_TARGETS)
    reads = [i for i, label in enumerate(labels) if label.endswith("_item")]
    points = pick(labels, {"mid-shard, after a batch": r"_item", "an atomic write": r"os:replace",
                           "a clean-up": r"unlink|rmtree"}, random.Random(SEED))
    points.append(reads[-1] + 2)  # the first call after the last tile read: the last batch's checkpoint
    # and the clean-up right after the manifest is in place: run.json's removal
    points.append(max(i for i, label in enumerate(labels) if label.endswith("unlink")) + 1)
    clean = sigkill.sha256s(clean_run, [".lock"])
    for n in points:
        out = tmp_path / f"killed_at_{n}"
        sigkill.run_killed_at_call(n, EMBED_TARGETS, argv(out))
        assert curate_embed(tiles_dir, out) == 0
        assert sigkill.sha256s(out, [".lock"]) == clean, f"killed at call {n} ({labels[n - 1]})"
