"""Lightning callbacks of AOI Anomaly Inspector, installed as `aoi_lightning.callbacks`."""

from aoi_lightning.callbacks.onnx_consistency import OnnxConsistencyCheck
from aoi_lightning.callbacks.onnx_export import OnnxExport
from aoi_lightning.callbacks.prediction_writer import PredictionWriter
from aoi_lightning.callbacks.report_writer import HtmlReport
from aoi_lightning.callbacks.threshold_tuning import ThresholdTuning

__all__ = ["HtmlReport", "OnnxConsistencyCheck", "OnnxExport", "PredictionWriter", "ThresholdTuning"]
