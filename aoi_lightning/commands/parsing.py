"""Command-line parsing of the `aoi` commands with jsonargparse, and one-line messages for its errors.

An inspection command is one typed function (`run(model_dir: str, ..., batch_size: int = 8) -> int`) whose
Google-style docstring `Args:` section is the `--help` text of each option; `command_parser` turns it into a
jsonargparse parser with `--config FILE` and `--print_config`. `one_line` rewrites jsonargparse's multi-line
errors (the whole usage, nested Union reports) into one line that names the key, what is allowed and the closest
match. No torch here: `aoi run --backend onnx` parses its options in a process without torch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence

import docstring_parser
from jsonargparse import ActionConfigFile, ArgumentParser

#: Most names an error line lists as allowed; the rest are counted.
MAX_LISTED = 24


class OptionError(ValueError):
    """A wrong option or config key; the message is one line naming the key, what is allowed and the closest match."""


def command_parser(name: str, function: Callable[..., int], *, exit_on_error: bool = False) -> ArgumentParser:
    """Parser of `aoi <name>` built from the signature and docstring of `function`.

    Every parameter becomes `--<parameter>` with its type hint (validated by jsonargparse), its default (a
    parameter without one is required) and the text of its docstring `Args:` entry as help. A `bool` option
    also works as a bare flag (`--resume` is `--resume true`); a `list[...]` option takes several values
    (`--run_dirs A B`). `--config FILE` reads the options from YAML (the output of `--print_config`).

    Args:
        name: command name as typed after `aoi` (`check-data`).
        function: the command's function; its summary and description become the help's description.
        exit_on_error: True prints jsonargparse's full usage and message and exits 2 (`--debug`); False raises
            `argparse.ArgumentError`, which `parse_command` turns into one line.
    """
    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    helps = {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}
    description = "\n\n".join(t for t in (doc.short_description, doc.long_description) if t)
    parser = ArgumentParser(prog=f"aoi {name}", description=description, exit_on_error=exit_on_error)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file of these options (as written by --print_config)."
    )
    hints = typing.get_type_hints(function)
    for param in inspect.signature(function).parameters.values():
        hint = hints.get(param.name, str)
        kwargs: dict = {"type": hint, "help": helps.get(param.name, "")}
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = list(param.default) if isinstance(param.default, tuple) else param.default
        if hint is bool:
            kwargs.update(nargs="?", const=True)
        elif typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="*")
        parser.add_argument(f"--{param.name}", **kwargs)
    return parser


def parse_command(name: str, function: Callable[..., int], argv: Sequence[str], *, debug: bool = False) -> dict:
    """Keyword arguments of `function` from the command line `argv` of `aoi <name>`.

    Raises:
        OptionError: an unknown option, a value of the wrong type, a missing required option (one line).
        SystemExit: `--help` and `--print_config` (code 0); with `debug`, any error (code 2, full usage).
    """
    import argparse

    parser = command_parser(name, function, exit_on_error=debug)
    try:
        cfg = parser.parse_args(list(argv))
    except argparse.ArgumentError as exc:
        raise OptionError(one_line(str(exc), option_keys(parser), dashes=True)) from exc
    values = cfg.as_dict()
    values.pop("config", None)
    return values


def option_keys(parser) -> list[str]:
    """Option keys of a jsonargparse parser (`data.root`, `trainer.max_epochs`, `batch_size`), in parser order."""
    skip = {"help", "config", "print_config", "print_shtab", "subcommand"}
    keys = []
    for action in parser._actions:  # argparse keeps no public list of the actions
        dest = getattr(action, "dest", None)
        if dest and dest not in skip and dest != "==SUPPRESS==" and not dest.endswith(".help") and dest not in keys:
            keys.append(dest)
    return keys


def class_options(class_path: str) -> list[str]:
    """`__init__` options a class accepts as `init_args` (resolved as jsonargparse does; [] when not importable)."""
    module_name, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x")
        return [k.split(".", 1)[1] for k in parser.get_defaults().keys()]
    except Exception:  # noqa: BLE001 - only a suggestion: a class that cannot be inspected lists nothing
        return []


def suggestion(
    word: str, allowed: Iterable[str], what: str = "allowed", match_prefix: str = "", list_prefix: str = ""
) -> str:
    """`did you mean --x? (options: --a, --b, --x)` for an unknown `word` ("" when nothing is allowed).

    At most MAX_LISTED names are listed; `match_prefix` is written before the closest match, `list_prefix`
    before each listed name (`--`, or `data.` for the match of a key listed under `options of data`).
    """
    allowed = [a for a in allowed if a]
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    parts = [f"did you mean {match_prefix}{close[0]}?"] if close else []
    if allowed:
        listed = ", ".join(list_prefix + a for a in allowed[:MAX_LISTED])
        more = len(allowed) - MAX_LISTED
        parts.append(f"({what}: {listed}" + (f" and {more} more" if more > 0 else "") + ")")
    return " ".join(parts)


def _joined(hint: str) -> str:
    """A hint appended to a message: `; did you mean ...` or ` (options: ...)`."""
    return "" if not hint else f" {hint}" if hint.startswith("(") else f"; {hint}"


def _clean_type(text: str) -> str:
    """`<class 'int'>` -> int, `typing.Literal['a', 'b']` -> one of a, b, NoneType -> null."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text.strip())
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in _split_top(literal.group(1)))
    return text.replace("typing.", "").replace("NoneType", "null")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[(" and 1 or ch in "])" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _expected(body: str) -> str | None:
    """`expected int, got x` from a jsonargparse type report (a plain or a Union one)."""
    given = re.search(r"Given value: (.*)", body)
    subtypes = re.search(r"Subtypes: \[(.*)\]", body)
    if subtypes and given:
        kinds = [_clean_type(t) for t in _split_top(subtypes.group(1))]
        return f"expected {' or '.join(kinds)}, got {given.group(1).strip()}"
    plain = re.search(r"Expected an? (.*?)\. Got value: (.*)", body)
    if plain:
        kind, value = _clean_type(plain.group(1)), plain.group(2).strip()
        if kind.startswith("one of "):
            close = difflib.get_close_matches(value, _split_top(kind[len("one of ") :]), n=1)
            return f"expected {kind}, got {value}" + (f"; did you mean {close[0]}?" if close else "")
        if kind == "float" and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            return f"expected a finite number, got {value}"
        return f"expected {kind}, got {value}"
    return None


def _class_problem(body: str) -> tuple[str, str] | None:
    """(class path, its nested report) from `- Problem with given class_path 'X':` and the lines indented below it."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"(\s*)- Problem with given class_path '([^']+)':\s*(.*)", line)
        if match:
            indent = len(match.group(1))
            inner = [match.group(3)] if match.group(3) else []
            for below in lines[i + 1 :]:
                if len(below) - len(below.lstrip()) <= indent + 1 and below.strip():
                    break
                inner.append(below)
            return match.group(2), "\n".join(inner)
    return None


def _first_line(text: str) -> str:
    lines = [ln.strip(" -") for ln in text.splitlines() if ln.strip(" -")]
    return lines[0] if lines else text.strip()


def one_line(
    message: str, keys: Sequence[str], *, dashes: bool = False, classes: Mapping[str, Sequence[str]] | None = None
) -> str:
    """One line for a jsonargparse error `message`: the key, what is wrong, what is allowed, the closest match.

    Args:
        message: `str(ArgumentError)` as jsonargparse raises it (often several lines, nested Union reports).
        keys: option keys of the parser (`option_keys`), for unknown-key suggestions.
        dashes: name keys as options (`--batch_size`, inspection commands) instead of config keys
            (`data.image_size`, Lightning commands, where the key may come from a YAML file).
        classes: class names allowed for a key (`{"model": ["Padim", "Patchcore"]}`), suggested for a wrong one.
    """

    def name(key: str) -> str:
        return f"--{key}" if dashes else key

    def unknown(key: str) -> str:
        parent, _, leaf = key.rpartition(".")
        if parent:
            siblings = [k[len(parent) + 1 :] for k in keys if k.startswith(parent + ".")]
            hint = suggestion(leaf, siblings, f"options of {name(parent)}", f"{name(parent)}.", "")
        else:
            dash = "--" if dashes else ""
            hint = suggestion(leaf, [k for k in keys if "." not in k], "options", dash, dash)
        if not hint.startswith("did you mean"):  # nothing close among its siblings: the closest key anywhere
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"did you mean {name(close[0])}? {hint}".strip() if close else hint
        return f"{name(key)}: unknown option" + _joined(hint)

    text = message.strip()
    match = re.match(r"unrecognized arguments: (.*)", text)
    if match:
        first = next((t for t in match.group(1).split() if t.startswith("-")), match.group(1).split()[0])
        key = first.lstrip("-").split("=", 1)[0].rstrip("+")
        return unknown(key) if first.startswith("-") else f"unexpected value {first!r} (options start with --)"
    match = re.match(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)|.* does not accept option '([^']+)'", text)
    if match:
        return unknown(match.group(1) or match.group(2))
    match = re.search(r"the following arguments are required: (.*)", text) or re.search(
        r'Key "([^"]+)" is required', text
    )
    if match:
        missing = [k.strip() for k in match.group(1).split(",")]
        return ", ".join(name(k) for k in missing) + (" is" if len(missing) == 1 else " are") + " required"
    match = re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)", text)
    if match:
        commands = [c.strip(" '") for c in match.group(2).split(",")]
        return f"unknown command {match.group(1)!r}" + _joined(suggestion(match.group(1), commands, "commands"))
    match = re.match(r'Parser key "([^"]+)"(?: element \d+)?:\s*(.*)', text, re.S)
    if match:
        key, body = match.group(1), match.group(2)
        problem = _class_problem(body)
        if problem:
            class_path, inner = problem
            option = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", inner)
            cls = class_path.rsplit(".", 1)[-1]
            if option:
                word = option.group(1) or option.group(2)
                hint = suggestion(word, class_options(class_path), f"options of {cls}")
                return f"{name(key)}.init_args.{word}: not an option of {cls}" + _joined(hint)
            inner_key = re.match(r'\s*Parser key "([^"]+)"(?: element \d+)?:\s*(.*)', inner, re.S)
            if inner_key:
                detail = _expected(inner_key.group(2)) or _first_line(inner_key.group(2))
                return f"{name(key)}.init_args.{inner_key.group(1)}: {detail}"
            return f"{name(key)} ({cls}): {_first_line(inner)}"
        detail = _expected(body)
        path_like = re.search(r"Expected a dot import path string: (.*)", body)
        if path_like:
            value = path_like.group(1).strip()
            hint = suggestion(value, (classes or {}).get(key, ()), "classes")
            detail = f"{value!r} is not a class name or class path" + _joined(hint)
        return f"{name(key)}: {detail or _first_line(body)}"
    return _first_line(text)
