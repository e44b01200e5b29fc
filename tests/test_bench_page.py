"""docs/benchmarks.md is exactly what the committed raw results render to, its ratios divide numbers the
page shows, and its explanations quote this run's numbers, never typed-in ones."""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path

import pytest

from vision_ft.bench import load_sections
from vision_ft.bench.report import markdown

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
RAW = ROOT / "docs" / "benchmarks"


@pytest.fixture(scope="module")
def sections():
    found = load_sections(RAW)
    assert {"params", "train", "infer", "transfer"} <= set(found), "raw results missing beside the page"
    return found


def test_the_page_re_renders_from_the_committed_json(sections, tmp_path):
    rendered = markdown(sections, tmp_path / PAGE.name)  # figures go to tmp_path/benchmarks/
    rendered = rendered.replace(tmp_path.as_posix(), "docs")  # the page names its own path in one command
    assert rendered == PAGE.read_text(), ("docs/benchmarks.md differs from what docs/benchmarks/*.json render to: "
                                          "python -m vision_ft bench report --out docs/benchmarks "
                                          "--report docs/benchmarks.md")


def _table(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return head, rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_latency_ratios_divide_the_columns_the_page_shows():
    head, rows = _table(PAGE.read_text().split("## Inference latency", 1)[1], "method | base ms")
    col = {name: i for i, name in enumerate(head)}
    checked = 0
    for row in rows:
        if row[col["merged ms"]] == "not mergeable":
            continue
        shown = _num(row[col["merged ms"]]) / _num(row[col["base ms (merged rounds)"]])
        assert abs(shown - _num(row[col["merged × base"]])) <= 0.006, row
        unmerged = _num(row[col["unmerged ms"]]) / _num(row[col["base ms"]])
        assert abs(unmerged - _num(row[col["unmerged × base"]])) <= 0.006, row
        checked += 1
    assert checked >= 5


def test_method_notes_and_the_report_carry_no_typed_measurements():
    from vision_ft.bench import goals, report
    from vision_ft.methods import registered

    typed = re.compile(r"\b\d+\.\d+ ?(x|×|%|ms|MB)\b|miss by \d")
    for name, cls in registered().items():
        for goal, note in cls.bench_notes.items():
            bare = goals.MEASURED.sub("", note)
            assert not typed.search(bare), f"{name}.bench_notes[{goal!r}] types a measured number: {note}"
    for module in (report, goals):
        strings = re.findall(r'"[^"\n]*"', inspect.getsource(module))
        hits = [s for s in strings if typed.search(s) and "{" not in s]
        assert not hits, f"{module.__name__} hard-codes measured figures: {hits}"


def test_notes_quote_the_rendered_runs_numbers(sections, tmp_path):
    from vision_ft.bench.goals import render_note

    train = copy.deepcopy(sections["train"])
    row = next(r for r in train["result"]["rows"] if r["method"] == "clip_lora[dropout=0]")
    row["ratio_vs_peft"] = 1.2345
    note = "twin {measured:clip_lora[dropout=0]:ratio_vs_peft}, absent {measured:nope:ratio_vs_peft}"
    assert render_note(note, train["result"], None) == "twin 1.23x, absent (not measured in this run)"
    page = markdown({**sections, "train": train}, tmp_path / "page.md")
    assert "measures 1.23x its twin" in page and "measures 0.98x its twin" not in page
    train["result"]["rows"].remove(row)
    page = markdown({**sections, "train": train}, tmp_path / "page.md")
    assert "(not measured in this run) its twin" in page


def test_report_copies_the_raw_results_beside_the_page(tmp_path):
    from vision_ft.bench import write_report

    out = tmp_path / "out"
    out.mkdir()
    for key in ("params", "infer"):
        (out / f"bench_{key}.json").write_text((RAW / f"bench_{key}.json").read_text())
    write_report(out, tmp_path / "site" / "bench.md")
    assert sorted(p.name for p in (tmp_path / "site" / "bench").glob("*.json")) == ["bench_infer.json",
                                                                                   "bench_params.json"]
    assert json.loads((tmp_path / "site" / "bench" / "bench_infer.json").read_text()) == \
        json.loads((RAW / "bench_infer.json").read_text())
