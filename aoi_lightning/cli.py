"""The `aoi` command: LightningCLI for fit/validate/test/predict, plus the inspection commands.

Only the standard library is imported at module level, so that `aoi run --backend onnx` works in an
environment without torch and Lightning.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

#: Commands handled outside LightningCLI: name -> (module, one-line description).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "aoi_lightning.commands.run",
        "OK/NG, masks, overlays, preds.jsonl and report.json for a folder of images",
    ),
    "export": ("aoi_lightning.commands.export", "ONNX export of a trained run (export/model.onnx)"),
    "consistency": ("aoi_lightning.commands.consistency", "ONNX-vs-torch check of an exported run"),
    "compare": ("aoi_lightning.commands.compare", "side-by-side comparison of two or more runs"),
    "check-data": ("aoi_lightning.commands.check_data", "data set check and preview.png"),
    "report": ("aoi_lightning.commands.report", "(re)write the run's HTML report"),
    "watch": ("aoi_lightning.commands.watch", "hot folder: each new image judged once complete, outputs as `aoi run`"),
    "serve": ("aoi_lightning.commands.serve", "HTTP inspection service: POST /predict, health, metrics, audit log"),
}


def _is_user_error(exc: BaseException) -> bool:
    """Errors that describe a mistake in the input (config, data, files), as opposed to a bug."""
    return isinstance(exc, (ValueError, FileNotFoundError)) or type(exc).__module__.startswith("aoi_lightning")


def _user_message(exc: BaseException) -> str:
    """One line for the user: the root cause of a chain (jsonargparse wraps errors raised while building the
    model or data module), prefixed with the config key it concerns when known."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
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
            module = importlib.import_module(EXTRA_COMMANDS[command][0])
            return int(module.main(argv[1:]) or 0)
        from aoi_lightning.commands.lightning import AoiCLI

        AoiCLI(args=argv)
        return 0
    except KeyboardInterrupt:
        print("aoi: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user mistakes become one line, anything else propagates
        if not _is_user_error(exc) or debug or os.environ.get("AOI_DEBUG"):
            raise
        print(f"aoi {command}: error: {_user_message(exc)}", file=sys.stderr)
        return 2


def console() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
