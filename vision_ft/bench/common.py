"""What every benchmark section shares: settings, method specs, model building, the step.

Models are built the way a run builds them: ``TimmViT(name, pretrained=False)``
(random weights: no download), the method from the registry, an
:class:`~vision_ft.tasks.ImageClassificationTask` around both, the task's own
optimiser groups (AdamW) and, for every method, ``method.prepare(task, data)`` on a
small random datamodule (as ``BaseTask.setup`` does before training).
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import platform
import re
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torch import nn

from ..backbones import TimmViT
from ..errors import ConfigError, VisionFTError
from ..methods import Method, get_method_class, registered

#: bench-only defaults that change a method's set-up cost, never its training step.
#: DR-Tune fills its K=2048 queue in ``prepare`` with K frozen forwards of training
#: images (minutes at ViT-B size on a CPU); the bench fills it with random unit
#: features instead (see :func:`steady_state`), so the timed steps see a full queue.
BENCH_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"dr_tune": {"prefill": False}}


# --- method specs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """A registered method plus init overrides: ``mosa`` or ``mosa:consistency=true:bottleneck=16``."""

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}[{','.join(f'{k}={_fmt_arg(v)}' for k, v in self.args)}]"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def build(self, defaults: dict[str, dict[str, Any]] | None = None) -> Method:
        """The method instance; ``defaults`` (per name) apply unless the spec sets the key."""
        cls = get_method_class(self.name)
        kwargs = {**(defaults or {}).get(self.name, {}), **self.kwargs}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bench --methods {self.label}: {e}") from None

    def file_stem(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)


def _fmt_arg(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_methods(tokens: list[str] | None, method_args: dict[str, dict[str, Any]] | None = None) -> list[MethodSpec]:
    """``--methods`` tokens (comma or space separated; ``all`` = every registered method).

    A token ``name:key=value:key=value`` adds a variant with init overrides (values
    parsed as YAML scalars). ``method_args`` (``--method-args`` JSON) adds overrides to
    every spec of that name.
    """
    names = registered()
    raw = [t for tok in (tokens or ["all"]) for t in tok.split(",") if t.strip()]
    specs: list[MethodSpec] = []
    for tok in raw:
        tok = tok.strip()
        if tok == "all":
            specs += [MethodSpec(n) for n in names]
            continue
        name, *pairs = tok.split(":")
        try:
            name = get_method_class(name).name  # "did you mean" on typos
        except ConfigError as e:
            raise ConfigError(str(e).replace("(model.init_args.method)", "(bench --methods)")) from None
        args = {}
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"bench --methods {tok!r}: expected name:key=value[:key=value], got {pair!r}")
            key, value = pair.split("=", 1)
            args[key] = yaml.safe_load(value)
        specs.append(MethodSpec(name, tuple(sorted(args.items()))))
    out: list[MethodSpec] = []
    for spec in specs:
        extra = (method_args or {}).get(spec.name, {})
        if extra:
            spec = MethodSpec(spec.name, tuple(sorted({**extra, **spec.kwargs}.items())))
        if spec not in out:
            out.append(spec)
    return out


# --- settings -------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What one benchmark run measures on (stated in every report)."""

    backbone: str = "vit_base_patch16_224"
    image_size: int | None = None  # None: the architecture's own size
    batch_size: int = 8
    num_classes: int = 100
    warmup: int = 2
    repeats: int = 5
    threads: int = 1
    device: str = "cpu"
    grad_checkpointing: bool = False
    rss: bool = True
    rss_steps: int = 2
    seed: int = 0
    lr: float = 1e-3
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(BENCH_METHOD_DEFAULTS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("bench --device cuda: no CUDA device is available here (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"bench --device {device!r}: use cpu or cuda[:N]")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- data ---------------------------------------------------------------------------------------
class RandomData:
    """A datamodule stand-in with random images, for ``method.prepare`` (SPT scoring, DR-Tune)."""

    def __init__(self, num_classes: int, n: int, size: int, batch_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.items = [{"image": torch.rand(3, size, size, generator=g),
                       "label": torch.tensor(i % num_classes)} for i in range(n)]
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.items, batch_size=self.batch_size, shuffle=False)


def random_batch(settings: Settings, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(settings.batch_size, 3, size, size, generator=g)
    labels = torch.randint(0, settings.num_classes, (settings.batch_size,), generator=g)
    return {"image": images.to(settings.torch_device), "label": labels.to(settings.torch_device)}


# --- building -----------------------------------------------------------------------------------
def make_backbone(settings: Settings) -> TimmViT:
    return TimmViT(settings.backbone, pretrained=False, img_size=settings.image_size,
                   grad_checkpointing=settings.grad_checkpointing, init_seed=settings.seed)


def input_size(settings: Settings) -> int:
    """The image side the models take (``image_size`` or the architecture's own)."""
    return settings.image_size or _native_size(settings.backbone)


@functools.lru_cache(maxsize=None)
def _native_size(name: str) -> int:
    return int(TimmViT(name, pretrained=False).input_size[-1])


class PreparedCache:
    """The result of ``prepare`` for data-dependent methods, so it runs once per bench run.

    The state is the method's own ``adapter_state_dict`` and is restored through its
    ``load_adapter`` — the path a run takes when it resumes (no re-scoring).
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.directory = directory

    def get(self, spec: MethodSpec) -> dict[str, torch.Tensor] | None:
        if spec.label in self.states:
            return self.states[spec.label]
        path = self.path(spec)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            self.states[spec.label] = load_file(path)
            return self.states[spec.label]
        return None

    def put(self, spec: MethodSpec, state: dict[str, torch.Tensor]) -> None:
        self.states[spec.label] = {k: v.detach().cpu().clone() for k, v in state.items()}

    def path(self, spec: MethodSpec) -> Path | None:
        return None if self.directory is None else self.directory / f"{spec.file_stem()}.safetensors"

    def save(self, spec: MethodSpec) -> Path | None:
        """Write the cached state for a child process; None when there is nothing to hand over."""
        path = self.path(spec)
        state = self.states.get(spec.label)
        if path is None or state is None:
            return None
        from ..export import atomic_save_safetensors

        atomic_save_safetensors(state, path)
        return path


def build_task(spec: MethodSpec, settings: Settings, cache: PreparedCache | None = None,
               prepare: bool = True) -> Any:
    """Backbone + method + classification head on ``settings.device``, prepared as for training."""
    from ..tasks import ImageClassificationTask

    method = spec.build(settings.method_defaults)
    task = ImageClassificationTask(make_backbone(settings), method=method, num_classes=settings.num_classes,
                                   lr=settings.lr)
    task.to(settings.torch_device)
    if prepare:
        prepare_task(task, spec, settings, cache)
    return task


def try_build(spec: MethodSpec, settings: Settings, cache: PreparedCache | None, skipped: list[dict[str, str]],
              log: Callable[[str], None]) -> Any | None:
    """:func:`build_task`, or None after recording why the method does not apply to this backbone.

    Only user-level errors (:class:`~vision_ft.errors.VisionFTError`, e.g. CoOp on a ViT
    without a text tower) are a skip; anything else is a bug and propagates.
    """
    try:
        return build_task(spec, settings, cache)
    except VisionFTError as e:
        record_skip(spec, e, skipped, log)
        return None


def record_skip(spec: MethodSpec, error: Exception, skipped: list[dict[str, str]],
                log: Callable[[str], None]) -> None:
    if not any(s["method"] == spec.label for s in skipped):
        skipped.append({"method": spec.label, "name": spec.name, "reason": str(error)})
        log(f"  skipped {spec.label}: does not apply here: {error}")


def prepare_task(task: Any, spec: MethodSpec, settings: Settings, cache: PreparedCache | None) -> None:
    method = task.method
    state = cache.get(spec) if (cache is not None and method.requires_data) else None
    if state is not None:
        method.load_adapter(task.backbone, {k: v.to(settings.torch_device) for k, v in state.items()})
        method.prepared = True
    else:
        data = RandomData(settings.num_classes, n=max(2 * settings.batch_size, 8), size=input_size(settings),
                          batch_size=settings.batch_size, seed=settings.seed + 1)
        method.prepare(task, data)
        if cache is not None and method.requires_data:
            cache.put(spec, method.adapter_state_dict(task.backbone))
    steady_state(task)


def steady_state(task: Any) -> str | None:
    """Bring a method's training-time state to where it is after many steps (timing only).

    DR-Tune: fill the feature queue to K rows (random unit features, random labels)
    through its own ``enqueue`` when ``prepare`` did not (``prefill=False``).
    """
    from ..methods import DRTune
    from ..methods.dr_tune import QUEUE_FILLED

    method = task.method
    if isinstance(method, DRTune):
        model = task.backbone.model
        missing = method.queue_size - int(model.get_buffer(QUEUE_FILLED))
        if missing > 0:
            g = torch.Generator().manual_seed(0)
            d = task.backbone.embed_dim
            feats = nn.functional.normalize(torch.randn(missing, d, generator=g), dim=1)
            labels = torch.randint(0, task.num_classes, (missing,), generator=g)
            dev = next(model.parameters()).device
            method.enqueue(task.backbone, feats.to(dev), feats.to(dev), labels.to(dev))
            return f"queue filled with {missing} random unit features"
    return None


def optimizer_for(task: Any) -> torch.optim.Optimizer:
    """AdamW over the task's own parameter groups (what ``configure_optimizers`` builds)."""
    return torch.optim.AdamW(task.param_groups(), lr=task.lr)


@contextmanager
def quiet_logging() -> Iterator[None]:
    """A task outside a Trainer warns on every ``self.log``; the bench calls the real loss path."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        yield


def train_step(task: Any, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
    """One training step as ``ImageClassificationTask.training_step`` + Lightning do it.

    Forward with the task's outputs, its loss, the method's loss adjustment and
    regularisers (``add_regularizers``: PEGO, MoSA's consistency, DR-Tune's queue
    term), backward, AdamW step, gradients cleared.
    """
    outputs = task.forward_outputs(batch["image"])
    loss = task.add_regularizers(task.loss(outputs["logits"], batch["label"]), outputs, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# --- timing ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(samples: list[float]) -> dict[str, Any]:
    """Median and spread of timing samples (seconds)."""
    med = statistics.median(samples)
    return {"median_s": med, "min_s": min(samples), "max_s": max(samples),
            "spread": (max(samples) - min(samples)) / med if med > 0 else 0.0, "samples_s": list(samples)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


# --- counting -------------------------------------------------------------------------------------
def trainable_backbone(task: Any) -> int:
    return task.method.trainable_parameters(task.backbone)


def head_parameters(task: Any) -> int:
    return sum(p.numel() for m in task.head_modules().values() for p in m.parameters() if p.requires_grad)


def frozen_base_parameters(task: Any) -> int:
    """Frozen parameters that belong to the base model (not the method's own tensors).

    Every tensor a method adds carries its prefix, so its frozen state (DR-Tune's
    frozen copy ``drtune_frozen``) is not counted: the saving a method can make is
    on the base weights it does not train.
    """
    from ..methods.base import has_prefix

    prefix = task.method.prefix
    return sum(p.numel() for n, p in task.backbone.model.named_parameters()
               if not p.requires_grad and not (prefix and has_prefix(n, prefix)))


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def training_state_bytes(task: Any, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Exact persistent bytes after a step: model tensors, gradients, optimiser state."""
    params = tensor_bytes(p for p in task.parameters())
    buffers = tensor_bytes(b for b in task.buffers())
    grads = tensor_bytes(p.grad for p in task.parameters() if p.grad is not None)
    optim = tensor_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
    return {"model_bytes": params + buffers, "grad_bytes": grads, "optimizer_bytes": optim,
            "train_state_bytes": grads + optim, "persistent_bytes": params + buffers + grads + optim}


@contextmanager
def count_saved_activations(exclude: set[int] | None = None) -> Iterator[dict[str, int]]:
    """Bytes autograd saves for backward inside the block; storages in ``exclude`` (parameters) skipped.

    The forward inside cannot be back-propagated (nothing is kept for it).

    Storages are counted once. Tensors saved inside an activation-checkpointed region
    are held by the checkpoint, not by autograd, and are therefore not counted (that is
    the saving checkpointing makes; its recomputation re-creates them one block at a time).
    """
    out = {"bytes": 0, "tensors": 0}
    seen: set[int] = set(exclude or ())

    def pack(t: torch.Tensor) -> None:
        # Count, then keep nothing: returning ``t`` would make the graph hold its own outputs through
        # C++ (a cycle Python's collector cannot see), leaking every counted forward's activations.
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return None
        if ptr != 0 and ptr not in seen:
            seen.add(ptr)
            out["bytes"] += storage.nbytes()
            out["tensors"] += 1
        return None

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("a forward run under count_saved_activations is for counting only: no backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield out


def activation_bytes(task: Any, batch: dict[str, torch.Tensor]) -> int:
    """Saved-for-backward bytes of one training forward (loss and regularisers included)."""
    persistent = {t.untyped_storage().data_ptr() for t in (*task.parameters(), *task.buffers())}
    with count_saved_activations(persistent) as counter:
        outputs = task.forward_outputs(batch["image"])
        loss = task.add_regularizers(task.loss(outputs["logits"], batch["label"]), outputs, batch)
    del outputs, loss
    return int(counter["bytes"])


# --- machine --------------------------------------------------------------------------------------
def machine_info(settings: Settings | None = None) -> dict[str, Any]:
    import peft
    import timm

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "load_average": _loadavg(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil ships with the dev extras
        pass
    if settings is not None and settings.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(settings.torch_device)
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None
