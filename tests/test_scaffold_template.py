"""`new-domain NAME` (default template): a minimal pack that names nothing of the template and runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vision_ft.cli import main
from vision_ft.pack_template import NAME, ROOT as TEMPLATE

ROOT = Path(__file__).resolve().parents[1]


def _template_names() -> set[str]:
    """Every identifier-like name in the template that contains the placeholder (any case)."""
    names = {NAME, NAME.capitalize(), NAME.upper()}
    for path in TEMPLATE.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".yaml", ".md"):
            names |= set(re.findall(rf"\w*{NAME}\w*", path.read_text(), flags=re.I))
    return names


def _project(tmp: Path) -> Path:
    (tmp / "domains").mkdir(parents=True)
    shutil.copy(ROOT / "domains" / "__init__.py", tmp / "domains" / "__init__.py")
    return tmp


def test_default_template_pack_has_one_of_each_part_and_none_of_the_template_names(tmp_path, capsys):
    root = _project(tmp_path / "proj")
    assert main(["new-domain", "skin_lesions", "--root", str(root)]) == 0
    assert "domains/skin_lesions/TODO.md" in capsys.readouterr().out
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["datasets_cards/skin_lesions.md", "domains/__init__.py", "domains/skin_lesions.yaml",
                     "domains/skin_lesions/TODO.md", "domains/skin_lesions/__init__.py",
                     "domains/skin_lesions/data.py", "domains/skin_lesions/sample.py",
                     "tests/test_pack_skin_lesions.py"]
    names = _template_names()
    assert {"StarterData", "starter"} <= names  # the check below looks for real names
    for rel in files:
        text = (root / rel).read_text()
        found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text) or n.lower() in text.lower()]
        assert not found, f"{rel} still names {found}"
        assert NAME not in rel.lower()
    config = (root / "domains" / "skin_lesions.yaml").read_text()
    assert "class_path: domains.skin_lesions.SkinLesionsData" in config and "name: skin_lesions" in config
    card = (root / "datasets_cards" / "skin_lesions.md").read_text()
    assert card.startswith("# Dataset card: SkinLesions")
    assert "--data.init_args.root=" in card and "data.init_args.path" not in card  # the key this datamodule reads
    assert "root: null" in config


def test_a_project_pack_copy_names_the_switch_key_its_data_reads(tmp_path):
    from vision_ft.scaffold import scaffold

    root = _project(tmp_path / "proj")
    for pack in ("medical", "radio_astronomy"):
        shutil.copy(ROOT / "domains" / f"{pack}.yaml", root / "domains" / f"{pack}.yaml")
        shutil.copytree(ROOT / "domains" / pack, root / "domains" / pack, ignore=shutil.ignore_patterns("__pycache__"))
    scaffold("derm", "medical", root)
    scaffold("astro", "radio_astronomy", root)
    assert "--data.init_args.path=" in (root / "datasets_cards" / "derm.md").read_text()
    assert "--data.init_args.root=" in (root / "datasets_cards" / "astro.md").read_text()


@pytest.mark.slow  # about 25 s: a fit in a fresh interpreter (the --from medical copy is run in the default suite)
@pytest.mark.subprocess
@pytest.mark.timeout(600)
def test_the_scaffolded_minimal_pack_passes_its_own_test(tmp_path):
    root = _project(tmp_path / "proj")
    assert main(["new-domain", "dermatology", "--root", str(root)]) == 0
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_pack_dermatology.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
