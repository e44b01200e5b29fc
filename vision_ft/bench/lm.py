"""``python -m vision_ft bench lm``: LoRA, QLoRA and full fine-tuning of a mid-size random causal LM, side by side.

    python -m vision_ft bench lm                         # llama_bench_mid, batch 4 x 128 tokens
    python -m vision_ft bench lm --quick                 # tiny model, one timed step (what the tests run)
    python -m vision_ft bench lm --methods lora full --json

One process times every method's training step (forward, backward, AdamW step) in alternating rounds, so
the ratios are measured side by side under the same machine load; the median of the timed rounds is
reported as step time and tokens per second. Peak memory is measured per method in a fresh process
(peak RSS during the steps minus the RSS after building the model), as the vision bench does. QLoRA's
quantised weights are counted from the 4-bit layers' own tensors (packed weights, absmax, nested scales)
against the fp32 bytes of the same weights.

Goals: LoRA step <= 0.75x full fine-tuning; QLoRA quantised weights <= 0.3x their fp32 bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .side_by_side import add_common_options, finish, goal, goal_lines, peak_in_fresh_process, settings

METHODS = ("lora", "qlora", "full")
GOALS = {"lora_step_vs_full": 0.75, "qlora_weight_bytes_vs_fp32": 0.3}


def build(method: str, backbone: str, rank: int) -> tuple[Any, Any]:
    """``(backbone, method)`` with the method applied, through the kit's own classes."""
    from ..backbones import CausalLM
    from ..methods import build_method

    if method not in METHODS:
        raise ConfigError(f"bench lm --methods: {method!r} unknown; choose from {list(METHODS)}")
    lm = CausalLM(backbone, quantization="nf4" if method == "qlora" else "none")
    if method == "full":
        m = build_method("full")
    else:
        m = build_method({"class_path": "vision_ft.methods.LoRA", "init_args": {"r": rank, "alpha": 2 * rank}})
    m.apply(lm)
    lm.train()
    return lm, m


def _batch(lm: Any, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = lm.model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def _optimizer(lm: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-4)


def step(lm: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor) -> float:
    from ..data.chat import shifted_loss

    loss, _ = shifted_loss(lm(ids), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def quantised_bytes(lm: Any) -> dict[str, int]:
    """Bytes of the 4-bit layers' storage (packed weights + quantisation state) and of the same weights in fp32."""
    packed = fp32 = 0
    for module in lm.model.modules():
        own = module._parameters.get("weight")  # a peft wrapper forwards .weight to its base layer: count once
        state = getattr(own, "quant_state", None)
        if state is None:
            continue
        packed += module.weight.numel() * module.weight.element_size()
        for t in (state.absmax, state.code, getattr(state, "offset", None)):
            if isinstance(t, torch.Tensor):
                packed += t.numel() * t.element_size()
        if state.nested:
            packed += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
        fp32 += int(torch.Size(state.shape).numel()) * 4
    return {"quantised_bytes": packed, "fp32_bytes": fp32}


def persistent_bytes(lm: Any) -> dict[str, int]:
    """Parameters, and what training keeps per trainable parameter (fp32 gradient + two AdamW moments)."""
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    trainable = sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    return {"parameter_bytes": params, "trainable": trainable, "grad_and_adam_bytes": trainable * 12}


def measure_peak(method: str, backbone: str, rank: int, batch_size: int, seq_len: int, steps: int) -> dict[str, Any]:
    """In this (fresh) process: peak RSS over ``steps`` training steps minus the RSS after building."""
    from .memory import steps_peak

    lm, _ = build(method, backbone, rank)
    ids, labels = _batch(lm, batch_size, seq_len)
    opt = _optimizer(lm)
    return steps_peak(lambda: step(lm, opt, ids, labels), steps)


def run(methods: list[str], backbone: str, rank: int, batch_size: int, seq_len: int, warmup: int, repeats: int,
        rss: bool, log: Any = print) -> dict[str, Any]:
    models = {}
    for name in methods:
        log(f"[bench lm] building {name} on {backbone}")
        lm, m = build(name, backbone, rank)
        models[name] = (lm, _optimizer(lm))
    ids, labels = _batch(next(iter(models.values()))[0], batch_size, seq_len)
    times: dict[str, list[float]] = {n: [] for n in methods}
    for r in range(warmup + repeats):  # alternating rounds: every method sees the same machine load
        for name, (lm, opt) in models.items():
            started = time.perf_counter()
            step(lm, opt, ids, labels)
            if r >= warmup:
                times[name].append(time.perf_counter() - started)
        log(f"[bench lm] round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    cfg = next(iter(models.values()))[0].model.config
    rows: dict[str, Any] = {}
    for name, (lm, _) in models.items():
        median = statistics.median(times[name])
        row = {"step_s": median, "step_s_all": times[name], "tokens_per_s": batch_size * seq_len / median,
               **persistent_bytes(lm)}
        if name == "qlora":
            row.update(quantised_bytes(lm))
        rows[name] = row
    del models
    if rss:
        for name in methods:
            log(f"[bench lm] peak memory of {name} (fresh process)")
            rows[name].update(_peak_in_fresh_process(name, backbone, rank, batch_size, seq_len))
    model = {"backbone": backbone, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
             "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
             "attention_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
             "parameters": sum(p.numel() for p in build("full", backbone, rank)[0].model.parameters())}
    return {"model": model, "rows": rows, "goals": goals(rows)}


def _peak_in_fresh_process(name: str, backbone: str, rank: int, batch_size: int, seq_len: int) -> dict[str, Any]:
    return peak_in_fresh_process("vision_ft.bench.lm", ["--child", name, "--backbone", backbone, "--rank", str(rank),
                                                         "--batch-size", str(batch_size), "--seq-len", str(seq_len)])


def goals(rows: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "lora" in rows and "full" in rows:
        out["lora_step_vs_full"] = goal(rows["lora"]["step_s"] / rows["full"]["step_s"], GOALS["lora_step_vs_full"])
    if "qlora" in rows:
        out["qlora_weight_bytes_vs_fp32"] = goal(rows["qlora"]["quantised_bytes"] / rows["qlora"]["fp32_bytes"],
                                                 GOALS["qlora_weight_bytes_vs_fp32"])
    return out


def report(result: dict[str, Any]) -> str:
    m, rows = result["model"], result["rows"]
    full = rows.get("full", {}).get("step_s")
    lines = [f"bench lm: {m['backbone']} (random weights; hidden {m['hidden_size']}, {m['layers']} layers, "
             f"MLP {m['intermediate_size']}, vocab {m['vocab_size']}, {m['attention_heads']}/{m['kv_heads']} "
             f"q/kv heads; {m['parameters'] / 1e6:.1f}M parameters)",
             f"{'method':<8} {'step s':>8} {'x full':>7} {'tokens/s':>9} {'trainable':>12} {'peak MB':>9}"]
    for name, r in rows.items():
        ratio = f"{r['step_s'] / full:.2f}" if full else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        lines.append(f"{name:<8} {r['step_s']:>8.3f} {ratio:>7} {r['tokens_per_s']:>9.0f} {r['trainable']:>12,} "
                     f"{peak:>9}")
    if "qlora" in rows:
        q = rows["qlora"]
        lines.append(f"qlora 4-bit layers: {q['quantised_bytes'] / 2**20:.1f} MB vs {q['fp32_bytes'] / 2**20:.1f} MB "
                     f"in fp32 ({q['quantised_bytes'] / q['fp32_bytes']:.3f}x)")
    lines += goal_lines(result["goals"])
    return "\n".join(lines)


def cmd_lm(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vision_ft bench lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--backbone", default=None, help="a CausalLM preset (default llama_bench_mid)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), all projections")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128)")
    add_common_options(p, "bench_lm.json")
    a = p.parse_args(argv)
    args = settings(a, quick=dict(backbone="llama_test_tiny", batch_size=2, seq_len=32, warmup=1, repeats=1, rss=False),
                    full=dict(backbone="llama_bench_mid", batch_size=4, seq_len=128, warmup=1, repeats=3, rss=True))
    if args["batch_size"] < 1 or args["seq_len"] < 2 or args["repeats"] < 1 or a.rank < 1:
        raise ConfigError("bench lm: --batch-size, --rank and --repeats must be >= 1, --seq-len >= 2")
    if a.child:
        print(json.dumps(measure_peak(a.child, args["backbone"], a.rank, args["batch_size"], args["seq_len"], 2)))
        return 0
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.json else print
    started = time.time()
    result = run(a.methods, args["backbone"], a.rank, args["batch_size"], args["seq_len"], args["warmup"],
                 args["repeats"], args["rss"], log=log)
    return finish(result, argv, "lm", {**args, "rank": a.rank}, started, Path(a.out) / "bench_lm.json", a.json,
                  report(result) if not a.json else "")


if __name__ == "__main__":
    sys.exit(cmd_lm(sys.argv[1:]))
