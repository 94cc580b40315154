"""`curate import`: a folder of trident / CLAM feature files -> the EMB_DIR that `curate embed` writes.

Features already extracted with another encoder (UNI, Virchow2, ...) take the place of `curate embed`:
EMB_DIR gets the same `embeddings.npy` (float16 [N, D], slides in slide id order, each file's rows in
its order), `slides.csv` and `manifest.json` (last), and also the tile list the coords give, as
`curate tiles` writes it (`tiles.csv`, `index/`), so EMB_DIR is the `--tiles` of `curate write`:

    dinov2-patho curate import --features trident/20x_256px/features_uni_v1 --out EMB_DIR
    dinov2-patho curate kmeans --embeddings EMB_DIR --out TREE
    dinov2-patho curate write --tiles EMB_DIR --tree TREE --out CLUSTERS

Streamed a block of rows at a time; `progress.json` counts the files copied, so a killed import resumes
at the first file not done; a directory of another folder's import is refused, never mixed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.curation.embed import (
    EMBEDDINGS,
    FORMAT_VERSION,
    MANIFEST,
    PARTIAL,
    RUN,
    SLIDES,
    check_settings,
)
from dinov2_patho.data.feature_files import FeatureFile, open_feature_folder
from dinov2_patho.data.folders import INDEX, TILES_CSV
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.jsonfile import read_json

PROGRESS = "progress.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def files_fingerprint(files: list[FeatureFile]) -> str:
    """sha256 over each file's slide id, shape, size and modification time: a changed folder (a file
    added, removed or rewritten) is another fingerprint, without reading 670 GB to tell."""
    h = hashlib.sha256()
    for f in files:
        st = f.path.stat()
        h.update(f"{f.slide_id}\0{f.num_rows}\0{f.dim}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def import_features(features: str | Path, out: str | Path, *, progress: bool = True) -> Path:
    """`curate import`: a folder of trident / CLAM `<slide_id>.h5` feature files -> OUT as `curate embed`
    writes it (embeddings.npy, slides.csv, manifest.json), with the tile list of their coords (tiles.csv,
    index/), resumed after a kill. Returns OUT's embeddings.npy."""
    from dinov2_patho.data.index import build_index
    from dinov2_patho.progress import progress_bar

    files = open_feature_folder(features)
    out = Path(out)
    n, dim = sum(f.num_rows for f in files), files[0].dim
    settings = {"features": {"path": str(Path(features).resolve()), "files": len(files),
                             "fingerprint": files_fingerprint(files)},
                "tiles": {"num_rows": n, "from": "coords"}, "dim": dim}
    if check_settings(out, settings):
        print(f"curate import: {out} already holds these features ({n} x {dim}); nothing to do")
        return out / EMBEDDINGS
    done = _prepare(out, settings, n, dim)
    if not (out / INDEX / "manifest.json").is_file():
        _write_tiles(out / TILES_CSV, files, progress)
        build_index(out / TILES_CSV, out / INDEX, progress=progress)
    header = np.load(out / PARTIAL, mmap_mode="r").offset
    first = sum(f.num_rows for f in files[:done])
    # written with plain file writes, not a memory map: mapped pages would count as the process's memory
    with open(out / PARTIAL, "r+b") as dst, progress_bar(total=n, initial=first, unit="tile", unit_scale=True,
                                                 desc="curate import", disable=not progress) as bar:
        for i in range(done, len(files)):
            f = files[i]
            for a, x in f.feature_blocks():
                dst.seek(header + (first + a) * dim * 2)
                dst.write(_float16(x, f, a).tobytes())
                bar.update(len(x))
            first += f.num_rows
            dst.flush()
            os.fsync(dst.fileno())  # before the progress mark that says these rows are on disk
            atomic_write_text(out / PROGRESS, json.dumps({"files": i + 1}))
    _finish(out, files, settings)
    print(f"curate import: {len(files)} slides, {n} tiles x {dim} -> {out / EMBEDDINGS}; tile list "
          f"{out / INDEX} (the --tiles of `curate write`)")
    return out / EMBEDDINGS


def _float16(x: np.ndarray, f: FeatureFile, first_row: int) -> np.ndarray:
    """float16 rows, as `curate embed` stores them; a value beyond float16's range is an error, not an inf."""
    big = np.abs(x).max(1) > FLOAT16_MAX
    if big.any():
        row = first_row + int(np.argmax(big))
        raise UserError(f"{f.path}: features row {row} holds {np.abs(x[row - first_row]).max():g}, beyond "
                        f"float16's range (±{FLOAT16_MAX:g}) in which embeddings are stored")
    return x.astype(np.float16)


def _prepare(out: Path, settings: dict[str, Any], n: int, dim: int) -> int:
    """The files already copied by a resumed run, or 0 after setting up a fresh one."""
    if (out / RUN).is_file() and (out / PARTIAL).is_file():
        if not (out / PROGRESS).is_file():
            return 0
        done = read_json(out / PROGRESS, "import progress record", "delete that directory to start over",
                         shape={"files": int})["files"]
        if not 0 <= done <= settings["features"]["files"]:
            raise UserError(f"{out / PROGRESS}: {done} files done of {settings['features']['files']}; "
                            "delete that directory to start over")
        return done
    out.mkdir(parents=True, exist_ok=True)
    for stale in (EMBEDDINGS, SLIDES, PROGRESS, TILES_CSV):  # of an older run whose manifest was removed
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / INDEX, ignore_errors=True)
    with atomic_path(out / PARTIAL) as tmp:
        np.lib.format.open_memmap(tmp, "w+", np.float16, (n, dim)).flush()
    run_state = {"format_version": FORMAT_VERSION, "settings": settings}
    atomic_write_text(out / RUN, json.dumps(run_state, indent=1))
    return 0


def _write_tiles(path: Path, files: list[FeatureFile], progress: bool) -> None:
    """slide_id,tile_x,tile_y of every row, from the coords (checked as integers), streamed."""
    from dinov2_patho.progress import progress_bar

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as out, \
            progress_bar(total=sum(f.num_rows for f in files), unit="tile", unit_scale=True, desc="tile list",
                 disable=not progress) as bar:
        w = csv.writer(out)
        w.writerow(("slide_id", "tile_x", "tile_y"))
        for f in files:
            for _, xy in f.coord_blocks():
                w.writerows((f.slide_id, x, y) for x, y in xy.tolist())
                bar.update(len(xy))


def _finish(out: Path, files: list[FeatureFile], settings: dict[str, Any]) -> None:
    """slides.csv, embeddings.npy, manifest.json (last), as `curate embed` finishes; the run state dropped."""
    with atomic_path(out / SLIDES) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("slide_id", "start_row", "end_row"))
        start = 0
        for file in files:
            w.writerow((file.slide_id, start, start + file.num_rows))
            start += file.num_rows
    os.replace(out / PARTIAL, out / EMBEDDINGS)
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, "dim": settings["dim"],
                "num_rows": settings["tiles"]["num_rows"], "dtype": "float16", "world_size": 1}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    (out / RUN).unlink()
    (out / PROGRESS).unlink(missing_ok=True)
