"""Inference back ends (torch, ONNX Runtime) and the folder runner shared by `aoi run` and later entry points."""
