"""setup.py lists every third-party distribution the package imports (install_requires or an extra)."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("dinov2_patho", "samplers", "eval")
# distributions whose import name differs, for optional ones not installed in the test environment
NOT_INSTALLED = {"umap": "umap-learn"}


def imported_modules() -> dict[str, str]:
    """Top-level module names imported anywhere in the package (absolute imports), with one file each."""
    found: dict[str, str] = {}
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    """install_requires and every extra of the setup() call in setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    requirements = list(ast.literal_eval(keywords["install_requires"]))
    for extra in ast.literal_eval(keywords["extras_require"]).values():
        requirements += extra
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_every_third_party_import_is_declared():
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, path in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module in ("dinov2_patho", "__future__"):
            continue
        distributions = providers.get(module) or [NOT_INSTALLED.get(module, module)]
        if not {canonicalize_name(d) for d in distributions} & declared:
            missing.append(f"{module} ({path}): none of {distributions} in setup.py")
    assert not missing

