"""The one registry of model variants: ``@register_model`` on a factory, ``create_model(name, **overrides)``.

``create_model(name_or_file, pretrained=FILE, ...)`` also builds a model from exported weights (``pretrain export``):
a safetensors file whose metadata holds the variant's name and its ``model`` config. Only torch and safetensors are
used, so a model trained with DeepSpeed loads in any PyTorch program. Overrides that change the head
(``num_classes``) re-initialise it; a new ``img_size`` goes through the family's own rules (the ``pretrained_kwargs``
and ``adapt_pretrained`` its module registers with its variants as a :class:`ModelFamily`), which adapt what is well
defined and raise ``ValueError`` naming the part that is not.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "EXPORT_FORMAT",
    "ModelFamily",
    "create_model",
    "list_models",
    "model_entrypoint",
    "model_from_state",
    "on_meta_device",
    "read_pretrained",
    "register_model",
]

EXPORT_FORMAT = "vitpretrain-export-1"
"""``format`` key of an export's metadata; a file without it was not written by ``pretrain export``."""

_HEAD_PREFIX = "head."  # both families name their classifier ``head``


@dataclass(frozen=True)
class ModelFamily:
    """Variants that share a module and its rules for weights trained at another image size.

    Attributes:
        name: The family's name (``sepvit``, ``setformer``).
        pretrained_kwargs: ``(source, kwargs) -> kwargs``: the build's keyword arguments for a new ``img_size``.
        adapt_pretrained: ``(model, state, source) -> state``: the source's weights fitted to ``model``.
    """

    name: str
    pretrained_kwargs: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    adapt_pretrained: Callable[[nn.Module, dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]] | None = (
        None
    )

    def register(self, fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        """Decorator: register ``fn`` as a variant of this family (see :func:`register_model`)."""
        return register_model(fn, family=self)


_MODELS: dict[str, tuple[Callable[..., nn.Module], ModelFamily | None]] = {}


class _NoValuesOnMeta(TorchFunctionMode):
    """Skips ``normal_`` on meta tensors: they hold no values to draw. On the meta device torch runs it through a
    Python reference that imports its compiler first (~1 s of CPU), for a model built only for its shapes."""

    _DRAWS = (torch.nn.init.normal_, torch.Tensor.normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._DRAWS:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta_device() -> Iterator[None]:
    """Build models on the meta device: shapes and parameter counts, no memory, no compute, no random draws."""
    with torch.device("meta"), _NoValuesOnMeta():
        yield


def register_model(fn: Callable[..., nn.Module], family: ModelFamily | None = None) -> Callable[..., nn.Module]:
    """Register a variant factory under its function name (e.g. ``sepvit_tiny``), of ``family`` if given."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model '{name}' registered twice")
    _MODELS[name] = (fn, family)
    return fn


def list_models(prefix: str = "") -> list[str]:
    """Sorted names of the registered variants, optionally only those starting with ``prefix``."""
    return sorted(n for n in _MODELS if n.startswith(prefix))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    return _MODELS[name][0]


def read_pretrained(path: str | Path, weights: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an export: ``(state_dict, meta)`` with ``meta["model_config"]`` parsed.

    Args:
        path: A ``.safetensors`` file written by ``pretrain export``.
        weights: False reads the metadata only (the state dict is then empty).

    Raises:
        ValueError: The file is missing, not safetensors, or has no export metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()} if weights else {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from e
    if raw.get("format") != EXPORT_FORMAT or "model_config" not in raw:
        raise ValueError(
            f"{path} has no export metadata (format {raw.get('format')!r}); write it with `pretrain export`"
        )
    meta: dict[str, Any] = dict(raw)
    meta["model_config"] = json.loads(raw["model_config"])
    return state, meta


def model_from_state(
    state: dict[str, torch.Tensor], source: dict[str, Any], name: str | None = None, **overrides: Any
) -> nn.Module:
    """Build the model of ``source`` (a run's ``model`` config) with ``overrides`` and load ``state`` into it.

    Another ``num_classes`` keeps the freshly initialised head of the build (seed torch first for a reproducible one);
    another ``img_size`` goes through its :class:`ModelFamily`'s ``pretrained_kwargs`` and ``adapt_pretrained``.
    Every other weight must fit exactly.

    Raises:
        ValueError: ``name`` differs from the source's, or the family cannot adapt a part (named), or weights are
            missing or left over.
    """
    if name is not None and name != source["name"]:
        raise ValueError(f"the weights are of a {source['name']} model, not {name}")
    fn = model_entrypoint(source["name"])
    family = _MODELS[source["name"]][1] or ModelFamily(source["name"])
    kwargs = {
        "num_classes": source["num_classes"],
        "img_size": source["img_size"],
        "drop_path_rate": source["drop_path_rate"],
        "drop_rate": source["drop_rate"],
        **(source.get("kwargs") or {}),
        **overrides,
    }
    if family.pretrained_kwargs is not None and kwargs["img_size"] != source["img_size"]:
        kwargs = family.pretrained_kwargs(source, kwargs)
    model = fn(**kwargs)
    if family.adapt_pretrained is not None:
        state = family.adapt_pretrained(model, state, source)
    new_head = kwargs["num_classes"] != source["num_classes"]
    if new_head:  # the checkpoint's classifier does not fit: keep the fresh head of the build
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (new_head and k.startswith(_HEAD_PREFIX))]
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit {source['name']} built with {kwargs}: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}"
        )
    return model


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build variant ``name``, or the model of an export.

    Args:
        name: A registered variant, or the path of an export (``.safetensors``), which then is ``pretrained``.
        pretrained: Export to load: the model is built from the file's ``model`` config with ``overrides`` applied
            (another ``num_classes`` gets a freshly initialised head; another ``img_size`` follows the family's
            rule), then the weights are loaded.
        overrides: Replace the variant's defaults (unknown ones raise ``ValueError``).
    """
    if pretrained is None and name not in _MODELS and (str(name).endswith(".safetensors") or Path(name).is_file()):
        name, pretrained = None, name  # type: ignore[assignment]
    if pretrained is not None:
        state, meta = read_pretrained(pretrained)
        if name is not None and name != meta["model_config"]["name"]:
            raise ValueError(f"{pretrained} holds a {meta['model_config']['name']} model, not {name}")
        return model_from_state(state, meta["model_config"], **overrides)
    fn = model_entrypoint(name)
    return fn(**overrides)
