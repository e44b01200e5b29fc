"""The video rows of ``python -m vision_ft bench diffusion``: TIC-FT + LoRA against plain LoRA on the same frames
of a mid-size random Wan transformer, and a buffer-count sweep.

    python -m vision_ft bench diffusion --part video           # wan_bench_mid, 13 latent frames, 8 x 8 latents
    python -m vision_ft bench diffusion --part video --quick   # wan_test_tiny, one timed round

Every row trains the same LoRA (``to_q, to_k, to_v, to_out.0`` of both attentions, rank r, alpha = r) on the
same latent clip (random latents and text embeddings: the frozen VAE and UMT5 cost the same for every row)
with the video task's loss: ``lora`` is plain flow matching on all frames; ``tic_ft_b<B>`` lays the clip out
as TIC-FT does (``C + B`` condition latents then targets, buffers at ``k / (B + 1)``, loss on targets).
TIC-FT changes no architecture, so its step should cost what plain LoRA's does: the goal is
``tic_ft_b3`` step <= 1.05x ``lora``. Timing alternates rows round by round (median of the timed rounds);
peak memory is measured per row in a fresh process (peak RSS during the steps minus the RSS after building).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from .side_by_side import goal_lines, peak_in_fresh_process

ROWS = ("lora", "tic_ft_b0", "tic_ft_b1", "tic_ft_b3")
GOAL = 1.05
#: latent frames of the clip and of its condition part (the paper's 49 = 13 + 36 pixel frames: 13 latents, 4 context)
FRAMES, CONTEXT = 13, 4


def build(row: str, backbone: str, rank: int) -> Any:
    """The video task of a row, LoRA applied, in training mode."""
    from ..backbones import WanVideo
    from ..tasks import VideoDiffusionTask

    lora = {"class_path": "vision_ft.methods.LoRA", "init_args": {"r": rank, "alpha": rank}}
    method = lora if row == "lora" else {"class_path": "vision_ft.methods.TICFT",
                                         "init_args": {"buffers": int(row.rsplit("_b", 1)[1]), "adapter": lora}}
    task = VideoDiffusionTask(WanVideo(backbone, max_sequence_length=32), method=method)
    task.backbone.model.train()
    return task


def _batch(task: Any, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = task.backbone
    latents = torch.randn(batch_size, *b.latent_shape(FRAMES), generator=g)
    text = torch.randn(batch_size, b.max_sequence_length, b.model.config.text_dim, generator=g)
    return latents, text


def _optimizer(task: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in task.backbone.model.parameters() if p.requires_grad], lr=1e-4)


def step(task: Any, opt: torch.optim.Optimizer, latents: torch.Tensor, text: torch.Tensor) -> float:
    """One training step of the video task's loss on fixed latents (fresh noise and levels)."""
    plan = task.plan(CONTEXT, FRAMES)  # plain LoRA: every latent frame is a target
    levels = task.backbone.train_levels(latents.shape[0], latents.device)
    loss = task.flow_loss(latents, torch.randn_like(latents), levels, text, plan)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_peak(row: str, backbone: str, rank: int, batch_size: int, steps: int) -> dict[str, Any]:
    """In this (fresh) process: peak RSS over ``steps`` steps minus the RSS after building."""
    from .memory import steps_peak

    task = build(row, backbone, rank)
    latents, text = _batch(task, batch_size)
    opt = _optimizer(task)
    return steps_peak(lambda: step(task, opt, latents, text), steps)


def run(backbone: str, rank: int, batch_size: int, warmup: int, repeats: int, rss: bool,
        log: Any = print) -> dict[str, Any]:
    tasks = {}
    for row in ROWS:
        log(f"[bench diffusion] building video row {row} on {backbone}")
        task = build(row, backbone, rank)
        tasks[row] = (task, _optimizer(task))
    latents, text = _batch(next(iter(tasks.values()))[0], batch_size)
    times: dict[str, list[float]] = {r: [] for r in ROWS}
    torch.manual_seed(0)
    for i in range(warmup + repeats):  # alternating rounds: every row sees the same machine load
        for row, (task, opt) in tasks.items():
            started = time.perf_counter()
            step(task, opt, latents, text)
            if i >= warmup:
                times[row].append(time.perf_counter() - started)
        log(f"[bench diffusion] video round {i + 1}/{warmup + repeats}" + (" (warm-up)" if i < warmup else ""))
    rows: dict[str, Any] = {}
    for row, (task, _) in tasks.items():
        plan = task.plan(CONTEXT, FRAMES)
        rows[row] = {"step_s": statistics.median(times[row]), "step_s_all": times[row],
                     "layout": [plan.condition, plan.buffers, plan.target],
                     "trainable": sum(p.numel() for p in task.backbone.model.parameters() if p.requires_grad)}
    model = tasks["lora"][0].backbone.model
    info = {"backbone": backbone, "width": int(model.config.num_attention_heads * model.config.attention_head_dim),
            "layers": int(model.config.num_layers), "latent_frames": FRAMES,
            "latent_shape": list(tasks["lora"][0].backbone.latent_shape(FRAMES)),
            "parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)}
    del tasks
    if rss:
        for row in ROWS:
            log(f"[bench diffusion] peak memory of video row {row} (fresh process)")
            rows[row].update(_peak_in_fresh_process(row, backbone, rank, batch_size))
    ratio = rows["tic_ft_b3"]["step_s"] / rows["lora"]["step_s"]
    return {"model": info, "rows": rows,
            "goals": {"tic_ft_step_vs_lora": {"value": ratio, "goal": GOAL, "met": ratio <= GOAL}}}


def _peak_in_fresh_process(row: str, backbone: str, rank: int, batch_size: int) -> dict[str, Any]:
    return peak_in_fresh_process("vision_ft.bench.diffusion", [
        "--child-video", row, "--video-backbone", backbone, "--rank", str(rank), "--batch-size", str(batch_size)],
        env={"OMP_NUM_THREADS": str(torch.get_num_threads())})


def report(result: dict[str, Any]) -> str:
    m, rows = result["model"], result["rows"]
    base = rows["lora"]["step_s"]
    title = (f"bench diffusion (video): {m['backbone']} transformer (random weights; width {m['width']}, "
             f"{m['layers']} blocks, latents {m['latent_shape']}; {m['parameters']:,} parameters)")
    lines = [title, f"{'row':<10} {'C/B/T':>8} {'step s':>8} {'x lora':>7} {'trainable':>10} {'peak MB':>8}"]
    for name, r in rows.items():
        peak = f"{r['peak_bytes'] / 2 ** 20:.0f}" if "peak_bytes" in r else "-"
        layout = "/".join(str(x) for x in r["layout"])
        lines.append(f"{name:<10} {layout:>8} {r['step_s']:>8.3f} {r['step_s'] / base:>7.2f} {r['trainable']:>10,} "
                     f"{peak:>8}")
    lines += goal_lines(result["goals"])
    return "\n".join(lines)
