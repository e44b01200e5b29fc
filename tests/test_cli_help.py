"""`python -m vision_ft --help` lists every subcommand with one line each."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vision_ft.cli import COMMANDS, TRAINER_COMMANDS, main


def _subcommand_lines(text: str) -> dict[str, str]:
    block = text.split("subcommands:\n", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and not line.startswith(" " * 4):
            rows[parts[0]] = parts[1]
    return rows


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_top_level_help_lists_every_subcommand_with_a_line(argv, capsys):
    assert main(argv) == 0
    rows = _subcommand_lines(capsys.readouterr().out)
    expected = set(TRAINER_COMMANDS) | set(COMMANDS)
    assert {"fit", "validate", "test", "predict", "methods", "export", "bench", "new-domain"} <= expected
    assert set(rows) == expected
    assert all(len(text) > 20 and "\n" not in text for text in rows.values())


def test_help_names_the_bench_sections_the_bench_parser_has(capsys):
    from vision_ft.bench import build_parser

    main(["--help"])
    out = capsys.readouterr().out
    sections = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
    line = next(line for line in out.splitlines() if "bench sections:" in line)
    assert sections and all(name in line for name in sections)


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_python_dash_m_help_prints_the_overview():
    done = subprocess.run([sys.executable, "-m", "vision_ft", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(_subcommand_lines(done.stdout)) == set(TRAINER_COMMANDS) | set(COMMANDS)
