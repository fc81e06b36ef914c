"""Consolidated weights of a checkpoint, offline: any ZeRO stage, any number of ranks, no GPU, no process group.

ZeRO 1-3 partition the fp32 master weights over the ranks (stage 3 the module's parameters too); DeepSpeed's own
``zero_to_fp32`` reassembles them from the ``*_optim_states.pt`` files. A stage 0 checkpoint keeps the whole module
in ``mp_rank_00_model_states.pt``. The EMA weights are our own ``ema.pt``. The result is written as safetensors (no
pickle, loads anywhere) with the model's name and config, so :func:`pretrain.models.create_model` rebuilds the model
from the file alone.

DeepSpeed's files are pickles. A checkpoint is verified against its COMPLETE marker first: the marker must carry this
user's signature (a checkpoint of another user loads only with ``trusted``, ``--trust-checkpoint``; see
:mod:`pretrain.trust`) and every file must match its sha256. Every ``torch.load`` of the conversion runs with
``weights_only`` forced on (:func:`pretrain.checkpoint.plain_loads`), so an export never runs code from a file: a
checkpoint that needs more than tensors and plain data is refused.

Nor is an export's metadata trusted: its ``model`` config is checked as a run's ``model`` section is (types, ranges:
an ``img_size`` of 10**9 is refused before anything is allocated), and the model is first built and loaded on the
meta device, so weights that do not fit the config are named, not found out by an allocation or a traceback. Every
failure is an :class:`ExportError` whose message names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from data_pipeline.config import AugmentConfig, ConfigError
from pretrain.checkpoint import (
    UntrustedCheckpoint,
    check_signature,
    find_resume_checkpoint,
    load_plain,
    plain_loads,
    read_meta,
    untrusted_message,
    unusable_checkpoints,
    verify_checkpoint,
)
from pretrain.config import ModelConfig, build_dataclass
from pretrain.config_ranges import check_ranges
from pretrain.fsutil import unwritable_reason
from pretrain.models.registry import EXPORT_FORMAT
from pretrain.rundir import CHECKPOINTS, COMPLETE_MARKER, CONFIG_YAML, EMA_FILE
from pretrain.yaml_io import read_yaml_mapping

__all__ = [
    "ExportError",
    "build_from_state",
    "check_pretrained",
    "checkpoint_source",
    "consolidated_state_dict",
    "export_weights",
    "load_pretrained",
    "resolve_checkpoint",
    "source_meta",
    "source_weights",
]

logger = logging.getLogger(__name__)

"""The EMA weights in a checkpoint, written by the trainer (ours: tensors only, loaded with ``weights_only=True``)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class ExportError(ValueError):
    """The path is not a usable checkpoint or run directory; the message says why."""


def resolve_checkpoint(path: str | Path, trusted: bool = False, digests: bool = True) -> Path:
    """The checkpoint ``path`` names, verified (signature, sha256): a checkpoint itself, or a run directory's newest
    usable one. ``trusted`` (``--trust-checkpoint``) accepts a checkpoint that is not signed by this user; without
    ``digests`` the files' sizes are checked but not their sha256 (for a caller that reads no weight).

    Raises:
        ExportError: Neither a checkpoint nor a run directory, no usable checkpoint (each one's reason listed), or
            the named checkpoint fails verification (the reason).
        UntrustedCheckpoint: The checkpoint is not signed by this user and not ``trusted`` (the message names
            ``--trust-checkpoint``).
    """
    path = Path(path)
    if (path / COMPLETE_MARKER).exists() or (path.is_dir() and path.parent.name == CHECKPOINTS):
        ok, reason = verify_checkpoint(path, digests=False)
        if ok and not trusted and not (signed := check_signature(path))[0]:
            raise UntrustedCheckpoint(untrusted_message(path, signed[1]))
        ok, reason = verify_checkpoint(path) if ok and digests else (ok, reason)
        if not ok:
            raise ExportError(f"checkpoint {path} failed verification: {reason}")
        return path
    if (path / CHECKPOINTS).is_dir():
        tag = find_resume_checkpoint(path / CHECKPOINTS, digests=digests, trusted=trusted)
        if tag is None:
            why = "; ".join(f"{t}: {r}" for t, r in unusable_checkpoints(path / CHECKPOINTS)) or "none saved"
            raise ExportError(f"run directory {path} has no usable checkpoint ({why})")
        return tag
    raise ExportError(f"{path} is neither a checkpoint nor a run directory (no {COMPLETE_MARKER}, no {CHECKPOINTS}/)")


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
            with plain_loads(), contextlib.redirect_stdout(chatter):
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as e:
            raise ExportError(f"could not consolidate the ZeRO partitions of {tag_dir}: {type(e).__name__}: {e}") from e
        logger.debug("zero_to_fp32: %s", chatter.getvalue().strip())
    else:  # stage 0: the engine saved the whole module
        try:
            with plain_loads():
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
    return _checked_model_config(cfg, tag_dir)


def _checked_model_config(raw: Any, source: str | Path) -> dict[str, Any]:
    """A stored ``model`` section checked as a run config's is (keys, types, ranges), as a plain dict.

    Raises:
        ExportError: Naming ``source`` and the field that is wrong.
    """
    try:
        return dataclasses.asdict(build_dataclass(ModelConfig, raw if isinstance(raw, dict) else {"": raw}, "model"))
    except ConfigError as e:
        raise ExportError(
            f"{source}: its model config is unusable ({e}); export it again with `pretrain export`"
        ) from e


def _checked_augment(raw: Any, source: str | Path) -> dict[str, Any]:
    """A stored ``augment`` section checked as a run config's is ({} stays {}: the defaults, with a warning)."""
    if not raw:
        return {}
    try:
        augment = build_dataclass(AugmentConfig, raw if isinstance(raw, dict) else {"": raw}, "augment")
        check_ranges(augment, "augment")
    except ConfigError as e:
        raise ExportError(f"{source}: its augment section is unusable ({e})") from e
    return dataclasses.asdict(augment)


def _json_field(meta: dict[str, Any], key: str, source: Path) -> Any:
    try:
        return json.loads(meta.get(key) or "{}")
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{source}: its metadata field {key!r} is not valid JSON ({type(e).__name__})") from None


def source_meta(
    path: str | Path, ema: bool = False, trusted: bool = False, digests: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The metadata of an export, a checkpoint or a run directory (its newest usable checkpoint; ``trusted`` and
    ``digests``: see :func:`resolve_checkpoint`), checked, without reading a weight.

    Returns:
        ``(weights, meta)``: ``weights`` is the export file or the verified checkpoint to read with
        :func:`source_weights`; ``meta["model_config"]`` is the run's ``model`` section, ``meta["augment"]`` its
        ``augment`` section when known ({} otherwise), ``meta["step"]`` and ``meta["source"]`` as in an export.
    """
    p = Path(path)
    if p.is_file():
        if ema:
            raise ExportError(f"{p} is an export: --ema applies to checkpoints (export them with --ema)")
        meta = _export_meta(p)
        meta["model_config"] = _checked_model_config(meta["model_config"], p)
        meta["augment"] = _checked_augment(_json_field(meta, "augment", p), p)
        return p, meta
    tag_dir = resolve_checkpoint(p, trusted, digests)
    info = {
        "model_config": _model_config(tag_dir),
        "augment": _checked_augment(_run_config(tag_dir).get("augment"), tag_dir),
        "step": str(read_meta(tag_dir).get("step", "")),
        "ema": "true" if ema else "false",
        "source": str(tag_dir.resolve()),
    }
    return tag_dir, info


def source_weights(weights: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``weights`` as :func:`source_meta` named it: an export file, or a verified checkpoint
    (consolidated; its EMA weights with ``ema``)."""
    from pretrain.models import read_pretrained

    if weights.is_file():
        return read_pretrained(weights)[0]
    return consolidated_state_dict(weights, ema=ema)


def checkpoint_source(
    path: str | Path, ema: bool = False, trusted: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an export, a checkpoint or a run directory: :func:`source_meta` (checked before any
    weight is read), then :func:`source_weights`."""
    weights, meta = source_meta(path, ema, trusted)
    return source_weights(weights, ema), meta


def load_pretrained(
    path: str | Path, name: str | None = None, ema: bool = False, trusted: bool = False, **overrides: Any
) -> torch.nn.Module:
    """The model of an export, a checkpoint or a run directory, built with ``overrides`` (see
    :func:`pretrain.models.registry.model_from_state`: another head size or input size is adapted or refused);
    ``trusted``: see :func:`resolve_checkpoint`.

    Raises:
        ExportError: The source is unusable, or its weights do not fit (named).
    """
    state, meta = checkpoint_source(path, ema=ema, trusted=trusted)
    return build_from_state(state, meta["model_config"], str(path), name=name, **overrides)


def build_from_state(
    state: dict[str, torch.Tensor], model_config: dict[str, Any], source: str, name: str | None = None, **overrides: Any
) -> torch.nn.Module:
    """:func:`~pretrain.models.registry.model_from_state`, first on the meta device (no memory, no compute), so that
    weights that do not fit the model their config describes are named before a real model is built.

    Raises:
        ExportError: Naming ``source`` and the tensors or the part that do not fit.
    """
    meta_state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    _build_or_explain(meta_state, model_config, source, name, overrides, meta=True)
    return _build_or_explain(state, model_config, source, name, overrides, meta=False)


def check_pretrained(path: str | Path, name: str | None = None, trusted: bool = False, **overrides: Any) -> None:
    """Check that ``path`` (an export, a checkpoint or a run directory) can initialise model ``name`` built with
    ``overrides``, without reading its weights: the metadata, and for an export the tensor shapes of its header on
    the meta device. What ``model.init_from`` runs before a training starts (``trusted``: see
    :func:`resolve_checkpoint`).

    Raises:
        ExportError: Naming the file and what does not fit.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        model_cfg = _model_config(resolve_checkpoint(p, trusted))
        if name is not None and name != model_cfg["name"]:
            raise ExportError(f"{p} holds a {model_cfg['name']} model, not {name}")
        return
    meta = _export_meta(p)
    model_cfg = _checked_model_config(meta["model_config"], p)
    _checked_augment(_json_field(meta, "augment", p), p)
    with safe_open(str(p), framework="pt") as f:
        shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    meta_state = {
        k: torch.empty(shape, dtype=_SAFETENSORS_DTYPES.get(dtype, torch.float32), device="meta")
        for k, (shape, dtype) in shapes.items()
    }
    _build_or_explain(meta_state, model_cfg, str(p), name, overrides, meta=True)


def _export_meta(p: Path) -> dict[str, Any]:
    """The metadata of export ``p``, or :class:`ExportError` with why it is none (not safetensors, no metadata, not
    JSON)."""
    from pretrain.models import read_pretrained

    try:
        return read_pretrained(p, weights=False)[1]
    except json.JSONDecodeError as e:
        raise ExportError(f"{p}: its metadata field 'model_config' is not valid JSON ({e})") from None
    except RecursionError:
        raise ExportError(f"{p}: its metadata field 'model_config' is not valid JSON (nested too deep)") from None
    except ValueError as e:
        raise ExportError(str(e)) from None


def _build_or_explain(
    state: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    source: str,
    name: str | None,
    overrides: dict[str, Any],
    meta: bool,
) -> torch.nn.Module | None:
    from pretrain.models.registry import model_from_state, on_meta_device

    try:
        if not meta:
            return model_from_state(state, model_config, name=name, **overrides)
        with on_meta_device():
            return model_from_state(state, model_config, name=name, **overrides)
    except NotImplementedError:  # an op without a meta kernel (in a family's adapt hook): the real build will tell
        if meta:
            return None
        raise
    except ValueError as e:  # the registry's and the families' own reasons (another model, a part it cannot adapt)
        raise ExportError(f"{source}: {e}") from None
    except (RuntimeError, TypeError, KeyError, IndexError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = "; ".join(line for line in lines if "size mismatch" in line)[:600] or " ".join(lines)[:600]
        raise ExportError(
            f"{source}: its weights do not fit the {model_config.get('name')} model its config describes "
            f"({detail}); the file was changed after `pretrain export`, or is not one"
        ) from None


def export_weights(
    path: str | Path, out: str | Path, ema: bool = False, dtype: str = "fp32", trusted: bool = False
) -> dict[str, str]:
    """Write the consolidated weights of ``path`` (checkpoint or run directory) to ``out`` (safetensors).

    Args:
        path: A checkpoint, or a run directory (its newest usable checkpoint).
        out: The ``.safetensors`` file to write (replaced atomically).
        ema: Export the EMA weights instead of the trained ones.
        dtype: ``fp32`` or ``bf16`` for the floating-point tensors.
        trusted: ``--trust-checkpoint``: accept a checkpoint that is not signed by this user.

    Returns:
        The metadata written: ``format``, ``model_name``, ``model_config`` (JSON), ``step``, ``ema``, ``dtype``,
        ``source``, ``zero_stage``, ``world_size``, ``metrics`` (JSON, the eval at save time), ``augment`` (JSON,
        the run's ``augment`` section, whose eval transform ``pretrain eval`` reuses; {} when unknown).

    Raises:
        ExportError: A bad path or checkpoint (the reason), or an unknown ``dtype``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    out = Path(out)
    problem = unwritable_reason(out)
    if problem:  # before the consolidation, which may take minutes
        raise ExportError(f"cannot write {out}: {problem}")
    tag_dir = resolve_checkpoint(path, trusted)
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
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        reason = _write_reason(e)
        raise ExportError(f"could not write {out} ({reason}); nothing was written, {tag_dir} is unchanged") from None
    logger.info("exported %s (step %s%s) to %s", tag_dir, metadata["step"], ", EMA" if ema else "", out)
    return metadata


def _write_reason(error: Exception) -> str:
    """Why a write failed, in the OS's words, also where safetensors wraps them (``... (os error 28)``)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r"os error (\d+)", str(error))
    return os.strerror(int(found.group(1))) if found else (str(error).strip().splitlines() or ["unknown error"])[-1]
