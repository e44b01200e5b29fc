"""Peak memory of a few training steps, measured in a fresh process.

``python -m vision_ft.bench.memory CONFIG.json`` builds one model (a registered method
or the peft LoRA twin), records its RSS, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``, Linux >= 4.0, trusted only after a probe allocation
is seen to lift it; otherwise a sampling thread watches the RSS) and runs the
steps. It prints one JSON line: the peak RSS over the steps minus the RSS
before them. A fresh process keeps other models' freed memory, which
the allocator would reuse, out of the number.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _clear_peak_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the mark really moved down


_PROBE_BYTES = 32 * 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark and prove that it tracks growth from there.

    A ``/proc`` that accepts the write to ``clear_refs`` but never raises ``VmHWM`` again
    would report a peak of zero. A 32 MiB probe, written page by page and freed, must
    lift the mark before it is trusted; the mark is then reset once more so the probe is
    not part of the measurement. (In a long-lived process whose freed memory is still
    resident, nothing lifts the mark or the RSS: measure in a fresh process.)"""
    if not _clear_peak_mark():
        return False
    before = _status_kib("VmHWM") or 0
    probe = torch.ones(_PROBE_BYTES // 4)  # written, so its pages are resident
    del probe  # a true high-water mark keeps the probe after it is freed; a current-RSS copy does not
    raised = (_status_kib("VmHWM") or 0) - before
    return raised * 1024 >= 0.9 * _PROBE_BYTES and _clear_peak_mark()


class _Sampler:
    """Fallback: poll the RSS every millisecond on a thread and keep the maximum."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def peak_during(run: Callable[[], Any]) -> tuple[int, str]:
    """Peak RSS while ``run()`` executes minus the RSS just before it, in this process, and how it was measured
    (the kernel's mark when a probe shows it tracks, else a 1 ms RSS sampler)."""
    base = _rss_bytes()
    if _reset_peak():
        run()
        return int((_status_kib("VmHWM") or 0) * 1024 - base), "VmHWM after clear_refs"
    with _Sampler() as sampler:
        run()
    return int(sampler.peak - base), "RSS sampled every 1 ms"


def steps_peak(step: Callable[[], Any], steps: int) -> dict[str, int]:
    """``{"peak_bytes"}`` of ``steps`` calls of ``step`` (the family benchmarks' fresh-process children)."""
    def run() -> None:
        for _ in range(steps):
            step()

    return {"peak_bytes": peak_during(run)[0]}


def build_for_memory(spec: Any, settings: Any, cache: Any) -> Any:
    """The model to measure: a :class:`MethodSpec` through the registry, or a peft twin dict."""
    from .common import MethodSpec, build_task
    from .family import build_peft_task

    if isinstance(spec, MethodSpec):
        return build_task(spec, settings, cache)
    return build_peft_task(settings, spec["r"], spec["alpha"], spec["modules"], spec.get("dropout", 0.0))


def measure(config: dict[str, Any]) -> dict[str, Any]:
    from .common import (MethodSpec, PreparedCache, Settings, input_size, optimizer_for, quiet_logging,
                         random_batch, train_step)

    settings = Settings(**config["settings"])
    torch.set_num_threads(int(config.get("threads") or settings.threads))
    if "spec" in config:
        spec: Any = MethodSpec(config["spec"]["name"], tuple(tuple(a) for a in config["spec"]["args"]))
        cache = PreparedCache()
        if config.get("prepared"):
            from safetensors.torch import load_file

            cache.put(spec, load_file(config["prepared"]))
    else:
        spec, cache = config["peft"], None
    task = build_for_memory(spec, settings, cache)
    batch = random_batch(settings, input_size(settings), seed=settings.seed)
    opt = optimizer_for(task)
    task.train()
    base = _rss_bytes()

    def run() -> None:
        with quiet_logging():
            for _ in range(settings.rss_steps):
                train_step(task, batch, opt)

    peak, how = peak_during(run)
    return {"peak_bytes": peak, "baseline_bytes": int(base), "how": f"peak RSS ({how}) - RSS after build"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(measure(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
