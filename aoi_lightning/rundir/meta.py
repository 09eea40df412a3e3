"""meta.json: versions, seed, device, git commit, data facts, timings."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_PACKAGES = (
    "aoi-lightning",
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "torchmetrics",
    "kornia",
    "faiss-cpu",
    "onnx",
    "onnxruntime",
    "opencv-python-headless",
    "numpy",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(start: Path | None = None) -> str | None:
    """Commit of the git work tree holding the current folder (None outside git)."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=start or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_meta(seed: int | None, device: str, data: dict, timings: dict, extra: dict | None = None) -> dict:
    meta = {
        "created_at": utc_now(),
        "seed": seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "data": data,
        "timings": timings,
    }
    if extra:
        meta.update(extra)
    return meta
