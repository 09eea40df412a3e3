"""The `aoi` commands, one module each; `aoi_lightning.cli` dispatches to them."""
