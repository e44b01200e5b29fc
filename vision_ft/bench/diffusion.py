"""``python -m vision_ft bench diffusion``: LoRA, SaRA and full fine-tuning of a mid-size random Stable
Diffusion UNet, side by side.

    python -m vision_ft bench diffusion                  # sd_bench_mid UNet, batch 2, 32 x 32 latents
    python -m vision_ft bench diffusion --quick          # tiny UNet, one timed round (what the tests run)
    python -m vision_ft bench diffusion --methods lora sara --json
    python -m vision_ft bench diffusion --part video     # only the video rows (vision_ft.bench.video_diffusion)

The training step is the text-to-image one on the UNet alone (random latents and text embeddings: the
frozen VAE and text encoder cost the same for every method): ``add_noise`` at random timesteps, the
epsilon MSE, the method's regularisers (SaRA's nuclear-norm term), backward, AdamW. One process times
every method in alternating rounds (the median of the timed rounds is reported); peak memory is measured
per method in a fresh process (peak RSS during the steps minus the RSS after building). Training state is
counted from the tensors themselves: trainable values, AdamW moments, and SaRA's mask indices apart.

Goals: LoRA step <= 0.75x full fine-tuning; SaRA's optimiser-held bytes (trained values + AdamW moments)
<= 1.2 x (12 bytes x its trainable count). The video rows (TIC-FT + LoRA vs plain LoRA on a random Wan
transformer, buffer counts 0, 1, 3) are :mod:`vision_ft.bench.video_diffusion`'s, in the result's ``video``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .side_by_side import goal_lines, peak_in_fresh_process

METHODS = ("lora", "sara", "full")
GOALS = {"lora_step_vs_full": 0.75, "sara_optimizer_bytes_vs_12x": 1.2}


def build(method: str, backbone: str, rank: int) -> tuple[Any, Any]:
    """``(backbone, method)`` with the method applied (LoRA: the diffusers targets, alpha = rank)."""
    from ..backbones import StableDiffusion
    from ..methods import build_method

    if method not in METHODS:
        raise ConfigError(f"bench diffusion --methods: {method!r} unknown; choose from {list(METHODS)}")
    sd = StableDiffusion(backbone)
    spec = {"lora": {"class_path": "vision_ft.methods.LoRA", "init_args": {"r": rank, "alpha": rank}},
            "sara": {"class_path": "vision_ft.methods.SaRA", "init_args": {}}, "full": "full"}[method]
    m = build_method(spec)
    m.apply(sd)
    sd.model.train()
    return sd, m


def _batch(sd: Any, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = sd.model.config
    latents = torch.randn(batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(batch_size, 77, cfg.cross_attention_dim, generator=g)
    return latents, text


def _optimizer(sd: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in sd.model.parameters() if p.requires_grad], lr=1e-4)


def step(sd: Any, method: Any, opt: torch.optim.Optimizer, latents: torch.Tensor, text: torch.Tensor) -> float:
    sched = sd.scheduler
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
    pred = sd.denoise(sched.add_noise(latents, noise, t), t, text)
    loss = F.mse_loss(pred, noise) + sum(method.regularizer({}, None).values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def state_bytes(sd: Any, method: Any, opt: torch.optim.Optimizer) -> dict[str, int]:
    """What training keeps: trained values, optimiser moments (after a step), method buffers (SaRA's indices)."""
    trainable = [p for p in sd.model.parameters() if p.requires_grad]
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                  if isinstance(t, torch.Tensor) and k != "step")
    buffers = sum(b.numel() * b.element_size() for n, b in sd.model.named_buffers() if method.is_own(n))
    return {"trainable": sum(p.numel() for p in trainable),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer_moment_bytes": moments, "method_buffer_bytes": buffers}


def measure_peak(method: str, backbone: str, rank: int, batch_size: int, steps: int) -> dict[str, Any]:
    """In this (fresh) process: peak RSS over ``steps`` training steps minus the RSS after building."""
    from .memory import steps_peak

    sd, m = build(method, backbone, rank)
    latents, text = _batch(sd, batch_size)
    opt = _optimizer(sd)
    return steps_peak(lambda: step(sd, m, opt, latents, text), steps)


def run(methods: list[str], backbone: str, rank: int, batch_size: int, warmup: int, repeats: int, rss: bool,
        log: Any = print) -> dict[str, Any]:
    models = {}
    for name in methods:
        log(f"[bench diffusion] building {name} on {backbone}")
        sd, m = build(name, backbone, rank)
        models[name] = (sd, m, _optimizer(sd))
    latents, text = _batch(next(iter(models.values()))[0], batch_size)
    times: dict[str, list[float]] = {n: [] for n in methods}
    torch.manual_seed(0)
    for r in range(warmup + repeats):  # alternating rounds: every method sees the same machine load
        for name, (sd, m, opt) in models.items():
            started = time.perf_counter()
            step(sd, m, opt, latents, text)
            if r >= warmup:
                times[name].append(time.perf_counter() - started)
        log(f"[bench diffusion] round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    first = next(iter(models.values()))[0]
    cfg = first.model.config
    rows: dict[str, Any] = {}
    for name, (sd, m, opt) in models.items():
        rows[name] = {"step_s": statistics.median(times[name]), "step_s_all": times[name], **state_bytes(sd, m, opt)}
    del models
    if rss:
        for name in methods:
            log(f"[bench diffusion] peak memory of {name} (fresh process)")
            rows[name].update(_peak_in_fresh_process(name, backbone, rank, batch_size))
    base = build("full", backbone, rank)[0].model
    model = {"backbone": backbone, "block_out_channels": list(cfg.block_out_channels),
             "cross_attention_dim": cfg.cross_attention_dim, "latent_size": cfg.sample_size,
             "parameters": sum(p.numel() for p in base.parameters())}
    return {"model": model, "rows": rows, "goals": goals(rows)}


def _peak_in_fresh_process(name: str, backbone: str, rank: int, batch_size: int) -> dict[str, Any]:
    return peak_in_fresh_process("vision_ft.bench.diffusion", [
        "--child", name, "--backbone", backbone, "--rank", str(rank), "--batch-size", str(batch_size)],
        env={"OMP_NUM_THREADS": str(torch.get_num_threads())})


def goals(rows: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "lora" in rows and "full" in rows:
        ratio = rows["lora"]["step_s"] / rows["full"]["step_s"]
        out["lora_step_vs_full"] = {"value": ratio, "goal": GOALS["lora_step_vs_full"],
                                    "met": ratio <= GOALS["lora_step_vs_full"]}
    if "sara" in rows:
        s = rows["sara"]
        ratio = (s["trainable_bytes"] + s["optimizer_moment_bytes"]) / (12 * s["trainable"])
        out["sara_optimizer_bytes_vs_12x"] = {"value": ratio, "goal": GOALS["sara_optimizer_bytes_vs_12x"],
                                              "met": ratio <= GOALS["sara_optimizer_bytes_vs_12x"]}
    return out


def report(result: dict[str, Any]) -> str:
    m, rows = result["model"], result["rows"]
    full = rows.get("full", {}).get("step_s")
    mb = 2 ** 20
    title = (f"bench diffusion: {m['backbone']} UNet (random weights; channels {m['block_out_channels']}, "
             f"cross-attention {m['cross_attention_dim']}, latents {m['latent_size']}x{m['latent_size']}; "
             f"{m['parameters'] / 1e6:.1f}M parameters)")
    header = (f"{'method':<6} {'step s':>8} {'x full':>7} {'trainable':>12} {'values MB':>10} {'AdamW MB':>9} "
              f"{'buffers MB':>10} {'peak MB':>8}")
    lines = [title, header]
    for name, r in rows.items():
        ratio = f"{r['step_s'] / full:.2f}" if full else "-"
        peak = f"{r['peak_bytes'] / mb:.0f}" if "peak_bytes" in r else "-"
        lines.append(f"{name:<6} {r['step_s']:>8.3f} {ratio:>7} {r['trainable']:>12,} {r['trainable_bytes'] / mb:>10.1f} "
                     f"{r['optimizer_moment_bytes'] / mb:>9.1f} {r['method_buffer_bytes'] / mb:>10.1f} {peak:>8}")
    lines += goal_lines(result["goals"])
    return "\n".join(lines)


def cmd_diffusion(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vision_ft bench diffusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--backbone", default=None, help="a StableDiffusion preset (default sd_bench_mid)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank, the diffusers example's)")
    p.add_argument("--batch-size", type=int, default=None, help="latents per step (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--no-rss", dest="rss", action="store_false", default=None, help="skip fresh-process peak memory")
    p.add_argument("--out", default="runs/bench", help="folder for bench_diffusion.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quick", action="store_true", help="tiny UNet, one timed round, no fresh processes")
    p.add_argument("--part", choices=("all", "image", "video"), default="all",
                   help="image rows (Stable Diffusion UNet), video rows (Wan transformer, TIC-FT) or both")
    p.add_argument("--video-backbone", default=None, help="a WanVideo preset for the video rows (default wan_bench_mid)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for this command and its fresh processes (default: torch's own count; 1 is "
                        "steadier on a shared machine)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-video", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quick = dict(backbone="sd_test_tiny", video_backbone="wan_test_tiny", batch_size=2, warmup=1, repeats=1,
                 rss=False)
    full = dict(backbone="sd_bench_mid", video_backbone="wan_bench_mid", batch_size=2, warmup=1, repeats=3, rss=True)
    preset = quick if a.quick else full
    args = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in preset.items()}
    if args["batch_size"] < 1 or args["repeats"] < 1 or a.rank < 1 or (a.threads is not None and a.threads < 1):
        raise ConfigError("bench diffusion: --batch-size, --rank, --repeats and --threads must be >= 1")
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _diffusion(a, argv, args)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this command only


def _diffusion(a: argparse.Namespace, argv: list[str], args: dict[str, Any]) -> int:
    from . import video_diffusion as video

    if a.child:
        print(json.dumps(measure_peak(a.child, args["backbone"], a.rank, args["batch_size"], 2)))
        return 0
    if a.child_video:
        print(json.dumps(video.measure_peak(a.child_video, args["video_backbone"], a.rank, args["batch_size"], 2)))
        return 0
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if a.json else print
    started = time.time()
    result: dict[str, Any] = {}
    if a.part in ("all", "image"):
        result = run(a.methods, args["backbone"], a.rank, args["batch_size"], args["warmup"], args["repeats"],
                     args["rss"], log=log)
    if a.part in ("all", "video"):
        result["video"] = video.run(args["video_backbone"], a.rank, args["batch_size"], args["warmup"],
                                    args["repeats"], args["rss"], log=log)
    result["meta"] = {"command": "python -m vision_ft bench diffusion " + " ".join(argv),
                      "settings": {**args, "rank": a.rank}, "threads": torch.get_num_threads(),
                      "wall_s": time.time() - started, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    from ..io import atomic_write_text

    atomic_write_text(Path(a.out) / "bench_diffusion.json", json.dumps(result, indent=1) + "\n")
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        parts = ([report(result)] if "rows" in result else []) + ([video.report(result["video"])] if "video" in result
                                                                   else [])
        print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(cmd_diffusion(sys.argv[1:]))
