"""What a new user runs first: options and overrides in any order, typos named with their full
key, wrong paths and unknown options as one line before any work starts."""

from __future__ import annotations

import pytest

from dinov2_patho.cli import build_parser, main


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
