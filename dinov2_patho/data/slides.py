"""Slide registry: slide_id -> slide file.

Two sources: a CSV with columns `slide_id,path` (relative paths are relative to the CSV's
directory), or a directory searched recursively for `<slide_id>.<ext>` with a known
whole-slide extension. The registry is a plain dict of strings, cheap to pickle to workers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

from dinov2_patho.errors import UserError
from dinov2_patho.slide_files import check_slide_id
from dinov2_patho.textfile import open_text

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


SLIDES_HELP = "a slide folder (searched for <slide_id>.<ext>) or a slide_id,path CSV"  # every --slides

class SlideNotFoundError(UserError):
    pass


class SlideRegistry:
    def __init__(self, paths: dict[str, str], source: str, ambiguous: dict[str, list[str]] | None = None):
        self._paths = paths
        self._ambiguous = ambiguous or {}
        self.source = source

    @classmethod
    def from_csv(cls, csv_path: str | Path) -> SlideRegistry:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise UserError(f"slide CSV {csv_path} does not exist")
        paths: dict[str, str] = {}
        with open_text(csv_path) as f:
            reader = csv.DictReader(f)
            missing = {"slide_id", "path"} - set(reader.fieldnames or ())
            if missing:
                raise UserError(f"{csv_path}: header lacks column(s) {sorted(missing)} "
                                f"(need slide_id,path; got {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                slide_id, path = (row["slide_id"] or "").strip(), (row["path"] or "").strip()
                if not slide_id or not path:
                    raise UserError(f"{csv_path}:{line}: empty slide_id or path")
                check_slide_id(slide_id, f"{csv_path}:{line}")
                full = str(csv_path.parent / path)
                if paths.setdefault(slide_id, full) != full:
                    raise UserError(f"{csv_path}:{line}: slide {slide_id!r} listed twice with different "
                                    f"paths ({paths[slide_id]} and {full})")
        return cls(paths, str(csv_path))

    @classmethod
    def from_dir(cls, root: str | Path, extensions: Iterable[str] = SLIDE_EXTENSIONS) -> SlideRegistry:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"slide directory {root} does not exist")
        exts = tuple(e.lower() for e in extensions)
        paths: dict[str, str] = {}
        ambiguous: dict[str, list[str]] = {}
        # One walk up front: a lookup per tile must not touch the file system. Hidden entries are not
        # slides (`._x.svs` is macOS metadata); the walk follows no link out of `root`.
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                ext = next((e for e in exts if name.lower().endswith(e)), None)
                if ext is None or name.startswith("."):
                    continue
                slide_id, full = name[: -len(ext)], os.path.join(dirpath, name)
                check_slide_id(slide_id, f"slide directory {dirpath}")
                if slide_id in paths:
                    ambiguous.setdefault(slide_id, [paths[slide_id]]).append(full)
                paths[slide_id] = full
        return cls(paths, str(root), ambiguous)

    @classmethod
    def from_spec(cls, spec: str | Path) -> SlideRegistry:
        """A directory, or a CSV file of `slide_id,path`."""
        spec = Path(spec)
        if spec.is_dir():
            return cls.from_dir(spec)
        if spec.is_file():
            return cls.from_csv(spec)
        raise UserError(f"slides {str(spec)!r} is neither a directory nor a CSV file")

    def path(self, slide_id: str) -> Path:
        if slide_id in self._ambiguous:
            raise SlideNotFoundError(f"slide {slide_id!r} is ambiguous in {self.source}: "
                                     f"{', '.join(self._ambiguous[slide_id])}")
        try:
            path = self._paths[slide_id]
        except KeyError:
            raise SlideNotFoundError(f"slide {slide_id!r} not found in {self.source} "
                                     f"({len(self._paths)} slides known)") from None
        if not os.path.exists(path):
            raise SlideNotFoundError(f"slide {slide_id!r}: file {path} (from {self.source}) does not exist")
        return Path(path)

    def known_path(self, slide_id: str) -> str | None:
        """The registered path of `slide_id`, unchecked, or None."""
        return self._paths.get(slide_id)

    def slide_ids(self) -> list[str]:
        return sorted(self._paths)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._paths

    def __len__(self) -> int:
        return len(self._paths)
