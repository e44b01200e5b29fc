"""``python -m vision_ft new-domain NAME [--from TEMPLATE]``: start a domain pack.

A pack is a runnable config (``domains/<name>.yaml``), a Python package
(``domains/<name>/``: datamodules, transforms, metrics, sample generator), a dataset card
(``datasets_cards/<name>.md``) and a test (``tests/test_pack_<name>.py``).

By default the scaffold copies the kit's minimal template (:mod:`vision_ft.pack_template`: its own
sample generator, one datamodule, one config, one card, one test and ``TODO.md``, the list of what to
replace), with the placeholder name replaced by ``NAME`` everywhere, so the new pack runs ``fit`` at
once and names nothing of the template. ``--from PACK`` copies an existing pack of the project instead
(all of its configs' main one, its package, a generic card and test), references to it renamed.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from .errors import ConfigError

CARD = """# Dataset card: {title}

Used by the `{name}` pack (`domains/{name}.yaml`, `domains/{name}/`), scaffolded from the
`{template}` pack. Until you replace `domains/{name}/sample.py` and the datamodule, the pack
trains on the `{template}` pack's embedded SYNTHETIC sample.

## What it is
Source (paper, DOI, URL), what the images show, how they were acquired, labels and who
made them, size (images per split, classes), known biases and intended use.

## Licence and access
Licence of the images and of the labels; registration or data-use agreement; whether
commercial use is allowed; how to cite.

## On-disk format
The exact layout the loader reads (folders, file names, annotation files, dtypes), and the
conversion steps from what the host distributes.

## Switch the config to it
```bash
python -m vision_ft fit --config domains/{name}.yaml \\
    --data.init_args.{data_key}=/data/...                                   # the real dataset
    --model.init_args.backbone.init_args.pretrained=true              # or ...backbone.init_args.checkpoint=/weights/...
```

## The embedded sample
What the generator writes, that it is SYNTHETIC, and what it can and cannot show.
"""

TEST = '''"""The {name} pack runs end to end on its embedded sample (scaffolded from {template})."""

from pathlib import Path

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "domains" / "{name}.yaml"


def test_{name}_pack_fits_offline(tmp_path):
    code = main(["fit", "--config", str(CONFIG), "--trainer.fast_dev_run=true",
                 f"--trainer.logger.init_args.save_dir={{tmp_path / 'runs'}}",
                 f"--data.init_args.sample_dir={{tmp_path / 'sample'}}"])
    assert code == 0


def test_{name}_pack_imports():
    import domains.{name} as pack

    assert Path(pack.CONFIG).is_file()
'''


def _templates(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "domains").glob("*.yaml") if (root / "domains" / p.stem).is_dir())


DEFAULT_TEMPLATE = "minimal"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def scaffold_minimal(name: str, root: str | Path = ".", force: bool = False) -> list[Path]:
    """Copy :mod:`vision_ft.pack_template` as the pack ``name`` under ``root``; returns the files written."""
    from .pack_template import NAME, ROOT as TEMPLATE

    root = Path(root)
    targets = _targets(root, name, force)

    def rename(text: str) -> str:
        return text.replace(NAME, name).replace(NAME.capitalize(), _camel(name)).replace(NAME.upper(), name.upper())

    written = []
    copies = [(TEMPLATE / f"{NAME}.yaml", targets[0]), (TEMPLATE / f"{NAME}_card.md", targets[2]),
              (TEMPLATE / f"test_pack_{NAME}.py", targets[3])]
    copies += [(p, targets[1] / p.relative_to(TEMPLATE / NAME)) for p in sorted((TEMPLATE / NAME).rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts]
    for source, target in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rename(source.read_text()))
        written.append(target)
    package = root / "domains" / "__init__.py"
    if not package.exists():  # `domains.<name>` must import from the project root
        package.write_text('"""Domain packs: runnable configs + their Python code."""\n')
        written.append(package)
    return written


def _targets(root: Path, name: str, force: bool) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"pack name {name!r}: use lower case letters, digits and _ (a Python module name)")
    targets = [root / "domains" / f"{name}.yaml", root / "domains" / name,
               root / "datasets_cards" / f"{name}.md", root / "tests" / f"test_pack_{name}.py"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise ConfigError(f"pack {name!r} exists already ({', '.join(existing)}); pick another name or pass --force")
    return targets


def scaffold(name: str, template: str = DEFAULT_TEMPLATE, root: str | Path = ".", force: bool = False) -> list[Path]:
    """Write the new pack under ``root``; returns the files written. ``template``: ``minimal`` (the kit's
    template, :func:`scaffold_minimal`) or a pack of the project (``domains/<template>.yaml`` + package)."""
    root = Path(root)
    if template == DEFAULT_TEMPLATE:
        return scaffold_minimal(name, root, force)
    _targets(root, name, force=True)  # the name check first
    available = _templates(root)
    if template not in available:
        raise ConfigError(f"--from {template!r}: no pack domains/{template}.yaml + domains/{template}/ under "
                          f"{root.resolve()}; available: {[DEFAULT_TEMPLATE, *available]}")
    targets = _targets(root, name, force)

    def rename(text: str) -> str:
        text = re.sub(rf"\bdomains([./]){template}\b", rf"domains\g<1>{name}", text)
        text = re.sub(rf"\bname: {template}\b", f"name: {name}", text)            # logger run folder
        text = re.sub(rf"data/{template}_sample", f"data/{name}_sample", text)     # sample_dir default
        text = re.sub(rf"\b{template}\.yaml\b", f"{name}.yaml", text)                # the pack's CONFIG
        return text

    written = []
    config = rename((root / "domains" / f"{template}.yaml").read_text())
    header = (f"# {name} pack, scaffolded from the {template} pack by `python -m vision_ft new-domain`.\n"
              f"# It runs on the {template} pack's embedded sample until you replace domains/{name}/sample.py\n"
              f"# and the datamodule; document the real dataset in datasets_cards/{name}.md.\n#\n")
    targets[0].write_text(header + config)
    written.append(targets[0])
    shutil.copytree(root / "domains" / template, targets[1], dirs_exist_ok=force,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(targets[1].rglob("*.py")):
        path.write_text(rename(path.read_text()))
        written.append(path)
    targets[2].parent.mkdir(parents=True, exist_ok=True)
    data_key = "root" if re.search(r"^\s+root:", config, re.M) else "path"  # the switch key the data reads
    targets[2].write_text(CARD.format(name=name, template=template, title=name.replace("_", " ").title(),
                                      data_key=data_key))
    targets[3].parent.mkdir(parents=True, exist_ok=True)
    targets[3].write_text(TEST.format(name=name, template=template))
    written += [targets[2], targets[3]]
    return written


def cmd_new_domain(argv: list[str]) -> int:
    """Scaffold a new domain pack from an existing one (config, package, card, test)."""
    p = argparse.ArgumentParser(prog="vision_ft new-domain", description=cmd_new_domain.__doc__)
    p.add_argument("name", help="the new pack's name (a Python module name, e.g. dermatology)")
    p.add_argument("--from", dest="template", default=DEFAULT_TEMPLATE,
                   help="'minimal' (default: the kit's template: one sample, datamodule, config, card, test and a "
                        "TODO list) or a pack of the project to copy (e.g. medical)")
    p.add_argument("--root", default=".", help="project root holding domains/, datasets_cards/, tests/")
    p.add_argument("--force", action="store_true", help="overwrite an existing pack of that name")
    a = p.parse_args(argv)
    written = scaffold(a.name, a.template, a.root, a.force)
    root = Path(a.root)
    print(f"new pack {a.name!r} from {a.template!r}: {len(written)} files")
    for path in written:
        print(f"  {path.relative_to(root) if path.is_relative_to(root) else path}")
    todo = (f"follow domains/{a.name}/TODO.md" if a.template == DEFAULT_TEMPLATE else
            f"replace domains/{a.name}/sample.py and the datamodule, fill in datasets_cards/{a.name}.md")
    print(f"next: python -m vision_ft fit --config domains/{a.name}.yaml   (runs on the {a.template} sample)\n"
          f"      {todo}")
    return 0
