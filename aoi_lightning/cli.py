"""The `aoi` command: LightningCLI for fit/validate/test/predict, plus the inspection commands.

Only the standard library (and `aoi_lightning.allocator`, which uses nothing else) is imported at module
level, so that `aoi run --backend onnx` works in an environment without torch and Lightning.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import NamedTuple

from aoi_lightning.allocator import enable_startup_freeze, frozen_after_startup, keep_freed_memory


class Command(NamedTuple):
    """An inspection command: `function` of `module` is typed and documented (Google style); its signature
    and docstring become the command's options and `--help` (see `aoi_lightning.commands.parsing`)."""

    module: str
    function: str
    summary: str


#: Commands handled outside LightningCLI: name -> Command. A new command is one entry here.
EXTRA_COMMANDS: dict[str, Command] = {
    "run": Command(
        "aoi_lightning.commands.run",
        "run",
        "OK/NG, masks, overlays, preds.jsonl and report.json for a folder of images",
    ),
    "export": Command("aoi_lightning.commands.export", "export", "ONNX export of a trained run (export/model.onnx)"),
    "consistency": Command(
        "aoi_lightning.commands.consistency", "consistency", "ONNX-vs-torch check of an exported run"
    ),
    "compare": Command("aoi_lightning.commands.compare", "compare", "side-by-side comparison of two or more runs"),
    "check-data": Command("aoi_lightning.commands.check_data", "check_data", "data set check and preview.png"),
    "report": Command("aoi_lightning.commands.report", "report", "(re)write the run's HTML report"),
    "watch": Command(
        "aoi_lightning.commands.watch", "watch", "hot folder: each new image judged once complete, outputs as `aoi run`"
    ),
    "serve": Command(
        "aoi_lightning.commands.serve", "serve", "HTTP inspection service: POST /predict, health, metrics, audit log"
    ),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


#: Packages of the full install that the torch-free line install leaves out.
TRAINING_STACK = ("torch", "torchvision", "lightning", "timm", "kornia", "torchmetrics", "faiss", "numba")

#: Libraries that attach a stderr handler of their own to their top logger at import, and still propagate.
LIBRARY_LOGGERS = ("lightning", "torchmetrics")


class _PrintedByLibrary(logging.Filter):
    """Drops records that a library logger printed through a handler of its own (one imported after
    `drop_library_handlers` ran): each line appears once."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


class _LineFormatter(logging.Formatter):
    """`INFO: message`; warnings and errors also name their logger (`WARNING aoi_lightning.x: message`)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s: %(message)s")
        self._named = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record) if record.levelno < logging.WARNING else self._named.format(record)


def _no_advert(record: logging.LogRecord) -> bool:
    """False for Lightning's tips that advertise its cloud services (litlogger, litmodels)."""
    return not str(record.msg).lstrip().startswith("\N{ELECTRIC LIGHT BULB} Tip")


def configure_logging() -> None:
    """INFO lines on stderr (`INFO: message`), each once, without Lightning's advertisements."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_LineFormatter())
        handler.addFilter(_PrintedByLibrary())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _no_advert not in logger.filters:
            logger.addFilter(_no_advert)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def drop_library_handlers() -> None:
    """Remove the stderr handlers that Lightning and torchmetrics attached to their loggers at import (they also
    propagate to the root, so every line would be printed twice); their records then go to the root's handlers.
    Nothing changes where the root has no handler."""
    if not logging.getLogger().handlers:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.propagate:
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)


def run_command(name: str, argv: list[str], debug: bool = False) -> int:
    """Run the inspection command `name` with the command line `argv`; returns its exit code.

    Raises:
        OptionError: a wrong option (one line); `SystemExit` for `--help` and `--print_config`.
    """
    from aoi_lightning.commands.parsing import parse_command

    entry = EXTRA_COMMANDS[name]
    with frozen_after_startup():
        function = getattr(importlib.import_module(entry.module), entry.function)
    drop_library_handlers()
    return int(function(**parse_command(name, function, argv, debug=debug)) or 0)


def _is_user_error(exc: BaseException) -> bool:
    """Errors that describe a mistake in the input (config, data, files), as opposed to a bug."""
    # OSError: a file system refusal (permission, no space, a file where a folder should be) names its path
    return isinstance(exc, (ValueError, OSError)) or type(exc).__module__.startswith("aoi_lightning")


def _user_message(exc: BaseException) -> str:
    """One line for the user: the root cause of a chain (jsonargparse wraps errors raised while building the
    model or data module), prefixed with the config key it concerns when known."""
    chain = [exc]
    while True:  # `raise ... from None` ends the chain, as in a traceback
        last = chain[-1]
        following = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if following is None:
            break
        chain.append(following)
    # the outermost error of this package says what to do; otherwise the root cause says what went wrong
    ours = [e for e in chain if type(e).__module__.startswith("aoi_lightning")]
    root = ours[0] if ours else chain[-1]
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
Common options: --config FILE, --print_config, --run_id ID, --runs_root DIR (default runs), --seed N, --debug.
`aoi <command> --help` lists every option of a command; `aoi fit --model.help Patchcore` (or Padim) the model's.
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
    configure_logging()
    keep_freed_memory()
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*returned `None`, this fit will run with no optimizer.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # batches are decoded on threads in the process by design (data.decode_threads); workers are not missing
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if not argv or argv[0] in ("-h", "--help"):
        extra = "".join(f"  {name:<11} {entry.summary}\n" for name, entry in EXTRA_COMMANDS.items())
        print(HELP.format(extra=extra or "  (none)\n"))
        return 0 if argv else 2
    command = argv[0]
    if command not in EXTRA_COMMANDS and command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        import difflib

        known = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
        close = difflib.get_close_matches(command, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"aoi: error: unknown command {command!r}; {hint}commands: {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        if command in EXTRA_COMMANDS:
            return run_command(command, argv[1:], debug)
        with frozen_after_startup():
            from aoi_lightning.commands.lightning import AoiCLI

        drop_library_handlers()
        AoiCLI(args=argv, debug=debug)
        return 0
    except SystemExit as exc:  # --help, --print_config; with --debug a parsing error after its full report
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("aoi: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in TRAINING_STACK or debug or os.environ.get("AOI_DEBUG"):
            raise
        print(
            f"aoi {command}: error: {missing} is not installed here (a line install?): without it `aoi run`, "
            "`aoi serve` and `aoi watch` work with --backend onnx or openvino; the other commands need the full "
            "install (pip install .)",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # noqa: BLE001 - user mistakes become one line, anything else propagates
        if not _is_user_error(exc) or debug or os.environ.get("AOI_DEBUG"):
            raise
        print(f"aoi {command}: error: {_user_message(exc)}", file=sys.stderr)
        return 2


def console() -> None:  # pragma: no cover - thin wrapper
    enable_startup_freeze()  # a process of its own: its start-up objects live until it exits
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
