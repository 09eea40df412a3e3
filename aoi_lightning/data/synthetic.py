"""Built-in, deterministic synthetic AOI data set in MVTec AD layout.

The scene is a small "part on a board": a green solder-mask board with copper traces, fiducials and a
silkscreen outline, and a dark chip body with ten metallic leads on tinned pads and a printed marking.
Good images vary slightly (position/rotation jitter, brightness, low-frequency shading, board texture,
sensor noise). Defective test images add one local defect; its ground-truth mask is exactly the set of
pixels that differ from the same image rendered without the defect.

Layout written by :func:`generate_synthetic_mvtec`::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png ...
    <root>/<category>/README.txt
    <root>/<category>/.complete          (JSON of the generation arguments, written last)
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DEFAULT_CATEGORY",
    "DEFECT_TYPES",
    "default_cache_dir",
    "ensure_synthetic",
    "generate_synthetic_mvtec",
]

DEFAULT_CATEGORY = "synthetic"
DEFECT_TYPES = ("scratch", "missing_pad", "contamination", "crack")

_FORMAT_VERSION = 1
_CACHE_SUBDIR = "synthetic_v1"
_MARKER = ".complete"
_NOMINAL = 256.0  # layout is designed on a 256 x 256 canvas and scaled to ``image_size``
_MIN_SIZE = 64
_AREA_RANGE = (0.002, 0.05)  # accepted defect area, as a fraction of the image
_MAX_DEFECT_TRIES = 25
_SPLIT_CODES = {"train": 1, "test_good": 2}  # defects use 10 + index into DEFECT_TYPES

# Colours are RGB in [0, 255]; images are converted to BGR only when encoded.
_BOARD = (28.0, 92.0, 52.0)
_TRACE = (44.0, 118.0, 62.0)
_SILK = (206.0, 208.0, 196.0)
_COPPER = (190.0, 140.0, 82.0)
_CLEARANCE = (22.0, 70.0, 40.0)
_PAD = (198.0, 190.0, 162.0)
_LEAD = (168.0, 170.0, 176.0)
_LEAD_HIGHLIGHT = (222.0, 224.0, 228.0)
_BEVEL = (74.0, 74.0, 80.0)
_BODY = (50.0, 50.0, 55.0)
_DIMPLE = (36.0, 36.0, 40.0)
_MARKING = (168.0, 168.0, 160.0)
_CONTAMINANTS = (
    (176.0, 112.0, 40.0),  # flux residue
    (226.0, 224.0, 212.0),  # dust / fibre
    (20.0, 18.0, 16.0),  # dark particle
    (70.0, 96.0, 200.0),  # blue speck
)

_Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in nominal coordinates


def _pin_geometry() -> tuple[_Rect, list[_Rect], list[_Rect]]:
    """Return the nominal body rectangle, pad rectangles and lead rectangles (5 pins top, 5 bottom)."""
    body = (64.0, 92.0, 192.0, 164.0)
    pads: list[_Rect] = []
    leads: list[_Rect] = []
    for top in (True, False):
        for i in range(5):
            cx = 128.0 + (i - 2) * 22.0
            if top:
                pads.append((cx - 6.0, 60.0, cx + 6.0, 83.0))
                leads.append((cx - 4.0, 67.0, cx + 4.0, 92.0))
            else:
                pads.append((cx - 6.0, 173.0, cx + 6.0, 196.0))
                leads.append((cx - 4.0, 164.0, cx + 4.0, 189.0))
    return body, pads, leads


_BODY_RECT, _PADS, _LEADS = _pin_geometry()


def default_cache_dir() -> Path:
    """Return the cache directory: ``$AOI_CACHE_DIR`` if set, else ``~/.cache/aoi_lightning``."""
    env = os.environ.get("AOI_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "aoi_lightning"


# --------------------------------------------------------------------------------------------- rendering


def _pt(x: float, y: float, s: float) -> tuple[int, int]:
    return int(round(x * s)), int(round(y * s))


def _th(t: float, s: float) -> int:
    return max(1, int(round(t * s)))


def _rect(img: np.ndarray, r: _Rect, color: tuple[float, ...], s: float) -> None:
    p0 = _pt(r[0], r[1], s)
    p1 = (int(round(r[2] * s)) - 1, int(round(r[3] * s)) - 1)
    cv2.rectangle(img, p0, p1, color, thickness=-1, lineType=cv2.LINE_8)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color: tuple[float, ...], s: float) -> None:
    """Draw anti-aliased text onto a float image (``cv2.putText`` only accepts 8-bit images)."""
    canvas = np.zeros(img.shape[:2], np.uint8)
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255,), _th(1, s), cv2.LINE_AA)
    img[:] = _compose(img, canvas.astype(np.float32) / 255.0, color)


def _render_scene(size: int, texture: np.ndarray, omit_pin: int | None = None) -> np.ndarray:
    """Render the clean (noise-free, unjittered) scene as float32 RGB, optionally without one pin."""
    s = size / _NOMINAL
    img = np.empty((size, size, 3), np.float32)
    img[:] = _BOARD

    # Copper traces under the solder mask, fanning out from every pad.
    for k, pad in enumerate(_PADS):
        i, top = k % 5, k < 5
        cx = 0.5 * (pad[0] + pad[2])
        dx = (i - 2) * 16.0
        if top:
            pts = [(cx, pad[1]), (cx, 46.0), (cx + dx, 30.0), (cx + dx, -4.0)]
        else:
            pts = [(cx, pad[3]), (cx, 210.0), (cx + dx, 226.0), (cx + dx, 260.0)]
        poly = np.array([_pt(x, y, s) for x, y in pts], np.int32)
        cv2.polylines(img, [poly], False, _TRACE, thickness=_th(4, s), lineType=cv2.LINE_AA)

    # Fiducials and silkscreen.
    for fx, fy in ((26.0, 26.0), (230.0, 230.0)):
        cv2.circle(img, _pt(fx, fy, s), _th(10, s), _CLEARANCE, -1, cv2.LINE_AA)
        cv2.circle(img, _pt(fx, fy, s), _th(6, s), _COPPER, -1, cv2.LINE_AA)
    cv2.rectangle(img, _pt(52, 52, s), _pt(204, 204, s), _SILK, _th(1.5, s), cv2.LINE_AA)
    _text(img, "U3", _pt(206, 48, s), 0.45 * s, _SILK, s)

    # Pads, leads (with a specular stripe) and the chip body.
    for k, (pad, lead) in enumerate(zip(_PADS, _LEADS, strict=True)):
        if k == omit_pin:
            continue
        _rect(img, pad, _PAD, s)
        _rect(img, lead, _LEAD, s)
        cx = 0.5 * (lead[0] + lead[2])
        _rect(img, (cx - 1.0, lead[1] + 1.0, cx + 1.0, lead[3] - 1.0), _LEAD_HIGHLIGHT, s)
    _rect(img, _BODY_RECT, _BEVEL, s)
    x0, y0, x1, y1 = _BODY_RECT
    _rect(img, (x0 + 3.0, y0 + 3.0, x1 - 3.0, y1 - 3.0), _BODY, s)
    cv2.circle(img, _pt(x0 + 13.0, y0 + 13.0, s), _th(5, s), _DIMPLE, -1, cv2.LINE_AA)

    # Printed marking: part number plus a smaller date/lot code line.
    for text, width, y in (("AOI-7421", 84.0, 132.0), ("X2G 2417", 52.0, 150.0)):
        (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
        _text(img, text, _pt(128.0 - width / 2.0, y, s), width * s / tw, _MARKING, s)

    img += texture[..., None]
    return img


def _compose(img: np.ndarray, alpha: np.ndarray, color: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """Alpha-compose a defect layer (``color`` where ``alpha`` > 0) onto ``img``."""
    a = alpha[..., None].astype(np.float32)
    return img * (1.0 - a) + np.asarray(color, np.float32) * a


def _body_alpha(size: int, s: float) -> np.ndarray:
    inside = np.zeros((size, size), np.float32)
    _rect(inside, _BODY_RECT, (1.0,), s)
    return inside


def _random_polyline(
    rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, step_len: tuple[float, float], wiggle: float
) -> np.ndarray:
    pts = [start.astype(np.float64)]
    for _ in range(steps):
        angle += rng.normal(0.0, wiggle)
        length = rng.uniform(*step_len)
        pts.append(pts[-1] + length * np.array([np.cos(angle), np.sin(angle)]))
    return np.stack(pts)


def _defect_scratch(clean: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    size = clean.shape[0]
    x0, y0, x1, y1 = _BODY_RECT
    start = np.array([rng.uniform(x0 + 10, x1 - 10), rng.uniform(y0 + 8, y1 - 8)])
    angle = rng.uniform(0, np.pi)
    seg = rng.uniform(10.0, 16.0)
    line = _random_polyline(rng, start, angle, 4, (seg, seg * 1.1), 0.06)
    line += rng.normal(0.0, 0.6, line.shape)
    canvas = np.zeros((size, size), np.float32)
    cv2.polylines(canvas, [np.round(line * s).astype(np.int32)], False, (1.0,), _th(2, s), cv2.LINE_AA)
    alpha = canvas * _body_alpha(size, s) * rng.uniform(0.7, 0.95)
    shade = rng.uniform(140.0, 190.0)
    return _compose(clean, alpha, (shade, shade, shade * 1.02))


def _defect_crack(clean: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    size = clean.shape[0]
    x0, y0, x1, y1 = _BODY_RECT
    side = int(rng.integers(4))
    if side == 0:
        start, angle = np.array([rng.uniform(x0 + 12, x1 - 12), y0]), np.pi / 2
    elif side == 1:
        start, angle = np.array([rng.uniform(x0 + 12, x1 - 12), y1]), -np.pi / 2
    elif side == 2:
        start, angle = np.array([x0, rng.uniform(y0 + 12, y1 - 12)]), 0.0
    else:
        start, angle = np.array([x1, rng.uniform(y0 + 12, y1 - 12)]), np.pi
    angle += rng.uniform(-0.5, 0.5)
    main = _random_polyline(rng, start, angle, int(rng.integers(6, 10)), (4.0, 7.0), 0.55)
    branches = [main]
    if rng.random() < 0.7:
        j = int(rng.integers(2, len(main) - 1))
        branches.append(_random_polyline(rng, main[j], angle + rng.choice([-1.0, 1.0]) * 0.9, 3, (3.0, 5.0), 0.5))
    canvas = np.zeros((size, size), np.float32)
    for poly in branches:
        for a, b in zip(poly[:-1], poly[1:], strict=True):
            t = _th(float(rng.choice([1.0, 2.0, 2.0, 3.0])), s)
            cv2.line(canvas, _pt(*a, s), _pt(*b, s), (1.0,), t, cv2.LINE_8)  # hard, jagged edges
    alpha = canvas * _body_alpha(size, s) * rng.uniform(0.85, 1.0)
    return _compose(clean, alpha, (10.0, 10.0, 12.0))


def _defect_contamination(clean: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    size = clean.shape[0]
    center = np.array([rng.uniform(56.0, 200.0), rng.uniform(56.0, 200.0)])
    canvas = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 7))):
        c = center + rng.normal(0.0, 3.0, 2)
        r = rng.uniform(2.5, 5.5)
        cv2.ellipse(
            canvas,
            _pt(*c, s),
            (_th(r, s), _th(r * rng.uniform(0.6, 1.0), s)),
            rng.uniform(0, 180),
            0,
            360,
            (1.0,),
            -1,
            cv2.LINE_AA,
        )
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.7 * s)
    alpha = np.clip(canvas, 0.0, 1.0) * rng.uniform(0.75, 0.95)
    base = np.asarray(_CONTAMINANTS[int(rng.integers(len(_CONTAMINANTS)))], np.float32)
    tint = base * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    grain = 1.0 + 0.08 * cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.8)
    color = np.clip(tint[None, None, :] * grain[..., None], 0.0, 255.0)
    return _compose(clean, alpha, color)


_LayerDefect = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]
_LAYER_DEFECTS: dict[str, _LayerDefect] = {
    "scratch": _defect_scratch,
    "crack": _defect_crack,
    "contamination": _defect_contamination,
}


class _Capture:
    """Per-image nuisance parameters (texture, jitter, illumination, sensor noise) drawn once from ``rng``."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        s = size / _NOMINAL
        fine = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.7)
        weave = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 3.0 * s)
        self.texture = 5.0 * fine + 12.0 * weave
        angle = rng.uniform(-0.5, 0.5)
        shift = rng.uniform(-3.0, 3.0, 2) * s
        m = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, 1.0)
        m[:, 2] += shift
        self.matrix = m
        low = rng.standard_normal((4, 4)).astype(np.float32)
        shading = 1.0 + 0.04 * cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        self.gain = (shading * rng.uniform(0.95, 1.05)).astype(np.float32)
        self.noise = rng.normal(0.0, rng.uniform(1.2, 2.2), (size, size, 3)).astype(np.float32)

    def apply(self, clean: np.ndarray) -> np.ndarray:
        size = clean.shape[0]
        warped = cv2.warpAffine(
            clean, self.matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        out = warped * self.gain[..., None] + self.noise
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _render_good(rng: np.random.Generator, size: int) -> np.ndarray:
    cap = _Capture(rng, size)
    return cap.apply(_render_scene(size, cap.texture))


def _render_defect(rng: np.random.Generator, size: int, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """Render one defective image and its exact 0/255 mask (pixels that differ from the defect-free render)."""
    s = size / _NOMINAL
    cap = _Capture(rng, size)
    clean = _render_scene(size, cap.texture)
    good = cap.apply(clean)
    best: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(_MAX_DEFECT_TRIES):
        if defect == "missing_pad":
            bad = cap.apply(_render_scene(size, cap.texture, omit_pin=int(rng.integers(len(_PADS)))))
        else:
            bad = cap.apply(_LAYER_DEFECTS[defect](clean, rng, s))
        changed = np.any(bad != good, axis=2)
        frac = float(changed.mean())
        if frac > 0.0:
            best = (bad, changed.astype(np.uint8) * 255)
            if _AREA_RANGE[0] <= frac <= _AREA_RANGE[1]:
                break
    if best is None:  # pragma: no cover - defensive, every defect kind changes pixels
        raise RuntimeError(f"could not render a visible {defect!r} defect at image_size={size}")
    return best


# ------------------------------------------------------------------------------------------------ writing


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    img = rgb_or_gray[..., ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:  # pragma: no cover
        raise OSError(f"PNG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _args_record(
    category: str, n_train: int, n_test_good: int, n_test_per_defect: int, image_size: int, seed: int
) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "generator": __name__,
        "category": category,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_per_defect": n_test_per_defect,
        "image_size": image_size,
        "seed": seed,
        "defect_types": list(DEFECT_TYPES),
    }


def _validate(
    category: str, n_train: int, n_test_good: int, n_test_per_defect: int, image_size: int, seed: int
) -> None:
    if not category or category in (".", "..") or category.startswith(".") or any(c in category for c in "/\\"):
        raise ValueError(f"category must be a plain directory name, got {category!r}")
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_test_good", n_test_good, 0),
        ("n_test_per_defect", n_test_per_defect, 0),
        ("image_size", image_size, _MIN_SIZE),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _readme(rec: dict[str, Any]) -> str:
    return (
        "aoi_lightning synthetic AOI data set (MVTec AD layout)\n"
        "======================================================\n\n"
        "Procedurally generated by aoi_lightning.data.synthetic; deterministic for a given set of arguments.\n"
        "Scene: a dark chip body with ten metallic leads on tinned pads, printed marking, on a green board with\n"
        "copper traces, fiducials and silkscreen. Good images vary by a few pixels of position, < 0.5 deg\n"
        "rotation, +-5% brightness, low-frequency shading, board texture and sensor noise.\n\n"
        f"Defect types: {', '.join(DEFECT_TYPES)}\n"
        "  scratch        thin bright line across the chip body\n"
        "  missing_pad    one lead and its pad absent (bare board)\n"
        "  contamination  coloured speck / blob on the board or part\n"
        "  crack          jagged dark polyline running into the body from an edge\n\n"
        "ground_truth/<defect>/NNN_mask.png (uint8 0/255) marks exactly the pixels that differ from the same\n"
        "image rendered without the defect.\n\n"
        f"Arguments: {json.dumps(rec, sort_keys=True)}\n"
    )


def _read_marker(category_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((category_dir / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _build_tree(dst: Path, rec: dict[str, Any]) -> None:
    size, seed, digits = rec["image_size"], rec["seed"], 3
    train, test, gt = dst / "train" / "good", dst / "test", dst / "ground_truth"
    train.mkdir(parents=True)
    (test / "good").mkdir(parents=True)
    for i in range(rec["n_train"]):
        _write_png(train / f"{i:0{digits}d}.png", _render_good(_rng(seed, _SPLIT_CODES["train"], i), size))
    for i in range(rec["n_test_good"]):
        _write_png(test / "good" / f"{i:0{digits}d}.png", _render_good(_rng(seed, _SPLIT_CODES["test_good"], i), size))
    for d, defect in enumerate(DEFECT_TYPES):
        (test / defect).mkdir()
        (gt / defect).mkdir(parents=True)
        for i in range(rec["n_test_per_defect"]):
            img, mask = _render_defect(_rng(seed, 10 + d, i), size, defect)
            _write_png(test / defect / f"{i:0{digits}d}.png", img)
            _write_png(gt / defect / f"{i:0{digits}d}_mask.png", mask)
    (dst / "README.txt").write_text(_readme(rec), encoding="utf-8")
    (dst / _MARKER).write_text(json.dumps(rec, sort_keys=True) + "\n", encoding="utf-8")  # last


def _install(tmp: Path, final: Path, rec: dict[str, Any]) -> None:
    """Atomically move the finished ``tmp`` tree to ``final``; if another process won the race, keep theirs."""
    for _ in range(20):
        try:
            os.rename(tmp, final)  # atomic; fails if ``final`` exists and is non-empty
            return
        except FileNotFoundError:
            if not tmp.exists():
                raise
            continue
        except OSError:
            if not final.exists():
                continue
        if _read_marker(final) == rec:  # an identical tree is already in place (race winner)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(final, trash)  # move the stale/incomplete tree aside, then retry
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(f"could not install synthetic data set at {final}")


def generate_synthetic_mvtec(
    root: str | os.PathLike[str],
    category: str = DEFAULT_CATEGORY,
    n_train: int = 60,
    n_test_good: int = 16,
    n_test_per_defect: int = 6,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Generate the synthetic data set in MVTec AD layout under ``<root>/<category>``.

    The tree is built in a temporary directory beside the target and renamed into place, with the
    ``.complete`` marker (JSON of the arguments) written last; an existing tree is replaced.

    Args:
        root: Data set root (the directory that holds category folders).
        category: Category folder name.
        n_train: Number of good training images.
        n_test_good: Number of good test images.
        n_test_per_defect: Number of test images per entry of ``DEFECT_TYPES``.
        image_size: Side length of the square RGB images (>= 64).
        seed: Seed of the numpy ``Generator``s; same arguments give byte-identical files.

    Returns:
        ``root`` as a ``Path``.
    """
    _validate(category, n_train, n_test_good, n_test_per_defect, image_size, seed)
    rec = _args_record(category, int(n_train), int(n_test_good), int(n_test_per_defect), int(image_size), int(seed))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{category}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _build_tree(tmp, rec)
        _install(tmp, root / category, rec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_synthetic(
    root: str | os.PathLike[str] | None = None, category: str = DEFAULT_CATEGORY, **kwargs: Any
) -> Path:
    """Return a root holding the synthetic data set, generating it only if missing or built with other args.

    Args:
        root: Data set root; ``None`` means ``default_cache_dir() / "synthetic_v1"``.
        category: Category folder name.
        **kwargs: Further arguments of :func:`generate_synthetic_mvtec` (``n_train``, ``image_size``, ...).

    Returns:
        The data set root as a ``Path``.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(generate_synthetic_mvtec).parameters.items()
        if name not in ("root", "category")
    }
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    params = {**defaults, **kwargs}
    _validate(category, **params)
    root = Path(root) if root is not None else default_cache_dir() / _CACHE_SUBDIR
    rec = _args_record(category, **{k: int(v) for k, v in params.items()})
    if _read_marker(root / category) == rec:
        return root
    return generate_synthetic_mvtec(root, category, **params)
