"""``python -m vision_ft bench``: parameters, training step, inference and a transfer testbed.

    python -m vision_ft bench all --out runs/bench --report docs/benchmarks.md      # params + train + infer
    python -m vision_ft bench transfer --out runs/bench --report docs/benchmarks.md # the transfer testbed
    python -m vision_ft bench train --methods lora ssf --batch-size 4 --json
    python -m vision_ft bench all --quick                                           # tiny ViT smoke run

Every registered method is measured (``--methods`` picks some; ``name:key=value``
adds a variant), on real-size architectures with random weights, in one process so
ratios are side by side. Each section writes ``<out>/bench_<section>.json``;
``--report PAGE.md`` renders every section present in ``--out`` into a Markdown
page with PNG plots (in ``PAGE/``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError

SECTIONS = ("params", "train", "infer")

#: ``--quick``: a tiny ViT and few repeats (the test suite runs this)
QUICK = dict(backbone="vit_test_tiny", batch_size=2, num_classes=3, warmup=1, repeats=2, rss=False)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="methods to measure (default: all registered); NAME:key=value:... adds a variant")
    p.add_argument("--method-args", default=None, metavar="JSON",
                   help='init overrides per method name, e.g. \'{"mosa": {"consistency": true}}\'')
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count)")
    p.add_argument("--out", default="runs/bench", help="folder for the section JSON files (and caches)")
    p.add_argument("--report", default=None, metavar="PAGE.md",
                   help="render the Markdown page (and PAGE/*.png) from every section in --out")
    p.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (what the tests run)")
    p.add_argument("--append", action="store_true",
                   help="add the measured methods' rows to the section files already in --out (same settings "
                        "required) instead of replacing them: measure a newly registered method without "
                        "re-running the others")


def _speed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="timm ViT architecture or tiny preset (default vit_base_patch16_224)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the architecture's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 8)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the linear head (default 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing of the backbone blocks (backbone.grad_checkpointing)")
    p.add_argument("--rss", dest="rss", action="store_true", default=None,
                   help="measure peak memory in a fresh process per method (default on; off with --quick)")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the fresh-process peak memory")


def _transfer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="adaptation seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=None, help="adaptation epochs")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="source pre-training epochs")
    p.add_argument("--lr", type=float, default=None, help="adaptation learning rate (all methods)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision_ft bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="section", required=True, metavar="SECTION")
    helps = {"params": "trainable parameters per method (head excluded and included) vs the papers",
             "train": "train-step time and memory vs full fine-tuning and vs peft LoRA",
             "infer": "inference latency: merged and unmerged vs the base model",
             "all": "params + train + infer in one process"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        _speed(p)
    p = sub.add_parser("transfer", help="adapt a pre-trained small ViT to a related task with every method",
                       description="source pre-training (cached) then adaptation with every method, 3 seeds")
    _common(p)
    _transfer(p)
    sub.add_parser("lm", add_help=False, help="causal LM: LoRA, QLoRA and full fine-tuning step time and memory "
                   "(python -m vision_ft bench lm --help)")
    sub.add_parser("vlm", add_help=False, help="vision-language model: LoRA, QLoRA and full fine-tuning of the "
                   "language model beside plain peft loops (python -m vision_ft bench vlm --help)")
    sub.add_parser("diffusion", add_help=False, help="Stable Diffusion UNet: LoRA, SaRA and full fine-tuning step "
                   "time, memory and training state (python -m vision_ft bench diffusion --help)")
    p = sub.add_parser("report", help="render --report from the section files in --out (no measurement)")
    _common(p)
    return parser


def _settings(a: argparse.Namespace) -> Any:
    from .common import Settings, check_device

    base = Settings()
    preset = QUICK if a.quick else {}
    values = {}
    for key in ("backbone", "batch_size", "num_classes", "warmup", "repeats", "rss"):
        given = getattr(a, key)
        values[key] = given if given is not None else preset.get(key, getattr(base, key))
    if a.image_size is not None:
        values["image_size"] = a.image_size
    for key, minimum in (("batch_size", 1), ("num_classes", 2), ("warmup", 1), ("repeats", 1)):
        if values[key] < minimum:
            raise ConfigError(f"bench --{key.replace('_', '-')} must be >= {minimum}, got {values[key]}")
    check_device(a.device)
    return Settings(**values, device=a.device, grad_checkpointing=a.grad_checkpointing,
                    threads=torch.get_num_threads())


def _method_args(text: str | None) -> dict[str, dict[str, Any]]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"bench --method-args is not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError('bench --method-args must map method names to init arguments, e.g. {"lora": {"r": 16}}')
    return value


#: settings that must agree for rows of two runs to share one table
_COMPARABLE = ("backbone", "image_size", "batch_size", "num_classes", "warmup", "repeats", "device",
               "grad_checkpointing", "seed", "lr")


def append_rows(old: dict[str, Any], new: dict[str, Any], section: str) -> dict[str, Any]:
    """``old`` section with ``new``'s rows added (a method measured again replaces its old row).

    Each train row carries its own full-fine-tuning timings from the rounds it alternated with, so
    its ratios stay side by side; the commands that added rows are listed in ``meta["appended"]``.
    """
    old_s, new_s = old["meta"]["settings"], new["meta"]["settings"]
    differ = [k for k in _COMPARABLE if old_s.get(k) != new_s.get(k)]
    if section == "transfer":
        differ = sorted(k for k in set(old_s) | set(new_s) if old_s.get(k) != new_s.get(k))
    if differ:
        raise ConfigError(f"bench --append: the {section} results in --out were measured with other settings "
                          f"({', '.join(f'{k}: {old_s.get(k)!r} vs {new_s.get(k)!r}' for k in differ)}); "
                          "use the same settings or a new --out")
    o, n = old["result"], new["result"]
    labels = {r["method"] for r in n.get("rows", [])} | {r["method"] for r in n.get("skipped", [])}
    merged = dict(o)
    merged["rows"] = sorted([r for r in o.get("rows", []) if r["method"] not in labels] + list(n.get("rows", [])),
                            key=lambda r: r["method"])
    merged["skipped"] = [r for r in o.get("skipped", []) if r["method"] not in labels] + list(n.get("skipped", []))
    if "peft" in o:
        seen = {(p["r"], tuple(p["modules"])) for p in o["peft"]}
        merged["peft"] = list(o["peft"]) + [p for p in n.get("peft", []) if (p["r"], tuple(p["modules"])) not in seen]
    meta = dict(old["meta"])
    meta["appended"] = list(meta.get("appended", [])) + [
        {"command": new["meta"]["command"], "methods": sorted(labels), "machine": new["meta"]["machine"],
         "wall_s": new["meta"]["wall_s"], "load_average_end": new["meta"]["load_average_end"]}]
    return {"meta": meta, "result": merged}


def load_sections(out: Path) -> dict[str, Any]:
    sections = {}
    for key in (*SECTIONS, "transfer"):
        path = out / f"bench_{key}.json"
        if path.is_file():
            sections[key] = json.loads(path.read_text())
    return sections


def write_report(out: Path, page: Path) -> Path:
    from ..export import atomic_write_text
    from .report import markdown

    sections = load_sections(out)
    if not sections:
        raise ConfigError(f"bench --report: no bench_*.json in {str(out)!r} (run a section with --out {out} first)")
    assets = page.parent / page.stem  # the raw results go beside the page (committed with it), then the page
    assets.mkdir(parents=True, exist_ok=True)
    for key in sections:
        if (out / f"bench_{key}.json").resolve() != (assets / f"bench_{key}.json").resolve():
            atomic_write_text(assets / f"bench_{key}.json", (out / f"bench_{key}.json").read_text())
    return atomic_write_text(page, markdown(sections, page))


def cmd_bench(argv: list[str]) -> int:
    """Entry point of ``python -m vision_ft bench``; returns the exit status."""
    if argv[:1] == ["lm"]:  # its own options: vision_ft.bench.lm
        from .lm import cmd_lm

        return cmd_lm(argv[1:])
    if argv[:1] == ["vlm"]:  # its own options: vision_ft.bench.vlm
        from .vlm import cmd_vlm

        return cmd_vlm(argv[1:])
    if argv[:1] == ["diffusion"]:  # its own options: vision_ft.bench.diffusion
        from .diffusion import cmd_diffusion

        return cmd_diffusion(argv[1:])
    a = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(a, argv)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this command only


def _run(a: argparse.Namespace, argv: list[str]) -> int:
    from ..export import atomic_write_text
    from .common import PreparedCache, machine_info, parse_methods
    from .report import terminal_report

    out = Path(a.out)
    log: Callable[[str], None] = (lambda s: print(s, file=sys.stderr, flush=True)) if a.json else \
        (lambda s: print(s, flush=True))
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError(f"bench --threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.section == "report":
        if not a.report:
            raise ConfigError("bench report needs --report PAGE.md")
        page = write_report(out, Path(a.report))
        log(f"report written to {page}")
        return 0
    method_args = _method_args(a.method_args)
    specs = parse_methods(a.methods, method_args)
    command = "python -m vision_ft bench " + shlex.join(argv)
    log(f"[bench] torch threads: {torch.get_num_threads()}; methods: {', '.join(s.label for s in specs)}")
    results: dict[str, Any] = {}

    def record(section: str, settings: dict[str, Any], started: float, machine: dict[str, Any],
               result: dict[str, Any]) -> None:
        import os

        meta = {"command": command, "settings": settings, "machine": machine,
                "wall_s": time.time() - started, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
        results[section] = {"meta": meta, "result": result}
        path = out / f"bench_{section}.json"
        if a.append and path.is_file():
            results[section] = append_rows(json.loads(path.read_text()), results[section], section)
        atomic_write_text(out / f"bench_{section}.json", json.dumps(results[section], indent=1, default=str) + "\n")

    if a.section == "transfer":
        from .transfer import TransferConfig, run_transfer

        config = TransferConfig.from_args(a)
        started, machine = time.time(), machine_info()
        result = run_transfer(specs, config, out / "transfer", method_args=method_args, log=log)
        record("transfer", config.to_dict(), started, machine, result)
    else:
        from .params import run_params
        from .speed import run_infer, run_train

        settings = _settings(a)
        cache = PreparedCache(out / "prepared")
        wanted = SECTIONS if a.section == "all" else (a.section,)
        log(f"[bench] {settings.backbone}, batch {settings.batch_size}, device {settings.device}, "
            f"{settings.warmup} warm-up + {settings.repeats} timed repeats")
        for section in wanted:
            started, machine = time.time(), machine_info(settings)
            log(f"[bench] {section}")
            if section == "params":
                result = run_params(specs, settings, cache, log=log)
            elif section == "train":
                result = run_train(specs, settings, cache, out, log=log)
            else:
                result = run_infer(specs, settings, cache, log=log)
            record(section, settings.to_dict(), started, machine, result)
    if a.json:
        from .report import evaluate_goals

        goals = evaluate_goals((results.get("train") or {}).get("result"), (results.get("infer") or {}).get("result"))
        print(json.dumps({**results, "goals": goals}, indent=1, default=str))
    else:
        print(terminal_report(results))
    if a.report:
        page = write_report(out, Path(a.report))
        log(f"[bench] report written to {page}")
    return 0


__all__ = ["cmd_bench", "build_parser", "write_report", "load_sections"]
