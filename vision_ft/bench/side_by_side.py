"""What the side-by-side family benchmarks (``bench lm``, ``bench vlm``) share: their common options, the
peak-memory child process, goals, and the result file."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def add_common_options(p: argparse.ArgumentParser, out_name: str) -> None:
    """``--warmup --repeats --no-rss --out --json --quick`` and the hidden ``--child``."""
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--no-rss", dest="rss", action="store_false", default=None, help="skip fresh-process peak memory")
    p.add_argument("--out", default="runs/bench", help=f"folder for {out_name}")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quick", action="store_true", help="tiny model, one timed round, no fresh processes")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def settings(a: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The preset (``--quick`` or the full run) with the options given on the command line."""
    return {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in (quick if a.quick else full).items()}


def peak_in_fresh_process(module: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` (a ``--child`` measurement; ``env`` added to this environment) and read the
    JSON line it prints."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=1800)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"peak_error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def goal(value: float, limit: float) -> dict[str, Any]:
    return {"value": value, "goal": limit, "met": value <= limit}


def goal_lines(goals: dict[str, Any]) -> list[str]:
    return [f"goal {key}: {g['value']:.3f} (<= {g['goal']}) {'met' if g['met'] else 'MISSED'}"
            for key, g in goals.items()]


def finish(result: dict[str, Any], argv: list[str], command: str, run_settings: dict[str, Any], started: float,
           out: Path, as_json: bool, report: str) -> int:
    """Record how the run was made, write ``out`` and print the report (or the JSON)."""
    from ..io import atomic_write_text

    result["meta"] = {"command": f"python -m vision_ft bench {command} " + " ".join(argv), "settings": run_settings,
                      "threads": torch.get_num_threads(), "wall_s": time.time() - started,
                      "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1) if as_json else report)
    return 0
