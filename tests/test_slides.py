import pytest

from dinov2_patho.data.slides import SlideNotFoundError, SlideRegistry
from dinov2_patho.errors import UserError


def test_directory_search_finds_every_cohort_slide(cohort):
    reg = SlideRegistry.from_dir(cohort.root)
    assert reg.slide_ids() == sorted(cohort.slide_ids)
    for sid in cohort.slide_ids:
        assert reg.path(sid) == cohort.slide_path(sid)


def test_directory_search_extensions_dots_nesting_and_ambiguity(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    tcga = "TCGA-02-0001-01Z-00-DX1.83fce43e-42ac-4dcd-b156-2908e75f2e47"
    names = (f"a/{tcga}.svs", "a/b/S2.NDPI", "S3.mrxs", "notes.txt", "S4.tiff", "b_dup.svs", "a/b_dup.tif")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    reg = SlideRegistry.from_dir(tmp_path)
    assert set(reg.slide_ids()) == {tcga, "S2", "S3", "S4", "b_dup"}
    assert reg.path(tcga) == tmp_path / "a" / f"{tcga}.svs"
    assert reg.path("S2") == tmp_path / "a" / "b" / "S2.NDPI"
    assert "notes" not in reg
    with pytest.raises(SlideNotFoundError, match="'b_dup' is ambiguous") as info:
        reg.path("b_dup")
    assert "b_dup.svs" in str(info.value) and "b_dup.tif" in str(info.value)
    with pytest.raises(SlideNotFoundError, match=f"'nope' not found in {tmp_path}"):
        reg.path("nope")


def test_csv_registry_resolves_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.svs").write_bytes(b"x")
    (tmp_path / "slides.csv").write_text(
        "slide_id,path,extra\nX,sub/x.svs,1\nY,/abs/missing.svs,2\nX,sub/x.svs,3\n")
    reg = SlideRegistry.from_spec(tmp_path / "slides.csv")
    assert len(reg) == 2
    assert reg.path("X") == tmp_path / "sub" / "x.svs"
    with pytest.raises(SlideNotFoundError, match="'Y': file /abs/missing.svs .*does not exist"):
        reg.path("Y")


@pytest.mark.parametrize(("text", "match"), [
    ("slide,path\nA,a.svs\n", "lacks column.*slide_id"),
    ("slide_id,path\nA,a.svs\nA,b.svs\n", r"slides.csv:3: slide 'A' listed twice"),
    ("slide_id,path\nA,\n", r"slides.csv:2: empty slide_id or path"),
])
def test_csv_registry_errors_name_file_and_line(tmp_path, text, match):
    (tmp_path / "slides.csv").write_text(text)
    with pytest.raises(UserError, match=match):
        SlideRegistry.from_csv(tmp_path / "slides.csv")


def test_spec_that_is_neither_dir_nor_file(tmp_path):
    with pytest.raises(UserError, match="neither a directory nor a CSV"):
        SlideRegistry.from_spec(tmp_path / "absent")
    with pytest.raises(UserError, match="does not exist"):
        SlideRegistry.from_dir(tmp_path / "absent")
