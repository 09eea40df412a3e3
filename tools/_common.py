"""What the measurement scripts in tools/ share: the data and model options of their command lines, and the
Markdown tables they print."""

from __future__ import annotations

import argparse

MODELS = ("padim", "patchcore")


def data_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of `doc`, with `--root`, `--category` (an MVTec-layout category,
    transistor by default) and `--models` (both by default)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/datasets/mvtec_ad")
    parser.add_argument("--category", default="transistor")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    return parser


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    """A Markdown table of `header` and `rows` of cell texts."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
