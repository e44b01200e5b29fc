"""``python -m vision_ft``: LightningCLI (fit / validate / test / predict) plus kit commands.

    python -m vision_ft fit --config domains/medical.yaml [--model.init_args.method=lora ...]
    python -m vision_ft methods --backbone vit_base_patch16_224 [--json]
    python -m vision_ft predict RUN_DIR --images DIR_OR_CSV          # -> RUN_DIR/predictions.csv
    python -m vision_ft export RUN_DIR --merge --out OUT_DIR
    python -m vision_ft export RUN_DIR --interpolate 0 0.5 1 --out OUT_DIR   # WiSE-FT
    python -m vision_ft new-domain NAME --from medical
    python -m vision_ft bench {params,train,infer,all,transfer} [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from .errors import VisionFTError, first_line

log = logging.getLogger("vision_ft")


class VisionFTCLI(LightningCLI):
    """LightningCLI whose ``fit`` also tests the trained weights and exports the run."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the final weights and add test metrics to adapter.json")
        for key in ("num_classes", "class_names", "multilabel"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Reserve the run's ``version_<N>`` folder (create-exclusive) before anything is written, so
        runs started together with one config never share a folder (:mod:`vision_ft.run_dir`)."""
        from .run_dir import reserve_logger_dirs

        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        reserve_logger_dirs(config.get("trainer"))

    def before_fit(self) -> None:
        # Lightning resolves fit(ckpt_path=...) only after LightningModule.setup(); setting it on
        # the trainer first lets setup() see the run is resuming, so data-dependent method set-up
        # (SPT's sensitivity scoring) is restored from the checkpoint instead of recomputed.
        cfg = self.config_init[self.subcommand]
        path = cfg.get("ckpt_path")
        if path and str(path) not in ("last", "best", "hpc", "registry"):
            self.trainer.ckpt_path = path
            cfg["ckpt_path"] = None
        self._safe_loading()

    def _safe_loading(self) -> None:
        cfg = self.config_init[self.subcommand]
        if "weights_only" in cfg and cfg["weights_only"] is None:
            cfg["weights_only"] = True  # never unpickle arbitrary objects from a checkpoint

    def before_validate(self) -> None:
        self._safe_loading()

    def before_test(self) -> None:
        self._safe_loading()

    def before_predict(self) -> None:
        self._safe_loading()

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        cfg = self.config.get(self.subcommand, self.config)
        if cfg.get("test_after_fit", True) and _has_test_data(self.datamodule):
            trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        if trainer.is_global_zero:
            _print_summary(self.model)


def _has_test_data(datamodule: Any) -> bool:
    return datamodule is not None and type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader


def _print_summary(task: Any) -> None:
    from .export import ADAPTER_META

    path = task.run_dir / ADAPTER_META
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    rows = [("run dir", str(task.run_dir)),
            ("backbone", f"{meta['backbone']['init_args'].get('name')}: {meta['weights_source']}"),
            ("method", f"{meta['method']} ({meta['trainable_params']:,} trainable backbone params "
                       f"+ {meta['head_params']:,} head)")]
    rows += [(k, f"{v:.4f}") for k, v in sorted(meta["metrics"].items())]
    width = max(len(k) for k, _ in rows)
    print("\n=== vision_ft run summary ===")
    for key, value in rows:
        print(f"{key:<{width}} : {value}")
    files = sorted(p.name for p in task.run_dir.iterdir() if p.suffix in (".png", ".json", ".safetensors"))
    print(f"{'files':<{width}} : {', '.join(files)}")


def _cli(args: list[str] | None) -> None:
    from .tasks import BaseTask

    VisionFTCLI(
        BaseTask, pl.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        args=args, seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


# --- kit commands ---------------------------------------------------------------------------
def cmd_methods(argv: list[str]) -> int:
    """List the registered methods with their trainable-parameter counts on a real architecture."""
    from .backbones.open_clip import build_backbone_for_counts
    from .methods import registered

    p = argparse.ArgumentParser(prog="vision_ft methods", description=cmd_methods.__doc__)
    p.add_argument("--backbone", default="vit_base_patch16_224", help="timm architecture or tiny preset")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    a = p.parse_args(argv)
    rows = []
    for name, cls in registered().items():
        backbone = build_backbone_for_counts(a.backbone)  # random weights: counts need no download
        method = cls()
        try:
            method.apply(backbone)
        except Exception as e:  # e.g. SSF on open_clip's MultiheadAttention, CoOp on a ViT without text tower
            rows.append({"name": name, "trainable_params": None, "error": f"{type(e).__name__}: {e}"[:200],
                         "data_dependent": cls.requires_data, "mergeable": cls.mergeable, "zero_init": cls.zero_init,
                         "class_path": f"{cls.__module__}.{cls.__qualname__}"})
            continue
        count = method.trainable_parameters(backbone)
        if cls.requires_data:  # what is added is decided from data in prepare(): report the plan
            count = method.nominal_trainable_parameters(backbone)
        rows.append({"name": name, "trainable_params": count, "data_dependent": cls.requires_data,
                     "mergeable": cls.mergeable, "zero_init": cls.zero_init,
                     "image_classification_only": method.needs_image_classification_task,
                     "video_diffusion_only": cls.needs_in_context_task,
                     "class_path": f"{cls.__module__}.{cls.__qualname__}"})
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        total = sum(p.numel() for p in build_backbone_for_counts(a.backbone).model.parameters())
        print(f"methods on {a.backbone} ({total:,} backbone parameters; head excluded)")
        print(f"{'name':<12} {'trainable':>12} {'% of base':>10}  mergeable  zero-init")
        for r in rows:
            if r.get("error"):
                print(f"{r['name']:<12} {'-':>12}  does not apply to this backbone: {r['error'][:90]}")
                continue
            n = r["trainable_params"] or 0
            star = "*" if r["data_dependent"] else " "
            only = "  (image classification task only)" if r["image_classification_only"] else ""
            only = "  (video diffusion task only)" if r["video_diffusion_only"] else only
            print(f"{r['name']:<12} {n:>12,}{star}{100 * n / total:>9.3f}%  {str(r['mergeable']):<9}  {r['zero_init']}{only}")
        if any(r["data_dependent"] for r in rows):
            print("* decided from training data in prepare(); the planned budget is shown")
    return 0


def cmd_export(argv: list[str]) -> int:
    """Export a run to its model library's own format (--merge; --interpolate: WiSE-FT ensembles).

    ``--merge`` folds the adapter into the base weights and writes the native model;
    ``--interpolate`` writes WiSE-FT weight-space ensembles of the zero-shot and the fine-tuned model."""
    from .export import export_merged

    p = argparse.ArgumentParser(prog="vision_ft export", description=cmd_export.__doc__)
    p.add_argument("run_dir", help="run directory holding adapter.json + adapter.safetensors")
    p.add_argument("--merge", action="store_true", help="fold the method into the base weights")
    p.add_argument("--interpolate", type=float, nargs="+", metavar="ALPHA", default=None,
                   help="WiSE-FT: write (1-ALPHA)*zero-shot + ALPHA*fine-tuned (merged) for each ALPHA in [0, 1]; "
                        "several values write OUT/alpha_<ALPHA> folders (CLIP tasks, mergeable methods)")
    p.add_argument("--format", choices=("native", "peft"), default="native",
                   help="native: the library's own model folder (with --merge); peft: the adapter in HF peft's "
                        "format, for peft.PeftModel.from_pretrained (peft-based methods such as lora)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", default=None,
                   help="local base weights, when the run used hub weights that are not reachable now")
    a = p.parse_args(argv)
    overrides = {"checkpoint": a.checkpoint} if a.checkpoint else None
    if a.interpolate is not None:
        from .wise_ft import export_interpolated

        outs = export_interpolated(a.run_dir, a.out, a.interpolate, backbone=overrides)
        for alpha, out in zip(a.interpolate, outs):
            print(f"WiSE-FT alpha={alpha:g}: {_describe_export(out)}")
        return 0
    if a.format == "peft":
        from .export import export_peft

        out = export_peft(a.run_dir, a.out, backbone=overrides)
        print(f"peft adapter written to {out}; load with peft.PeftModel.from_pretrained(base_model, '{out}')")
        return 0
    if not a.merge:
        p.error("nothing to do: pass --merge or --interpolate ALPHA (the run directory already holds the adapter)")
    out = export_merged(a.run_dir, a.out, backbone=overrides)
    print(f"merged model {_describe_export(out)}")
    return 0


def _describe_export(out: Path) -> str:
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    head = ("classifier_head.safetensors: logits = image features @ weight.T + bias"
            if (out / "classifier_head.safetensors").is_file() else "class_text_features.safetensors")
    if (out / "model_index.json").is_file():  # a diffusers pipeline folder (Stable Diffusion)
        pipeline = json.loads((out / "model_index.json").read_text()).get("_class_name", "DiffusionPipeline")
        return (f"written to {out} (diffusers {pipeline} folder); "
                f"load with diffusers.{pipeline}.from_pretrained('{out}')")
    if (out / "open_clip_config.json").is_file():
        return (f"written to {out} (open_clip local-dir layout + {head}); "
                f"load with open_clip.create_model('local-dir:{out}')")
    if config.get("architectures"):  # a transformers save_pretrained folder (D-FINE, HF CLIP)
        extra = f" + {head}" if (out / "vision_ft_native.json").is_file() else ""
        return (f"written to {out} ({config['architectures'][0]}, transformers save_pretrained{extra}); "
                f"load with transformers.{config['architectures'][0]}.from_pretrained('{out}')")
    return (f"written to {out} (model.safetensors + config.json, timm native); "
            f"load with timm.create_model('local-dir:{out}', pretrained=True)")


def cmd_bench(argv: list[str]) -> int:
    """Measure the registered methods: parameters, train step, inference, transfer (and render the page)."""
    from .bench import cmd_bench as run

    return run(argv)


def cmd_new_domain(argv: list[str]) -> int:
    """Scaffold a new domain pack (config, datamodule, sample, dataset card, test) from a template."""
    from .scaffold import cmd_new_domain as run

    return run(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"methods": cmd_methods, "export": cmd_export,
                                                   "bench": cmd_bench, "new-domain": cmd_new_domain}


#: LightningCLI's subcommands, one line each (``python -m vision_ft SUBCOMMAND --help`` has the rest)
TRAINER_COMMANDS = {
    "fit": "train a task from a config (then test the final weights and write the run's adapter and plots)",
    "validate": "evaluate a model on the validation split (--ckpt_path: a run's checkpoint)",
    "test": "evaluate a model on the test split (--ckpt_path: a run's checkpoint)",
    "predict": "classify images with a run: predict RUN --images DIR|CSV|FILES writes predictions.csv "
               "(--ckpt_path CKPT instead of RUN; without --images: Lightning's predict on a config's data)",
}


def top_level_help() -> str:
    """Every subcommand with one line (the trainer's four, then the kit's); bench lists its sections."""
    rows = dict(TRAINER_COMMANDS)
    for name, fn in COMMANDS.items():
        rows[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    lines = ["usage: python -m vision_ft SUBCOMMAND [options]", "",
             "vision_ft: fine-tune vision and multimodal models with parameter-efficient methods.", "",
             "subcommands:"]
    width = max(len(k) for k in rows)
    lines += [f"  {name:<{width}}  {text}" for name, text in rows.items()]
    sections = _bench_sections()
    if sections:
        lines.append(f"  {'':<{width}}  bench sections: {', '.join(sections)}")
    lines += ["", "python -m vision_ft SUBCOMMAND --help shows a subcommand's options, e.g.",
              "  python -m vision_ft fit --help",
              "  python -m vision_ft fit --config domains/medical.yaml"]
    return "\n".join(lines) + "\n"


def _bench_sections() -> list[str]:
    """The bench sub-commands, read from the bench parser itself (so added sections show up)."""
    try:
        from .bench import build_parser
    except ImportError:
        return []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("VISION_FT_LOGLEVEL", "INFO"), format="%(message)s")
    if argv in ([], ["-h"], ["--help"]):
        print(top_level_help(), end="")
        return 0
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        from .predict import cmd_predict, wants_kit_predict

        if wants_kit_predict(argv):  # predict RUN|--ckpt_path --images ...: predictions.csv
            return cmd_predict(argv[1:])
        _check_config_files(argv)
        _cli(None if from_sys else argv)  # LightningCLI reads sys.argv itself
    except Exception as e:  # user errors surface wrapped by jsonargparse during instantiation
        user_error = _find_user_error(e)
        if user_error is None and _is_refused_pickle(e):
            cause = first_line(e, root_cause=True, lines=1)
            user_error = "refused to load a checkpoint that holds Python objects beyond tensors and plain " \
                         f"containers (torch.load weights_only=True): {cause}. vision_ft never " \
                         "unpickles arbitrary code; use a checkpoint written by vision_ft, or an adapter (safetensors)"
        if user_error is None:
            raise
        print(f"vision_ft: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _check_config_files(argv: list[str]) -> None:
    """Name the file and line of a YAML syntax error (the parser alone reports neither the file)."""
    import yaml

    from .errors import ConfigError

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: file not found")
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path}:{where}: not valid YAML ({problem})") from None


def _is_refused_pickle(e: BaseException | None) -> bool:
    import pickle

    while e is not None:
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower().replace(" ", "_"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _find_user_error(e: BaseException | None) -> VisionFTError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, VisionFTError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
