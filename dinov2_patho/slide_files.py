"""The one rule for naming a file after a slide: `<directory>/<slide_id><suffix>`, the id unchanged,
for ids that are safe as one file name; any other id is refused in one line.

Checked, not encoded: the file names are the slide ids because people and other tools look them up
by name — the slide folder is the user's own `<slide_id>.svs`, a tile store or a feature file is
`<slide_id>.h5` as CLAM/TRIDENT write them — and an encoding would rename exactly the files of the
ids it changes, so the same slide would have two spellings on disk. Real ids (TCGA barcodes, GTEx
ids, scanner file stems) pass; the ids refused are damaged or hostile: they name a path elsewhere
(`../../x`, `/abs/x`, `a/b`), hold a NUL or control character, are hidden or empty, or are too long
for a file name. Ids are checked where they enter (index build, registry CSVs, slide-task label
CSVs, feature import: one line naming the file, row and id), and again wherever a file is named
after one (`slide_path`), so an index or cache written before this rule cannot name a file outside
its folder either.

Ids of one index that differ only by case (`TCGA-A` and `tcga-a`) are refused too: on a
case-insensitive file system (macOS, most Windows and some NAS shares) their files are one file,
and the second slide's tiles would silently replace the first's.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path

from dinov2_patho.errors import UserError

# 255 bytes is the file-name limit of ext4, XFS, ZFS and Lustre; the longest name written after a
# slide is `.<id><suffix>.<12 hex>.tmp` (atomic_path's temporary file), 18 bytes beside a suffix of
# up to 8 (`.svslide`), with room to spare for a caller's longer suffix.
MAX_ID_BYTES = 200
_SEPARATORS = ("/", "\\")
# control (Cc), format (Cf: zero-width and bidirectional marks that make a name show as another),
# surrogate (Cs: not encodable as a file name) and line/paragraph separators (Zl, Zp)
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def shown(slide_id: str, limit: int = 60) -> str:
    """`slide_id` quoted for an error line, what does not print escaped (repr), a long one cut with its
    length said."""
    if len(slide_id) <= limit:
        return repr(slide_id)
    return f"{slide_id[:limit]!r}... ({len(slide_id)} characters)"


def slide_id_problem(slide_id: str) -> str | None:
    """What makes `slide_id` unsafe as a file name, or None where it is safe."""
    if not isinstance(slide_id, str):
        return f"is a {type(slide_id).__name__}, not text"
    if not slide_id:
        return "is empty"
    for sep in _SEPARATORS:
        if sep in slide_id:
            return f"holds a path separator {sep!r}"
    if slide_id.startswith("."):
        return "starts with '.' (a hidden file, or '.'/'..', a folder)"
    if slide_id != slide_id.strip():
        return "starts or ends with white space (CSV readers strip it)"
    for ch in slide_id:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return f"holds the control or invisible character {ch!r}"
    size = len(slide_id.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return f"is {size} bytes long, more than the {MAX_ID_BYTES} a file name allows"
    return None


def check_slide_id(slide_id: str, where: str) -> str:
    """`slide_id`, or a UserError `<where>: slide id <id> <problem>` (`where`: the file and row)."""
    problem = slide_id_problem(slide_id)
    if problem is not None:
        raise UserError(f"{where}: slide id {shown(str(slide_id))} {problem}; a slide id names its files, "
                        f"so it must be one plain file name")
    return slide_id


def check_distinct_case(slide_ids: Iterable[str], where: str) -> None:
    """A UserError naming the first two of `slide_ids` that differ only by case (see the module)."""
    seen: dict[str, str] = {}
    for slide_id in slide_ids:
        other = seen.setdefault(slide_id.casefold(), slide_id)
        if other != slide_id:
            raise UserError(f"{where}: slide ids {shown(other)} and {shown(slide_id)} differ only by case; "
                            f"their files would be one file on a case-insensitive file system")


def slide_path(directory: str | Path, slide_id: str, suffix: str = "") -> Path:
    """`<directory>/<slide_id><suffix>`: the file (or folder) named after `slide_id`, which lies directly
    in `directory`; an id that is not one plain file name is a UserError naming `directory`."""
    check_slide_id(slide_id, str(directory))
    return Path(directory) / f"{slide_id}{suffix}"
