"""Single-device model code: SepViT and SeTformer, one registry. Imports neither deepspeed nor torch.distributed."""

from . import sepvit, setformer  # noqa: F401  (registers the variants)
from .registry import create_model, list_models, read_pretrained, register_model

__all__ = ["create_model", "list_models", "read_pretrained", "register_model"]
