"""AOI Anomaly Inspector: PaDiM and PatchCore for automated optical inspection."""

__version__ = "0.1.0"
