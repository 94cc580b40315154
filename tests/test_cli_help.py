"""Every option of every command says what it is, and `--help` shows what a user types."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from dinov2_patho.cli import COMMANDS, build_parser


def _parsers(command: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    commands = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    todo = [(command, commands.choices[command])]
    while todo:
        path, parser = todo.pop()
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{path} {name}", sub) for name, sub in action.choices.items()]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_help_shows_percent_signs_once(command):
    for path, parser in _parsers(command):
        bare = [action.option_strings or [action.dest] for action in parser._actions
                if not action.help and not isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                               argparse._SubParsersAction))]
        assert not bare, f"dinov2-patho {path}: options without help: {bare}"
        text = parser.format_help()
        assert "%%" not in text, f"dinov2-patho {path} --help shows '%%'"


def test_path_flags_mean_one_thing_in_every_command():
    """--tiles, --embeddings, --slides and --backbone take the same things wherever they appear (their
    help is the one text of data/folders.py and data/slides.py), at least twice each."""
    from dinov2_patho.data.folders import BACKBONE_HELP, EMBEDDINGS_HELP, TILES_HELP
    from dinov2_patho.data.slides import SLIDES_HELP

    meaning = {"--tiles": TILES_HELP, "--embeddings": EMBEDDINGS_HELP, "--slides": SLIDES_HELP,
               "--backbone": BACKBONE_HELP}
    seen = {flag: [] for flag in meaning}
    for command in COMMANDS:
        for path, parser in _parsers(command):
            for action in parser._actions:
                for flag in set(action.option_strings) & set(meaning):
                    assert meaning[flag] in action.help, f"dinov2-patho {path} {flag}: {action.help!r}"
                    seen[flag].append(path)
    assert all(len(paths) >= 2 for paths in seen.values()), seen
