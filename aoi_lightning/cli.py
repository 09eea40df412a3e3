"""The `aoi` command: LightningCLI for fit/validate/test/predict, plus the inspection commands."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from aoi_lightning.data.datamodule import MVTecDataModule
from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.runs.artifacts import write_eval_outputs, write_fit_outputs
from aoi_lightning.runs.jsonio import write_text_atomic
from aoi_lightning.runs.layout import RunDir, new_run_id

log = logging.getLogger("aoi_lightning")

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "devices": 1,
}

#: Commands handled outside LightningCLI: name -> (module, one-line description).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "aoi_lightning.runner.command",
        "OK/NG, masks, overlays, preds.jsonl and report.json for a folder of images",
    ),
    "export": ("aoi_lightning.export.command", "ONNX export of a trained run (export/model.onnx)"),
    "consistency": ("aoi_lightning.export.consistency_command", "ONNX-vs-torch check of an exported run"),
    "compare": ("aoi_lightning.compare.command", "side-by-side comparison of two or more runs"),
    "check-data": ("aoi_lightning.data.check_command", "data set check and preview.png"),
    "report": ("aoi_lightning.report.command", "(re)write the run's HTML report"),
}


class RunConfigSaver(SaveConfigCallback):
    """Writes the fully resolved config of a fit to `<run>/config.yaml` (atomically, rank zero)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        text = self.parser.dump(self.config, skip_none=False)
        write_text_atomic(Path(trainer.default_root_dir) / "config.yaml", text)


def _is_run_logger(logger) -> bool:
    """True for the CSV logger this CLI puts into every run (as saved in a run's config.yaml)."""
    if not isinstance(logger, (Namespace, dict)):
        return False
    init = logger.get("init_args") or {}
    return str(logger.get("class_path", "")).endswith("CSVLogger") and init.get("name") == "logs"


class AoiCLI(LightningCLI):
    """LightningCLI with a run directory per fit: `<runs_root>/<model>/<category>/<run_id>/`."""

    def __init__(self, args=None, run: bool = True) -> None:
        self.run_dir: RunDir | None = None
        self._timings: dict[str, float] = {}
        super().__init__(
            model_class=AnomalyModule,
            subclass_mode_model=True,
            datamodule_class=MVTecDataModule,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_id", type=str | None, default=None, help="Run folder name (default: a UTC timestamp)."
        )
        parser.add_argument("--runs_root", type=str, default="runs", help="Folder that holds the run directories.")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        model_name = str(cfg.model.class_path).rsplit(".", 1)[-1].lower()
        ckpt = cfg.get("ckpt_path")
        run_id = cfg.get("run_id") or new_run_id()
        cfg.run_id = run_id
        run = RunDir.from_checkpoint(ckpt) if ckpt and self.subcommand != "fit" else None
        if run is None:
            run = RunDir.create(cfg.runs_root, model_name, cfg.data.category, run_id)
        self.run_dir = run
        cfg.trainer.default_root_dir = str(run.path)
        if cfg.trainer.get("logger") in (None, True) or _is_run_logger(cfg.trainer.get("logger")):
            # a fresh log folder per command, so that a later test/predict never overwrites the fit's logs
            cfg.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=str(run.path), name="logs", version=f"{self.subcommand}-{run_id}"),
            )

    def before_fit(self) -> None:
        self._timings["fit_start"] = time.perf_counter()
        log.info("run directory: %s", self.run_dir.path)

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        self._timings["fit_s"] = time.perf_counter() - self._timings.pop("fit_start")
        write_fit_outputs(self.trainer, self.model, self.datamodule, self.run_dir, self.config, self._timings)

    def after_validate(self) -> None:
        write_eval_outputs(self.trainer, self.model, self.run_dir, "validate")

    def after_test(self) -> None:
        write_eval_outputs(self.trainer, self.model, self.run_dir, "test")


def _user_errors() -> tuple[type[BaseException], ...]:
    from aoi_lightning.data.image_io import ImageReadError
    from aoi_lightning.data.mvtec import DataError
    from aoi_lightning.models.components.base import NotFittedError
    from aoi_lightning.models.components.feature_extractor import LayerError
    from aoi_lightning.models.components.weights import WeightsError

    return (DataError, LayerError, WeightsError, NotFittedError, ImageReadError, FileNotFoundError, ValueError)


def _user_message(exc: BaseException) -> str:
    """One line for the user: the root cause of a chain (jsonargparse wraps errors raised while building the
    model or data module), prefixed with the config key it concerns when known."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    root = chain[-1]
    text = str(root).strip()
    first = text.splitlines()[0] if text else type(root).__name__
    key = getattr(root, "key", None)
    if key is None and root is not exc:
        outer = str(exc)
        key = "model" if "AnomalyModule" in outer else "data" if "DataModule" in outer else None
    if key and not first.startswith(key):
        first = f"{key}: {first}"
    return first


HELP = """usage: aoi <command> [options]

Train PaDiM / PatchCore on good parts, judge new images OK/NG, locate defects.

Lightning commands (options from the YAML experiment and every override, e.g. --data.root, --model.backbone):
  fit         build the model from good images, tune thresholds, test, write the run directory
  validate    score the validation split of a trained run (--ckpt_path RUN/weights/model.ckpt)
  test        score the test split of a trained run (--ckpt_path RUN/weights/model.ckpt)
  predict     write predictions of a trained run (--ckpt_path RUN/weights/model.ckpt)

Inspection commands:
{extra}
Common options: --config FILE, --run_id ID, --runs_root DIR (default runs), --seed N, --debug.
`aoi <command> --help` lists every option of a command.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aoi` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    argv = [
        "--seed_everything"
        if a == "--seed"
        else a.replace("--seed=", "--seed_everything=", 1)
        if a.startswith("--seed=")
        else a
        for a in argv
    ]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*returned `None`, this fit will run with no optimizer.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if not argv or argv[0] in ("-h", "--help"):
        extra = "".join(f"  {name:<11} {desc}\n" for name, (_, desc) in EXTRA_COMMANDS.items())
        print(HELP.format(extra=extra or "  (none)\n"))
        return 0 if argv else 2
    command = argv[0]
    try:
        if command in EXTRA_COMMANDS:
            import importlib

            module = importlib.import_module(EXTRA_COMMANDS[command][0])
            return int(module.main(argv[1:]) or 0)
        AoiCLI(args=argv)
        return 0
    except KeyboardInterrupt:
        print("aoi: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug or os.environ.get("AOI_DEBUG"):
            raise
        print(f"aoi {command}: error: {_user_message(exc)}", file=sys.stderr)
        return 2


def console() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
