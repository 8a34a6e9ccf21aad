"""``fraudstream --help`` and each subcommand's ``--help`` are plain text for a terminal:
no reStructuredText markup (``literals``, :roles:) from the docstrings."""

from __future__ import annotations

import argparse
import re

from fraudstream.streams.cli.main import build_parser

MARKUP = re.compile(r"``|:(?:func|class|data|meth|mod|attr):`")


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_help_texts_are_plain_and_list_the_commands():
    parser = build_parser()
    top = parser.format_help()
    for command in ("broker", "worker", "produce", "tail", "replay", "settings"):
        assert re.search(rf"^\s+{command}\s+\S", top, re.M), top
    parsers = _parsers(parser)
    assert len(parsers) > 13
    for p in parsers:
        text = p.format_help()
        assert not MARKUP.search(text), f"{p.prog}: reStructuredText in --help:\n{text}"


def test_tail_help_names_the_export_flags():
    text = next(p for p in _parsers(build_parser()) if p.prog.endswith(" tail")).format_help()
    for flag in ("--format", "--out", "--from", "--to", "--until-idle", "--from-beginning",
                 "--count"):
        assert flag in text
