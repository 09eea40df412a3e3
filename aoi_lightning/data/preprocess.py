"""What the model expects of its input, and the one function that makes it from an image file (numpy + OpenCV).

Every path from an image file to a model input goes through `Preprocessing`: the data module's dataset, `aoi run`
(torch and ONNX back ends), the report's overlays and the ONNX consistency check. A fitted model carries its
`Preprocessing` (checkpoint key `aoi.preprocessing`, `export_meta.json` key `preprocessing`), so inference
reproduces what the model was fitted on, bit for bit.

The steps, in order:

1. decode (`image_io.read_image_with_size`): any supported format, mode and bit depth -> RGB uint8 (h, w, 3);
2. resize to `image_size` (H, W), by the `resize` mode:

   - `stretch` (default): the image is scaled to exactly H x W and its aspect ratio is **not** kept. Pick an
     (H, W) with the aspect ratio of your parts (e.g. [256, 384] for 2:3 images) to avoid distortion.
   - `fit_pad`: the aspect ratio is kept. The image is scaled by s = min(H / h, W / w) to (round(h s), round(w s)),
     centred, and the rest of H x W is padded by repeating the image's edge pixels outwards (OpenCV
     `BORDER_REPLICATE`; masks are padded with 0). This is for inputs whose aspect ratio varies or differs
     from (H, W). The part of the model input that holds the image is its *content box*
     (`Preprocessing.content_box`). Anomaly maps are cropped to that box before defects are located and mapped
     back to the original image (`postprocess.prediction`), pixel metrics count only its pixels, and the image
     score is the map's maximum over it (`postprocess.prediction.content_score`). Training images are padded
     the same way, so the model learns the padding as normal. Repeating the edge continues the image's own
     border (mostly background) into the padding, instead of drawing a black frame at a place that moves with
     the aspect ratio. On varied crops of transistor that raised PaDiM's image AUROC from 0.785 (black) to
     0.938 (docs/choosing.md).

   Interpolation `area_linear`: OpenCV `INTER_AREA` when neither side grows, else `INTER_LINEAR`;
3. (H, W, 3) -> (3, H, W) float32 by dividing the uint8 values by 255: RGB in [0, 1];
4. normalisation with `mean`/`std` happens **inside the model** (and the ONNX graph): they are recorded here as a
   fact of the model, never applied by this module.

Masks are resized with the same geometry and nearest-neighbour interpolation (they stay binary); with `fit_pad` a
mask whose size differs from its image's is first stretched onto the image, then padded like it.

Torch-free: importable where only numpy, OpenCV and onnxruntime are installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np

from aoi_lightning.data.image_io import ImageReadError, read_image_with_size, resize_image, resize_mask

#: Interpolations of the resize step (`Preprocessing.interpolation`) and what they mean.
INTERPOLATIONS = {"area_linear": "cv2.INTER_AREA when neither side grows, else cv2.INTER_LINEAR"}
#: Resize modes (`Preprocessing.resize`) and what they do.
RESIZE_DESCRIPTIONS = {
    "stretch": "stretch to image_size (aspect ratio not kept)",
    "fit_pad": "scale to fit inside image_size keeping the aspect ratio, centre, pad by repeating the edge pixels",
}
RESIZE_MODES = tuple(RESIZE_DESCRIPTIONS)
#: Value of the padding of masks with `fit_pad` (images repeat their edge pixels instead).
MASK_PAD_VALUE = 0
#: Where the normalisation with mean/std happens (`Preprocessing.normalization`).
NORMALIZATION_PLACES = ("in_model",)
#: Largest value of the decoded uint8 image: the model input is value / PIXEL_SCALE, in [0, 1].
PIXEL_SCALE = 255.0


def content_box(
    image_size: tuple[int, int], original_size: Sequence[int], resize: str = "stretch"
) -> tuple[int, int, int, int]:
    """Where an image of `original_size` (h, w) lies in a model input of `image_size` (H, W) under `resize`:
    (top, left, height, width), model pixels.

    `stretch`: the whole input, (0, 0, H, W). `fit_pad`: the centred box of the image scaled by
    s = min(H / h, W / w), each side round(side x s), clamped to [1, H] or [1, W]. An unknown size (a side of 0,
    e.g. an unreadable image) gives the whole input.
    """
    big_h, big_w = image_size
    h, w = (int(v) for v in original_size)
    if resize == "stretch" or h <= 0 or w <= 0:
        return 0, 0, big_h, big_w
    s = min(big_h / h, big_w / w)
    box_h = min(big_h, max(1, round(h * s)))
    box_w = min(big_w, max(1, round(w * s)))
    return (big_h - box_h) // 2, (big_w - box_w) // 2, box_h, box_w


def crop_box(plane, box: Sequence[int]):
    """`plane` (..., H, W), a numpy array or torch tensor, cut to `box` (top, left, height, width)."""
    top, left, h, w = (int(v) for v in box)
    return plane[..., top : top + h, left : left + w]


class PreprocessingError(ValueError):
    """A preprocessing description that cannot be used (bad size, unknown value or key); one line for the user."""


def image_size_hw(value: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) of an image size given as one side (square) or as [h, w].

    Raises:
        PreprocessingError: not one or two positive integers.
    """
    if isinstance(value, (bool, str, bytes)):
        raise PreprocessingError(f"image_size must be an integer or [h, w], got {value!r}")
    if isinstance(value, (int, np.integer)):
        value = (value, value)
    try:
        h, w = value
        size = (int(h), int(w))
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"image_size must be an integer or [h, w], got {value!r}") from exc
    if any(isinstance(v, bool) or int(v) != v for v in (h, w)) or min(size) < 1:
        raise PreprocessingError(f"image_size must be positive integers [h, w], got {[h, w]}")
    return size


def _channel_values(name: str, value) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"preprocessing {name} must be three numbers (R, G, B), got {value!r}") from exc
    if len(out) != 3 or not all(np.isfinite(out)):
        raise PreprocessingError(f"preprocessing {name} must be three finite numbers (R, G, B), got {value!r}")
    if name == "std" and min(out) <= 0:
        raise PreprocessingError(f"preprocessing std must be positive, got {list(out)}")
    return out


@dataclass
class LoadedImage:
    """One decoded input file.

    Attributes:
        path: the file.
        original_size: (h, w) of the full-size image (0, 0 on error).
        original: the decoded RGB uint8 (h', w', 3) image when asked for (smaller than `original_size` for images
            over `image_io.MAX_PIXELS`, which are decoded reduced), else None.
        model_input: (3, H, W) float32 in [0, 1], None on error.
        error: "" or the one-line reason the file could not be read.
    """

    path: Path
    original_size: tuple[int, int] = (0, 0)
    original: np.ndarray | None = None
    model_input: np.ndarray | None = None
    error: str = ""


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects as input and how an image becomes it (see the module docstring for the steps).

    Attributes:
        image_size: (H, W) of the model input, in pixels.
        interpolation: resize interpolation, a key of `INTERPOLATIONS` (`area_linear`).
        mean: per-channel (R, G, B) mean the model subtracts inside its forward pass (None: not recorded).
        std: per-channel (R, G, B) standard deviation the model divides by inside (None: not recorded).
        resize: `stretch`: resized to exactly (H, W), the aspect ratio is not kept; `fit_pad`: aspect ratio kept,
            centred in (H, W) and padded by repeating its edge pixels (see the module docstring and `content_box`).
        channels: channel order of the input, `RGB`.
        scale: the uint8 values are divided by this (255.0), giving float32 in [0, 1].
        normalization: `in_model`: mean/std are applied by the model (and the ONNX graph), not by the caller.

    Raises:
        PreprocessingError: on construction with a bad size or an unknown value.
    """

    image_size: tuple[int, int]
    interpolation: str = "area_linear"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str = "stretch"
    channels: str = "RGB"
    scale: float = PIXEL_SCALE
    normalization: str = "in_model"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "image_size", image_size_hw(self.image_size))
        set_(self, "mean", _channel_values("mean", self.mean))
        set_(self, "std", _channel_values("std", self.std))
        if (self.mean is None) != (self.std is None):
            raise PreprocessingError("preprocessing mean and std are given together or not at all")
        for name, allowed in (
            ("interpolation", tuple(INTERPOLATIONS)),
            ("resize", RESIZE_MODES),
            ("channels", ("RGB",)),
            ("normalization", NORMALIZATION_PLACES),
        ):
            if getattr(self, name) not in allowed:
                raise PreprocessingError(
                    f"preprocessing {name} {getattr(self, name)!r} is not supported (supported: {', '.join(allowed)})"
                )
        if float(self.scale) != PIXEL_SCALE:
            raise PreprocessingError(f"preprocessing scale must be {PIXEL_SCALE:g} (uint8 -> [0, 1]), got {self.scale}")
        set_(self, "scale", PIXEL_SCALE)

    # -- construction and serialisation ----------------------------------------------------------------------
    @classmethod
    def from_image_size(
        cls,
        image_size: int | Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize: str = "stretch",
    ) -> Preprocessing:
        """The preprocessing at `image_size` (one side for a square, or [h, w]), `stretch` unless told."""
        return cls(image_size_hw(image_size), mean=mean, std=std, resize=resize)

    def with_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> Preprocessing:
        """A copy that records the model's in-graph normalisation."""
        return replace(self, mean=mean, std=std)

    def to_dict(self) -> dict:
        """Plain JSON / `torch.load(weights_only=True)` friendly dict; `from_dict` reads it back equal."""
        return {
            "image_size": list(self.image_size),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "channels": self.channels,
            "scale": self.scale,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "normalization": self.normalization,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Preprocessing:
        """The inverse of `to_dict`; absent keys take their defaults, `image_size` is required.

        Raises:
            PreprocessingError: not a mapping, no image_size, an unknown key (written by a newer version) or value.
        """
        if not isinstance(data, Mapping):
            raise PreprocessingError(f"preprocessing must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PreprocessingError(
                f"unknown preprocessing key {unknown[0]!r} (known: {', '.join(sorted(known))}); written by a newer "
                "version of aoi-lightning?"
            )
        if "image_size" not in data:
            raise PreprocessingError("preprocessing has no image_size")
        return cls(**{k: v for k, v in data.items()})

    # -- images ----------------------------------------------------------------------------------------------
    def content_box(self, original_size: Sequence[int]) -> tuple[int, int, int, int]:
        """Where an image of `original_size` lies in the model input (the module function `content_box`)."""
        return content_box(self.image_size, original_size, self.resize)

    def _place(self, resized: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """`resized` (box_h, box_w, C) image or (box_h, box_w) mask placed at `box` in `image_size`: an image padded
        by repeating its edge pixels (`cv2.BORDER_REPLICATE`), a mask with MASK_PAD_VALUE."""
        top, left, box_h, box_w = box
        big_h, big_w = self.image_size
        if resized.ndim == 3:
            bottom, right = big_h - top - box_h, big_w - left - box_w
            return cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_REPLICATE)
        canvas = np.full(self.image_size, MASK_PAD_VALUE, dtype=resized.dtype)
        canvas[top : top + box_h, left : left + box_w] = resized
        return canvas

    def resize_image(self, image: np.ndarray, original_size: Sequence[int] | None = None) -> np.ndarray:
        """(h, w, C) uint8 -> (H, W, C) uint8 by the `resize` mode (`image_io.resize_image` does the scaling).

        Args:
            image: the decoded image.
            original_size: (h, w) of the full-size image when `image` is its reduced decoding (`fit_pad` places it
                in the box of the full size, as `content_box` gives it to the postprocessing); default its shape.
        """
        if self.resize == "stretch":
            return resize_image(image, self.image_size)
        box = self.content_box(image.shape[:2] if original_size is None else original_size)
        return self._place(resize_image(image, box[2:]), box)

    def to_model_input(self, image: np.ndarray, original_size: Sequence[int] | None = None) -> np.ndarray:
        """Decoded RGB uint8 image (h, w, 3) -> model input (3, H, W) float32 in [0, 1] (not normalised);
        `original_size` as in `resize_image`.

        Raises:
            ValueError: not a uint8 (h, w, 3) array.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"expected an RGB uint8 image (h, w, 3), got {desc}")
        small = self.resize_image(image, original_size)
        return np.ascontiguousarray(small.transpose(2, 0, 1)).astype(np.float32) / np.float32(self.scale)

    def resize_mask(self, mask: np.ndarray, original_size: Sequence[int] | None = None) -> np.ndarray:
        """Binary mask (h, w) uint8 -> (H, W) uint8, the geometry of its image, nearest neighbour.

        Args:
            mask: the decoded mask.
            original_size: (h, w) of its image; with `fit_pad` a mask of another size is first stretched onto
                the image (default: the mask's own size).
        """
        if self.resize == "stretch":
            return resize_mask(mask, self.image_size)
        if original_size is not None:
            mask = resize_mask(mask, (int(original_size[0]), int(original_size[1])))  # as is when already that size
        box = self.content_box(mask.shape[:2])
        return self._place(resize_mask(mask, box[2:]), box)

    def load(self, path: str | Path, keep_original: bool = False) -> LoadedImage:
        """Decode an image file and make its model input; an unreadable file gives `error`, never an exception.

        Args:
            path: image file (PNG, JPEG, BMP, TIFF, WebP; any mode and bit depth).
            keep_original: also return the decoded RGB image (for overlays at the original size).
        """
        path = Path(path)
        try:
            image, original_size = read_image_with_size(path)
        except ImageReadError as exc:
            return LoadedImage(path, error=str(exc))
        model_input = self.to_model_input(image, original_size)
        return LoadedImage(path, original_size, image if keep_original else None, model_input)

    def blank_input(self) -> np.ndarray:
        """Zeros (3, H, W) float32: the placeholder input of an unreadable image in a batch."""
        return np.zeros((3, *self.image_size), dtype=np.float32)


def as_preprocessing(value: Preprocessing | int | Sequence[int]) -> Preprocessing:
    """A `Preprocessing` as is, or the default (`stretch`) one at an image size (one side, or [h, w])."""
    return value if isinstance(value, Preprocessing) else Preprocessing.from_image_size(value)
