"""Documentation stays inside the repository: no pointer to documents outside it, every relative
Markdown link resolves, and every registered method has its page under docs/methods/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vision_ft.methods import registered

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
SCANNED = ("vision_ft", "domains", "configs", "docs", "tests")
#: names of documents that live outside the repository (or lived there once)
OUTSIDE = ("METHODS.md", "DESIGN.md", "STYLE.md", "shared/")
METHOD_DOCS = ROOT / "docs" / "methods"
#: methods documented together on one page
SHARED_PAGE = {"spt_lora": "spt", "spt_adapter": "spt"}

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)[^`]*?\1")
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def _text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            parts = path.relative_to(ROOT).parts
            if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in parts):
                continue
            if path.resolve() == THIS:
                continue
            files.append(path)
    return files


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:  # binary (images, compiled files)
        return None
    return data.decode("utf-8", errors="replace")


def _links(markdown: str) -> list[str]:
    """Link targets of a Markdown text, code blocks and code spans left out."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    return _INLINE.findall(prose) + _REFERENCE.findall(prose)


def _is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")))


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_no_file_points_at_a_document_outside_the_repository():
    offenders = []
    for path in _text_files():
        text = _read_text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for name in OUTSIDE:
                if name in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno} mentions {name!r}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_markdown_link_resolves(doc):
    broken = []
    for target in _links(doc.read_text(encoding="utf-8")):
        if not _is_relative(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def _index_targets() -> set[Path]:
    index = METHOD_DOCS / "README.md"
    return {(index.parent / t.split("#", 1)[0]).resolve() for t in _links(index.read_text(encoding="utf-8"))
            if _is_relative(t) and t.split("#", 1)[0]}


@pytest.mark.parametrize("name", sorted(registered()))
def test_every_registered_method_has_a_page_linked_from_the_index(name):
    page = METHOD_DOCS / f"{SHARED_PAGE.get(name, name)}.md"
    assert page.is_file(), f"method {name!r} has no page {page.relative_to(ROOT)}"
    assert page.resolve() in _index_targets(), f"{page.relative_to(ROOT)} is not linked from docs/methods/README.md"
    assert f"`{name}`" in page.read_text(encoding="utf-8"), f"{page.relative_to(ROOT)} does not name `{name}`"


def test_every_method_page_is_a_registered_method_and_linked_from_the_index():
    names = {SHARED_PAGE.get(n, n) for n in registered()}
    pages = {p.stem for p in METHOD_DOCS.glob("*.md") if p.name != "README.md"}
    assert pages <= names, f"pages without a registered method: {sorted(pages - names)}"
    unlinked = [p for p in pages if (METHOD_DOCS / f"{p}.md").resolve() not in _index_targets()]
    assert not unlinked, f"pages not linked from docs/methods/README.md: {sorted(unlinked)}"
