"""Lightning callbacks of AOI Anomaly Inspector, installed as `aoi_lightning.callbacks`."""

from aoi_lightning.callbacks.threshold_tuning import ThresholdTuning

__all__ = ["ThresholdTuning"]
