"""`new-domain` scaffolds a pack that runs at once and passes its own generated test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vision_ft.cli import main
from vision_ft.errors import ConfigError
from vision_ft.scaffold import scaffold

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp: Path, template: str = "medical") -> Path:
    """A project root holding just the template pack."""
    (tmp / "domains").mkdir(parents=True)
    shutil.copy(ROOT / "domains" / "__init__.py", tmp / "domains" / "__init__.py")
    shutil.copy(ROOT / "domains" / f"{template}.yaml", tmp / "domains" / f"{template}.yaml")
    shutil.copytree(ROOT / "domains" / template, tmp / "domains" / template,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


@pytest.mark.subprocess
@pytest.mark.timeout(600)
def test_new_domain_from_medical_passes_its_own_test(tmp_path, capsys):
    root = _project(tmp_path / "proj")
    assert main(["new-domain", "dermatology", "--from", "medical", "--root", str(root)]) == 0
    assert "next: python -m vision_ft fit --config domains/dermatology.yaml" in capsys.readouterr().out
    config = (root / "domains" / "dermatology.yaml").read_text()
    assert "domains.dermatology." in config and "domains.medical" not in config
    assert "name: dermatology" in config
    init = (root / "domains" / "dermatology" / "__init__.py").read_text()
    assert '"dermatology.yaml"' in init
    assert (root / "datasets_cards" / "dermatology.md").read_text().startswith("# Dataset card: Dermatology")
    # the generated test, run as a user would run it, from the project root
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_pack_dermatology.py"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout


def test_new_domain_refuses_bad_names_unknown_templates_and_overwrites(tmp_path):
    root = _project(tmp_path / "proj")
    with pytest.raises(ConfigError, match="Python module name"):
        scaffold("Derm-1", "medical", root)
    with pytest.raises(ConfigError, match="available: \\['minimal', 'medical'\\]"):
        scaffold("derm", "astronomy", root)
    scaffold("derm", "medical", root)
    before = (root / "domains" / "derm.yaml").read_text()
    with pytest.raises(ConfigError, match="exists already"):
        scaffold("derm", "medical", root)
    assert (root / "domains" / "derm.yaml").read_text() == before


def test_packs_are_importable_templates():
    import domains.medical as medical

    assert medical.CONFIG.is_file() and medical.CONFIG.name == "medical.yaml"
    assert medical.MedicalSampleData.__name__ == "MedicalSampleData"
