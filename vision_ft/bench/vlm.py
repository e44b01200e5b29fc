"""``python -m vision_ft bench vlm``: LoRA, QLoRA and full fine-tuning of a vision-language model's language
model, each beside the same setup driven by a plain loop, in one run.

    python -m vision_ft bench vlm                        # qwen2_5_vl_bench_mid, 2 conversations, 128-token replies
    python -m vision_ft bench vlm --quick                # tiny model, one timed round (what the tests run)
    python -m vision_ft bench vlm --methods lora full --json

Kit rows run ``VisionLanguageSFTTask.training_loss`` (the training step without logging: forward through the
backbone, loss on the replies, regularisers, non-finite check) then backward and AdamW. Their ``plain`` twins
build the same transformers model with peft (or nothing, for full) and run ``model(**batch, labels=...)``,
backward and AdamW, with no kit code in the step: the ratio is the kit's overhead. Every configuration is
timed in alternating rounds (same machine load), the median of the timed rounds reported. Peak memory of
the kit rows is measured in fresh processes (peak RSS over two steps minus the RSS after building). QLoRA's
4-bit layers are counted from their own tensors against the fp32 bytes of the same weights.

Goals: LoRA step <= 0.75x full; QLoRA quantised weights <= 0.3x fp32; no kit row slower than its plain twin
by more than 5%.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import ConfigError
from .lm import goals as lm_goals
from .lm import persistent_bytes, quantised_bytes
from .side_by_side import add_common_options, finish, goal, goal_lines, peak_in_fresh_process, settings

METHODS = ("lora", "qlora", "full", "q_adapter", "q_adapter_lora")
#: methods with a transformers + peft twin driven by a plain loop
TWINNED = ("lora", "qlora", "full")
GOALS = {"lora_step_vs_full": 0.75, "qlora_weight_bytes_vs_fp32": 0.3, "kit_vs_plain": 1.05}
#: every projection of the language model's decoder layers (what the kit's ``lora`` adapts by default)
_LM_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def conversations(root: Path, batch_size: int, seq_len: int, tokenizer: Any, seed: int = 0,
                  video: bool = False) -> list[Any]:
    """``batch_size`` one-image conversations (112 x 112 px random images; ``video``: 8-frame 112 x 112 clips
    at 4 fps) whose replies are ``seq_len`` tokens or just over."""
    import numpy as np
    from PIL import Image

    from ..data.conversations import parse_record

    rng = np.random.default_rng(seed)
    words = ["polyp", "mucosa", "lesion", "left", "right", "upper", "lower", "small", "large", "red"]
    out = []
    for i in range(batch_size):
        if video:
            from ..data.video import write_video

            write_video(root / f"b{i}.mp4", (rng.random((8, 112, 112, 3)) * 255).astype("uint8"), fps=4, codec="ffv1")
            media, tag = {"video": f"b{i}.mp4"}, "<video>"
        else:
            Image.fromarray((rng.random((112, 112, 3)) * 255).astype("uint8")).save(root / f"b{i}.png")
            media, tag = {"image": f"b{i}.png"}, "<image>"
        reply = str(rng.choice(words))
        while len(tokenizer(reply, add_special_tokens=False)["input_ids"]) < seq_len:
            reply += " " + str(rng.choice(words))
        conv = parse_record({**media, "conversations": [
            {"from": "human", "value": f"{tag}\nDescribe the finding."}, {"from": "gpt", "value": reply}]},
            f"bench:{i}", root)
        if video:
            from ..data.vl_video import VideoSampling

            conv.sampling = VideoSampling(frames=8)
        out.append(conv)
    return out


def make_batch(processor: Any, convs: list[Any]) -> dict[str, torch.Tensor]:
    from ..data.conversations import collate_vl, encode

    return collate_vl([encode(processor, c) for c in convs], processor.tokenizer.pad_token_id)


def build_kit(method: str, backbone: str, rank: int) -> Any:
    """The kit's task: LoRA (r, alpha = 2r) on the language model, QLoRA = the same on NF4 weights, full = the
    language model trained in full (vision tower and projector frozen), q_adapter = Q-Adapter's defaults in the
    vision tower, q_adapter_lora = Q-Adapter with the same LoRA stacked; ``base`` = no method (inference only)."""
    from ..backbones import VisionLanguageModel
    from ..tasks import VisionLanguageSFTTask

    vlm = VisionLanguageModel(backbone, quantization="nf4" if method == "qlora" else "none")
    lora = {"r": rank, "alpha": 2 * rank}
    if method in ("full", "base"):
        task = VisionLanguageSFTTask(vlm, method="linear", train_full=["language_model"] if method == "full" else [])
    elif method.startswith("q_adapter"):
        task = VisionLanguageSFTTask(vlm, method={"class_path": "vision_ft.methods.QAdapter", "init_args": {
            "lora": lora if method == "q_adapter_lora" else None}})
    else:
        task = VisionLanguageSFTTask(vlm, method={"class_path": "vision_ft.methods.LoRA",
                                                  "init_args": {"r": rank, "alpha": 2 * rank}})
    return task.train()


def build_plain(method: str, backbone: str, rank: int) -> Any:
    """The same model built with transformers (+ bitsandbytes) and peft alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from ..backbones._transformers import nf4_config
    from ..backbones.vlm_presets import TINY_VLM_PRESETS, tiny_vl_config, tiny_vl_tokenizer

    family = TINY_VLM_PRESETS[backbone]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_vl_config(family, tiny_vl_tokenizer(family), backbone),
                                                    dtype=torch.float32)
    if method == "qlora":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            skip = ["lm_head", "model.visual", "visual"]
            model = AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32,
                                                                quantization_config=nf4_config(True, "float32", skip))
    if method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("model.language_model.", "lm_head.")))
    else:
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=_LM_LINEARS))
    model.config.use_cache = False
    return model.train()


def _trainables(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def kit_step(task: Any, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = task.training_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def plain_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss  # batch carries labels: transformers shifts them and averages over replies
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _configs(methods: list[str], backbone: str, rank: int, log: Any) -> dict[str, tuple[str, Any, Any]]:
    out = {}
    for m in methods:
        log(f"[bench vlm] building {m} (kit)" + (" and its plain loop" if m in TWINNED else "") + f" on {backbone}")
        task = build_kit(m, backbone, rank)
        out[m] = ("kit", task, torch.optim.AdamW(_trainables(task), lr=1e-5))
        if m not in TWINNED:
            continue
        plain = build_plain(m, backbone, rank)
        out[f"{m}_plain"] = ("plain", plain, torch.optim.AdamW(_trainables(plain), lr=1e-5))
    return out


def _inference(configs: dict[str, tuple[str, Any, Any]], backbone: str, rank: int, batch: dict[str, Any],
               rounds: int) -> dict[str, float]:
    """Median forward time (no gradients) of each non-mergeable kit model and of the base model, alternating."""
    models = {"base": build_kit("base", backbone, rank).eval()}
    models.update({n: c[1] for n, c in configs.items() if c[0] == "kit" and not c[1].method.mergeable})
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for r in range(2 + max(rounds, 3)):  # two untimed rounds, then at least three timed ones
            for name, task in models.items():
                started = time.perf_counter()
                task(inputs)
                if r >= 2:
                    times[name].append(time.perf_counter() - started)
    return {n: statistics.median(t) for n, t in times.items()}


def run(methods: list[str], backbone: str, rank: int, batch_size: int, seq_len: int, warmup: int, repeats: int,
        rss: bool, log: Any = print, video: bool = False) -> dict[str, Any]:
    configs = _configs(methods, backbone, rank, log)
    processor = next(c[1] for c in configs.values() if c[0] == "kit").processor
    with tempfile.TemporaryDirectory() as tmp:
        batch = make_batch(processor, conversations(Path(tmp), batch_size, seq_len, processor.tokenizer,
                                                    video=video))
    times: dict[str, list[float]] = {n: [] for n in configs}
    for r in range(warmup + repeats):
        for name, (kind, model, opt) in configs.items():
            started = time.perf_counter()
            (kit_step if kind == "kit" else plain_step)(model, opt, batch)
            if r >= warmup:
                times[name].append(time.perf_counter() - started)
        log(f"[bench vlm] round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    tokens = int(batch["attention_mask"].sum())
    infer = _inference(configs, backbone, rank, batch, repeats) \
        if any(not c[1].method.mergeable for c in configs.values() if c[0] == "kit") else {}
    rows: dict[str, Any] = {}
    for name, (kind, model, _) in configs.items():
        median = statistics.median(times[name])
        inner = model.backbone if kind == "kit" else SimpleNamespace(model=model)  # the counters read ``.model``
        row = {"kind": kind, "step_s": median, "step_s_all": times[name], "tokens_per_s": tokens / median,
               **persistent_bytes(inner)}
        if name.startswith("qlora"):
            row.update(quantised_bytes(inner))
        if name in infer:
            row.update(infer_s=infer[name], infer_vs_base=infer[name] / infer["base"])
        rows[name] = row
    cfg = configs[methods[0]][1].backbone.model.config
    parameters = sum(p.numel() for p in configs[methods[0]][1].backbone.model.parameters()) \
        if methods[0] != "qlora" else None  # 4-bit layers pack two weights per byte
    del configs
    if rss:
        for name in methods:
            log(f"[bench vlm] peak memory of {name} (fresh process)")
            rows[name].update(_peak_in_fresh_process(name, backbone, rank, batch_size, seq_len, video))
    text, vision = cfg.get_text_config(), cfg.vision_config
    model = {"backbone": backbone, "text_hidden": text.hidden_size, "text_layers": text.num_hidden_layers,
             "text_mlp": text.intermediate_size, "vocab_size": text.vocab_size,
             "vision_hidden": vision.hidden_size, "vision_blocks": vision.depth,
             "tokens_per_step": tokens, "image_tokens_per_step": int((batch["mm_token_type_ids"] > 0).sum())
             if "mm_token_type_ids" in batch else None, "input": "video" if video else "image",
             "parameters": parameters, "base_infer_s": infer.get("base")}
    return {"model": model, "rows": rows, "goals": goals(rows)}


def measure_peak(method: str, backbone: str, rank: int, batch_size: int, seq_len: int, steps: int,
                 video: bool = False) -> dict[str, Any]:
    from .memory import steps_peak

    task = build_kit(method, backbone, rank)
    with tempfile.TemporaryDirectory() as tmp:
        batch = make_batch(task.processor, conversations(Path(tmp), batch_size, seq_len, task.processor.tokenizer,
                                                         video=video))
    opt = torch.optim.AdamW(_trainables(task), lr=1e-5)
    return steps_peak(lambda: kit_step(task, opt, batch), steps)


def _peak_in_fresh_process(name: str, backbone: str, rank: int, batch_size: int, seq_len: int,
                           video: bool = False) -> dict[str, Any]:
    return peak_in_fresh_process("vision_ft.bench.vlm", [
        "--child", name, "--backbone", backbone, "--rank", str(rank), "--batch-size", str(batch_size),
        "--seq-len", str(seq_len), *(["--video"] if video else [])])


def goals(rows: dict[str, Any]) -> dict[str, Any]:
    out = lm_goals(rows)
    for name in [n for n in rows if f"{n}_plain" in rows]:
        out[f"{name}_kit_vs_plain"] = goal(rows[name]["step_s"] / rows[f"{name}_plain"]["step_s"], GOALS["kit_vs_plain"])
    return out


def report(result: dict[str, Any]) -> str:
    m, rows = result["model"], result["rows"]
    full = rows.get("full", {}).get("step_s")
    lines = [f"bench vlm: {m['backbone']} (random weights; language model {m['text_layers']} x {m['text_hidden']}, "
             f"MLP {m['text_mlp']}, vocab {m['vocab_size']}; vision tower {m['vision_blocks']} x {m['vision_hidden']}; "
             + (f"{m['parameters'] / 1e6:.1f}M parameters; " if m["parameters"] else "") +
             f"{m['tokens_per_step']} tokens per step, {m['image_tokens_per_step']} of them {m['input']} tokens)",
             f"{'setup':<12} {'step s':>8} {'x full':>7} {'tokens/s':>9} {'trainable':>12} {'peak MB':>9}"]
    for name, r in rows.items():
        ratio = f"{r['step_s'] / full:.2f}" if full else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        lines.append(f"{name:<12} {r['step_s']:>8.3f} {ratio:>7} {r['tokens_per_s']:>9.0f} {r['trainable']:>12,} "
                     f"{peak:>9}")
    for name, r in rows.items():
        if "infer_s" in r:
            lines.append(f"{name} inference (forward, not mergeable): {r['infer_s']:.3f} s vs base "
                         f"{m['base_infer_s']:.3f} s ({r['infer_vs_base']:.2f}x)")
    if "qlora" in rows:
        q = rows["qlora"]
        lines.append(f"qlora 4-bit layers: {q['quantised_bytes'] / 2**20:.1f} MB vs {q['fp32_bytes'] / 2**20:.1f} MB "
                     f"in fp32 ({q['quantised_bytes'] / q['fp32_bytes']:.3f}x)")
    lines += goal_lines(result["goals"])
    return "\n".join(lines)


def cmd_vlm(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vision_ft bench vlm", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="default lora qlora full; with --video lora q_adapter q_adapter_lora")
    p.add_argument("--video", action="store_true", help="8-frame video conversations instead of images")
    p.add_argument("--backbone", default=None, help="a Qwen-VL preset (default qwen2_5_vl_bench_mid)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), every language-model projection")
    p.add_argument("--batch-size", type=int, default=None, help="conversations per step (default 2)")
    p.add_argument("--seq-len", type=int, default=None, help="reply tokens per conversation (default 128)")
    add_common_options(p, "bench_vlm.json (bench_vlm_video.json with --video)")
    a = p.parse_args(argv)
    args = settings(a, quick=dict(backbone="qwen2_5_vl_test_tiny", batch_size=2, seq_len=16, warmup=1, repeats=1,
                                  rss=False),
                    full=dict(backbone="qwen2_5_vl_bench_mid", batch_size=2, seq_len=128, warmup=1, repeats=3, rss=True))
    from ..backbones.vlm_presets import TINY_VLM_PRESETS

    if not re.match(r"qwen", TINY_VLM_PRESETS.get(args["backbone"], "")):
        raise ConfigError(f"bench vlm --backbone {args['backbone']!r}: a Qwen-VL preset "
                          f"({sorted(k for k, v in TINY_VLM_PRESETS.items() if v.startswith('qwen'))})")
    if args["batch_size"] < 1 or args["seq_len"] < 2 or args["repeats"] < 1 or a.rank < 1:
        raise ConfigError("bench vlm: --batch-size, --rank and --repeats must be >= 1, --seq-len >= 2")
    methods = a.methods or (["lora", "q_adapter", "q_adapter_lora"] if a.video else list(TWINNED))
    if a.child:
        print(json.dumps(measure_peak(a.child, args["backbone"], a.rank, args["batch_size"], args["seq_len"], 2,
                                      a.video)))
        return 0
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.json else print
    started = time.time()
    result = run(methods, args["backbone"], a.rank, args["batch_size"], args["seq_len"], args["warmup"],
                 args["repeats"], args["rss"], log=log, video=a.video)
    name = "bench_vlm_video.json" if a.video else "bench_vlm.json"
    return finish(result, argv, "vlm", {**args, "rank": a.rank, "methods": methods, "video": a.video}, started,
                  Path(a.out) / name, a.json, report(result) if not a.json else "")


if __name__ == "__main__":
    sys.exit(cmd_vlm(sys.argv[1:]))
