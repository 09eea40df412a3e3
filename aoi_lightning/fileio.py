"""Plain file I/O of the bottom layer: atomic JSON/JSONL/text writing (temporary file in the same folder,
fsync, then rename), JSON Lines reading that survives a torn last line, and safe output file names."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePath

_UMASK = os.umask(0)
os.umask(_UMASK)


def _default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj):
    """Replace NaN/inf by None so that every file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj, indent: int | None = None) -> str:
    return json.dumps(_finite(obj), indent=indent, default=_default, ensure_ascii=False)


def write_bytes_atomic(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write bytes to `path` atomically: readers see the old file or the new one, never half of it.

    Args:
        durable: fsync before the rename (survives a power cut; costs a disk flush).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to `path` atomically (see `write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> Path:
    """Atomic, strict (NaN -> null), indented JSON."""
    return write_text_atomic(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Atomic JSON Lines file, one record a line."""
    return write_text_atomic(path, "".join(dumps(r) + "\n" for r in records))


def read_json(path: str | Path) -> dict:
    """The JSON object of a file.

    Raises:
        OSError: unreadable file.
        ValueError: not valid UTF-8 JSON, or JSON that is not an object (e.g. a list where a run file is expected).
    """
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle)
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """Complete lines of a JSON Lines file; a torn last line (crash while appending) is ignored.

    Raises:
        ValueError: a complete line that is not a JSON object (one line naming the file and the line number).
    """
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                break
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number} is not a JSON object; fix or remove that line")
            out.append(record)
    return out


class OutputDirError(ValueError):
    """An output folder that cannot be used: a file in its place, or no permission to create or write it."""


def check_output_dir(path: str | Path, option: str = "output_dir") -> Path:
    """Check, before any work starts and without creating anything, that the output folder `path` can be made
    and written: no file in its place or above it, and write permission where it will be created.

    Raises:
        OutputDirError: one line naming `--option` and the reason.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--{option}: {path} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"--{option}: cannot create {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"--{option}: cannot write in {existing}: permission denied")
    return path


def differing_value(on_disk: object, expected: dict[str, float], rel_tol: float = 1e-5) -> tuple[str, object] | None:
    """The first key of `expected` whose number in the JSON object `on_disk` is missing or differs (beyond float32
    round-off), with the value found; None when all agree."""
    for key, value in expected.items():
        found = on_disk.get(key) if isinstance(on_disk, dict) else None
        try:
            same = found is not None and math.isclose(float(found), value, rel_tol=rel_tol, abs_tol=1e-7)
        except (TypeError, ValueError):
            same = False
        if not same:
            return key, found
    return None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 120


def output_name(image_path: str | Path, root: str | Path | None = None) -> str:
    """File name stem for the outputs (mask, overlay) of an image: unique per path, safe on any file system.

    The path relative to `root` with folders joined by `__` and the extension dropped (`sub/0001.png` ->
    `sub__0001`). When that is not an exact, reversible rendering of `<rel>.png` (other extension, characters
    outside [a-z0-9._-] (capitals included: names must differ on case-insensitive disks and shares too), `__` in
    a part, a leading dot, a long path, or a file outside `root`), a short hash
    of the relative path is appended (`my_part-3f2a9c01d4`), so two different inputs never share a name. The
    result has no path separators and never starts with a dot.
    """
    path = PurePath(image_path)
    rel: PurePath | None = None
    if root is not None:
        try:
            rel = path.relative_to(PurePath(root))
        except ValueError:
            rel = None
    if rel is None or not rel.parts or ".." in rel.parts:
        rel, outside = PurePath(path.name), True
    else:
        outside = False
    parts = [*rel.parts[:-1], rel.stem]
    friendly = "__".join(_UNSAFE.sub("_", p) for p in parts)
    friendly = "_" + friendly[1:] if friendly.startswith(".") else friendly
    exact = (
        not outside
        and friendly == friendly.lower()  # `A.png` and `a.png` must not meet on a case-insensitive share
        and rel.suffix == ".png"
        and "/".join(friendly.split("__")) + ".png" == rel.as_posix()
        and all(p and "__" not in p for p in parts)
        and len(friendly) <= _MAX_NAME
    )
    if exact:
        return friendly
    digest = hashlib.sha1(str(path if outside else rel.as_posix()).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{friendly[:_MAX_NAME]}-{digest}"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_same_or_above(folder: str | Path, start: str | Path) -> bool:
    """Whether `folder` exists and is `start` or one of its parents as the file system sees it (case-insensitive
    disks, bind mounts), not only by name."""
    folder, start = Path(folder).expanduser(), Path(start).expanduser().resolve()
    if not folder.is_dir():
        return False
    return any(os.path.samefile(folder, above) for above in (start, *start.parents))
