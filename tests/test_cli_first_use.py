"""What a new user runs first: options and overrides in any order, typos named with their full
key, wrong paths and unknown options as one line before any work starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dinov2_patho.cli import build_parser, main
from dinov2_patho.errors import UserError


@pytest.mark.parametrize("argv, dest", [
    (["train", "--output-dir", "runs/x", "data.index=I", "--dry-run", "train.iterations=2"], "overrides"),
    (["eval", "run", "--benchmarks", "crc", "a.b=1", "--output-dir", "ev", "c.d=2"], "overrides"),
    (["sampler", "dump", "--index", "I", "sampler.name=uniform", "--batch-size", "4", "--steps", "2",
      "--out", "b.npy", "sampler.seed=3"], "overrides"),
    (["curate", "tiles", "--slides", "S", "tiles.workers=1", "--out", "T", "kmeans.seed=1"], "overrides"),
])
def test_overrides_are_collected_around_options(argv, dest):
    args = build_parser(argv[0]).parse_args(argv)
    assert getattr(args, dest) == [a for a in argv if "=" in a and not a.startswith("-")]


def test_an_unknown_option_is_the_subcommands_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--output-dir", "runs/x", "data.index=I", "--dryrun"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "dinov2-patho train: error: unrecognized arguments: --dryrun" in err
    assert "usage: dinov2-patho train" in err


def test_an_unknown_benchmark_option_names_its_key(tmp_path):
    from dinov2_patho.eval.benchmarks import build_benchmark

    # was a TypeError traceback from the adapter's call
    with pytest.raises(UserError, match=r"^datasets.synthetic.rot: not an option of benchmark 'synthetic'; "
                                        r"did you mean 'datasets.synthetic.root'\?$"):
        build_benchmark("synthetic", tmp_path, rot=str(tmp_path))
    with pytest.raises(UserError, match=r"^datasets.bach.magnifications: .*; valid: root$"):
        build_benchmark("bach", tmp_path, magnifications=["40X"])


def test_an_unknown_slide_task_option_names_its_key(tmp_path):
    from dinov2_patho.eval.slide.runner import open_task, slide_config

    cfg = slide_config({"datasets": {"synthetic": {"root": str(tmp_path), "tile": "x"}}})
    with pytest.raises(UserError, match=r"^datasets.synthetic.tile: .*mean 'datasets.synthetic.tiles'"):
        open_task("synthetic", cfg, tmp_path / "cache")


def test_eval_run_takes_no_progress_as_eval_slide_does(tmp_path):
    import yaml

    # an unknown benchmark stops the run once its config is saved, before any feature is computed
    assert main(["eval", "run", "--no-progress", "--arch", "vit_small", "--benchmarks", "nosuch",
                 "--output-dir", str(tmp_path), "backbone.model.img_size=28"]) == 2
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["progress"] is False


@pytest.mark.parametrize("option, message", [("--metadata", "metadata CSV"),
                                             ("--eval-dir", "eval directory")])
def test_report_refuses_a_missing_path_it_was_given(tmp_path, capsys, option, message):
    # a missing --metadata was a FileNotFoundError once the map was drawn, or ignored without a map
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path), "--out", str(out), option, str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dinov2-patho report: error: {message} {tmp_path / 'nope'} does not exist"
    assert not out.exists()


@pytest.mark.parametrize("content", [None, "slide_id,tile_x,tile_y,tissue_type\ns,0,0,a\n"])
def test_index_build_of_a_bad_csv_draws_no_progress_bar(tmp_path, capsys, content):
    from dinov2_patho.data.index.ingest import build

    csv = tmp_path / "clusters.csv"
    if content is not None:
        csv.write_text(content)
    with pytest.raises(UserError, match=r"clusters.csv: (no such file|unknown column)"):
        build(csv, tmp_path / "index", progress=True)
    assert capsys.readouterr().err == ""


def test_a_shipped_configs_bare_name_points_to_where_it_is(tmp_path, monkeypatch):
    from dinov2_patho.config_files import ConfigError, packaged_config
    from dinov2_patho.curation.config import load_curation_config

    monkeypatch.chdir(tmp_path)  # no cpu_smoke.yaml here: the help lists the shipped names
    shipped = packaged_config("curation/cpu_smoke.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"config file cpu_smoke.yaml does not exist; the shipped "
                                                    f"one is {shipped}")):
        load_curation_config("cpu_smoke.yaml")
    with pytest.raises(ConfigError, match="^config file other.yaml does not exist$"):
        load_curation_config("other.yaml")


@pytest.mark.parametrize("unbuffered", [True, False])
def test_output_into_a_closed_pipe_is_no_traceback(tmp_path, unbuffered):
    import os
    import subprocess
    import sys

    from dinov2_patho.data.index.ingest import build

    csv = tmp_path / "clusters.csv"
    csv.write_text("slide_id,tile_x,tile_y,level_1\ns,0,0,1\ns,224,0,2\n")
    build(csv, tmp_path / "index", progress=False)
    read, write = os.pipe()
    os.close(read)  # `dinov2-patho index info IDX | head -1`, head gone before the output
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        argv = [sys.executable, "-m", "dinov2_patho", "index", "info", str(tmp_path / "index")]
        proc = subprocess.run(argv, env={**env, "PYTHONUNBUFFERED": "1"} if unbuffered else env,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 1


def test_knn_says_when_k_exceeds_the_training_images(caplog):
    import logging

    import numpy as np

    from dinov2_patho.eval.heads import knn_classify

    rng = np.random.default_rng(0)
    train = (rng.normal(size=(6, 4)).astype(np.float32), np.arange(6) % 2)
    test = (rng.normal(size=(3, 4)).astype(np.float32), np.arange(3) % 2)
    with caplog.at_level(logging.WARNING):
        results = knn_classify(train, test, ["a", "b"], ks=(3, 20, 100))
    assert set(results) == {3, 20, 100}
    assert [r.getMessage() for r in caplog.records if "kNN" in r.getMessage()] == [
        "kNN: k=20, 100 exceed the 6 training images: each votes with all 6"]


@pytest.mark.parametrize("grid", [["0", "3"], ["-1", "4"]])
def test_cohort_refuses_an_empty_grid_in_one_line(tmp_path, capsys, grid):
    # was a ValueError traceback from the TIFF writer (0) or numpy (negative)
    assert main(["cohort", "--out", str(tmp_path / "c"), "--num-slides", "1", "--grid", *grid]) == 2
    assert capsys.readouterr().err == (f"dinov2-patho cohort: error: grid must be at least 1 x 1 tiles, "
                                       f"got {grid[0]} x {grid[1]}\n")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("option, value", [("--map-points", "0"), ("--map-points", "-1"),
                                           ("--tiles-per-cluster", "0"), ("--mosaic-clusters", "-2"),
                                           ("--batch-steps", "-3")])
def test_report_refuses_counts_out_of_range_in_one_line(tmp_path, capsys, option, value):
    # --map-points -1 was a numpy ValueError traceback, 0 one from PCA; negative counts drew an empty part
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path), "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinov2-patho report: error: --map-points and --tiles-per-cluster must be >= 1")
    assert err.count("\n") == 1 and not out.exists()


def test_eval_features_of_another_backbone_or_preprocessing_are_refused(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from dinov2_patho.eval.runner import run_benchmarks
    from dinov2_patho.models import VisionTransformer

    for split in ("train", "val"):
        for c, colour in (("pink", 200), ("blue", 60)):
            folder = tmp_path / "folder" / split / c
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((16, 16, 3), colour + i, np.uint8)).save(folder / f"{i}.png")

    def vit(seed: int) -> VisionTransformer:
        torch.manual_seed(seed)
        return VisionTransformer(embed_dim=32, depth=1, num_heads=2, img_size=28, patch_size=14)

    heads = {"linear": {"enabled": False}, "logreg": {"enabled": False}, "knn": {"k": [1]}}
    cfg = {"data_root": str(tmp_path), "preprocess": {"size": 28}, "heads": heads, "progress": False,
           "plot": False}
    out = tmp_path / "out"
    run_benchmarks(vit(0), ["folder"], cfg, out)
    # the cache was read back as any later backbone's features, and results.json named that backbone
    with pytest.raises(UserError, match=r"features of other settings \(weights_sha256 "):
        run_benchmarks(vit(1), ["folder"], cfg, out)
    with pytest.raises(UserError, match=r"features of other settings \(preprocess.size \(28 there, 42 now"):
        run_benchmarks(vit(0), ["folder"], {**cfg, "preprocess": {"size": 42}}, out)
    run_benchmarks(vit(0), ["folder"], cfg, out)  # the same backbone reads its cache


@pytest.mark.parametrize("override, message", [
    ("heads.linear.n_runs=0", "heads.linear.n_runs=0: must be an integer >= 1"),
    ("heads.linear.lr=-1", "heads.linear.lr=-1.0: must be > 0"),
    ("heads.knn.k=5", "heads.knn.k=5: must be a non-empty list of integers >= 1"),
    ("heads.knn.k=[10,0]", "heads.knn.k=[10, 0]: must be a non-empty list of integers >= 1"),
    ("heads.logreg.C=[]", "heads.logreg.C=[]: must be a non-empty list of numbers > 0"),
    ("features.batch_size=0", "features.batch_size=0: must be an integer >= 1"),
    ("preprocess.size=0", "preprocess.size=0: must be an integer >= 1"),
    ("preprocess.target_mpp=-0.5", "preprocess.target_mpp=-0.5: must be > 0 (or null)"),
])
def test_eval_values_outside_their_domain_are_one_line(override, message):
    from omegaconf import OmegaConf

    from dinov2_patho.config_files import ConfigError
    from dinov2_patho.eval.runner import eval_config

    eval_config()  # the shipped defaults pass
    # each was a traceback from torch, sklearn or PIL once features were extracted
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        eval_config(OmegaConf.from_dotlist([override]))


@pytest.mark.parametrize("override, message", [
    ("heads.abmil.n_runs=0", "heads.abmil.n_runs=0: must be an integer >= 1"),
    ("heads.abmil.batch_size=0", "heads.abmil.batch_size=0: must be an integer >= 1"),
    ("heads.mean_pool.C=[]", "heads.mean_pool.C=[]: must be a non-empty list of numbers > 0"),
    ("bags.max_tiles=0", "bags.max_tiles=0: must be an integer >= 1 (or null)"),
])
def test_slide_eval_values_outside_their_domain_are_one_line(override, message):
    from omegaconf import OmegaConf

    from dinov2_patho.config_files import ConfigError
    from dinov2_patho.eval.slide.runner import slide_config

    slide_config()
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        slide_config(OmegaConf.from_dotlist([override]))


def test_logs_go_to_stderr_so_stdout_holds_only_results(capsys):
    import logging

    from dinov2_patho.logging import LOGGER_NAME, get_logger, setup_logging

    logger = logging.getLogger(LOGGER_NAME)
    saved = logger.handlers[:], logger.propagate, logger.level
    try:
        setup_logging(rank=0)
        get_logger("dinov2_patho.train.trainer").info("resumed from somewhere")
        out, err = capsys.readouterr()
    finally:  # the package logger as other tests found it
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    # `train --json | jq` read the log lines before the summary on stdout
    assert out == "" and "INFO [rank0] dinov2_patho.train.trainer: resumed from somewhere" in err


def test_a_level_of_an_index_without_levels_says_it_has_none(tmp_path):
    from dinov2_patho.data.index import TileIndex
    from dinov2_patho.data.index.ingest import build
    from dinov2_patho.data.mosaic import parse_level

    csv = tmp_path / "tiles.csv"
    csv.write_text("slide_id,tile_x,tile_y\ns,0,0\ns,224,0\n")
    build(csv, tmp_path / "index", progress=False)
    # was "level 0 does not exist: the index ... has levels 1..0 ()" from `tiles preview --by cluster`
    with pytest.raises(UserError, match=r"index has no cluster levels \(its CSV had no level_K columns\)"):
        parse_level(TileIndex.open(tmp_path / "index"), 0)


@pytest.mark.parametrize("under, message", [("", "file exists"), ("sub", "not a directory")])
def test_an_output_directory_that_is_a_file_is_one_line(tmp_path, capsys, under, message):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = afile / under if under else afile
    # was a FileExistsError / NotADirectoryError traceback (eval run, train, export, curate tiles, ...)
    assert main(["eval", "run", "--benchmarks", "nosuch", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"dinov2-patho eval: error: {out}: {message}\n"


def test_results_record_no_arch_for_a_runs_teacher(tmp_path):
    from dinov2_patho.backbones.load import backbone_record

    run = tmp_path / "run"
    run.mkdir()
    # results.json said arch vit_small (the unused default) for a cpu_smoke run's 96-dim teacher
    assert backbone_record(run, "vit_small", 0) == {"path": str(run), "arch": None, "seed": None}
    assert backbone_record(tmp_path / "w.pth", "vit_large", 0) == {"path": str(tmp_path / "w.pth"),
                                                                    "arch": "vit_large", "seed": None}
    assert backbone_record(None, "vit_small", 3) == {"path": None, "arch": "vit_small", "seed": 3}


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.benchmarks=[synthetc]"],
     "evaluation.benchmarks: unknown benchmark 'synthetc'; did you mean 'synthetic'?"),
    (["evaluation.slide_tasks=[camelyon]"], "evaluation.slide_tasks: 'camelyon' is neither a slide task"),
    (["evaluation.benchmarks=[crc]", "evaluation.config_file=EVAL"], "evaluation.config_file=EVAL: "
                                                                      "heads.linear.n_runs=0: must be"),
])
def test_training_checks_its_evaluation_before_it_starts(tmp_path, overrides, message):
    from dinov2_patho.config_files import ConfigError
    from dinov2_patho.train.config import load_train_config, validate_config

    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text("heads:\n  linear:\n    n_runs: 0\n")
    overrides = [o.replace("EVAL", str(eval_file)) for o in overrides]
    cfg = load_train_config(None, [f"data.index={tmp_path}", *overrides])
    # was an error at the first evaluation, after evaluation.every_n_iterations of training
    with pytest.raises(ConfigError, match=f"^{re.escape(message.replace('EVAL', str(eval_file)))}"):
        validate_config(cfg)


def test_demo_no_progress_reaches_its_evaluations(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from dinov2_patho.demo import method as demo
    from dinov2_patho.eval import runner
    from dinov2_patho.eval.slide import runner as slide_runner

    seen = []
    monkeypatch.setattr(runner, "run_benchmarks", lambda b, names, cfg, out: seen.append(cfg) or
                        {"synthetic": {}})
    monkeypatch.setattr(slide_runner, "run_slide_tasks", lambda b, names, cfg, out, name: seen.append(cfg) or
                        {"synthetic": {}})
    # `demo --no-progress` drew the feature and bag bars of every evaluation
    demo.evaluate({"trained": None}, SimpleNamespace(root=tmp_path), 112, tmp_path, progress=False)
    assert [cfg["progress"] for cfg in seen] == [False, False]


def test_demo_refuses_fewer_slides_than_its_folds_before_any_work(tmp_path, capsys):
    from dinov2_patho.demo.method import FOLDS

    # 3 slides curated and trained for minutes, then the 4-fold cross-validation stopped
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--num-slides", str(FOLDS - 1)]) == 2
    assert f"needs at least {FOLDS} slides" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "cohort").exists()


def test_train_no_progress_reaches_the_slide_preflight(cohort, cohort_index, tmp_path, monkeypatch):
    from test_train import SMOKE, TINY, _data

    from dinov2_patho.train import trainer as trainer_mod

    asked = []

    def preflight(cfg, index, *, progress: bool = True):
        asked.append(progress)

    monkeypatch.setattr(trainer_mod, "slide_preflight", preflight)
    monkeypatch.setattr(trainer_mod, "install_stop_handlers", lambda: None)  # keep pytest's handlers
    args = ["train", "--config-file", str(SMOKE), *_data(cohort, cohort_index), *TINY, "train.iterations=1",
            "train.num_workers=0", "--no-progress"]
    # `train` had no --no-progress: over 10^4 slides its preflight bar was the one thing it drew
    assert main([*args, "--output-dir", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 0
    assert asked == [False, False]


@pytest.mark.parametrize("action, override, message", [
    ("embed", "embed.batch_size=0", "embed.batch_size=0: must be an integer >= 1"),
    ("embed", "embed.device=gpu", "embed.device='gpu': must be one of auto, cuda, cpu"),
    ("embed", "embed.amp=fp8", "embed.amp='fp8': must be one of bf16, fp16, none"),
    ("kmeans", "kmeans.engine=torc", "kmeans.engine='torc': must be one of faiss, torch"),
    ("kmeans", "kmeans.chunk_rows=0", "kmeans.chunk_rows=0: must be an integer >= 1"),
    ("kmeans", "kmeans.init_points_per_centroid=0",
     "kmeans.init_points_per_centroid=0: must be an integer >= 1"),
    ("kmeans", "kmeans.seed=-1", "kmeans.seed=-1: must be an integer >= 0"),
    ("kmeans", "kmeans.tol=-1", "kmeans.tol=-1.0: must be >= 0"),
    ("kmeans", "sample.strategy=nearest", "sample.strategy='nearest': must be one of random, closest"),
])
def test_curation_values_out_of_their_domain_are_one_line_before_work(tmp_path, capsys, action, override,
                                                                      message):
    import numpy as np

    # were ValueError/range()/numpy tracebacks from inside the k-means or the feature loop
    np.save(tmp_path / "e.npy", np.random.default_rng(0).random((64, 4), dtype=np.float32))
    inputs = {"embed": ["--tiles", str(tmp_path / "tiles")],
              "kmeans": ["--embeddings", str(tmp_path / "e.npy")]}
    out = tmp_path / "out"
    assert main(["curate", action, *inputs[action], "--out", str(out), "--no-progress", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dinov2-patho curate: error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_curate_tiles_workers_option_is_checked_as_its_key(tmp_path, capsys, workers):
    # --workers was applied after the check: 0 and -2 ran serially without a word
    out = tmp_path / "out"
    assert main(["curate", "tiles", "--slides", str(tmp_path), "--out", str(out), "--workers", workers]) == 2
    expected = f"dinov2-patho curate: error: tiles.workers={workers}: must be an integer >= 1"
    assert capsys.readouterr().err.strip() == expected
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_curation_device_without_cuda_names_its_own_key(tmp_path, capsys):
    import numpy as np

    from dinov2_patho.config_files import packaged_config

    np.save(tmp_path / "e.npy", np.random.default_rng(0).random((200, 4), dtype=np.float32))
    smoke = packaged_config("curation/cpu_smoke.yaml")
    assert main(["curate", "kmeans", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "t"),
                 "--config-file", str(smoke), "kmeans.device=cuda"]) == 2
    # said "train.device=cuda" whatever the command
    assert capsys.readouterr().err.strip() == ("dinov2-patho curate: error: kmeans.device=cuda but no CUDA "
                                               "device is visible")


def test_a_runs_config_serves_resume_and_report_from_another_directory(cohort, cohort_index, tmp_path,
                                                                         monkeypatch):
    import os

    import yaml
    from test_train import SMOKE, TINY

    from dinov2_patho.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "install_stop_handlers", lambda: None)  # keep pytest's handlers
    monkeypatch.chdir(cohort_index.path.parent)
    relative = [f"data.index={cohort_index.path.name}", f"data.slides={os.path.relpath(cohort.slides_dir)}"]
    run = tmp_path / "run"
    common = [*TINY, "train.iterations=1", "train.num_workers=0", "--no-progress", "--output-dir", str(run)]
    assert main(["train", "--config-file", str(SMOKE), *relative, *common]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert Path(saved["index"]).is_absolute() and Path(saved["index"]).samefile(cohort_index.path)
    assert Path(saved["slides"]).is_absolute() and Path(saved["slides"]).samefile(cohort.slides_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the saved config named the paths relative to the first directory: 'data.index: ... does not exist'
    assert main(["train", "--config-file", str(run / "config.yaml"), *common]) == 0
    # and the report said "the run's tile index ... is not there: give --index"
    assert main(["report", str(run), "--out", "r.html", "--no-progress", "--map-points", "20",
                 "--mosaic-clusters", "0", "--batch-steps", "2"]) == 0
    assert "is not there: give --index" not in (elsewhere / "r.html").read_text()


def test_slide_task_csvs_in_a_run_config_are_absolute_and_task_names_are_kept(tmp_path, monkeypatch):
    from dinov2_patho.train.config import load_train_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.txt").write_text("slide_id,label\n")
    cfg = load_train_config(overrides=["evaluation.slide_tasks=[tasks/labels.csv,camelyon16,labels.txt]"])
    # a relative labels CSV was saved as given: the evaluation hook of a resume from elsewhere lost it
    assert list(cfg.evaluation.slide_tasks) == [str(tmp_path / "tasks" / "labels.csv"), "camelyon16",
                                                str(tmp_path / "labels.txt")]


def test_tiles_preview_writes_the_format_its_suffix_says(cohort, cohort_index, tmp_path, capsys):
    from PIL import Image

    args = ["tiles", "preview", "--index", str(cohort_index.path), "--slides", str(cohort.slides_dir),
            "--rows", "2", "--cols", "2", "--tile-px", "16", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "g.jpg")]) == 0
    with Image.open(tmp_path / "g.jpg") as image:
        assert image.format == "JPEG"  # was PNG bytes in a .jpg
    # an unknown suffix is refused before any tile is read
    assert main([*args, str(tmp_path / "g.xyz")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "g.xyz: cannot write an image with suffix '.xyz'; give .png, .jpg, .webp, ...")
    assert not (tmp_path / "g.xyz").exists()
