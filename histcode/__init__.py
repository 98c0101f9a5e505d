"""HistCode: contrastive computational histopathology as a feature store and ML-ops platform."""

__version__ = "0.1.0"
