"""vitpretrain: distributed pretraining of SeTformer and SepViT."""

__all__ = ["__version__"]
__version__ = "0.1.0"
