"""AoiCLI: LightningCLI with a run directory per fit (`aoi fit/validate/test/predict`)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from aoi_lightning.commands.parsing import OptionError, one_line, option_keys
from aoi_lightning.data.datamodule import MVTecDataModule
from aoi_lightning.distributed import resolve_strategy
from aoi_lightning.fileio import write_text_atomic
from aoi_lightning.models.lightning_base import AnomalyModule
from aoi_lightning.rundir.artifacts import write_eval_outputs, write_fit_checkpoint, write_fit_outputs
from aoi_lightning.rundir.layout import RunDir, new_run_id, unique_name
from aoi_lightning.rundir.loading import RunError

log = logging.getLogger("aoi_lightning")

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "devices": 1,
}

MODEL_HELP = (
    "The model's options (model.init_args.*) depend on its class and are not listed above: "
    "`aoi {command} --model.help Padim` or `aoi {command} --model.help Patchcore` lists them (a class path such as "
    "aoi_lightning.models.Patchcore works too), and `aoi {command} --config FILE --print_config` prints a whole "
    "resolved config."
)


def _holds_a_run(run: RunDir) -> bool:
    """Whether a run folder holds what a fit produces (a checkpoint, thresholds, metrics or an export); the
    config.yaml and logs a failed fit leaves do not count, so the same --run_id can be fitted again then."""
    return any(p.is_file() for p in (run.checkpoint, run.thresholds, run.metrics, run.export / "model.onnx"))


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


def model_class_names() -> list[str]:
    """Names of the model classes `--model` accepts (the AnomalyModule subclasses defined in this package)."""
    import aoi_lightning.models  # noqa: F401 - defines the subclasses

    found, todo = [], list(AnomalyModule.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("aoi_lightning.") and cls.__name__ not in found:
            found.append(cls.__name__)
    return found


def _is_run_logger(logger) -> bool:
    """True for the CSV logger this CLI puts into every run (as saved in a run's config.yaml)."""
    if not isinstance(logger, (Namespace, dict)):
        return False
    init = logger.get("init_args") or {}
    return str(logger.get("class_path", "")).endswith("CSVLogger") and init.get("name") == "logs"


class AoiCLI(LightningCLI):
    """LightningCLI with a run directory per fit: `<runs_root>/<model>/<category>/<run_id>/`."""

    def __init__(self, args=None, run: bool = True, debug: bool = False) -> None:
        """Parse `args` (a command line without `aoi`), set up the run directory and run the subcommand.

        Args:
            args: e.g. `["fit", "--config", "x.yaml"]`; None reads `sys.argv`.
            run: False only parses and instantiates (no subcommand).
            debug: True keeps jsonargparse's full usage and error report; False raises `OptionError`
                with one line for a wrong option or config key.

        Raises:
            OptionError: unknown key (with the closest match and the allowed keys), wrong type, missing value.
        """
        self.run_dir: RunDir | None = None
        self.output_name = ""
        self._new_dirs: list[Path] = []
        self._timings: dict[str, float] = {}
        subcommands = ("fit", "validate", "test", "predict")
        try:
            super().__init__(
                model_class=AnomalyModule,
                subclass_mode_model=True,
                datamodule_class=MVTecDataModule,
                save_config_callback=RunConfigSaver,
                save_config_kwargs={"overwrite": True},
                trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=0,
                auto_configure_optimizers=False,
                parser_kwargs={
                    "prog": "aoi",
                    "exit_on_error": debug,
                    **{c: {"epilog": MODEL_HELP.format(command=c)} for c in subcommands},
                },
                args=args,
                run=run,
            )
        except BaseException:
            self._remove_unstarted_run_dir()
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_id", type=str | None, default=None, help="Run folder name (default: a UTC timestamp)."
        )
        parser.add_argument("--runs_root", type=str, default="runs", help="Folder that holds the run directories.")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            subparsers = getattr(self, "_subcommand_parsers", {})  # absent with run=False
            sub = next((a for a in (args or []) if isinstance(a, str) and a in subparsers), None)
            keys = option_keys(subparsers[sub] if sub else parser)
            raise OptionError(one_line(str(exc), keys, classes={"model": model_class_names()})) from exc
        # LightningCLI next takes the model's hyper-parameters from --ckpt_path, silently replacing the model
        # class of the config: a checkpoint of another model or structure (backbone, layers, tiling, input size),
        # an unsafe or damaged file, or one whose run's thresholds.json disagrees with it is refused first, with
        # one line, before anything is created or written.
        subcommand = self.config.get("subcommand")
        if subcommand and subcommand != "fit":
            cfg = self.config[subcommand]
            ckpt = cfg.get("ckpt_path")
            if ckpt and Path(ckpt).is_file():
                from aoi_lightning.rundir.loading import check_checkpoint_for_config

                check_checkpoint_for_config(
                    ckpt,
                    str(cfg.model.class_path),
                    "the config (--config / --model)",
                    model_config=cfg.model.as_dict(),
                    image_size=cfg.data.get("image_size"),
                )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        model_name = str(cfg.model.class_path).rsplit(".", 1)[-1].lower()
        ckpt = cfg.get("ckpt_path")
        # processes that Lightning launches for DDP re-run this command: they take the launcher's run folder
        inherited = os.environ.get("AOI_RUN_ID") if os.environ.get("LOCAL_RANK", "0") != "0" else None
        run_id = cfg.get("run_id") or inherited or new_run_id()
        if run_id in (".", "..") or any(sep in run_id for sep in ("/", "\\")) or run_id != run_id.strip():
            raise RunError(f"--run_id {run_id!r}: a folder name is expected (no path separators, not . or ..)")
        cfg.run_id = run_id
        os.environ["AOI_RUN_ID"] = run_id
        run = RunDir.from_checkpoint(ckpt) if ckpt and self.subcommand != "fit" else None
        if run is None:
            run = RunDir.create(cfg.runs_root, model_name, cfg.data.category, run_id)
            if self.subcommand == "fit" and inherited is None and _holds_a_run(run):
                # a second fit into a run would mix its files with the first's (a model beside another's
                # predictions and evaluations), and replace a model a line may be using
                raise RunError(
                    f"{run.path} already holds a run: choose another --run_id, or remove the folder to fit it again"
                )
            if os.environ.get("LOCAL_RANK", "0") == "0":
                root = Path(cfg.runs_root).expanduser()
                chain = [run.path, *run.path.parents[: len(run.path.relative_to(root).parts)]]
                self._new_dirs = [p for p in chain if not p.exists()]
        self.run_dir = run
        cfg.trainer.default_root_dir = str(run.path)
        # a fresh name per command: a later test/validate/predict of a run gets logs/<name> and eval/<name> of its
        # own, so that it overwrites neither the fit's files nor those of an earlier evaluation
        self.output_name = f"{self.subcommand}-{run_id}"
        if ckpt and self.subcommand != "fit":
            base = f"{self.subcommand}-{new_run_id()}"
            self.output_name = unique_name(base, run.path / "logs", run.path / "eval")
        if cfg.trainer.get("logger") in (None, True) or _is_run_logger(cfg.trainer.get("logger")):
            cfg.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=str(run.path), name="logs", version=self.output_name),
            )

    def _remove_unstarted_run_dir(self) -> None:
        """After a failure: remove the run directory (and the parent folders) this command created, if no file was
        written into it (only the empty folders of the logger). A folder that existed before is never removed."""
        if self.run_dir is None or not self._new_dirs or self._new_dirs[0] != self.run_dir.path:
            return
        path = self.run_dir.path
        if not path.is_dir() or any(not p.is_dir() for p in path.rglob("*")):
            return
        for folder in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        for folder in self._new_dirs:  # deepest first; stops at the first one that is not empty
            try:
                folder.rmdir()
            except OSError:
                break

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self._get(self.config_init, "trainer", default={})
        kwargs["strategy"] = resolve_strategy(cfg.get("strategy", "auto"), cfg.get("devices"), cfg.get("num_nodes"))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._timings["fit_start"] = time.perf_counter()
        self.model.deferred_errors = []
        log.info("run directory: %s", self.run_dir.path)

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        self._timings["fit_s"] = time.perf_counter() - self._timings.pop("fit_start")
        write_fit_checkpoint(self.trainer, self.model, self.datamodule, self.run_dir, self._timings)
        start = time.perf_counter()
        tested = bool(self.datamodule.test_samples)
        if tested:  # test metrics, per-image scores and the HTML report of the fitted model
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        self._timings["test_s"] = time.perf_counter() - start
        write_fit_outputs(self.trainer, self.model, self.datamodule, self.run_dir, self.config, self._timings, tested)
        if self.model.deferred_errors:
            raise self.model.deferred_errors[0]

    def after_validate(self) -> None:
        write_eval_outputs(self.trainer, self.model, self.run_dir, "validate", self.output_name)

    def after_test(self) -> None:
        write_eval_outputs(self.trainer, self.model, self.run_dir, "test", self.output_name)
