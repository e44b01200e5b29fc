"""Faults a shared cluster throws at a run: SIGKILL mid-epoch, NaN losses, multi-process training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from vision_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
MEDICAL = str(ROOT / "domains" / "medical.yaml")
TINY = str(ROOT / "configs" / "backbones" / "vit_test_tiny.yaml")
EVERY_3_STEPS = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                 '"init_args": {"every_n_train_steps": 3, "save_last": true, "save_top_k": -1}}]')


class KillAtStep(Callback):
    """SIGKILLs its own process after optimiser step ``step``: no clean-up, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpRankWeights(Callback):
    """Writes each rank's trainable tensors at the end of training (to compare ranks)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: p.detach().contiguous() for k, p in pl_module.named_parameters() if p.requires_grad}
        Path(self.out).mkdir(parents=True, exist_ok=True)
        save_file(state, str(Path(self.out) / f"rank{trainer.global_rank}.safetensors"))


def _args(tmp: Path, *extra: str) -> list[str]:
    return ["fit", "--config", MEDICAL, "--config", TINY,
            f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", f"--data.init_args.sample_dir={tmp / 'sample'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]


def _subprocess(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    # a fresh launch: no rendezvous variables inherited from an in-process DDP run of another test
    dist_vars = {"MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                 "GROUP_RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "vision_ft", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _runs(tmp: Path) -> list[Path]:
    return sorted((tmp / "runs" / "medical").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


@pytest.mark.subprocess
@pytest.mark.timeout(600)
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    common = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=2",
              "--test_after_fit=false", "--trainer.deterministic=true", "--data.init_args.batch_size=16",
              "--model.init_args.ema_decay=0.8", EVERY_3_STEPS)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(a, *common)) == 0
    # step 7 is the 2nd batch of epoch 2 (5 steps per epoch); the newest checkpoint is step 6, mid-epoch
    kill = '--trainer.callbacks+={"class_path": "test_reliability.KillAtStep", "init_args": {"step": 7}}'
    proc = _subprocess(_args(b, *common, kill))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = _runs(b)[-1]
    assert not (killed / "adapter.json").exists()
    last = killed / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # killed mid-epoch, newest checkpoint is mid-epoch too
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 1
    assert ckpt["vision_ft"]["ema"], "EMA state missing from the checkpoint"
    assert main(_args(b, *common, f"--ckpt_path={last}")) == 0
    wa = load_file(_runs(a)[-1] / "adapter.safetensors")
    wb = load_file(_runs(b)[-1] / "adapter.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    ma = json.loads((_runs(a)[-1] / "adapter.json").read_text())["metrics"]
    mb = json.loads((_runs(b)[-1] / "adapter.json").read_text())["metrics"]
    assert ma == pytest.approx(mb, abs=1e-6)


def test_sampler_splits_one_permutation_across_ranks_and_skips_on_resume():
    from vision_ft.data import EpochShuffleSampler

    data = list(range(10))
    single = EpochShuffleSampler(data, seed=3)
    single.set_epoch(2)
    order = list(single)
    ranks = [EpochShuffleSampler(data, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    r0, r1 = list(ranks[0]), list(ranks[1])
    assert r0 == order[0::2] and r1 == order[1::2]
    # batch t of 2 ranks x 2 == batch t of 1 process x 4
    assert sorted(r0[:2] + r1[:2]) == sorted(order[:4])
    # resume after 3 samples of epoch 2; another epoch is untouched
    single.resume_at(2, 3)
    single.set_epoch(2)
    assert list(single) == order[3:]
    single.resume_at(2, 3)
    single.set_epoch(3)
    assert len(list(single)) == 10
    # odd length: ranks are padded to equal length by wrap-around (like DistributedSampler)
    odd = [EpochShuffleSampler(list(range(7)), seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert [len(list(s)) for s in odd] == [4, 4]


def _fit_tiny(tmp: Path, *extra: str) -> int:
    return main(_args(tmp, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                      "--trainer.limit_val_batches=1", "--test_after_fit=false", *extra))


class PoisonStep(Callback):
    """Makes the training loss of one step NaN by poisoning that batch's images."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["image"][:] = float("nan")


def test_nonfinite_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path, capsys):
    poison = '--trainer.callbacks+={"class_path": "test_reliability.PoisonStep", "init_args": {"step": 4}}'
    code = main(_args(tmp_path, "--trainer.max_epochs=3", "--trainer.limit_train_batches=3",
                      "--trainer.limit_val_batches=1", "--test_after_fit=false", poison))
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "at step 4" in err and "epoch 1" in err
    assert "last.ckpt" in err and "on_nonfinite=skip" in err and "Traceback" not in err


def test_nonfinite_loss_skip_leaves_weights_untouched_and_counts(tmp_path):
    poison = '--trainer.callbacks+={"class_path": "test_reliability.PoisonStep", "init_args": {"step": 1}}'
    assert _fit_tiny(tmp_path, "--model.init_args.on_nonfinite=skip", poison) == 0
    run = _runs(tmp_path)[-1]
    weights = load_file(run / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["vision_ft"]["skipped_batches"] == 1
    assert ckpt["global_step"] == 3  # Lightning still counts the skipped step (no gradients, so no update)


def test_ema_averages_the_trainable_tensors_and_evaluates_with_them():
    from conftest import make_task

    task = make_task("ssf", ema_decay=0.5)
    task.on_train_batch_start(None, 0)
    params = task._ema_targets()
    name = next(iter(params))
    before = params[name].detach().clone()
    with torch.no_grad():
        params[name].add_(1.0)
    task._update_ema()
    assert torch.allclose(task._ema[name], before + 0.5)  # 0.5 * old + 0.5 * new
    live = params[name].detach().clone()
    task._swap_ema()
    assert torch.allclose(params[name], before + 0.5)
    task._swap_ema()
    assert torch.equal(params[name], live)


def test_ema_decay_out_of_range_names_the_key():
    from conftest import make_task
    from vision_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="model.init_args.ema_decay"):
        make_task("ssf", ema_decay=1.0)


def test_per_class_recall_is_logged_at_test(tmp_path):
    assert main(_args(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                      "--trainer.limit_val_batches=1")) == 0
    metrics = json.loads((_runs(tmp_path)[-1] / "adapter.json").read_text())["metrics"]
    recalls = {k: v for k, v in metrics.items() if k.startswith("test/recall_")}
    assert set(recalls) == {f"test/recall_{n}" for n in ("normal", "lesion", "fibrosis", "calcification")}
    assert all(0.0 <= v <= 1.0 for v in recalls.values())


@pytest.mark.ddp
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["ssf", "lora"])
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(method, tmp_path):
    """2 ranks x batch 8 (gloo) == 1 process x batch 16: same samples per step, averaged gradients."""
    common = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
              "--trainer.limit_test_batches=2", "--trainer.deterministic=true", "--trainer.accelerator=cpu",
              f"--model.init_args.method={method}")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_args(single, *common, "--data.init_args.batch_size=16")) == 0
    dump = ('--trainer.callbacks+={"class_path": "test_reliability.DumpRankWeights", '
            f'"init_args": {{"out": "{ddp / "ranks"}"}}}}')
    proc = _subprocess(_args(ddp, *common, "--data.init_args.batch_size=8", "--trainer.strategy=ddp",
                             "--trainer.devices=2", dump))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one run directory, one adapter, written by rank 0
    runs = _runs(ddp)
    assert len(runs) == 1 and (runs[0] / "adapter.safetensors").is_file()
    meta = json.loads((runs[0] / "adapter.json").read_text())
    assert meta["world_size"] == 2 and meta["weights_identical_on_all_ranks"] is True
    # the replicas are bit-identical
    r0, r1 = (load_file(ddp / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    # and equal to the single-process run up to float reduction order (gradients agree to ~1e-7; AdamW's
    # normalised update can turn that into ~1e-5 on tensors whose gradients are near zero; lr is 5e-3)
    w1 = load_file(_runs(single)[-1] / "adapter.safetensors")
    w2 = load_file(runs[0] / "adapter.safetensors")
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    m1 = json.loads((_runs(single)[-1] / "adapter.json").read_text())["metrics"]
    assert set(m1) == set(meta["metrics"])
    assert meta["metrics"] == pytest.approx(m1, abs=1e-4)


@pytest.mark.ddp
@pytest.mark.timeout(600)
def test_data_dependent_setup_is_the_same_on_both_ranks(tmp_path):
    """SPT scores sensitivity on training data and allocates its budget from it: one allocation for all ranks."""
    args = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2",
            "--config", str(ROOT / "configs" / "methods" / "spt_lora.yaml"),
            "--model.init_args.method.init_args.budget=800", "--model.init_args.method.init_args.n_images=32",
            "--model.init_args.method.init_args.batch_size=8", "--data.init_args.batch_size=8",
            '--trainer.callbacks+={"class_path": "test_reliability.DumpRankWeights", '
            f'"init_args": {{"out": "{tmp_path / "ranks"}"}}}}')
    proc = _subprocess(_args(tmp_path, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    spt = [k for k in r0 if "spt" in k]
    assert spt and r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)


@pytest.mark.ddp
@pytest.mark.timeout(600)
@pytest.mark.slow
def test_dr_tune_queue_prefill_is_synced_from_rank_0(tmp_path):
    """DR-Tune fills its feature queue from each rank's own shard: rank 0's queue is sent to all."""
    args = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2",
            "--model.init_args.method=dr_tune", "--data.init_args.batch_size=8",
            '--trainer.callbacks+={"class_path": "test_reliability.DumpRankWeights", '
            f'"init_args": {{"out": "{tmp_path / "ranks"}"}}}}')
    proc = _subprocess(_args(tmp_path, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0's was sent to all ranks" in proc.stdout + proc.stderr
    run = _runs(tmp_path)[-1]
    assert json.loads((run / "adapter.json").read_text())["weights_identical_on_all_ranks"] is True


class CrashAtStep(Callback):
    """Raises mid-epoch after optimiser step ``step``, as a crashing node would (in-process stand-in)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


METHOD_ARGS = {
    "mosa": ("--model.init_args.method=mosa",),
    "dr_tune": ("--model.init_args.method=dr_tune",),
    "spt_lora": ("--config", str(ROOT / "configs" / "methods" / "spt_lora.yaml"),
                 "--model.init_args.method.init_args.budget=800", "--model.init_args.method.init_args.n_images=32",
                 "--model.init_args.method.init_args.batch_size=8"),
}


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_method_state_survives_a_mid_epoch_crash(method, tmp_path):
    """MoSA's expert masks, DR-Tune's queues and SPT's allocation come back exactly from a mid-epoch checkpoint."""
    common = (*METHOD_ARGS[method], "--trainer.max_epochs=2", "--trainer.limit_train_batches=4",
              "--trainer.limit_val_batches=1", "--test_after_fit=false", "--trainer.deterministic=true",
              "--data.init_args.batch_size=8", "--trainer.max_epochs=2", EVERY_3_STEPS)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(a, *common)) == 0
    crash = '--trainer.callbacks+={"class_path": "test_reliability.CrashAtStep", "init_args": {"step": 5}}'
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(b, *common, crash))
    last = _runs(b)[-1] / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 3
    assert main(_args(b, *common, f"--ckpt_path={last}")) == 0
    wa = load_file(_runs(a)[-1] / "adapter.safetensors")
    wb = load_file(_runs(b)[-1] / "adapter.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst <= 1e-6, f"{method}: resumed run differs by {worst}"
