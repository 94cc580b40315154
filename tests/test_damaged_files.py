"""Files we wrote, damaged (cut short, replaced by an object array, by random bytes, by a file not ours),
then read by the command that reads them: one line naming the file, exit 2, never a traceback (caches
rebuild instead: test_eval_heads, test_eval_slide)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_patho.cli import main
from dinov2_patho.data.index import build_index
from dinov2_patho.data.index.format import Manifest, index_files
from dinov2_patho.readback import DamagedFileError, load_npy, load_state


def damage(path: Path, how: str) -> None:
    """Damage the file `path` in place, as `how` says."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: max(1, len(data) // 2)])
    elif how == "object array":
        with open(path, "wb") as f:
            np.save(f, np.array([{"a": 1}, "x"], dtype=object), allow_pickle=True)
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(len(data)).bytes(max(len(data), 64)))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


DAMAGES = ("truncated", "object array", "random bytes", "empty")


@pytest.mark.parametrize("how", DAMAGES)
def test_load_npy_and_load_state_say_what_is_wrong_in_one_line(tmp_path, how):
    np.save(tmp_path / "a.npy", np.arange(1000, dtype=np.int64))
    torch.save({"iteration": 3, "model": {"w": torch.zeros(100)}}, tmp_path / "s.pt")
    for name in ("a.npy", "s.pt"):
        damage(tmp_path / name, how)
    for read in (lambda: load_npy(tmp_path / "a.npy", "column", "rebuild it", mmap_mode="r"),
                 lambda: load_npy(tmp_path / "a.npy", "column", "rebuild it", mmap_mode="r+"),
                 lambda: load_npy(tmp_path / "a.npy", "column", "rebuild it"),
                 lambda: load_state(tmp_path / "s.pt", "checkpoint", "rebuild it", keys=("model",))):
        with pytest.raises(DamagedFileError) as e:
            read()
        line = str(e.value)
        assert "\n" not in line and line.startswith(str(tmp_path)) and "; rebuild it" in line


def test_a_file_of_other_values_or_shape_is_not_ours(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(DamagedFileError, match=r"f.npy: the column holds float32 values, not signed int"):
        load_npy(tmp_path / "f.npy", "column", "", kinds="i")
    with pytest.raises(DamagedFileError, match=r"has shape \(4, 2\), not 1-D$"):
        load_npy(tmp_path / "f.npy", "column", "", ndim=1)
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(DamagedFileError, match=r"t.pt: not a checkpoint: it holds a Tensor, without model"):
        load_state(tmp_path / "t.pt", "checkpoint", "", keys=("model",))
    (tmp_path / "p.pt").write_bytes(pickle.dumps({"model": 1}, protocol=2))  # refused, never run
    with pytest.raises(DamagedFileError, match="p.pt: not a readable checkpoint"):
        load_state(tmp_path / "p.pt", "checkpoint", "")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged_index")
    # values 10, 20: level_1.values.npy is written too; slides interleaved: slide.npy
    (root / "c.csv").write_text("slide_id,tile_x,tile_y,level_1\na,0,0,10\nb,0,0,20\na,224,0,10\n")
    return build_index(root / "c.csv", root / "index", progress=False).path


@pytest.mark.parametrize("how", DAMAGES)
def test_each_damaged_index_column_is_one_line(index_dir, tmp_path, how, capsys):
    columns = [f for f in index_files(Manifest.read(index_dir)) if f.endswith(".npy")]
    assert {"xy.npy", "slide.npy", "level_1.npy", "level_1.sizes.npy", "level_1.values.npy"} <= set(columns)
    for name in columns:
        copy = tmp_path / name / "index"
        copy.mkdir(parents=True)
        for f in index_dir.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        damage(copy / name, how)
        assert main(["index", "info", str(copy)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{copy / name}: " in err and "rebuild the index" in err, err


def _checkpoint(root: Path, state) -> Path:
    ckpt = root / "iter_00000001"
    ckpt.mkdir(parents=True)
    torch.save(state, ckpt / "state.pt")
    return ckpt


@pytest.mark.parametrize("how", [*DAMAGES, "not ours", "a config that does not build"])
def test_a_damaged_checkpoint_is_one_line_for_export_and_eval(how, tmp_path, capsys):
    state = {"iteration": 1, "model": {"teacher.backbone.w": torch.zeros(64)}, "config": {"student": {}}}
    if how == "not ours":
        state = {"weights": torch.zeros(3)}
    ckpt = _checkpoint(tmp_path, state)
    if how in DAMAGES:
        damage(ckpt / "state.pt", how)
    for command in (["export", "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "out")],
                    ["eval", "run", "--backbone", str(ckpt), "--benchmarks", "synthetic", "--output-dir",
                     str(tmp_path / "eval")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(ckpt / "state.pt") in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()
