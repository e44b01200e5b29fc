"""``bench train`` and ``bench infer``: step time, memory and inference latency, side by side.

Train: every method's real training step (the task's forward outputs, loss, the
method's loss adjustment and regularisers, backward, AdamW step) at one batch and
image size, after warm-up, median of several repeats, all in this process so the
ratios compare like with like. Each method's steps alternate with steps of full
fine-tuning (one model kept for the whole run) and, for the LoRA family, of HF
peft's LoRA of the same rank and targets: every ratio has its own reference,
measured under the same load, and slow drift of a shared machine cancels out.

Memory, three numbers with different meanings:

- ``persistent``: exact bytes of model tensors + gradients + AdamW moments held
  during a step, counted from the tensors (what the memory goal is about);
- ``activations``: bytes autograd saves for backward in one training forward
  (parameters excluded) — the part activation checkpointing reduces;
- ``peak``: on CPU the peak RSS of a fresh process during ``rss_steps`` steps
  minus its RSS once the model is built (allocator included), on CUDA
  ``max_memory_allocated`` over the same steps minus the allocation before them.

Infer: latency of the trained-state model without and with ``merge``, each timed
alternately with the untouched base model so every ratio has its own baseline.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .common import (MethodSpec, PreparedCache, Settings, activation_bytes, build_task, frozen_base_parameters,
                     input_size, optimizer_for, quiet_logging, random_batch, ratio, summary, sync, timed,
                     train_step, trainable_backbone, training_state_bytes, try_build)
from .family import build_peft_task, in_lora_family, peft_equivalent

FULL = MethodSpec("full")


# --- train -----------------------------------------------------------------------------------------
class Trainee:
    """A task with its optimiser, stepped by the timing loop."""

    def __init__(self, task: Any) -> None:
        self.task = task.train()
        self.opt = optimizer_for(task)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        train_step(self.task, batch, self.opt)

    def memory(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """One counted step (state bytes while gradients are held) and one counted forward (activations)."""
        task, opt = self.task, self.opt
        outputs = task.forward_outputs(batch["image"])
        loss = task.add_regularizers(task.loss(outputs["logits"], batch["label"]), outputs, batch)
        loss.backward()
        opt.step()
        state = training_state_bytes(task, opt)
        opt.zero_grad(set_to_none=True)
        del outputs, loss
        return {**state, "activation_bytes": activation_bytes(task, batch)}


def time_alternating(trainees: dict[str, Trainee], batch: dict[str, torch.Tensor],
                     settings: Settings) -> dict[str, list[float]]:
    """Warm-up each, then ``repeats`` rounds of one timed step per trainee, in turn."""
    device = settings.torch_device
    samples: dict[str, list[float]] = {k: [] for k in trainees}
    with quiet_logging():
        for _ in range(settings.warmup):
            for t in trainees.values():
                t.step(batch)
        for _ in range(settings.repeats):
            for key, t in trainees.items():
                samples[key].append(timed(lambda: t.step(batch), device))
    return samples


def measure_peak(spec: MethodSpec | dict[str, Any], settings: Settings, cache: PreparedCache | None,
                 out_dir: Path) -> dict[str, Any]:
    """Peak memory of ``rss_steps`` training steps on a freshly built model (see module docstring)."""
    if settings.device.startswith("cuda"):
        return _cuda_peak(spec, settings, cache)
    config = {"settings": settings.to_dict(), "threads": torch.get_num_threads()}
    if isinstance(spec, MethodSpec):
        config["spec"] = {"name": spec.name, "args": [list(a) for a in spec.args]}
        prepared = cache.save(spec) if cache is not None else None
        config["prepared"] = str(prepared) if prepared else None
    else:
        config["peft"] = spec
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out_dir, prefix=".memory-", suffix=".json")
    path = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(config, default=str))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    try:
        proc = subprocess.run([sys.executable, "-m", "vision_ft.bench.memory", str(path)],
                              capture_output=True, text=True, env=env, timeout=3600)
    finally:
        path.unlink(missing_ok=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory measurement of {config.get('spec') or 'peft'} failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


def _cuda_peak(spec: MethodSpec | dict[str, Any], settings: Settings, cache: PreparedCache | None) -> dict[str, Any]:
    from .memory import build_for_memory

    device = settings.torch_device
    gc.collect()
    torch.cuda.empty_cache()
    task = build_for_memory(spec, settings, cache)
    batch = random_batch(settings, input_size(settings))
    opt = optimizer_for(task)
    task.train()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with quiet_logging():
        for _ in range(settings.rss_steps):
            train_step(task, batch, opt)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del task, opt, batch
    gc.collect()
    torch.cuda.empty_cache()
    return {"peak_bytes": int(peak), "baseline_bytes": int(base), "how": "cuda max_memory_allocated"}


def run_train(specs: list[MethodSpec], settings: Settings, cache: PreparedCache, out_dir: Path,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    size = input_size(settings)
    batch = random_batch(settings, size, seed=settings.seed)
    full = Trainee(build_task(FULL, settings, cache))
    with quiet_logging():
        full.step(batch)  # AdamW state exists before counting
        full_memory = full.memory(batch)
    full_params = trainable_backbone(full.task)
    twins: dict[tuple, dict[str, Any]] = {}
    rows, full_samples, skipped, measured = [], [], [], []
    for spec in specs:
        task = try_build(spec, settings, cache, skipped, log)
        if task is None:
            continue
        measured.append(spec)
        trainees = {"full": full, "method": Trainee(task)}
        twin = peft_equivalent(task.method, task.backbone)
        key = None
        if twin is not None:
            key = (twin["r"], twin["alpha"], twin["dropout"], tuple(twin["modules"]))
            trainees["twin"] = Trainee(build_peft_task(settings, twin["r"], twin["alpha"], twin["modules"],
                                                       twin["dropout"]))
        log(f"  train {spec.label} (alternating with full fine-tuning"
            f"{' and peft LoRA r=%d on %d modules' % (twin['r'], len(twin['modules'])) if twin else ''}) ...")
        samples = time_alternating(trainees, batch, settings)
        with quiet_logging():
            memory = trainees["method"].memory(batch)
        row: dict[str, Any] = {
            "method": spec.label, "name": spec.name, "trainable_params": trainable_backbone(task),
            "frozen_base_params": frozen_base_parameters(task), "lora_family": in_lora_family(task.method),
            "time": summary(samples["method"]), "full_time": summary(samples["full"]), "memory": memory,
        }
        row["ratio_vs_full"] = ratio(row["time"]["median_s"], row["full_time"]["median_s"])
        full_samples += samples["full"]
        if twin is not None:
            twin_time = summary(samples["twin"])
            if key not in twins:
                with quiet_logging():
                    twin_memory = trainees["twin"].memory(batch)
                twins[key] = {"r": twin["r"], "alpha": twin["alpha"], "dropout": twin["dropout"],
                              "modules": twin["modules"],
                              "trainable_params": trainable_backbone(trainees["twin"].task),
                              "time": twin_time, "ratio_vs_full": ratio(twin_time["median_s"],
                                                                        row["full_time"]["median_s"]),
                              "memory": twin_memory}
            row["peft_twin"] = {"r": twin["r"], "dropout": twin["dropout"], "modules": len(twin["modules"]),
                                "note": twin["note"],
                                "time": twin_time, "trainable_params": twins[key]["trainable_params"]}
            row["ratio_vs_peft"] = ratio(row["time"]["median_s"], twin_time["median_s"])
        rows.append(row)
        del task, trainees
        gc.collect()
    for row in rows:
        mem = row["memory"]
        ideal = 12 * row["frozen_base_params"]  # gradient + two AdamW moments, fp32
        realised = full_memory["persistent_bytes"] - mem["persistent_bytes"]
        mem["ideal_saving_bytes"] = ideal
        mem["realised_saving_bytes"] = realised
        mem["saving_fraction"] = ratio(float(realised), float(ideal)) if ideal else None
        mem["persistent_ratio_vs_full"] = ratio(mem["persistent_bytes"], full_memory["persistent_bytes"])
        mem["activation_ratio_vs_full"] = ratio(mem["activation_bytes"], full_memory["activation_bytes"])
    reference = summary(full_samples) if full_samples else None
    if reference is not None:
        reference["drift"] = ratio(rows[-1]["full_time"]["median_s"], rows[0]["full_time"]["median_s"])
    result: dict[str, Any] = {"image_size": size, "rows": rows, "peft": list(twins.values()), "skipped": skipped,
                              "reference": {"method": "full", "trainable_params": full_params, "time": reference,
                                            "memory": full_memory}}
    del full
    gc.collect()
    if settings.rss or settings.device.startswith("cuda"):
        log("  peak memory: full (fresh process) ...")
        full_peak = measure_peak(FULL, settings, cache, out_dir)
        result["reference"]["peak"] = full_peak
        for row, spec in zip(rows, measured):
            log(f"  peak memory: {spec.label} (fresh process) ...")
            row["peak"] = measure_peak(spec, settings, cache, out_dir)
            row["peak"]["ratio_vs_full"] = ratio(row["peak"]["peak_bytes"], full_peak["peak_bytes"])
            ideal = row["memory"]["ideal_saving_bytes"]
            row["peak"]["saving_fraction"] = (ratio(float(full_peak["peak_bytes"] - row["peak"]["peak_bytes"]),
                                                    float(ideal)) if ideal else None)
    return result


# --- infer -----------------------------------------------------------------------------------------
def _alternate(a: Callable[[], Any], b: Callable[[], Any], settings: Settings) -> tuple[list[float], list[float]]:
    device = settings.torch_device
    for _ in range(settings.warmup):
        a()
        b()
    sa, sb = [], []
    for _ in range(settings.repeats):
        sa.append(timed(a, device))
        sb.append(timed(b, device))
    return sa, sb


@torch.no_grad()
def run_infer(specs: list[MethodSpec], settings: Settings, cache: PreparedCache,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Latency of unmerged and merged models vs the untouched base, timed alternately."""
    images = random_batch(settings, input_size(settings), seed=settings.seed)["image"]
    base = build_task(MethodSpec("linear"), settings, cache).eval()
    base_fn = lambda: base(images)  # noqa: E731
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for spec in specs:
        task = try_build(spec, settings, cache, skipped, log)
        if task is None:
            continue
        log(f"  infer {spec.label} ...")
        task.method.on_train_end(task)  # the trained state a run exports (MoSA folds its experts)
        task.eval()
        fn = lambda: task(images)  # noqa: E731
        b1, unmerged = _alternate(base_fn, fn, settings)
        row: dict[str, Any] = {"method": spec.label, "name": spec.name, "mergeable": type(task.method).mergeable,
                               "base": summary(b1), "unmerged": summary(unmerged)}
        row["unmerged_ratio"] = ratio(row["unmerged"]["median_s"], row["base"]["median_s"])
        if type(task.method).mergeable:
            task.method.merge(task.backbone)
            b2, merged = _alternate(base_fn, fn, settings)
            row["base_merged"] = summary(b2)
            row["merged"] = summary(merged)
            row["merged_ratio"] = ratio(row["merged"]["median_s"], row["base_merged"]["median_s"])
            hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in task.backbone.model.modules())
            row["merged_plain_model"] = (type(task.backbone.model).__name__ == "VisionTransformer" and hooks == 0
                                         and sum(p.numel() for p in task.backbone.model.parameters())
                                         == sum(p.numel() for p in base.backbone.model.parameters()))
        else:
            row["merged"] = None
            row["merged_ratio"] = None
            row["why_unmerged"] = f"{spec.name} is not mergeable (nonlinear module kept at inference)"
        rows.append(row)
        del task
        gc.collect()
    return {"image_size": input_size(settings), "rows": rows, "skipped": skipped}
