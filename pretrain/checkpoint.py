"""Checkpoints of a run: layout, the COMPLETE marker, ``latest``, retention, RNG capture and resume selection.

Layout::

    runs/<name>/checkpoints/
        step_000120/                    # tag = step_{step:06d}
            mp_rank_00_model_states.pt  # DeepSpeed engine state (model, optimizer, LR scheduler, client state)
            zero_pp_rank_*_optim_states.pt
            rank_00000.pt ...           # per-rank state: RNGs (torch/numpy/python), data loader, corrupt counts
            ema.pt                      # EMA weights (only when trainer.ema_decay > 0)
            meta.json                   # step, digests, model config, eval metrics at save time
            COMPLETE                    # written LAST by rank 0: JSON {files: {path: size}, sha256: {path: hex}}
        latest                          # text: name of the newest COMPLETE tag (atomically replaced)
        rejected/<tag>/                 # checkpoints that failed verification or loading, set aside (never deleted)

A checkpoint is usable only when COMPLETE exists and every file it lists is present with the listed size and sha256:
a directory torn by a kill (no marker), a truncated file or flipped bytes are detected, the checkpoint is set aside
under ``rejected/`` with the reason, and the next older one is used. The digests are computed right after the files
are written (still in the page cache), each rank hashing its share. Sizes alone are checked where speed matters
(retention at every save); resume checks the digests.

Trust. Our own files (``rank_*.pt``, ``ema.pt``) hold tensors and plain data and load with ``weights_only=True``.
DeepSpeed's model and optimizer files are pickles that DeepSpeed loads itself: they are loaded only from a checkpoint
that verifies against its marker and lies under the run's own directory (:func:`is_trusted_checkpoint`), or when the
user says so (``--trust-checkpoint``).

Everything here except :class:`CheckpointManager`'s save/load works without DeepSpeed, so retention and torn
detection are unit-testable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.fsutil import fsync_dir
from pretrain.rundir import COMPLETE_MARKER, LATEST, read_latest, write_atomic, write_latest

__all__ = [
    "COMPLETE_MARKER",
    "LATEST_FILE",
    "META_FILE",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "RunDirRefused",
    "checkpoint_dir_bytes",
    "estimate_checkpoint_bytes",
    "apply_retention",
    "capture_rng_state",
    "check_resume_compatible",
    "find_resume_checkpoint",
    "is_trusted_checkpoint",
    "list_checkpoints",
    "load_plain",
    "reject_checkpoint",
    "read_latest",
    "read_meta",
    "rank_state_file",
    "restore_rng_state",
    "seed_rng_state",
    "step_from_tag",
    "tag_for_step",
    "unusable_checkpoints",
    "verify_checkpoint",
    "write_complete_marker",
    "write_latest",
]

logger = logging.getLogger(__name__)

LATEST_FILE = LATEST
META_FILE = "meta.json"
REJECTED_DIR = "rejected"
_TAG_PREFIX = "step_"
_HASH_CHUNK = 1 << 22


class CheckpointMismatchError(ValueError):
    """A checkpoint cannot be resumed with this config (model shape or world size differ)."""


class RunDirRefused(RuntimeError):
    """The run directory has history but no checkpoint it could resume from (every one was rejected)."""


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
    """List every file of ``tag_dir`` with its size and sha256 in COMPLETE (written atomically, last).

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
    write_atomic(tag_dir / COMPLETE_MARKER, json.dumps(marker, indent=1))
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
        if not sums:
            return True, "ok (sizes only: the marker predates sha256 digests)"
        for rel in files:
            if rel not in sums:
                return False, f"COMPLETE marker has no sha256 for {rel}"
            if sha256_file(tag_dir / rel) != sums[rel]:
                return False, f"file {rel} does not match its sha256 in COMPLETE (corrupted or modified)"
    return True, "ok"


def is_trusted_checkpoint(tag_dir: str | Path, run_dir: str | Path) -> bool:
    """True when ``tag_dir`` lies under ``run_dir`` (symlinks resolved): a checkpoint this run's own writes made."""
    try:
        Path(tag_dir).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return False
    return True


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
        (tag_dir.parent / LATEST_FILE).unlink(missing_ok=True)
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
    """Every ``step_*`` directory under ``ckpt_root``, oldest first, each verified."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = step_from_tag(p.name)
        if step is None or not p.is_dir():
            continue
        ok, reason = verify_checkpoint(p, digests=False)
        out.append(CheckpointInfo(p.name, p, step, ok, reason, read_meta(p) if ok else {}))
    return sorted(out, key=lambda c: c.step)


def find_resume_checkpoint(ckpt_root: str | Path, digests: bool = True) -> Path | None:
    """Newest complete and intact checkpoint (sha256 checked with ``digests``); newer unusable ones are skipped with a
    warning naming why (nothing is renamed here: :meth:`CheckpointManager.load_newest` sets them aside)."""
    for info in reversed(list_checkpoints(ckpt_root)):
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
    save may be in progress). ``latest`` is never left pointing at a deleted tag.

    Returns:
        The removed directories.
    """
    infos = list_checkpoints(ckpt_root)
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
    partitions are resharded on load (:meth:`CheckpointManager.load`) and the data stream continues at the same sample.

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
    old_decay = float(meta.get("layer_decay", 1.0))  # checkpoints of older versions: no layer decay
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
        raise CheckpointMismatchError(
            f"cannot resume a ZeRO-3 checkpoint of {old_world} ranks on {world_size}: resharding stage 3 through a "
            f"DeepSpeed universal checkpoint did not continue the run faithfully in our tests (stages 0-2 do). "
            f"Relaunch with {old_world} ranks"
        )
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


# ------------------------------------------------------------------------------------------------------------ manager


class CheckpointManager:
    """Saves and loads DeepSpeed checkpoints with per-rank state, the COMPLETE marker and retention.

    Every rank calls :meth:`save` and :meth:`load` together (DeepSpeed's save and load are collective).

    Args:
        ckpt_root: ``<run>/checkpoints``.
        rank: Global rank of this process.
        world_size: Number of ranks.
        keep_last: Newest complete checkpoints to keep.
        keep_best: Best checkpoints (by ``best_metric``) to keep in addition.
        best_metric: Eval metric that ranks checkpoints.
        best_mode: ``max`` or ``min``.
    """

    def __init__(
        self,
        ckpt_root: str | Path,
        rank: int,
        world_size: int,
        keep_last: int = 2,
        keep_best: int = 0,
        best_metric: str = "val_top1",
        best_mode: str = "max",
    ):
        self.root = Path(ckpt_root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        extra_files: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``tag_for_step(step)`` on every rank, then COMPLETE, ``latest`` and retention on rank 0.

        Args:
            engine: The DeepSpeed engine (model, optimizer and LR scheduler state).
            step: Optimizer step the checkpoint is taken after.
            client_state: Rank-independent state stored inside DeepSpeed's checkpoint.
            rank_state: This rank's own state (RNGs, loader position), saved to ``rank_{r:05d}.pt``.
            meta: JSON-serialisable summary written by rank 0 to ``meta.json`` (metrics, digests...).
            extra_files: ``{file name: object}`` that rank 0 saves with ``torch.save`` (e.g. ``ema.pt``).

        Returns:
            The tag directory.
        """
        from pretrain.distributed import all_gather_object, barrier

        tag = tag_for_step(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a torn leftover of a killed run that reached the same step: replace it
                logger.warning("replacing existing checkpoint directory %s", tag_dir)
                shutil.rmtree(tag_dir)
        barrier()
        t0 = time.monotonic()
        error = ""
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError ("iostream error")
            error = f"{type(e).__name__}: {e}"
            barrier()  # the other ranks end DeepSpeed's save in its closing barrier: meet them there
        if not error:
            try:
                torch.save(rank_state, rank_state_file(tag_dir, self.rank))
                if self.rank == 0:
                    for name, obj in (extra_files or {}).items():
                        torch.save(obj, tag_dir / name)
                    write_atomic(tag_dir / META_FILE, json.dumps(meta, indent=1, default=str))
            except (OSError, RuntimeError) as e:
                error = f"{type(e).__name__}: {e}"
        errors = [e for e in all_gather_object(error) if e]  # every rank learns of a failure on any rank
        if errors:
            self._fail_save(tag_dir, errors[0])
        barrier()  # every rank's files are on disk before the marker says so
        digests = self._hash_shares(tag_dir)
        if self.rank == 0:
            write_complete_marker(tag_dir, digests)
            write_latest(self.root, tag)
            apply_retention(self.root, self.keep_last, self.keep_best, self.best_metric, self.best_mode)
            logger.info("saved checkpoint %s in %.1f s", tag_dir, time.monotonic() - t0)
        barrier()
        return tag_dir

    def _fail_save(self, tag_dir: Path, error: str) -> None:
        """Remove a torn checkpoint (rank 0) and raise :class:`CheckpointSaveError` on every rank, naming the cause."""
        from pretrain.distributed import barrier

        barrier()
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        previous = [c for c in list_checkpoints(self.root) if c.complete]
        need = checkpoint_dir_bytes(previous[-1].path) if previous else 0
        if "No space left" in error or "iostream error" in error or (need and free < need):
            mb = 1 << 20
            reason = (
                f"no space left on device: need ~{max(need, 1) / mb:.0f} MB in {self.root}, {free / mb:.0f} MB free"
            )
        elif "Read-only" in error or "Permission denied" in error:
            reason = f"{self.root} is not writable"
        else:
            reason = f"could not write {tag_dir}"
        kept = f"; the earlier checkpoints are intact (newest {previous[-1].tag})" if previous else ""
        raise CheckpointSaveError(f"saving checkpoint {tag_dir.name} failed: {reason} ({error}){kept}")

    def _hash_shares(self, tag_dir: Path) -> dict[str, str]:
        """sha256 of every file of a just-written checkpoint, each rank hashing its share while the files are still in
        the page cache; every rank gets all digests."""
        from pretrain.distributed import all_gather_object, broadcast_object

        rels = broadcast_object(checkpoint_files(tag_dir) if self.rank == 0 else None)
        mine = {rel: sha256_file(tag_dir / rel) for rel in rels[self.rank :: self.world_size]}  # type: ignore[index]
        return {rel: h for part in all_gather_object(mine) for rel, h in part.items()}  # type: ignore[union-attr]

    def load_newest(
        self, engine: Any, explicit: str | Path | None = None, extra: tuple[str, ...] = ()
    ) -> tuple[Path, dict, dict] | None:
        """Load the newest usable checkpoint, on every rank alike; ``explicit`` (``--resume``) instead of searching.

        Rank 0 verifies each candidate (sha256 included); one that fails verification or fails to load on any rank is
        reported with the reason and set aside under ``rejected/`` (never deleted), and the next older one is tried.
        An ``explicit`` checkpoint is never set aside: its failure is an error. ``extra`` names our own files of the
        checkpoint (e.g. ``ema.pt``) loaded on every rank into ``rank_state["files"]``, so they take part in the check.

        Returns:
            ``(tag_dir, client_state, rank_state)``, or None when no usable checkpoint is left.
        """
        from pretrain.distributed import all_reduce_max, broadcast_object

        while True:
            pick, why = None, ""
            if self.rank == 0:
                if explicit is not None:
                    pick = str(explicit)
                    ok, why = verify_checkpoint(explicit)
                    if not ok:
                        pick = None
                else:
                    pick = self._newest_verified()
            pick, why = broadcast_object((pick, why))  # type: ignore[misc]
            if pick is None:
                if explicit is not None:
                    raise RuntimeError(f"checkpoint {explicit} is not usable: {why}")
                return None
            error = ""
            try:
                client, rank_state = self.load(engine, Path(pick), verified=True)
                rank_state["files"] = {name: load_plain(Path(pick) / name) for name in extra}
            except Exception as e:  # a pickle that does not load, a state that does not fit: try the previous one
                error = f"{type(e).__name__}: {e}"
                logger.error("rank %d could not load checkpoint %s: %s", self.rank, pick, error)
            if not all_reduce_max([1.0 if error else 0.0])[0]:
                return Path(pick), client, rank_state
            if explicit is not None:
                raise RuntimeError(f"checkpoint {explicit} could not be loaded: {error or 'failed on another rank'}")
            if self.rank == 0:
                reject_checkpoint(pick, f"failed to load: {error or 'failed on another rank (see its log)'}")

    def _newest_verified(self) -> str | None:
        """Rank 0: the newest checkpoint that verifies; newer ones that do not are set aside with their reason."""
        for info in reversed(list_checkpoints(self.root)):
            ok, reason = info.usable()
            if ok:
                return str(info.path)
            reject_checkpoint(info.path, reason)
        return None

    def load(self, engine: Any, tag_dir: str | Path, verified: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load ``tag_dir`` into ``engine`` (model, optimizer, scheduler) and read this rank's own state.

        Args:
            engine: The DeepSpeed engine.
            tag_dir: The checkpoint.
            verified: Rank 0 already checked the digests (:meth:`load_newest`); only sizes are checked here.

        Returns:
            ``(client_state, rank_state)``.
        """
        tag_dir = Path(tag_dir)
        ok, reason = verify_checkpoint(tag_dir, digests=not verified)
        if not ok:
            raise RuntimeError(f"checkpoint {tag_dir} is not usable: {reason}")
        saved_world = int(read_meta(tag_dir).get("world_size") or self.world_size)
        if saved_world != self.world_size:
            return self._load_resharded(engine, tag_dir, saved_world)
        load_path, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        path = rank_state_file(tag_dir, self.rank)
        if not path.is_file():
            raise RuntimeError(f"checkpoint {tag_dir} has no state for rank {self.rank} ({path.name})")
        rank_state = load_plain(path)
        return client_state or {}, rank_state

    def _load_resharded(self, engine: Any, tag_dir: Path, saved_world: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load a checkpoint written by ``saved_world`` ranks on this world size (elastic resume).

        ZeRO-1/2 partitions are per rank: rank 0 converts the checkpoint to a DeepSpeed universal checkpoint (one file
        per parameter and optimizer moment) next to it, every rank loads its new partition from that, and the
        conversion is deleted. Stage 0 checkpoints are not partitioned and load as they are. Stage 3 is refused: its
        universal conversion did not continue runs faithfully here (losses drifted by 1e-4 one step after the resume,
        against 1e-7 for stages 1 and 2).

        Every rank continues the data stream at old rank 0's position (the same global sample; the loader checks that
        the global batch is unchanged), rank 0 carries the corrupt-sample counts of all old ranks, and ``rng`` is None:
        the old per-rank RNG streams do not map onto the new ranks.
        """
        from pretrain.distributed import barrier, broadcast_object

        t0 = time.monotonic()
        universal = None
        load_root = tag_dir.parent
        if engine.zero_optimization_stage() == 3:
            raise RuntimeError(f"{tag_dir}: a ZeRO-3 checkpoint resumes only on the {saved_world} ranks that wrote it")
        if engine.zero_optimization_stage() > 0:
            universal = self.root / _RESHARD_DIR / tag_dir.name
            error = None
            if self.rank == 0:
                try:
                    _to_universal(tag_dir, universal)
                except RuntimeError as e:
                    error = str(e)
            error = broadcast_object(error)  # every rank fails with rank 0's message, none waits in a collective
            if error:
                raise RuntimeError(error)
            load_root = universal.parent
            engine._config.load_universal_checkpoint = True  # DeepSpeed reads this flag when it loads
        try:
            load_path, client_state = engine.load_checkpoint(
                str(load_root), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        finally:
            if universal is not None:
                engine._config.load_universal_checkpoint = False
        barrier()
        if universal is not None and self.rank == 0:
            shutil.rmtree(universal.parent, ignore_errors=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir} on {self.world_size} ranks")
        old = [load_plain(rank_state_file(tag_dir, r)) for r in range(saved_world)]
        data = dict(old[0]["data"])
        corrupt: dict[str, int] = {}
        if self.rank == 0:
            for state in old:
                for reason, n in state["data"].get("corrupt", {}).items():
                    corrupt[reason] = corrupt.get(reason, 0) + int(n)
        data["corrupt"] = corrupt
        logger.info(
            "resharded %s from %d to %d ranks in %.1f s (ZeRO stage %d)",
            tag_dir.name,
            saved_world,
            self.world_size,
            time.monotonic() - t0,
            engine.zero_optimization_stage(),
        )
        return client_state or {}, {"rank": self.rank, "rng": None, "data": data}


_RESHARD_DIR = ".reshard"  # under checkpoints/: a universal conversion while an elastic resume loads it


def _to_universal(tag_dir: Path, out: Path) -> None:
    """``deepspeed.checkpoint.ds_to_universal`` of ``tag_dir`` into ``out`` (replaced), in a subprocess."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
        "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state",
    ]  # fmt: skip
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(
            f"could not convert {tag_dir} to a DeepSpeed universal checkpoint for a resume on another number of "
            f"ranks (exit {done.returncode}); relaunch with the checkpoint's number of ranks. Output:\n{tail}"
        )
