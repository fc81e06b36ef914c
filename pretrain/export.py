"""Consolidated weights of a checkpoint, offline: any ZeRO stage, any number of ranks, no GPU, no process group.

ZeRO 1-3 partition the fp32 master weights over the ranks (stage 3 the module's parameters too); DeepSpeed's own
``zero_to_fp32`` reassembles them from the ``*_optim_states.pt`` files. A stage 0 checkpoint keeps the whole module
in ``mp_rank_00_model_states.pt``. The EMA weights are our own ``ema.pt``. The result is written as safetensors (no
pickle, loads anywhere) with the model's name and config, so :func:`pretrain.models.create_model` rebuilds the model
from the file alone.

DeepSpeed's files are pickles. A checkpoint is verified against its COMPLETE marker (sha256 of every file) first,
and every ``torch.load`` of the conversion runs with ``weights_only`` forced on (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``),
so an export never runs code from a file: a checkpoint that needs more than tensors and plain data is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import (
    COMPLETE_MARKER,
    find_resume_checkpoint,
    load_plain,
    read_meta,
    unusable_checkpoints,
    verify_checkpoint,
)
from pretrain.config import read_yaml_mapping
from pretrain.models._registry import EXPORT_FORMAT
from pretrain.rundir import CHECKPOINTS, CONFIG_YAML

__all__ = [
    "EMA_FILE",
    "ExportError",
    "checkpoint_source",
    "consolidated_state_dict",
    "export_weights",
    "load_pretrained",
    "resolve_checkpoint",
]

logger = logging.getLogger(__name__)

EMA_FILE = "ema.pt"
"""The EMA weights in a checkpoint, written by the trainer (ours: tensors only, loaded with ``weights_only=True``)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """The path is not a usable checkpoint or run directory; the message says why."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names, verified (sha256): a checkpoint itself, or a run directory's newest usable one.

    Raises:
        ExportError: Neither a checkpoint nor a run directory, no usable checkpoint (each one's reason listed), or
            the named checkpoint fails verification (the reason).
    """
    path = Path(path)
    if (path / COMPLETE_MARKER).exists() or (path.is_dir() and path.parent.name == CHECKPOINTS):
        ok, reason = verify_checkpoint(path)
        if not ok:
            raise ExportError(f"checkpoint {path} failed verification: {reason}")
        return path
    if (path / CHECKPOINTS).is_dir():
        tag = find_resume_checkpoint(path / CHECKPOINTS, digests=True)
        if tag is None:
            why = "; ".join(f"{t}: {r}" for t, r in unusable_checkpoints(path / CHECKPOINTS)) or "none saved"
            raise ExportError(f"run directory {path} has no usable checkpoint ({why})")
        return tag
    raise ExportError(f"{path} is neither a checkpoint nor a run directory (no {COMPLETE_MARKER}, no {CHECKPOINTS}/)")


def _deepspeed_plain_types() -> list[Any]:
    """DeepSpeed's plain record types inside its ZeRO files (the loss scaler, the stage enum, fragment addresses):
    allowed in a ``weights_only`` load, where they are rebuilt from their fields without calling anything else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads(allowed: list[Any] | None = None) -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's included, loads tensors, plain data and the ``allowed`` types only."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed or []):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def consolidated_state_dict(tag_dir: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a (verified) checkpoint: the EMA weights with ``ema``, else the trained ones.

    Raises:
        ExportError: ``ema`` without an ``ema.pt``, or files that do not load as weights.
    """
    tag_dir = Path(tag_dir)
    if ema:
        if not (tag_dir / EMA_FILE).is_file():
            raise ExportError(f"{tag_dir} has no {EMA_FILE} (the run had trainer.ema_decay=0)")
        state = load_plain(tag_dir / EMA_FILE)["module"]
    elif any(tag_dir.glob("*_optim_states.pt")):  # ZeRO 1-3: fp32 master partitions, one file per rank
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # zero_to_fp32 prints its progress
        try:
            with _weights_only_loads(_deepspeed_plain_types()), contextlib.redirect_stdout(chatter):
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as e:
            raise ExportError(f"could not consolidate the ZeRO partitions of {tag_dir}: {type(e).__name__}: {e}") from e
        logger.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    else:  # stage 0: the engine saved the whole module
        try:
            with _weights_only_loads():
                state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            state = state["module"]
        except Exception as e:
            raise ExportError(f"could not read the model of {tag_dir}: {type(e).__name__}: {e}") from e
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def _run_config(tag_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` ({} when the checkpoint is not inside its run directory)."""
    config_yaml = tag_dir.parent.parent / CONFIG_YAML
    return read_yaml_mapping(config_yaml) if tag_dir.parent.name == CHECKPOINTS and config_yaml.is_file() else {}


def _model_config(tag_dir: Path) -> dict[str, Any]:
    """The run's ``model`` section: the checkpoint's ``meta.json``, else the run directory's ``config.yaml``."""
    cfg = read_meta(tag_dir).get("model_config") or _run_config(tag_dir).get("model")
    if not cfg:
        raise ExportError(f"{tag_dir} has no model config (no model_config in meta.json, no run config.yaml)")
    return dict(cfg)


def checkpoint_source(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an export, a checkpoint or a run directory (its newest usable checkpoint).

    Returns:
        ``(state_dict, meta)``: ``meta["model_config"]`` is the run's ``model`` section, ``meta["augment"]`` its
        ``augment`` section when known ({} otherwise), ``meta["step"]`` and ``meta["source"]`` as in an export.
    """
    from pretrain.models import read_pretrained

    p = Path(path)
    if p.is_file():
        if ema:
            raise ExportError(f"{p} is an export: --ema applies to checkpoints (export them with --ema)")
        state, meta = read_pretrained(p)
        meta["augment"] = json.loads(meta.get("augment") or "{}")
        return state, meta
    tag_dir = resolve_checkpoint(p)
    meta = read_meta(tag_dir)
    info = {
        "model_config": _model_config(tag_dir),
        "augment": _run_config(tag_dir).get("augment") or {},
        "step": str(meta.get("step", "")),
        "ema": "true" if ema else "false",
        "source": str(tag_dir.resolve()),
    }
    return consolidated_state_dict(tag_dir, ema=ema), info


def load_pretrained(path: str | Path, name: str | None = None, ema: bool = False, **overrides: Any) -> torch.nn.Module:
    """The model of an export, a checkpoint or a run directory, built with ``overrides`` (see
    :func:`pretrain.models._registry.model_from_state`: another head size or input size is adapted or refused)."""
    from pretrain.models._registry import model_from_state

    state, meta = checkpoint_source(path, ema=ema)
    return model_from_state(state, meta["model_config"], name=name, **overrides)


def export_weights(path: str | Path, out: str | Path, ema: bool = False, dtype: str = "fp32") -> dict[str, str]:
    """Write the consolidated weights of ``path`` (checkpoint or run directory) to ``out`` (safetensors).

    Args:
        path: A checkpoint, or a run directory (its newest usable checkpoint).
        out: The ``.safetensors`` file to write (replaced atomically).
        ema: Export the EMA weights instead of the trained ones.
        dtype: ``fp32`` or ``bf16`` for the floating-point tensors.

    Returns:
        The metadata written: ``format``, ``model_name``, ``model_config`` (JSON), ``step``, ``ema``, ``dtype``,
        ``source``, ``zero_stage``, ``world_size``, ``metrics`` (JSON, the eval at save time), ``augment`` (JSON,
        the run's ``augment`` section, whose eval transform ``pretrain eval`` reuses; {} when unknown).

    Raises:
        ExportError: A bad path or checkpoint (the reason), or an unknown ``dtype``.
    """
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    tag_dir = resolve_checkpoint(path)
    model_cfg = _model_config(tag_dir)
    state = consolidated_state_dict(tag_dir, ema=ema)
    state = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    meta = read_meta(tag_dir)
    metadata = {
        "format": EXPORT_FORMAT,
        "model_name": str(model_cfg.get("name")),
        "model_config": json.dumps(model_cfg, sort_keys=True),
        "step": str(meta.get("step", "")),
        "ema": "true" if ema else "false",
        "dtype": dtype,
        "source": str(tag_dir.resolve()),
        "zero_stage": str(meta.get("zero_stage", "")),
        "world_size": str(meta.get("world_size", "")),
        "metrics": json.dumps(meta.get("metrics") or {}, sort_keys=True),
        "augment": json.dumps(_run_config(tag_dir).get("augment") or {}, sort_keys=True),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    logger.info("exported %s (step %s%s) to %s", tag_dir, metadata["step"], ", EMA" if ema else "", out)
    return metadata
