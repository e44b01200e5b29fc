"""The benchmark's goals and, per method and goal, the measured value, whether it is met and why not."""

from __future__ import annotations

import math
import re
from typing import Any


#: a PEFT step skips the weight-gradient products of frozen layers (~1/3 of a step)
TIME_GOAL = 0.70
#: share of the ideal saving (grad + 2 AdamW moments of every frozen base weight) realised
MEMORY_GOAL = 0.90
#: LoRA-family step time vs HF peft's LoRA of the same rank and targets
PEFT_GOAL = 1.05
#: merged model latency vs the untouched base model
MERGE_GOAL = 1.02

#: a measured value inside a method's note: ``{measured:<row label>:<key>}``, e.g.
#: ``{measured:clip_lora[dropout=0]:ratio_vs_peft}`` -> ``0.98x`` from this run's train section
MEASURED = re.compile(r"\{measured:([^:{}]+):(\w+)\}")


def render_note(note: str, train: dict[str, Any] | None, infer: dict[str, Any] | None) -> str:
    """A note with each ``{measured:ROW:KEY}`` replaced by that row's value in this run (``0.98x``), or by
    ``(not measured in this run)`` when the row or value is absent: notes never carry numbers of another run."""
    rows: dict[str, dict[str, Any]] = {}
    for section in (infer, train):  # train wins on a shared label
        for r in (section or {}).get("rows", []):
            rows.setdefault(r["method"], {}).update(r)

    def value(match: re.Match) -> str:
        v = rows.get(match.group(1), {}).get(match.group(2))
        return f"{v:.2f}x" if isinstance(v, (int, float)) and math.isfinite(v) else "(not measured in this run)"

    return MEASURED.sub(value, note)


def _why(name: str, goal: str, train: dict[str, Any] | None = None, infer: dict[str, Any] | None = None) -> str:
    """The method's own note on why it misses ``goal`` (``Method.bench_notes``), with this run's numbers."""
    from ..methods import registered

    cls = registered().get(name)
    note = cls.bench_notes.get(goal) if cls is not None else None
    if not note:
        return f"not analysed yet: add the reason to {name}'s bench_notes[{goal!r}] (vision_ft.methods)"
    return render_note(note, train, infer)


# --- goals -------------------------------------------------------------------------------------------
def evaluate_goals(train: dict[str, Any] | None, infer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per (method, goal) with the measured value, the target, whether it is met and why not."""
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any], goal: str, text: str, value: float | None, target: float, lower: bool,
            met: bool | None = None, shown: str | None = None, why: str | None = None) -> None:
        if met is None and value is not None:
            met = value <= target if lower else value >= target
        if met is False and why is None:
            why = _why(row["name"], goal, train, infer)
        rows.append({"method": row["method"], "name": row["name"], "goal": goal, "what": text, "value": value,
                     "shown": shown if shown is not None else ("—" if value is None or math.isnan(value) else f"{value:.3f}"), "target": target,
                     "comparison": "<=" if lower else ">=", "met": met, "why": why if met is False else None})

    if train:
        for r in train["rows"]:
            if r["name"] == "full":
                continue
            add(r, "time", "train step / full fine-tuning", r.get("ratio_vs_full"), TIME_GOAL, True)
            mem = r["memory"]
            ideal, realised = mem["ideal_saving_bytes"], mem["realised_saving_bytes"]
            fraction = mem.get("saving_fraction")
            shown = f"{100 * fraction:.1f}%" if fraction is not None else \
                f"{realised / 2**20:+,.1f} MB (no frozen base weights)"
            add(r, "memory", "realised / ideal saving of persistent state", fraction, MEMORY_GOAL, False,
                met=realised >= MEMORY_GOAL * ideal, shown=shown)
            if r.get("ratio_vs_peft") is not None:
                add(r, "peft", "train step / peft LoRA twin", r["ratio_vs_peft"], PEFT_GOAL, True)
    if infer:
        for r in infer["rows"]:
            if r.get("merged_ratio") is None:
                continue
            why = None
            if r.get("merged_plain_model") and r["merged_ratio"] > MERGE_GOAL:
                why = (f"the merged model is the plain timm model (no hooks, the base parameter count), so the "
                       f"gap is timing noise: the base model's own spread in this row is "
                       f"{100 * r['base_merged']['spread']:.0f}% of its median.")
            add(r, "merge", "merged latency / base model", r["merged_ratio"], MERGE_GOAL, True, why=why)
    return rows
