"""Inference with the torch model of a run directory (`weights/model.ckpt`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aoi_lightning.data.preprocess import Preprocessing
from aoi_lightning.postprocess.prediction import ModelFacts, module_facts


class TorchPredictor:
    """Predictor over the torch model of a run directory (`weights/model.ckpt`)."""

    def __init__(
        self, model, facts: ModelFacts, run_id: str, device: str = "cpu", preprocessing: Preprocessing | None = None
    ) -> None:
        self.model = model.eval()
        #: How the input images are made (the checkpoint's); default: the default one at `facts.input_size`.
        self.preprocessing = preprocessing or Preprocessing.from_image_size(facts.input_size)
        if self.preprocessing.image_size != tuple(facts.input_size):
            raise ValueError(f"preprocessing size {self.preprocessing.image_size} != input size {facts.input_size}")
        if str(device).startswith("cuda"):
            from aoi_lightning.models.components.base import exact_cuda_math

            exact_cuda_math()
        self.facts = facts
        self.run_id = run_id
        self.device = device

    @classmethod
    def from_run(cls, model_dir: str | Path, device: str = "cpu") -> TorchPredictor:
        """Load a trained run; errors clearly when it has no checkpoint or no thresholds."""
        from aoi_lightning.rundir.loading import load_run_model

        module, info = load_run_model(model_dir, device=device, require_thresholds=True)
        # the model name is the checkpoint's (config.yaml's class_path may be edited or unknown)
        facts = module_facts(module, info.category, module.preprocessing.image_size)
        return cls(module.model, facts, info.run.path.name, device, module.preprocessing)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
            scores = out.pred_score.float().cpu().numpy()
            maps = out.anomaly_map.float().cpu().numpy()[:, 0]
        return scores, maps


def resolve_device(device: str) -> str:
    """`cpu`, `cuda` or `auto` (cuda when available) -> a torch device name; errors when cuda is missing."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return device
