"""`curate write` (tree -> clustering CSV -> tile index) and `curate sample` (hierarchical balanced
subsets): tree consistency, round trips, the water-filling invariants as hypothesis properties."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinov2_patho.cli import main
from dinov2_patho.curation.sampling import balanced_rows
from dinov2_patho.curation.tree import ClusterTree, level_dir, write_level, write_manifest
from dinov2_patho.curation.tree_check import check_tree
from dinov2_patho.curation.write import write_clusters
from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_tree(root: Path, num_points: int, clusters: list[int], seed: int, skew: float = 0.3) -> ClusterTree:
    """A random tree: skewed cluster sizes (Dirichlet weights), empty clusters allowed, random distances."""
    rng = np.random.default_rng(seed)
    points = num_points
    for level, k in enumerate(clusters, 1):
        assignment = rng.choice(k, points, p=rng.dirichlet(np.full(k, skew)))
        write_level(root, level, rng.normal(size=(k, 4)), assignment, rng.random(points))
        points = k
    write_manifest(root, num_points, clusters)
    return ClusterTree.open(root)


trees = st.tuples(
    st.integers(1, 400),  # tiles
    st.lists(st.integers(1, 40), min_size=1, max_size=3).map(lambda ks: sorted(ks, reverse=True)),
    st.integers(0, 2**32 - 1),  # tree seed
    st.sampled_from([0.1, 0.5, 5.0]),  # cluster-size skew: very unequal .. near equal
)


def check_balanced(tree: ClusterTree, rows: np.ndarray) -> None:
    """Every level, every parent (the root above the top level): two children's counts differ by at most
    1 unless the smaller one got all its tiles."""
    for level in range(1, tree.num_levels + 1):
        labels = tree.tile_labels(level)
        k = tree.clusters[level - 1]
        sizes = np.bincount(labels, minlength=k)
        counts = np.bincount(labels[rows], minlength=k)
        parents = (np.asarray(tree.array(level + 1, "assignment")) if level < tree.num_levels
                   else np.zeros(k, np.int64))
        for parent in np.unique(parents):
            children = np.flatnonzero(parents == parent)
            for i in children:
                for j in children:
                    if counts[i] < counts[j] - 1:
                        assert counts[i] == sizes[i], (level, parent, i, j, counts[i], counts[j], sizes[i])


@SETTINGS
@given(trees, st.data(), st.sampled_from(["random", "closest"]), st.integers(0, 2**32 - 1))
def test_balanced_subset_properties(tree_params, data, strategy, seed):
    num_points, clusters, tree_seed, skew = tree_params
    with tempfile.TemporaryDirectory() as root:
        tree = make_tree(Path(root), num_points, clusters, tree_seed, skew)
        target = data.draw(st.integers(1, num_points), label="target")
        rows = balanced_rows(tree, target, strategy, seed, progress=False).rows
        assert rows.dtype == np.int64 and rows.size == target
        assert (np.diff(rows) > 0).all()  # sorted, no duplicates
        assert rows[0] >= 0 and rows[-1] < num_points
        check_balanced(tree, rows)
        again = balanced_rows(tree, target, strategy, seed, progress=False).rows
        np.testing.assert_array_equal(rows, again)
        if strategy == "closest":  # within each leaf cluster, no unpicked tile is closer than a picked one
            labels, dist = tree.tile_labels(1), np.asarray(tree.array(1, "distances"))
            picked = np.zeros(num_points, bool)
            picked[rows] = True
            for c in np.unique(labels[rows]):
                inside = labels == c
                if (inside & ~picked).any():
                    assert dist[inside & picked].max() <= dist[inside & ~picked].min()


def test_water_level_on_a_known_tree(tmp_path):
    """One parent, children of 1, 2, 10 and 10 tiles, target 15: water level 6 -> 1, 2, 6, 6."""
    assignment = np.repeat(np.arange(4), [1, 2, 10, 10])
    write_level(tmp_path, 1, np.zeros((4, 2)), assignment, np.arange(23, dtype=np.float32))
    write_manifest(tmp_path, 23, [4])
    subset = balanced_rows(ClusterTree.open(tmp_path), 15, "closest", 0, progress=False)
    assert subset.counts[0].tolist() == [1, 2, 6, 6]
    assert subset.rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 13, 14, 15, 16, 17, 18]


def test_random_pick_is_not_the_closest(tmp_path):
    """One leaf cluster of 1000 tiles, 100 picked at random: their distance ranks spread over the cluster."""
    write_level(tmp_path, 1, np.zeros((1, 2)), np.zeros(1000, np.int64), np.arange(1000, dtype=np.float32))
    write_manifest(tmp_path, 1000, [1])
    tree = ClusterTree.open(tmp_path)
    picks = [balanced_rows(tree, 100, "random", seed, progress=False).rows for seed in range(5)]
    assert all(350 < p.mean() < 650 for p in picks)  # the closest 100 would average 49.5
    assert len({tuple(p) for p in picks}) == 5


def test_sample_cli_writes_subset_and_summary(tmp_path, capsys):
    make_tree(tmp_path / "tree", 300, [30, 5], seed=1)
    out = tmp_path / "subset.npy"
    assert main(["curate", "sample", "--tree", str(tmp_path / "tree"), "--target", "120", "--out", str(out),
                 "--strategy", "closest", "--seed", "3", "--no-progress"]) == 0
    rows = np.load(out)
    assert rows.dtype == np.int64 and rows.size == 120
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["strategy"] == "closest" and summary["seed"] == 3
    assert [lv["tiles"] for lv in summary["levels"]] == [120, 120]
    assert "largest share" in capsys.readouterr().out
    # the config's default strategy/seed are used without the flags, and a dot-override reaches them
    assert main(["curate", "sample", "--tree", str(tmp_path / "tree"), "--target", "120", "--out", str(out),
                 "--no-progress", "sample.seed=3", "sample.strategy=closest"]) == 0
    np.testing.assert_array_equal(np.load(out), rows)


def test_sample_target_above_tiles_is_one_line_error(tmp_path, capsys):
    make_tree(tmp_path / "tree", 50, [5], seed=0)
    out = tmp_path / "subset.npy"
    assert main(["curate", "sample", "--tree", str(tmp_path / "tree"), "--target", "51", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--target 51" in err and "50 tiles" in err
    assert not out.exists()


def test_write_round_trip(cohort_index, tmp_path, capsys):
    """Tile list + tree -> clusters.csv -> index: rows, slides, coordinates and every level's labels."""
    n = len(cohort_index)
    tree = make_tree(tmp_path / "tree", n, [40, 9, 3], seed=2)
    out = tmp_path / "out"
    assert main(["curate", "write", "--tiles", str(cohort_index.path), "--tree", str(tree.root),
                 "--out", str(out), "--no-progress"]) == 0
    with open(out / "clusters.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["slide_id", "tile_x", "tile_y", "level_1", "level_2", "level_3"]
    assert len(lines) == n + 1
    index = TileIndex.open(out / "index")
    assert len(index) == n and index.slide_names == cohort_index.slide_names
    np.testing.assert_array_equal(index.slides(TileIndex.ALL), cohort_index.slides(TileIndex.ALL))
    for a, b in zip(index.coords(TileIndex.ALL), cohort_index.coords(TileIndex.ALL)):
        np.testing.assert_array_equal(a, b)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(index.cluster_values(k)[index.level(k)], tree.tile_labels(k))
    assert sorted(p.name for p in out.iterdir()) == ["clusters.csv", "index"]  # no temp files left
    # the index trains: batches stratified over the tree's level 2 take equal shares of its clusters
    from dinov2_patho.samplers import build_sampler, subset_view

    sampler = build_sampler({"name": "cluster_stratified", "level": 2, "cache": False}, index, 18)
    labels = tree.tile_labels(2)
    nonempty = np.flatnonzero(np.bincount(labels, minlength=9))
    for _ in range(3):
        shares = np.bincount(labels[sampler.next_batch()], minlength=9)[nonempty]
        assert shares.sum() == 18 and shares.max() - shares.min() <= 1
    # and a balanced subset of the same tree is its `data.subset` view
    subset = tmp_path / "subset.npy"
    assert main(["curate", "sample", "--tree", str(tree.root), "--target", str(n // 3), "--out", str(subset),
                 "--no-progress"]) == 0
    view = subset_view(index, subset)
    np.testing.assert_array_equal(view.row_ids(TileIndex.ALL), np.load(subset))
    batch = build_sampler({"name": "uniform"}, view, 32).next_batch()
    assert np.isin(batch, np.load(subset)).all()


def test_write_count_mismatch_names_both_files(cohort_index, tmp_path, capsys):
    """A `curate tiles` output directory (TILES_DIR/index) whose tile count is not the tree's."""
    tiles_dir = tmp_path / "tiles"
    shutil.copytree(cohort_index.path, tiles_dir / "index")
    make_tree(tmp_path / "tree", len(cohort_index) + 1, [4], seed=0)
    out = tmp_path / "out"
    assert main(["curate", "write", "--tiles", str(tiles_dir), "--tree", str(tmp_path / "tree"),
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tiles_dir / "index") in err
    assert str(tmp_path / "tree" / "manifest.json") in err
    assert f"{len(cohort_index)} tiles" in err and f"num_points {len(cohort_index) + 1}" in err
    assert not out.exists()


def _corrupt(tree: ClusterTree, level: int, name: str, edit) -> None:
    path = level_dir(tree.root, level) / f"{name}.npy"
    array = np.load(path)
    edit(array)
    np.save(path, array)


def test_tree_inconsistency_is_caught(tmp_path, cohort_index):
    tree = make_tree(tmp_path / "tree", len(cohort_index), [20, 6, 2], seed=4, skew=5.0)
    check_tree(tree, progress=False)
    # level 2: a level-1 cluster moved to another parent in assignment.npy only (members.npy disagrees)
    assignment = np.load(level_dir(tree.root, 2) / "assignment.npy")
    moved, new_parent = 7, (assignment[7] + 1) % 6
    _corrupt(tree, 2, "assignment", lambda a: a.__setitem__(moved, new_parent))
    first = min(assignment[moved], new_parent)
    with pytest.raises(UserError, match=rf"level 2: cluster {first} has \d+ points in assignment.npy"):
        check_tree(tree, progress=False)
    _corrupt(tree, 2, "assignment", lambda a: a.__setitem__(moved, assignment[moved]))
    # two members of one cluster swapped with another's: counts agree, membership does not
    members = np.load(level_dir(tree.root, 1) / "members.npy")
    offsets = np.load(level_dir(tree.root, 1) / "member_offsets.npy")
    c = int(np.flatnonzero(np.diff(offsets) > 0)[0])
    d = int(np.flatnonzero(np.diff(offsets) > 0)[1])
    i, j = offsets[c], offsets[d]
    _corrupt(tree, 1, "members", lambda m: m.__setitem__([i, j], m[[j, i]]))
    with pytest.raises(UserError, match=rf"level 1: cluster {c} lists point {members[j]} as a member"):
        check_tree(tree, progress=False)
    _corrupt(tree, 1, "members", lambda m: m.__setitem__(slice(None), members))
    # an out-of-range parent, and a level with the wrong number of points
    _corrupt(tree, 3, "assignment", lambda a: a.__setitem__(2, 9))
    with pytest.raises(UserError, match=r"level 3: point 2 is assigned to cluster 9, but the level has "
                                        r"clusters 0..1"):
        check_tree(tree, progress=False)
    np.save(level_dir(tree.root, 3) / "assignment.npy", np.zeros(5, np.int32))
    wrong_length = r"level 3: assignment.npy has shape \(5,\) .* expected \(6,\) \(the level-2 clusters\)"
    with pytest.raises(UserError, match=wrong_length):
        check_tree(tree, progress=False)
    np.save(level_dir(tree.root, 3) / "assignment.npy", np.zeros(6, np.float32))
    with pytest.raises(UserError, match=r"level 3: assignment.npy holds float32, expected integer ids"):
        check_tree(tree, progress=False)
    (level_dir(tree.root, 3) / "assignment.npy").write_bytes(b"not a npy file")
    with pytest.raises(UserError, match=r"level_3/assignment.npy: cannot read"):
        check_tree(tree, progress=False)
    # `curate write` refuses the broken tree and leaves nothing behind
    out = tmp_path / "out"
    with pytest.raises(UserError, match="level_3/assignment.npy: cannot read"):
        write_clusters(cohort_index.path, tree.root, out, progress=False)
    assert not (out / "clusters.csv").exists() and not (out / "index").exists()
