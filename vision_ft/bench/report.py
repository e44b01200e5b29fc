"""Goals, terminal tables, the Markdown page and its PNG plots.

The page is rendered from the section files a run wrote (``bench_params.json``,
``bench_train.json``, ``bench_infer.json``, ``bench_transfer.json``): every number
on it comes from a measurement, with the command and machine that produced it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .goals import MEMORY_GOAL, MERGE_GOAL, PEFT_GOAL, TIME_GOAL, evaluate_goals
from .plots import plot_ratios, plot_transfer

# --- formatting --------------------------------------------------------------------------------------
def _n(v: int | None) -> str:
    return "—" if v is None else f"{v:,}"


def _x(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _mb(v: int | float | None) -> str:
    return "—" if v is None else f"{v / 2**20:,.1f}"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{1000 * v:,.1f}"


def _met(v: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[v]


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def params_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "trainable (no head)", "with head", "% of base", "deployed", "paper (ViT-B/16)", "matches"]
    rows = []
    for r in result["rows"]:
        paper = r.get("paper")
        rows.append([r["method"], _n(r["trainable_params"]) + ("*" if r["requires_data"] else ""),
                     _n(r["trainable_with_head"]), f"{r['percent_of_base']:.3f}", _n(r["deployed_params"]),
                     paper["text"] if paper else "—", _met(r.get("paper_match"))])
    return head, rows


def train_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "trainable", "step ms", "spread", "full ms (same rounds)", "× full", "× peft twin",
            "persistent MB", "grads+AdamW MB", "activations MB", "saving realised", "peak MB", "peak × full"]
    ref = result["reference"]
    rows = [["full (reference)", _n(ref["trainable_params"]), _ms(ref["time"]["median_s"]),
             _x(ref["time"]["spread"]), "—", "1.00", "—", _mb(ref["memory"]["persistent_bytes"]),
             _mb(ref["memory"]["train_state_bytes"]), _mb(ref["memory"]["activation_bytes"]), "—",
             _mb((ref.get("peak") or {}).get("peak_bytes")), "1.00" if ref.get("peak") else "—"]]
    for r in result["rows"]:
        mem, peak = r["memory"], r.get("peak") or {}
        rows.append([r["method"], _n(r["trainable_params"]), _ms(r["time"]["median_s"]), _x(r["time"]["spread"]),
                     _ms(r["full_time"]["median_s"]), _x(r.get("ratio_vs_full")), _x(r.get("ratio_vs_peft")),
                     _mb(mem["persistent_bytes"]), _mb(mem["train_state_bytes"]), _mb(mem["activation_bytes"]),
                     "—" if mem.get("saving_fraction") is None else f"{100 * mem['saving_fraction']:.1f}%",
                     _mb(peak.get("peak_bytes")), _x(peak.get("ratio_vs_full"))])
    for p in result.get("peft", []):
        rows.append([f"peft LoRA r={p['r']} ({len(p['modules'])} modules)", _n(p["trainable_params"]),
                     _ms(p["time"]["median_s"]), _x(p["time"]["spread"]), "—", _x(p.get("ratio_vs_full")), "1.00",
                     _mb(p["memory"]["persistent_bytes"]), _mb(p["memory"]["train_state_bytes"]),
                     _mb(p["memory"]["activation_bytes"]), "—", "—", "—"])
    return head, rows


def infer_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "base ms", "unmerged ms", "unmerged × base", "base ms (merged rounds)", "merged ms",
            "merged × base", "merged is plain timm"]
    rows = []
    for r in result["rows"]:
        merged, base_merged = r.get("merged"), r.get("base_merged")
        rows.append([r["method"], _ms(r["base"]["median_s"]), _ms(r["unmerged"]["median_s"]), _x(r["unmerged_ratio"]),
                     _ms(base_merged["median_s"]) if merged and base_merged else "—",
                     _ms(merged["median_s"]) if merged else "not mergeable", _x(r.get("merged_ratio")),
                     {True: "yes", False: "no", None: "—"}[r.get("merged_plain_model")]])
    return head, rows


def goals_table(goals: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "goal", "measured", "target", "met"]
    rows = [[g["method"], g["what"], g["shown"], f"{g['comparison']} {g['target']:.2f}", _met(g["met"])]
            for g in goals]
    return head, rows


def transfer_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "trainable (no head)", "with head", "target acc", "source retention", "retention drop",
            "s / run"]
    rows = []
    for r in result["rows"]:
        rows.append([r["method"], _n(r["trainable_params"]), _n(r["trainable_with_head"]),
                     _pm(r["target_acc_mean"], r["target_acc_std"]), _pm(r["retention_mean"], r["retention_std"]),
                     _pm(r["retention_drop_mean"], r["retention_drop_std"]), f"{r['seconds_mean']:.1f}"])
    return head, rows


def text_table(head: list[str], rows: list[list[str]]) -> str:
    cells = [[c.replace("**", "") for c in row] for row in [head, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def terminal_report(sections: dict[str, Any]) -> str:
    parts = []
    for key, title, fn in (("params", "trainable parameters", params_table), ("train", "training step", train_table),
                           ("infer", "inference latency", infer_table), ("transfer", "transfer testbed", transfer_table)):
        if key in sections:
            result = sections[key]["result"]
            text = f"== {title} ==\n" + text_table(*fn(result))
            text += "".join(f"\nskipped {s['method']}: {s['reason']}" for s in result.get("skipped", []))
            parts.append(text)
    goals = evaluate_goals((sections.get("train") or {}).get("result"), (sections.get("infer") or {}).get("result"))
    if goals:
        lines = ["== goals ==", text_table(*goals_table(goals))]
        missed = [g for g in goals if g["met"] is False]
        lines += [f"missed: {g['method']} {g['goal']}: {g['why']}" for g in missed]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# --- plots -------------------------------------------------------------------------------------------
FULL_COMMANDS = (
    "python -m vision_ft bench all --out runs/bench --report docs/benchmarks.md\n"
    "python -m vision_ft bench transfer --out runs/bench --report docs/benchmarks.md"
)


def _machine_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    lines = [f"- machine: {m['cpu']}, {m['cpu_count']} logical CPUs, {m.get('memory_gb', '?')} GB RAM"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"- torch {m['torch']} (torch threads: {m['torch_threads']}), timm {m['timm']}, peft {m['peft']}, "
             f"Python {m['python']}, {m['platform']}",
             f"- date: {m['date']}; wall time {meta['wall_s'] / 60:.1f} min; load average (1/5/15 min) "
             f"at start {m.get('load_average')}, at end {meta.get('load_average_end')}"]
    return lines


def markdown(sections: dict[str, Any], page: Path) -> str:
    asset_dir = page.parent / page.stem
    rel = asset_dir.name
    train = (sections.get("train") or {}).get("result")
    infer = (sections.get("infer") or {}).get("result")
    transfer = (sections.get("transfer") or {}).get("result")
    out = ["# Benchmarks", "",
           "Generated by `python -m vision_ft bench`; do not edit by hand. Every number below was measured by the "
           "command shown with it, on the machine described there.", ""]
    out += _notices(sections)
    out += ["## How to reproduce", "",
            "The full benchmark (ViT-B/16 at 224 px, batch 8, 2 warm-up + 5 timed steps per method; the wall time "
            "of each section is stated with it below, about 35 minutes in all for 15 methods on 2 CPU cores — run "
            "it on an otherwise idle machine) and the transfer testbed "
            "(a few minutes):", "", "```bash", FULL_COMMANDS, "```", "",
            f"The raw results this page is rendered from are committed beside it (`{rel}/bench_<section>.json`, "
            "copied there by `--report`); the page is re-rendered from them, without measuring, by "
            f"`python -m vision_ft bench report --out {page.parent.as_posix()}/{rel} --report {page.as_posix()}`.", "",
            "A quick smoke run on a tiny ViT (what the tests run): "
            "`python -m vision_ft bench all --quick --out runs/bench_quick`. "
            "`--device cuda` runs the same on a GPU (peak memory then is `torch.cuda.max_memory_allocated`).", ""]
    for key, title in (("params", "Trainable parameters"), ("train", "Training step: time and memory"),
                       ("infer", "Inference latency"), ("transfer", "Transfer testbed")):
        if key not in sections:
            continue
        meta = sections[key]["meta"]
        s = meta.get("settings", {})
        out += [f"## {title}", "", f"Command: `{meta['command']}`", ""]
        out += _machine_lines(meta)
        for extra in meta.get("appended", []):
            m = extra["machine"]
            out.append(f"- rows {', '.join(f'`{x}`' for x in extra['methods'])} added by `{extra['command']}` "
                       f"(--append, same settings; date {m['date']}, wall time {extra['wall_s'] / 60:.1f} min, "
                       f"load average at start {m.get('load_average')}, at end {extra.get('load_average_end')})")
        if key != "transfer":
            size = sections[key]["result"].get("image_size", s.get("image_size"))
            out.append(f"- backbone `{s['backbone']}` with random weights, image {size} px, "
                       f"batch {s['batch_size']}, {s['num_classes']} classes, device {s['device']}, "
                       f"{s['warmup']} warm-up + {s['repeats']} timed repeats (median), "
                       f"activation checkpointing {'on' if s['grad_checkpointing'] else 'off'}")
        out.append("")
        result = sections[key]["result"]
        if key == "params":
            out += [md_table(*params_table(result)), "",
                    f"Base model: {result['base_params']:,} parameters. Head: a linear layer to "
                    f"{s['num_classes']} classes. `*`: decided from (random) training data in `prepare()`. "
                    "`deployed`: trainable tensors after the method's end-of-training step (MoSA folds its "
                    "experts). The paper column is compared only on `vit_base_patch16_224` at 224 px, at the "
                    "precision the paper prints.", ""]
        elif key == "train":
            ref = result["reference"]
            out += [md_table(*train_table(result)), "",
                    "Each method's steps alternate with full fine-tuning's (and, for the LoRA family, with its "
                    "peft twin's), so `× full` and `× peft twin` divide medians taken in the same rounds; `full ms "
                    "(same rounds)` is that row's reference. The reference row pools all of full fine-tuning's "
                    f"steps; its median in the last row over the first is ×{_x(ref['time'].get('drift'))} (drift of "
                    "the machine during the run). `spread` = (max − min) / median of the timed steps. A peft twin "
                    "row shows its first measurement.", "",
                    "Memory columns: **persistent** = model tensors + gradients + AdamW moments held during a step, "
                    "counted exactly from the tensors; **grads+AdamW** = its training-state part; **activations** = "
                    "bytes autograd saves for backward in one training forward (parameters excluded; PEFT methods save "
                    "less than full fine-tuning because a frozen linear layer keeps no copy of its input for a weight "
                    "gradient, methods with their own modules save those modules' inputs, and `--grad-checkpointing` "
                    "keeps only each block's input); **saving realised** "
                    "= (full − method persistent) / (12 bytes × frozen base parameters), the memory goal; **peak** "
                    "= peak RSS of a fresh process over "
                    f"{s.get('rss_steps', 2)} training steps minus its RSS after building the model (allocator and "
                    "temporaries included; on CUDA `max_memory_allocated`).", ""]
            notes = [f"- `{r['method']}` vs peft twin: {r['peft_twin']['note']}" for r in result["rows"]
                     if r.get("peft_twin")]
            if notes:
                out += ["LoRA-family twins (HF peft `get_peft_model` on the plain timm model):", "", *notes, ""]
            if any(r["name"] == "dr_tune" for r in result["rows"]):
                out += ["DR-Tune runs with `prefill=false` and its queue filled with K random unit features "
                        "before timing, so its steps run with a full queue without K frozen forwards of set-up "
                        "(the step itself is unchanged).", ""]
        elif key == "infer":
            out += [md_table(*infer_table(result)), "",
                    "Each method's model is timed alternately with the untouched base model (its own baseline per "
                    "row), in eval mode without gradients, after the method's end-of-training step; merged = "
                    "`method.merge(backbone)`. The merged model is timed in rounds of its own, alternating with the "
                    "base model again: `merged × base` = `merged ms` / `base ms (merged rounds)`, and `unmerged × "
                    "base` = `unmerged ms` / `base ms`. Non-mergeable methods keep their modules at inference.", ""]
        else:
            out += _transfer_text(result) + [""]
        if result.get("skipped"):
            out += ["Registered but not measured here (the method does not apply to this backbone):", ""]
            out += [f"- `{s['method']}`: {s['reason']}" for s in result["skipped"]] + [""]
    goals = evaluate_goals(train, infer)
    if goals:
        out += ["## Goals", "",
                f"- time: a PEFT method skips the weight-gradient products of frozen layers (about a third of a "
                f"step's FLOPs): train step ≤ {TIME_GOAL:.2f} × full fine-tuning;",
                f"- memory: it saves the gradient and both AdamW moments of every frozen base weight (12 bytes "
                f"each): realise ≥ {MEMORY_GOAL:.0%} of that saving;",
                f"- LoRA family: step ≤ {PEFT_GOAL:.2f} × HF peft's LoRA of the same rank, targets and input dropout;",
                f"- merged inference ≤ {MERGE_GOAL:.2f} × the base model.", "",
                md_table(*goals_table(goals)), ""]
        missed = [g for g in goals if g["met"] is False]
        if missed:
            out += ["### Why methods miss", ""]
            out += [f"- **{g['method']}**, {g['what']} = {g['shown']}: {g['why']}" for g in missed]
            out.append("")
    figures = []
    if plot_ratios(train, infer, asset_dir / "ratios.png"):
        figures.append(f"![step time, memory and inference ratios per method]({rel}/ratios.png)")
    if plot_transfer(transfer, asset_dir / "transfer.png"):
        figures.append(f"![target accuracy and source retention vs trainable parameters]({rel}/transfer.png)")
    if figures:
        out += ["## Plots", ""] + [f + "\n" for f in figures]
    return "\n".join(out).rstrip() + "\n"


def _notices(sections: dict[str, Any]) -> list[str]:
    """Say up front when a page does not come from the full settings on an idle machine."""
    from .common import Settings

    full = Settings()
    notes = []
    reduced = [(key, sections[key]["meta"]["settings"]) for key in ("params", "train", "infer") if key in sections]
    reduced = [(key, s) for key, s in reduced
               if (s["backbone"], s["batch_size"], s["warmup"], s["repeats"], s.get("image_size"))
               != (full.backbone, full.batch_size, full.warmup, full.repeats, full.image_size)]
    if reduced:
        s = reduced[0][1]
        notes.append(f"**Reduced run**: the {'/'.join(f'`{k}`' for k, _ in reduced)} numbers come from "
                     f"`{s['backbone']}`, batch {s['batch_size']}, {s['warmup']} warm-up + {s['repeats']} timed steps, "
                     "not the full ViT-B/16 settings; run the commands under *How to reproduce* for those.")
    busy = []
    for key, section in sections.items():
        meta = section.get("meta", {})
        cpus = meta.get("machine", {}).get("cpu_count") or 1
        loads = [x for x in ((meta.get("machine") or {}).get("load_average") or [])[:1] +
                 (meta.get("load_average_end") or [])[:1]]
        own = (meta.get("machine") or {}).get("torch_threads") or 1  # the bench itself adds about this much
        if loads and max(loads) > own + 0.5:
            busy.append(f"`{key}` (1-min load average up to {max(loads):.1f})")
    if busy:
        notes.append(f"**Shared machine** ({cpus} CPUs; the bench itself adds about its thread count to the load): "
                     "other processes ran during " + ", ".join(busy) + "; timings are noisier "
                     "than on an idle machine (ratios are taken from interleaved steps, which cancels slow drift "
                     "but not short bursts). Accuracies and exact byte counts do not depend on load.")
    return [n + "\n" for n in notes]


def _transfer_text(result: dict[str, Any]) -> list[str]:
    c = result["config"]
    lines = [
        f"- task: generated shapes ({c['image_size']} px, generator `vision_ft/bench/shapes.py` "
        f"v{result['generator_version']}, fixed seeds). Source: {', '.join(result['source_classes'])} ({c['source_train']} train / {c['source_test']} "
        f"test). Target: {', '.join(result['target_classes'])} ({c['target_train']} train / {c['target_test']} test) "
        "— the same primitives drawn hollow or turned 45°, so new classes that reuse the source features.",
        f"- source model: ViT {c['depth']} blocks, dim {c['embed_dim']}, patch {c['patch_size']}, average pooling, "
        f"trained from random init for {c['pretrain_epochs']} epochs (full fine-tuning, AdamW lr {c['pretrain_lr']}): source test accuracy "
        f"**{result['source_acc']:.3f}** (checkpoint `{result['checkpoint']}`, "
        f"{'reused' if result['checkpoint_reused'] else 'trained in this run'}).",
        f"- adaptation: every method with its defaults{_overrides(result)}, a new linear head, AdamW lr {c['lr']} "
        f"(all methods), batch {c['batch_size']}, {c['epochs']} epochs, warm-up + cosine; seeds {result['seeds']} "
        "(head init, method init, data order). Retention = source test accuracy of the adapted backbone (method "
        "active, after its end-of-training step) with the source head.",
        "",
        md_table(*transfer_table(result)),
        "",
        f"Chance is {1 / len(result['target_classes']):.2f} on both tasks. The linear probe's retention equals the "
        "source accuracy by construction (the backbone does not change): a check of the testbed itself.",
    ]
    linear = next((r for r in result["rows"] if r["name"] == "linear"), None)
    if linear is not None:
        flat = [r["method"] for r in result["rows"] if r["name"] != "linear" and
                abs(r["target_acc_mean"] - linear["target_acc_mean"]) <= 2 * max(r["target_acc_std"],
                                                                                   linear["target_acc_std"], 0.005)]
        if flat:
            lines += ["", f"Within noise of the linear probe on the target: "
                      f"{', '.join(f'`{m}`' for m in flat)}. The testbed uses one learning rate and length for all "
                      "methods and tunes none, so this says these methods did not adapt under that shared recipe, "
                      "not that they cannot."]
    return lines


def _overrides(result: dict[str, Any]) -> str:
    extra = result.get("method_args") or {}
    if not extra:
        return ""
    return " except " + "; ".join(f"{k}: {', '.join(f'{a}={v}' for a, v in args.items())}" for k, args in extra.items())
