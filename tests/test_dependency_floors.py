"""Declared dependency floors are the tested versions, and the test-suite guards are configured:
pytest-timeout on, every test that starts processes marked ``subprocess`` or ``ddp``."""

from __future__ import annotations

import ast
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def _floor(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(floors) if floors else None


def test_every_dependency_declares_a_floor():
    missing = [str(r) for r in _requirements() if _floor(r) is None]
    assert not missing, f"no >= floor: {missing}"


def test_floors_are_the_versions_ci_tests():
    """A floor older than the pinned (tested) release would claim support nobody checks: the pinned
    version must start with the floor (floor 5.24 -> 5.24.x tested)."""
    pins, wrong = _pins(), []
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            continue
        floor, pinned = _floor(req), pins[name]
        if floor > pinned or pinned.release[:len(floor.release)] != floor.release:
            wrong.append(f"{req} but CI tests {name}=={pinned}")
    assert not wrong, wrong
    core = {canonicalize_name(r.name) for r in _requirements()} & set(pins)
    assert {"torch", "transformers", "peft", "timm", "lightning"} <= core


def test_transformers_floor_is_a_5x_release():
    """hf_clip relies on transformers 5 behaviour (get_image_features returns an output object)."""
    floor = next(_floor(r) for r in _requirements() if canonicalize_name(r.name) == "transformers")
    assert floor.major >= 5


def test_installed_versions_satisfy_the_floors():
    bad = []
    for req in _requirements():
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue  # an extra this environment does not install
        if not req.specifier.contains(installed, prereleases=True):
            bad.append(f"{req.name} {installed} does not satisfy {req}")
    assert not bad, bad


def test_pytest_timeout_is_configured():
    options = _pyproject()["tool"]["pytest"]["ini_options"]
    assert 0 < int(options["timeout"]) <= 900
    assert any(Requirement(r).name == "pytest-timeout" for r in _pyproject()["project"]["optional-dependencies"]["dev"])
    marks = {m.split(":", 1)[0] for m in options["markers"]}
    assert {"slow", "subprocess", "ddp"} <= marks


def _starts_processes(func: ast.FunctionDef) -> bool:
    """A call that starts a process (subprocess.*, a ``_subprocess`` helper, spawn) or a DDP argument."""
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.startswith("subprocess.") or name.endswith(("_subprocess", "spawn", "start_processes", "Popen")):
                return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "strategy=ddp" in node.value:
            return True
    return False


def test_tests_that_start_processes_are_marked():
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and _starts_processes(node):
                marks = {ast.unparse(d) for d in node.decorator_list}
                if not marks & {"pytest.mark.subprocess", "pytest.mark.ddp"}:
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"mark these @pytest.mark.subprocess or @pytest.mark.ddp: {unmarked}"
