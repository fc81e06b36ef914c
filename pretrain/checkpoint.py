"""Checkpoints of a run: layout, the COMPLETE marker, ``latest``, retention, RNG capture and resume selection.

Layout::

    runs/<name>/checkpoints/
        step_000120/                    # tag = step_{step:06d}
            mp_rank_00_model_states.pt  # DeepSpeed engine state (model, optimizer, LR scheduler, client state)
            zero_pp_rank_*_optim_states.pt
            rank_00000.pt ...           # per-rank state: RNGs (torch/numpy/python), data loader, corrupt counts
            ema.pt                      # EMA weights (only when trainer.ema_decay > 0)
            meta.json                   # step, digests, model config, eval metrics at save time
            COMPLETE                    # written LAST by rank 0: JSON {files: {path: size}, sha256: {path: hex}, step,
                                        #   signed_by, hmac_sha256}: signed with the user's key (pretrain.trust)
        latest                          # text: name of the newest COMPLETE tag (atomically replaced)
        rejected/<tag>/                 # checkpoints that failed verification or loading, set aside (never deleted)

A checkpoint is usable only when COMPLETE exists and every file it lists is present with the listed size and sha256:
a directory torn by a kill (no marker), a truncated file or flipped bytes are detected, the checkpoint is set aside
under ``rejected/`` with the reason, and the next older one is used. The digests are computed right after the files
are written (still in the page cache), each rank hashing its share. Sizes alone are checked where speed matters
(retention at every save); resume checks the digests.

Trust. Anyone who can write the run directory can also recompute sha256 digests and a marker. So COMPLETE is signed:
an HMAC-SHA256 with this user's key, kept outside the directory (:mod:`pretrain.trust`). A checkpoint is loaded only
when its marker carries this user's signature, or when the user says so (``--trust-checkpoint``); otherwise it is
refused (:class:`UntrustedCheckpoint`), never set aside, so nothing changes. And nothing is unpickled on trust even
then: our own files (``rank_*.pt``, ``ema.pt``) load with ``weights_only=True``, and every ``torch.load`` DeepSpeed
makes while it loads a checkpoint (its model, optimizer and ZeRO files, the universal conversion of an elastic resume)
runs with ``weights_only`` forced on and DeepSpeed's few plain record types allowed (:func:`plain_loads`).

The collective save and load (every rank, DeepSpeed's engine) are :mod:`pretrain.checkpoint_manager`'s; everything
here works without DeepSpeed, so retention, verification and torn detection are unit-testable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.fsutil import fsync_dir
from pretrain import trust
from pretrain.lifecycle import environ_set
from pretrain.rundir import COMPLETE_MARKER, LATEST, read_latest, write_atomic, write_latest

__all__ = [
    "META_FILE",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "FORCE_WEIGHTS_ONLY_ENV",
    "RunDirRefused",
    "UntrustedCheckpoint",
    "adopt_checkpoint",
    "checkpoint_dir_bytes",
    "checkpoint_files",
    "estimate_checkpoint_bytes",
    "apply_retention",
    "capture_rng_state",
    "check_resume_compatible",
    "check_signature",
    "zero3_reshard_refused",
    "deepspeed_plain_types",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_plain",
    "plain_loads",
    "reject_checkpoint",
    "read_meta",
    "rank_state_file",
    "restore_rng_state",
    "seed_rng_state",
    "sha256_file",
    "step_from_tag",
    "tag_for_step",
    "unusable_checkpoints",
    "untrusted_message",
    "verify_checkpoint",
    "write_complete_marker",
]

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
REJECTED_DIR = "rejected"
_TAG_PREFIX = "step_"


class CheckpointMismatchError(ValueError):
    """A checkpoint cannot be resumed with this config (model shape or world size differ)."""


class RunDirRefused(RuntimeError):
    """The run directory cannot be resumed as it is: history but no checkpoint to resume from, or (the subclass) a
    checkpoint it must not load. Nothing was changed."""


class UntrustedCheckpoint(RunDirRefused):
    """A checkpoint whose COMPLETE marker does not carry this user's signature, loaded without ``--trust-checkpoint``:
    refused, never set aside (the message names the flag)."""


def untrusted_message(tag_dir: str | Path, reason: str) -> str:
    """Why ``tag_dir`` is refused and what to do, the one message of every command that loads checkpoints."""
    return (
        f"checkpoint {tag_dir} is not signed by your key ({reason}; key {trust.key_path()}). Its DeepSpeed files are "
        "pickles, and anyone who can write its directory can recompute its sha256 digests, so it was not loaded and "
        "nothing was changed. If you trust where it came from (another user's run, a copy made elsewhere), pass "
        "--trust-checkpoint: it is then loaded as plain data (tensors, no code)"
    )


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, read-only or vanished directory); its torn files were removed and
    the earlier checkpoints are intact."""


def estimate_checkpoint_bytes(n_params: int) -> int:
    """Rough size of one checkpoint: fp32 weights, fp32 master copy and two Adam moments per parameter (16 bytes),
    plus 10% for the rest (per-rank state, metadata)."""
    return int(n_params * 16 * 1.1)


def checkpoint_dir_bytes(tag_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(tag_dir).rglob("*") if p.is_file())


def tag_for_step(step: int) -> str:
    """Checkpoint tag of an optimizer step, e.g. ``step_000120``."""
    return f"{_TAG_PREFIX}{step:06d}"


def step_from_tag(tag: str) -> int | None:
    """The step in a tag made by :func:`tag_for_step`; None for other names."""
    if not tag.startswith(_TAG_PREFIX):
        return None
    try:
        return int(tag[len(_TAG_PREFIX) :])
    except ValueError:
        return None


def rank_state_file(tag_dir: str | Path, rank: int) -> Path:
    """Per-rank state file in a tag dir (RNGs, loader position, corrupt counts)."""
    return Path(tag_dir) / f"rank_{rank:05d}.pt"


# --------------------------------------------------------------------------------------------- marker and verification


def checkpoint_files(tag_dir: str | Path) -> list[str]:
    """The files of a checkpoint (relative paths, sorted), without the marker and hidden temporary files."""
    tag_dir = Path(tag_dir)
    return [
        p.relative_to(tag_dir).as_posix()
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".")
    ]


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_complete_marker(tag_dir: str | Path, digests: dict[str, str] | None = None) -> dict[str, int]:
    """List every file of ``tag_dir`` with its size and sha256 in COMPLETE (written atomically, last), signed with this
    user's key.

    Args:
        tag_dir: The checkpoint.
        digests: sha256 of files already hashed (e.g. by the ranks that wrote them); the others are hashed here.

    Returns:
        The recorded ``{relative path: size}``.
    """
    tag_dir = Path(tag_dir)
    rels = checkpoint_files(tag_dir)
    files = {rel: (tag_dir / rel).stat().st_size for rel in rels}
    digests = dict(digests or {})
    for rel in rels:
        if rel not in digests:
            digests[rel] = sha256_file(tag_dir / rel)
    fsync_dir(tag_dir)
    marker = {"files": files, "sha256": {rel: digests[rel] for rel in rels}, "time": time.time()}
    marker["step"] = step_from_tag(tag_dir.name)
    write_atomic(tag_dir / COMPLETE_MARKER, json.dumps(trust.sign_record("checkpoint", marker), indent=1))
    fsync_dir(tag_dir)
    return files


def verify_checkpoint(tag_dir: str | Path, digests: bool = True) -> tuple[bool, str]:
    """Check that ``tag_dir`` is a complete, intact checkpoint.

    Args:
        tag_dir: The checkpoint.
        digests: Also compare every file's sha256 with the marker's (reads the whole checkpoint); sizes only if not.

    Returns:
        ``(True, "ok")`` or ``(False, reason)`` naming the missing marker or the missing, truncated or altered file.
    """
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE_MARKER
    if not tag_dir.is_dir():
        return False, f"{tag_dir} is not a directory"
    if not marker.is_file():
        return False, "no COMPLETE marker (the save was interrupted)"
    try:
        content = json.loads(marker.read_text())
        files, sums = content["files"], content.get("sha256") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return False, f"unreadable COMPLETE marker ({type(e).__name__}: {e})"
    if not isinstance(files, dict) or not isinstance(sums, dict):
        return False, "unreadable COMPLETE marker (files/sha256 are not mappings)"
    if not files:
        return False, "COMPLETE marker lists no files"
    for rel, size in files.items():
        p = tag_dir / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            return False, f"COMPLETE marker names a file outside the checkpoint ({rel})"
        if not p.is_file():
            return False, f"missing file {rel}"
        actual = p.stat().st_size
        if actual != size:
            return False, f"file {rel} has {actual} bytes, COMPLETE recorded {size} (truncated or modified)"
    if digests:
        for rel in files:
            if rel not in sums:
                return False, f"COMPLETE marker has no sha256 for {rel}"
            if sha256_file(tag_dir / rel) != sums[rel]:
                return False, f"file {rel} does not match its sha256 in COMPLETE (corrupted or modified)"
    return True, "ok"


def check_signature(tag_dir: str | Path) -> tuple[bool, str]:
    """``(True, "signed by you")`` when the COMPLETE marker of ``tag_dir`` carries this user's signature (so the
    sha256 digests it lists are the ones this user's run wrote), else ``(False, reason)``.

    Raises:
        pretrain.trust.TrustKeyError: The key cannot be read or is not private (the message says how to fix it).
    """
    try:
        record = json.loads((Path(tag_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as e:
        return False, f"unreadable COMPLETE marker ({type(e).__name__})"
    if not isinstance(record, dict):
        return False, "unreadable COMPLETE marker"
    return trust.check_record("checkpoint", record)


def adopt_checkpoint(tag_dir: str | Path) -> tuple[bool, str]:
    """Sign the COMPLETE marker of ``tag_dir`` with this user's key as it is, once every file matches its sha256: what
    ``--trust-sweep`` does to the checkpoints of a sweep the user vouched for. Returns ``(ok, reason)``; a checkpoint
    that does not verify is left alone (a resume sets it aside)."""
    tag_dir = Path(tag_dir)
    ok, reason = verify_checkpoint(tag_dir)
    if ok and not check_signature(tag_dir)[0]:
        record = json.loads((tag_dir / COMPLETE_MARKER).read_text())
        write_atomic(tag_dir / COMPLETE_MARKER, json.dumps(trust.sign_record("checkpoint", record), indent=1))
    return ok, reason


def reject_checkpoint(tag_dir: str | Path, reason: str) -> Path | None:
    """Set a checkpoint that failed verification or loading aside, under ``checkpoints/rejected/`` (never deleted),
    with ``REJECTED.txt`` saying why. Returns where it went (None if it vanished)."""
    tag_dir = Path(tag_dir)
    dest_root = tag_dir.parent / REJECTED_DIR
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / tag_dir.name
    n = 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{tag_dir.name}.{n}"
    try:
        os.rename(tag_dir, dest)
    except FileNotFoundError:
        return None
    (dest / "REJECTED.txt").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {reason}\n")
    if read_latest(tag_dir.parent) == tag_dir.name:
        (tag_dir.parent / LATEST).unlink(missing_ok=True)
    logger.warning("set checkpoint %s aside as %s: %s", tag_dir, dest, reason)
    return dest


def load_plain(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of one of our own checkpoint files, tensors and plain data only (``weights_only=True``).

    Files written before RNG states were stored as tensors hold numpy's state as an array: numpy's array
    reconstruction is allowed for them (it builds arrays, never calls arbitrary code).
    """
    safe = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        safe.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        safe.append(np.core.multiarray._reconstruct)
    with torch.serialization.safe_globals(safe):
        return torch.load(path, map_location=map_location, weights_only=True)


def deepspeed_plain_types() -> list[Any]:
    """DeepSpeed's plain record types inside its checkpoint files (the loss scaler, the ZeRO stage enum, fragment
    addresses): a ``weights_only`` load rebuilds them from their fields without calling anything else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


FORCE_WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch.load honours this environment variable over a caller's ``weights_only=False`` (DeepSpeed's)."""


@contextmanager
def plain_loads() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's own included, loads tensors, plain data and DeepSpeed's plain record
    types only: a file that needs anything else fails to load instead of running code."""
    with environ_set(FORCE_WEIGHTS_ONLY_ENV, "1"), torch.serialization.safe_globals(deepspeed_plain_types()):
        yield


def read_meta(tag_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint ({} when absent or unreadable)."""
    try:
        return json.loads((Path(tag_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ listing and choosing


@dataclass
class CheckpointInfo:
    """One tag directory under ``checkpoints/``."""

    tag: str
    path: Path
    step: int
    complete: bool
    reason: str
    meta: dict[str, Any] = field(default_factory=dict)
    signed: bool = False
    """COMPLETE carries this user's signature (:func:`check_signature`)."""
    signature: str = ""
    """Why it is not signed (or ``signed by you``)."""

    def usable(self, digests: bool = True) -> tuple[bool, str]:
        """``(ok, reason)``: the listing's size check, then (``digests``) every file's sha256."""
        if not self.complete or not digests:
            return self.complete, self.reason
        return verify_checkpoint(self.path)

    def metric(self, name: str) -> float | None:
        """Eval metric recorded at save time (``meta.json`` ``metrics``), if any."""
        v = (self.meta.get("metrics") or {}).get(name)
        return float(v) if isinstance(v, (int, float)) else None


def list_checkpoints(ckpt_root: str | Path) -> list[CheckpointInfo]:
    """Every ``step_*`` directory under ``ckpt_root``, oldest first, each checked (sizes, signature)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = step_from_tag(p.name)
        if step is None or not p.is_dir():
            continue
        ok, reason = verify_checkpoint(p, digests=False)
        signed, why = check_signature(p) if ok else (False, reason)
        out.append(CheckpointInfo(p.name, p, step, ok, reason, read_meta(p) if ok else {}, signed, why))
    return sorted(out, key=lambda c: c.step)


def find_resume_checkpoint(ckpt_root: str | Path, digests: bool = True, trusted: bool = False) -> Path | None:
    """Newest complete and intact checkpoint (sha256 checked with ``digests``); newer unusable ones are skipped with a
    warning naming why (nothing is renamed here: a resume, ``CheckpointManager.load_newest``, sets them aside).

    Args:
        ckpt_root: ``<run>/checkpoints``.
        digests: Check every file's sha256 (else sizes only).
        trusted: ``--trust-checkpoint``: accept a checkpoint not signed by this user.

    Raises:
        UntrustedCheckpoint: The newest complete checkpoint is not signed by this user (and not ``trusted``): it is
            refused, not skipped, so that nobody can make a run go back to an older checkpoint by planting a newer one.
    """
    for info in reversed(list_checkpoints(ckpt_root)):
        if info.complete and not info.signed and not trusted:
            raise UntrustedCheckpoint(untrusted_message(info.path, info.signature))
        ok, reason = info.usable(digests)
        if ok:
            return info.path
        logger.warning("checkpoint %s is not usable (%s); trying the previous one", info.path, reason)
    return None


def unusable_checkpoints(ckpt_root: str | Path) -> list[tuple[str, str]]:
    """``(tag, reason)`` of every checkpoint that fails verification (sha256 included), oldest first."""
    out = []
    for info in list_checkpoints(ckpt_root):
        ok, reason = info.usable()
        if not ok:
            out.append((info.tag, reason))
    return out


def apply_retention(
    ckpt_root: str | Path, keep_last: int, keep_best: int = 0, best_metric: str = "val_top1", best_mode: str = "max"
) -> list[Path]:
    """Delete checkpoints outside the newest ``keep_last`` complete ones and the best ``keep_best``.

    Torn directories older than the newest complete checkpoint are deleted too (newer torn ones are left alone: a
    save may be in progress). Only checkpoints signed by this user count: one that is not (planted, or another user's)
    is neither kept in their place nor ever deleted. ``latest`` is never left pointing at a deleted tag.

    Returns:
        The removed directories.
    """
    infos = [c for c in list_checkpoints(ckpt_root) if c.signed or not c.complete]
    complete = [c for c in infos if c.complete]
    if not complete:
        return []
    keep = {c.tag for c in complete[-keep_last:]} if keep_last > 0 else set()
    if keep_best > 0:
        scored = [c for c in complete if c.metric(best_metric) is not None]
        sign = -1.0 if best_mode == "max" else 1.0
        # best first; among equal scores the newer one wins
        scored.sort(key=lambda c: (sign * c.metric(best_metric), -c.step))  # type: ignore[operator]
        keep |= {c.tag for c in scored[:keep_best]}
    keep.add(complete[-1].tag)  # resume needs the newest complete one whatever the settings
    newest_complete = complete[-1].step
    removed = []
    for c in infos:
        if c.tag in keep or (not c.complete and c.step > newest_complete):
            continue
        shutil.rmtree(c.path, ignore_errors=True)
        removed.append(c.path)
    if removed:
        logger.info("retention removed %s", ", ".join(p.name for p in removed))
    latest = read_latest(ckpt_root)
    if latest is None or not (Path(ckpt_root) / latest).is_dir():
        write_latest(ckpt_root, complete[-1].tag)
    return removed


def zero3_reshard_refused(saved_world: int, world_size: int) -> str:
    """Why a ZeRO-3 checkpoint of ``saved_world`` ranks does not resume on ``world_size``: its universal conversion
    does not continue runs faithfully (losses 1e-4 off one step after the resume, against 1e-7 for stages 1 and 2)."""
    return (
        f"cannot resume a ZeRO-3 checkpoint of {saved_world} ranks on {world_size}: resharding stage 3 through a "
        f"DeepSpeed universal checkpoint does not continue the run faithfully (stages 0-2 do). Relaunch with "
        f"{saved_world} ranks"
    )


def check_resume_compatible(
    meta: dict[str, Any],
    model_cfg: dict[str, Any],
    shape_digest: str,
    world_size: int,
    batch_size: int | None = None,
    layer_decay: float = 1.0,
) -> None:
    """Refuse a resume whose model shape differs from the checkpoint's, or whose ranks x micro-batch or optimizer
    param groups (``optim.layer_decay``) do.

    Another world size is fine when the global micro-batch (ranks x ``data.batch_size``) is the same: the ZeRO
    partitions are resharded on load (``CheckpointManager.load``) and the data stream continues at the same sample.

    Args:
        meta: The checkpoint's ``meta.json``.
        model_cfg: ``dataclasses.asdict(cfg.model)`` of the new run.
        shape_digest: ``model_shape_digest(cfg)`` of the new run.
        world_size: Ranks of the new run.
        batch_size: ``data.batch_size`` of the new run (None: not checked).
        layer_decay: ``optim.layer_decay`` of the new run; the checkpoint's optimizer state is laid out by its groups.

    Raises:
        CheckpointMismatchError: Naming each differing ``model.*`` field (old -> new), or the global batches with a
            ``data.batch_size`` that fits.
    """
    old_digest = meta.get("model_shape_digest")
    if old_digest and old_digest != shape_digest:
        old_model = meta.get("model_config") or {}
        ignore = {"drop_path_rate", "drop_rate"}
        diffs = [
            f"model.{k}: {old_model.get(k)!r} -> {model_cfg.get(k)!r}"
            for k in sorted(set(old_model) | set(model_cfg))
            if k not in ignore and old_model.get(k) != model_cfg.get(k)
        ]
        raise CheckpointMismatchError(
            "cannot resume: the model shape differs from the checkpoint's ("
            + ("; ".join(diffs) or "model shape digest differs")
            + "). Restore those values, or start a new run with a different run.name"
        )
    if not isinstance(meta.get("layer_decay"), (int, float)):
        raise CheckpointMismatchError(
            f"cannot resume: the checkpoint's {META_FILE} records no optim.layer_decay, which lays out its optimizer "
            "state; start a new run from these weights with model.init_from=<this checkpoint>"
        )
    old_decay = float(meta["layer_decay"])
    if old_decay != layer_decay:
        raise CheckpointMismatchError(
            f"cannot resume with optim.layer_decay={layer_decay:g}: the checkpoint was trained with {old_decay:g}, and "
            "its optimizer state is laid out by the param groups that value makes. Set optim.layer_decay="
            f"{old_decay:g}, or start a new run from these weights with model.init_from=<this checkpoint>"
        )
    old_world, old_batch = meta.get("world_size"), meta.get("batch_size")
    if old_world is None or int(old_world) == world_size:
        return
    if int(meta.get("zero_stage") or 0) == 3:
        raise CheckpointMismatchError(zero3_reshard_refused(int(old_world), world_size))
    if old_batch is not None and batch_size is not None:
        old_global = int(old_world) * int(old_batch)
        if world_size * batch_size != old_global:
            fix = (
                f"set data.batch_size={old_global // world_size}"
                if old_global % world_size == 0
                else f"use a number of ranks that divides {old_global}"
            )
            raise CheckpointMismatchError(
                f"cannot resume on {world_size} ranks x data.batch_size={batch_size}: the checkpoint was written by "
                f"{old_world} ranks x {old_batch}, and the data stream continues only with the same global batch "
                f"({old_global} samples per micro-step); {fix}, or relaunch with {old_world} ranks"
            )


# ------------------------------------------------------------------------------------------------------------ RNGs


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and CUDA (when present) of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # keys as a tensor: loads with weights_only=True
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng_state(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) of this process: the RNGs of a rank that has no saved state."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
