"""Session fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinov2_patho.demo.cohort import Cohort, make_cohort

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """8 small synthetic slides (10x10 tiles of 224 px at 0.5 mpp), made once per session."""
    return make_cohort(tmp_path_factory.mktemp("cohort") / "cohort", num_slides=8, seed=0)


@pytest.fixture(scope="session")
def cohort_index(cohort: Cohort, tmp_path_factory: pytest.TempPathFactory):
    """The TileIndex of the cohort's clusters.csv."""
    index = pytest.importorskip("dinov2_patho.data.index")
    return index.build_index(cohort.clusters_csv, tmp_path_factory.mktemp("cohort_index") / "index",
                             progress=False)


@pytest.fixture(scope="session")
def cmu_small_region() -> Path:
    """The real Aperio slide CMU-1-Small-Region.svs, or a skip when it is absent."""
    path = SHARED_DATA / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"real slide {path} is absent")
    return path
