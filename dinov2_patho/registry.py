"""Names to constructors, as in timm: configs say `name: cluster_stratified`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dinov2_patho.errors import UserError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}")
        return self._entries[name]

    def build(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def check_options(self, name: str, options: Iterable[str], section: str,
                      passed: Sequence[str] = ()) -> None:
        """A one-line UserError naming `section.key` for the first of `options` that `name`'s
        constructor does not take by keyword (`passed`: those its caller gives itself), before the
        call would raise a TypeError traceback."""
        params = inspect.signature(self.get(name)).parameters
        valid = [key for key, p in params.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and key not in passed]
        for key in options:
            if key not in valid:
                raise UserError(f"{section}.{key}: not an option of {self.kind} {name!r}"
                                f"{did_you_mean(str(key), valid, f'{section}.')}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """`; did you mean 'x'?` for the closest choice, or the list of valid ones; `prefix` (a config
    section, `train.`) goes before the suggestion, so it can be typed as it is shown."""
    choices = sorted(map(str, choices))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid: {', '.join(choices)}" if choices else ""
