"""Every `aoi` command and option that README.md and docs/ mention exists, and every docs link resolves."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from aoi_lightning.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "RELIABILITY.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Options of the Lightning commands that are not a config key: `aoi`'s own and LightningCLI's.
LIGHTNING_OPTIONS = {
    "config",
    "ckpt_path",
    "run_id",
    "runs_root",
    "seed",
    "seed_everything",
    "debug",
    "print_config",
    "help",
    "model.help",
    "data.help",
}
_COMMAND = re.compile(r"(?:^|[\s`(])aoi ([a-z][a-z-]*)((?:[ \t]+(?:\\\n)?[^\n`|]*)*)")
_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9_.]*)")


def _mentions() -> list[tuple[str, str, str]]:
    """(doc file, command, option) for every `aoi <command> ... --option` in the docs' code."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if "error:" in line:  # a quoted error message, not a command line
                continue
            for match in _COMMAND.finditer(line):
                command, rest = match.group(1), match.group(2)
                rest = rest.split(" aoi ")[0]  # the next command on the line starts its own options
                found.append((doc.name, command, ""))
                found += [(doc.name, command, opt.rstrip(".")) for opt in _OPTION.findall(rest)]
    return found


def _function_options(command: str) -> set[str]:
    spec = EXTRA_COMMANDS[command]
    function = getattr(importlib.import_module(spec.module), spec.function)
    return set(inspect.signature(function).parameters) | {"config", "print_config", "help", "debug"}


def _init_options(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _lightning_option_exists(option: str) -> bool:
    from lightning.pytorch import Trainer

    from aoi_lightning.data.datamodule import MVTecDataModule
    from aoi_lightning.models import Padim, Patchcore

    if option in LIGHTNING_OPTIONS:
        return True
    head, _, key = option.partition(".")
    key = key.split(".")[0]
    models = _init_options(Padim) | _init_options(Patchcore)
    if head == "model":
        return key in models or (key == "init_args" and option.split(".")[2] in models) or key == "class_path"
    if head == "data":
        return key in _init_options(MVTecDataModule)
    if head == "trainer":
        return key in _init_options(Trainer)
    return False


def test_the_docs_mention_commands() -> None:
    commands = {command for _, command, _ in _mentions()}
    assert {"fit", "run", "serve", "watch", "export", "consistency"} <= commands


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_every_mentioned_command_and_option_exists(doc: str) -> None:
    missing = []
    for name, command, option in _mentions():
        if name != doc:
            continue
        if command not in EXTRA_COMMANDS and command not in LIGHTNING_COMMANDS:
            missing.append(f"aoi {command}")
        elif option and command in EXTRA_COMMANDS and option not in _function_options(command):
            missing.append(f"aoi {command} --{option}")
        elif option and command in LIGHTNING_COMMANDS and not _lightning_option_exists(option):
            missing.append(f"aoi {command} --{option}")
    assert sorted(set(missing)) == []


def test_docs_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []
