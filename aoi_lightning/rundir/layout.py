"""The run directory `runs/<model>/<category>/<run_id>/` and what lives in it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path


def new_run_id() -> str:
    """Timestamp run id, e.g. 20261128-161500 (UTC)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def unique_name(base: str, *folders: Path) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first name that none of `folders` holds yet (e.g. two evaluations
    of a run within the same second)."""
    name, n = base, 1
    while any((Path(folder) / name).exists() for folder in folders):
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass(frozen=True)
class RunDir:
    """Paths of a run directory."""

    path: Path

    @classmethod
    def create(cls, runs_root: str | Path, model: str, category: str, run_id: str) -> RunDir:
        return cls(Path(runs_root).expanduser() / model / category / run_id)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path) -> RunDir | None:
        """The run dir a checkpoint at `<run>/weights/model.ckpt` belongs to, else None."""
        ckpt = Path(ckpt_path)
        if ckpt.parent.name == "weights" and (ckpt.parent.parent / "config.yaml").is_file():
            return cls(ckpt.parent.parent)
        return None

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "weights" / "model.ckpt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def thresholds(self) -> Path:
        return self.path / "thresholds.json"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def preds(self, split: str) -> Path:
        return self.path / f"preds_{split}.jsonl"
