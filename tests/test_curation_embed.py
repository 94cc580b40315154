"""`curate embed`: rows aligned with the tile list, float16 [N, D] memmap, resume after a kill equal to
a clean run without recomputing finished rows, 2 gloo ranks equal to 1, stale settings refused."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import sigkill
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from dinov2_patho.curation import cli as curate_cli
from dinov2_patho.curation import embed as embed_mod
from dinov2_patho.data.readers import SlideTileSource
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError

# A one-block, 32-wide timm ViT (UNI's model family, weights from a file): cheap on a CPU.
ARCH = "timm/vit_tiny_patch16_224"
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}
SMALL = ("--arch", ARCH, *(f"embed.model.{k}={v}" for k, v in TINY.items()), "embed.batch_size=16",
         "embed.num_workers=0", "embed.device=cpu", "embed.checkpoint_seconds=0")


def parse(action: str, argv: list[str]) -> argparse.Namespace:
    """`dinov2-patho curate ACTION ARGV` parsed."""
    parser = argparse.ArgumentParser()
    curate_cli.add_arguments(parser)
    return parser.parse_args([action, *argv])


def curate_embed(tiles: Path, out: Path, *extra: str) -> int:
    return curate_cli.run(parse("embed", ["--tiles", str(tiles), "--out", str(out), "--no-progress",
                                           *SMALL, *extra]))


@pytest.fixture(scope="module")
def tiles_dir(cohort, tmp_path_factory) -> Path:
    """`curate tiles` over three slides of the cohort."""
    slides = tmp_path_factory.mktemp("embed_slides")
    for sid in cohort.slide_ids[:3]:
        os.symlink(cohort.slide_path(sid), slides / cohort.slide_path(sid).name)
    out = tmp_path_factory.mktemp("embed_tiles") / "tiles"
    assert curate_cli.run(parse("tiles", ["--slides", str(slides), "--out", str(out), "--no-progress",
                                     "tiles.workers=1"])) == 0
    return out


@pytest.fixture(scope="module")
def clean_run(tiles_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb"
    assert curate_embed(tiles_dir, out) == 0
    return out


def tile_rows(tiles_dir: Path) -> list[tuple[str, int, int]]:
    with open(tiles_dir / "tiles.csv", newline="") as f:
        return [(r["slide_id"], int(r["tile_x"]), int(r["tile_y"])) for r in csv.DictReader(f)]


def test_rows_align_with_the_tile_list(tiles_dir, clean_run):
    rows = tile_rows(tiles_dir)
    emb = np.load(clean_run / "embeddings.npy", mmap_mode="r")
    assert isinstance(emb, np.memmap) and emb.dtype == np.float16 and emb.shape == (len(rows), 32)
    assert np.isfinite(emb).all() and len(np.unique(emb, axis=0)) == len(rows)
    with open(clean_run / "slides.csv", newline="") as f:
        ranges = [(r["slide_id"], int(r["start_row"]), int(r["end_row"])) for r in csv.DictReader(f)]
    assert ranges[0][1] == 0 and ranges[-1][2] == len(rows)
    for (sid, a, b), nxt in zip(ranges, [*ranges[1:], None]):
        assert {r[0] for r in rows[a:b]} == {sid} and (nxt is None or nxt[1] == b)
    # Row i is the embedding of tile i of the list: recompute a few from the slide pixels.
    from dinov2_patho.backbones.load import load_backbone
    from dinov2_patho.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD

    model = load_backbone(None, ARCH, seed=0, **TINY)  # embed.seed: the random-init baseline
    slides = json.loads((tiles_dir / "tiles.json").read_text())["slides"]
    source = SlideTileSource(SlideRegistry.from_spec(slides))
    picks = [0, len(rows) // 2, len(rows) - 1]
    tiles = torch.stack([torch.from_numpy(source.read(*rows[i]).copy()) for i in picks]).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.forward_features((tiles.float() / 255 - mean) / std)[:, 0].numpy()
    np.testing.assert_allclose(emb[picks].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    manifest = json.loads((clean_run / "manifest.json").read_text())
    assert (manifest["num_rows"], manifest["dim"], manifest["dtype"]) == (len(rows), 32, "float16")
    assert manifest["settings"]["backbone"]["token"] == "cls" and manifest["settings"]["tiles"]["px"] == 224
    assert sorted(p.name for p in clean_run.iterdir()) == [".lock", "embeddings.npy", "manifest.json",
                                                          "slides.csv"]


def test_resume_after_a_kill_equals_a_clean_run(tiles_dir, clean_run, tmp_path, monkeypatch):
    reads = {"n": 0, "fail_at": 40}
    real_read = SlideTileSource.read

    def counting_read(self, slide_id, x, y):
        reads["n"] += 1
        if reads["n"] == reads["fail_at"]:
            raise KeyboardInterrupt  # a kill: not an error the code handles
        return real_read(self, slide_id, x, y)

    monkeypatch.setattr(SlideTileSource, "read", counting_read)
    out = tmp_path / "emb"
    with pytest.raises(KeyboardInterrupt):
        curate_embed(tiles_dir, out)
    assert not (out / "manifest.json").exists() and not (out / "embeddings.npy").exists()
    (progress,) = (out / "progress").iterdir()
    done = json.loads(progress.read_text())["rows"]
    assert done == 32  # two batches of 16 finished before the kill at the 40th tile
    reads.update(n=0, fail_at=-1)
    assert curate_embed(tiles_dir, out) == 0
    n = len(tile_rows(tiles_dir))
    assert reads["n"] == n - done  # finished rows were not recomputed
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(clean_run / "embeddings.npy"))
    assert (out / "slides.csv").read_text() == (clean_run / "slides.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "embeddings.npy", "manifest.json", "slides.csv"]
    assert reads["n"] == n - done
    assert curate_embed(tiles_dir, out) == 0 and reads["n"] == n - done  # complete: nothing to do


def test_checkpoints_are_spaced_by_checkpoint_seconds(tiles_dir, tmp_path, monkeypatch):
    real_read = SlideTileSource.read

    def read_then_kill(self, slide_id, x, y):
        if read_then_kill.calls == 40:
            raise KeyboardInterrupt
        read_then_kill.calls += 1
        return real_read(self, slide_id, x, y)

    read_then_kill.calls = 0
    monkeypatch.setattr(SlideTileSource, "read", read_then_kill)
    with pytest.raises(KeyboardInterrupt):
        curate_embed(tiles_dir, tmp_path / "emb", "embed.checkpoint_seconds=3600")
    assert list((tmp_path / "emb" / "progress").iterdir()) == []  # no checkpoint within the hour


def _rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert curate_cli.run(parse("embed", argv)) == 0
    os._exit(0)  # passed: skip interpreter teardown, where gloo's threads can abort a finished worker


def test_a_sigkill_at_its_last_write_then_a_rerun_is_byte_identical(tiles_dir, clean_run, tmp_path):
    """SIGKILL (in a child process) at its last atomic write, the manifest's, after embeddings.npy is in
    place: the rerun's files are the clean run's, sha256 for sha256, with no temporary file of the
    killed write left (kills mid-shard: test_resume_after_a_kill_equals_a_clean_run)."""
    writes = sigkill.replaces(lambda: curate_embed(tiles_dir, tmp_path / "count"))
    sigkill.run_killed_at(writes, ["curate", "embed", "--tiles", str(tiles_dir), "--no-progress", *SMALL,
                                   "--out", str(tmp_path / "emb")])
    assert not (tmp_path / "emb" / "manifest.json").exists()
    assert curate_embed(tiles_dir, tmp_path / "emb") == 0
    assert sigkill.sha256s(tmp_path / "emb", [".lock"]) == sigkill.sha256s(clean_run, [".lock"])


def test_a_log_of_curate_embed_holds_lines_not_carriage_returns(tiles_dir, clean_run, tmp_path):
    """stderr to a file (SLURM, nohup, CI): whole progress lines. --tiles is the folder's tiles.csv here."""
    log = tmp_path / "embed.log"
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        assert curate_cli.run(parse("embed", ["--tiles", str(tiles_dir / "tiles.csv"),
                                               "--out", str(tmp_path / "emb"), *SMALL])) == 0
    text = log.read_bytes().decode()  # read_text turns each \r into \n
    assert "\r" not in text and "curate embed (rank 0/1)" in text, text
    assert f"{len(tile_rows(tiles_dir))}/{len(tile_rows(tiles_dir))}" in text.splitlines()[-1]
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "embeddings.npy"),
                                  np.load(clean_run / "embeddings.npy"))


@pytest.mark.slow  # two spawned interpreters import torch and timm: ~10 s each on 2 cores
def test_two_gloo_ranks_equal_one(tiles_dir, clean_run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "emb2"
    argv = ["--tiles", str(tiles_dir), "--out", str(out), "--no-progress", *SMALL]
    mp.spawn(_rank, args=(2, port, argv), nprocs=2, join=True)
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(clean_run / "embeddings.npy"))
    assert (out / "slides.csv").read_text() == (clean_run / "slides.csv").read_text()
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2


def test_embed_size_gives_the_features_of_the_resized_tiles(tiles_dir, clean_run, tmp_path):
    from dinov2_patho.backbones.load import load_backbone
    from dinov2_patho.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from dinov2_patho.data.augment import resize

    out, dynamic = tmp_path / "emb112", "embed.model.dynamic_img_size=true"
    assert curate_embed(tiles_dir, out, "embed.size=112", dynamic) == 0
    rows = tile_rows(tiles_dir)
    emb = np.load(out / "embeddings.npy")
    model = load_backbone(None, ARCH, seed=0, dynamic_img_size=True, **TINY)
    slides = json.loads((tiles_dir / "tiles.json").read_text())["slides"]
    source = SlideTileSource(SlideRegistry.from_spec(slides))
    picks = [0, len(rows) - 1]
    tiles = torch.stack([resize(torch.from_numpy(source.read(*rows[i]).copy()).permute(2, 0, 1), 112)
                         for i in picks])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.forward_features((tiles.float() / 255 - mean) / std)[:, 0].numpy()
    np.testing.assert_allclose(emb[picks].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert json.loads((out / "manifest.json").read_text())["settings"]["tiles"]["size"] == 112
    # the same backbone at another size is other embeddings: refused, as for any other setting
    for size, recorded, now in (([], 112, None), (["embed.size=96"], 112, 96)):
        with pytest.raises(UserError, match=rf"manifest\.json: .*tiles\.size \({recorded} there, {now} now"):
            curate_embed(tiles_dir, out, dynamic, *size)
    with pytest.raises(UserError, match=r"embed\.size=0"):
        curate_embed(tiles_dir, tmp_path / "bad", "embed.size=0")


def test_stale_manifest_or_unfinished_run_is_refused(tiles_dir, clean_run, tmp_path):
    before = {p.name: p.read_bytes() for p in clean_run.iterdir()}
    with pytest.raises(UserError, match=r"manifest\.json: embeddings of different settings "
                                        r"\(backbone\.token \('cls' there, 'patch_mean' now\)\)"):
        curate_embed(tiles_dir, clean_run, "embed.token=patch_mean")
    with pytest.raises(UserError, match=r"manifest\.json: .*backbone\.seed \(0 there, 1 now\)"):
        curate_embed(tiles_dir, clean_run, "embed.seed=1")
    assert {p.name: p.read_bytes() for p in clean_run.iterdir()} == before
    # Weights from a file: other weights under the same path are another backbone.
    from dinov2_patho.backbones.load import load_backbone

    weights = tmp_path / "uni_like.pth"
    torch.save(load_backbone(None, ARCH, seed=1, **TINY).state_dict(), weights)
    out = tmp_path / "emb"
    (out / "run.json").parent.mkdir()
    stale = json.loads((clean_run / "manifest.json").read_text())["settings"]
    stale["backbone"]["path"] = "/elsewhere.pth"
    (out / "run.json").write_text(json.dumps({"format_version": 1, "settings": stale}))
    with pytest.raises(UserError, match=r"run\.json: an unfinished run of different settings "
                                        r"\(backbone\.path \('/elsewhere\.pth' there"):
        curate_embed(tiles_dir, out, "--backbone", str(weights))
    (out / "run.json").unlink()
    assert curate_embed(tiles_dir, out, "--backbone", str(weights)) == 0
    torch.save(load_backbone(None, ARCH, seed=2, **TINY).state_dict(), weights)
    with pytest.raises(UserError, match=r"manifest\.json: .*backbone\.weights_sha256"):
        curate_embed(tiles_dir, out, "--backbone", str(weights))
    torch.save({"blocks.0.unexpected": torch.zeros(1)}, weights)
    with pytest.raises(UserError, match=r"uni_like\.pth: does not fit arch timm/vit_tiny_patch16_224 "
                                        r"\(.*\): \S+ missing from the checkpoint$"):
        curate_embed(tiles_dir, tmp_path / "other", "--backbone", str(weights))


def test_embeddings_of_another_tile_list_are_refused(tiles_dir, clean_run, tmp_path):
    other = tmp_path / "tiles"
    slides = json.loads((tiles_dir / "tiles.json").read_text())["slides"]
    assert curate_cli.run(parse("tiles", ["--slides", slides, "--out", str(other), "--no-progress",
                                     "tiles.workers=1", "tiles.min_tissue_fraction=0.95"])) == 0
    assert len(tile_rows(other)) != len(tile_rows(tiles_dir))
    with pytest.raises(UserError, match=r"manifest\.json: embeddings of different settings "
                                        r"\(tiles\.fingerprint"):
        curate_embed(other, clean_run)


def test_bad_input_is_one_line_and_leaves_nothing(tiles_dir, tmp_path):
    out = tmp_path / "emb"
    with pytest.raises(UserError, match=r"^--tiles .*nowhere: neither a `curate tiles` folder nor a file"):
        curate_embed(tmp_path / "nowhere", out)
    with pytest.raises(UserError, match=r"missing\.csv.*neither a directory nor a CSV file"):
        curate_embed(tiles_dir, out, "--slides", str(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match=r"^embed\.token='mean': must be one of cls, patch_mean, "):
        curate_embed(tiles_dir, out, "embed.token=mean")
    with pytest.raises(UserError, match=r"nope\.pth"):
        curate_embed(tiles_dir, out, "--backbone", str(tmp_path / "nope.pth"))
    assert not out.exists()


def test_launch_curate_checks_the_command_before_submitting(tmp_path):
    pytest.importorskip("submitit")
    from dinov2_patho.run.cli import checked_command

    args = ["embed", "--tiles", "t", "--out", "e_%j", "--backbone", "uni.bin", "embed.batch_size=256"]
    assert checked_command("curate", args) == ["curate", *args]
    with pytest.raises(UserError, match=r"launch curate: `dinov2-patho curate embed --bogus` is not a valid"):
        checked_command("curate", ["embed", "--bogus"])
    with pytest.raises(UserError, match="arguments after `--`"):
        checked_command("curate", [])


@given(st.integers(0, 10**12), st.integers(1, 4096))
def test_shards_partition_the_rows_contiguously_and_evenly(n, world):
    bounds = [embed_mod.shard(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_the_summary_names_a_runs_teacher_not_the_arch_default(tiles_dir, cohort, cohort_index, tmp_path,
                                                                monkeypatch, capsys):
    from test_train import SMOKE
    from test_train import TINY as TINY_RUN

    from dinov2_patho.cli import main
    from dinov2_patho.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "install_stop_handlers", lambda: None)  # keep pytest's handlers
    run = tmp_path / "run"
    assert main(["train", "--config-file", str(SMOKE), f"data.index={cohort_index.path}",
                 f"data.slides={cohort.slides_dir}", *TINY_RUN, "train.iterations=1", "train.num_workers=0",
                 "--no-progress", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert curate_cli.run(parse("embed", ["--tiles", str(tiles_dir), "--out", str(tmp_path / "emb"),
                                           "--no-progress", "--backbone", str(run), "embed.batch_size=16",
                                           "embed.num_workers=0", "embed.device=cpu"])) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    # said "(cls, vit_small)": --arch's default, unused for a run's teacher (48-dim, 2 blocks here)
    assert f"(cls, the teacher of {run}: ViT 48-dim, 2 blocks, patch 16)" in summary, summary


def test_export_writes_each_slide_as_a_trident_file_with_its_tiles(clean_run, tiles_dir, tmp_path, capsys):
    import h5py

    from dinov2_patho.cli import main

    out = tmp_path / "h5"
    assert main(["curate", "export", "--embeddings", str(clean_run), "--out", str(out), "--no-progress"]) == 2
    assert "pass --tiles" in capsys.readouterr().err  # an embed directory has no tile list of its own
    assert main(["curate", "export", "--embeddings", str(clean_run), "--tiles", str(tiles_dir), "--out",
                 str(out), "--no-progress"]) == 0
    matrix, rows = np.load(clean_run / "embeddings.npy"), tile_rows(tiles_dir)
    with open(tiles_dir / "slides.csv", newline="") as f:
        tile_px = {r["slide_id"]: int(r["tile_px"]) for r in csv.DictReader(f)}
    with open(clean_run / "slides.csv", newline="") as f:
        slides = list(csv.DictReader(f))
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(r["slide_id"] for r in slides)
    for r in slides:
        a, b = int(r["start_row"]), int(r["end_row"])
        with h5py.File(out / f"{r['slide_id']}.h5", "r") as f:
            np.testing.assert_array_equal(f["features"][:], matrix[a:b].astype(np.float32))
            assert [(r["slide_id"], x, y) for x, y in f["coords"][:].tolist()] == rows[a:b]
            assert f["coords"].attrs["patch_size_level0"] == tile_px[r["slide_id"]]
