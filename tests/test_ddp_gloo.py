"""Real 2-process CPU (gloo) runs: MoSA's adapters are identical on both ranks, and detection's COCOeval on
the union of the ranks' detections equals a 1-process run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from test_reliability import _args, _runs, _subprocess

ROOT = Path(__file__).resolve().parents[1]
DETECTION = str(ROOT / "domains" / "medical_detection.yaml")


class DumpTestMetrics(Callback):
    """Rank 0 writes the logged test metrics (what COCOeval computed) to a JSON file."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            Path(self.out).write_text(json.dumps({"metrics": metrics, "world_size": trainer.world_size}))


@pytest.mark.slow  # about 45 s on 2 shared cores
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_mosa_trains_identical_adapters_on_two_gloo_ranks(tmp_path):
    args = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=ddp_find_unused_parameters_true", "--model.init_args.method=mosa",
            "--data.init_args.batch_size=8",
            '--trainer.callbacks+={"class_path": "test_reliability.DumpRankWeights", '
            f'"init_args": {{"out": "{tmp_path / "ranks"}"}}}}')
    proc = _subprocess(_args(tmp_path, *args), timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    mosa = [k for k in r0 if "mosa_" in k]
    assert mosa and r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:3]
    # the experts trained: not all of MoSA's tensors are still at their initialisation
    assert any(r0[k].abs().sum() > 0 for k in mosa)
    meta = json.loads((_runs(tmp_path)[0] / "adapter.json").read_text())
    assert meta["world_size"] == 2 and meta["weights_identical_on_all_ranks"] is True


def _detection(tmp: Path, subcommand: str, *extra: str) -> list[str]:
    return [subcommand, "--config", DETECTION, f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
            f"--data.init_args.sample_dir={tmp.parent / 'sample'}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", *extra]


@pytest.mark.slow  # about 35 s on 2 shared cores
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_detection_cocoeval_over_two_gloo_ranks_equals_one_process(tmp_path):
    """Both evaluate one checkpoint on the whole test split; under DDP each rank sees a shard (padded by the
    sampler) and the evaluator gathers the union: the COCO metrics and detections must be the single run's."""
    train = tmp_path / "train"
    proc = _subprocess(_detection(train, "fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                  "--trainer.limit_val_batches=1", "--test_after_fit=false"), timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next((train / "runs").rglob("last.ckpt"))
    results = {}
    for name, extra in (("one", ["--trainer.devices=1"]), ("two", ["--trainer.devices=2", "--trainer.strategy=ddp"])):
        out = tmp_path / name
        dump = ('--trainer.callbacks+={"class_path": "test_ddp_gloo.DumpTestMetrics", '
                f'"init_args": {{"out": "{tmp_path / f"{name}.json"}"}}}}')
        proc = _subprocess(_detection(out, "test", f"--ckpt_path={ckpt}", *extra, dump), timeout=500)
        assert proc.returncode == 0, proc.stderr[-3000:]
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        detections = json.loads(next((out / "runs").rglob("predictions_test.json")).read_text())
        results[name] = (doc, detections)
    (one, det_one), (two, det_two) = results["one"], results["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["metrics"] and set(one["metrics"]) == set(two["metrics"])
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)

    def key(d):
        return (d["image_id"], d["category_id"], round(d["score"], 4), tuple(round(v, 2) for v in d["bbox"]))

    assert det_one and sorted(map(key, det_one)) == sorted(map(key, det_two))
    assert len({d["image_id"] for d in det_two}) == len({d["image_id"] for d in det_one})  # no padded duplicates


@pytest.mark.slow  # about a minute on 2 shared cores
@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_vlm_ranks_with_different_image_and_text_mixes_finish_with_identical_adapters(tmp_path):
    """Batch size 1 over a mix of image and text-only conversations: the two ranks draw different kinds at
    some step, with the projector trained in full and LoRA in both towers (vision-side tensors unused by a
    text-only batch)."""
    from test_reliability import _subprocess as run

    from test_vlm import _write_data

    data = tmp_path / "data"
    data.mkdir()
    train = _write_data(data, n=6)
    lines = train.read_text().splitlines()
    text = json.loads(lines[-1])
    train.write_text("\n".join(lines + [json.dumps(text)] * 4) + "\n")  # 6 with an image, 5 text-only
    args = ["fit", "--config", str(ROOT / "domains" / "medical_vlm.yaml"),
            "--data.class_path=vision_ft.data.ConversationData", f"--data.init_args.train={train}",
            "--data.init_args.batch_size=1", "--data.init_args.val_fraction=0.1",
            "--model.init_args.train_full=[projector]",
            "--model.init_args.method.init_args.towers=[vision, language]",
            "--model.init_args.method.init_args.targets=[proj, fc1, fc2]",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.devices=2",
            "--trainer.strategy=ddp", "--trainer.max_steps=4", "--trainer.limit_val_batches=1",
            "--test_after_fit=false",
            '--trainer.callbacks+={"class_path": "test_reliability.DumpRankWeights", '
            f'"init_args": {{"out": "{tmp_path / "ranks"}"}}}}']
    proc = run(args, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and any("merger" in k for k in r0) and any("visual" in k and "lora" in k for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:3]
