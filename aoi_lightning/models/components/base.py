"""What PaDiM and PatchCore torch models share: the inference output, threshold buffers, map post-processing."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from aoi_lightning.models.components.blur import GaussianBlur


class InferenceOutput(NamedTuple):
    """Model output; the field names are the ONNX output names.

    Attributes:
        pred_score: (B,) image anomaly score.
        anomaly_map: (B, 1, H, W) pixel anomaly map at the input resolution.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor


def exact_cuda_math() -> None:
    """Turn off TF32 in cuDNN convolutions and CUDA matmuls (on by default for convolutions), so that scores on
    a GPU match CPU and ONNX results to float32 precision and thresholds tuned on one device hold on another."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class NotFittedError(RuntimeError):
    """The model was used before `fit`."""


class AnomalyTorchModel(nn.Module):
    """Base class: thresholds as buffers (they travel in checkpoints and exports), a fitted flag, map smoothing.

    Subclasses implement `update`, `finalize` and `_forward_fitted`, and name their data-dependent buffers in
    `dynamic_buffers` so that checkpoints of any fitted size load.
    """

    dynamic_buffers: tuple[str, ...] = ()

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.blur = GaussianBlur(sigma)
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    @property
    def has_thresholds(self) -> bool:
        return bool(torch.isfinite(self.image_threshold)) and bool(torch.isfinite(self.pixel_threshold))

    def set_thresholds(self, image_threshold: float, pixel_threshold: float) -> None:
        self.image_threshold.fill_(float(image_threshold))
        self.pixel_threshold.fill_(float(pixel_threshold))

    def smooth_map(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) patch scores -> (B, 1, H, W) map: bilinear upsampling then Gaussian smoothing."""
        maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return self.blur(maps)

    def forward(self, images: torch.Tensor) -> InferenceOutput:
        """Images (B, 3, H, W) in [0, 1] -> InferenceOutput."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not self.is_fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted: run `aoi fit` (or call update/finalize) first")
        return self._forward_fitted(images)

    def _forward_fitted(self, images: torch.Tensor) -> InferenceOutput:
        raise NotImplementedError

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Fitted buffers have data-dependent shapes: take the checkpoint's shapes before the copy.
        for name in self.dynamic_buffers:
            key = prefix + name
            buf = self.get_buffer(name)
            if key in state_dict and tuple(state_dict[key].shape) != tuple(buf.shape):
                owner, _, attr = name.rpartition(".")
                module = self.get_submodule(owner) if owner else self
                setattr(module, attr, torch.empty_like(state_dict[key], device=buf.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
