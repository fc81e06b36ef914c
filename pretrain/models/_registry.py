"""The one registry of model variants: ``@register_model`` on a factory, ``create_model(name, **overrides)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn

__all__ = ["create_model", "list_models", "register_model", "model_entrypoint"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant factory under its function name (e.g. ``sepvit_tiny``)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model '{name}' registered twice")
    _MODELS[name] = fn
    return fn


def list_models(prefix: str = "") -> list[str]:
    """Sorted names of the registered variants, optionally only those starting with ``prefix``."""
    return sorted(n for n in _MODELS if n.startswith(prefix))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **overrides) -> nn.Module:
    """Build variant ``name``; ``overrides`` replace the variant's defaults (unknown ones raise ``ValueError``)."""
    fn = model_entrypoint(name)
    return fn(**overrides)


def factory_parameters(name: str) -> list[str]:
    return list(inspect.signature(model_entrypoint(name)).parameters)
