"""Checkpoints of a run: layout, the COMPLETE marker, ``latest``, retention, RNG capture and resume selection.

Layout (DESIGN.md, "Training flow")::

    runs/<name>/checkpoints/
        step_000120/                    # tag = step_{step:06d}
            mp_rank_00_model_states.pt  # DeepSpeed engine state (model, optimizer, LR scheduler, client state)
            zero_pp_rank_*_optim_states.pt
            rank_00000.pt ...           # per-rank state: RNGs (torch/numpy/python), data loader, corrupt counts
            ema.pt                      # EMA weights (only when trainer.ema_decay > 0)
            meta.json                   # step, digests, model config, eval metrics at save time
            COMPLETE                    # written LAST by rank 0: JSON {files: {relative path: size in bytes}}
        latest                          # text: name of the newest COMPLETE tag (atomically replaced)

A checkpoint is usable only when COMPLETE exists and every file it lists is present with the listed size, so a
directory torn by a kill (no marker) or a truncated file is detected and skipped. Everything here except
:class:`CheckpointManager`'s save/load works without DeepSpeed, so retention and torn detection are unit-testable.
"""

from __future__ import annotations

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

__all__ = [
    "COMPLETE_MARKER",
    "LATEST_FILE",
    "META_FILE",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointMismatchError",
    "apply_retention",
    "capture_rng_state",
    "check_resume_compatible",
    "find_resume_checkpoint",
    "list_checkpoints",
    "read_latest",
    "read_meta",
    "rank_state_file",
    "restore_rng_state",
    "seed_rng_state",
    "step_from_tag",
    "tag_for_step",
    "verify_checkpoint",
    "write_complete_marker",
    "write_latest",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
META_FILE = "meta.json"
_TAG_PREFIX = "step_"


class CheckpointMismatchError(ValueError):
    """A checkpoint cannot be resumed with this config (model shape or world size differ)."""


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- marker and verification


def write_complete_marker(tag_dir: str | Path) -> dict[str, int]:
    """List every file of ``tag_dir`` with its size in COMPLETE (written atomically, last).

    Returns:
        The recorded ``{relative path: size}``.
    """
    tag_dir = Path(tag_dir)
    files: dict[str, int] = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith("."):
            files[p.relative_to(tag_dir).as_posix()] = p.stat().st_size
    fsync_dir(tag_dir)
    _atomic_write_text(tag_dir / COMPLETE_MARKER, json.dumps({"files": files, "time": time.time()}, indent=1))
    fsync_dir(tag_dir)
    return files


def verify_checkpoint(tag_dir: str | Path) -> tuple[bool, str]:
    """Check that ``tag_dir`` is a complete, intact checkpoint.

    Returns:
        ``(True, "ok")`` or ``(False, reason)`` naming the missing marker or the missing/truncated file.
    """
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE_MARKER
    if not tag_dir.is_dir():
        return False, f"{tag_dir} is not a directory"
    if not marker.is_file():
        return False, "no COMPLETE marker (the save was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable COMPLETE marker ({e})"
    if not files:
        return False, "COMPLETE marker lists no files"
    for rel, size in files.items():
        p = tag_dir / rel
        if not p.is_file():
            return False, f"missing file {rel}"
        actual = p.stat().st_size
        if actual != size:
            return False, f"file {rel} has {actual} bytes, COMPLETE recorded {size} (truncated or modified)"
    return True, "ok"


def read_meta(tag_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint ({} when absent or unreadable)."""
    try:
        return json.loads((Path(tag_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_latest(ckpt_root: str | Path, tag: str) -> None:
    """Atomically point ``checkpoints/latest`` at ``tag``."""
    _atomic_write_text(Path(ckpt_root) / LATEST_FILE, tag + "\n")


def read_latest(ckpt_root: str | Path) -> str | None:
    """The tag named by ``checkpoints/latest``, or None."""
    try:
        return (Path(ckpt_root) / LATEST_FILE).read_text().strip() or None
    except OSError:
        return None


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
        ok, reason = verify_checkpoint(p)
        out.append(CheckpointInfo(p.name, p, step, ok, reason, read_meta(p) if ok else {}))
    return sorted(out, key=lambda c: c.step)


def find_resume_checkpoint(ckpt_root: str | Path) -> Path | None:
    """Newest complete and intact checkpoint; torn newer ones are skipped with a warning naming why."""
    for info in reversed(list_checkpoints(ckpt_root)):
        if info.complete:
            return info.path
        logger.warning("checkpoint %s is not usable (%s); trying the previous one", info.path, info.reason)
    return None


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
) -> None:
    """Refuse a resume whose model shape differs from the checkpoint's, or whose ranks x micro-batch does.

    Another world size is fine when the global micro-batch (ranks x ``data.batch_size``) is the same: the ZeRO
    partitions are resharded on load (:meth:`CheckpointManager.load`) and the data stream continues at the same sample.

    Args:
        meta: The checkpoint's ``meta.json``.
        model_cfg: ``dataclasses.asdict(cfg.model)`` of the new run.
        shape_digest: ``model_shape_digest(cfg)`` of the new run.
        world_size: Ranks of the new run.
        batch_size: ``data.batch_size`` of the new run (None: not checked).

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        from pretrain.distributed import barrier

        tag = tag_for_step(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a torn leftover of a killed run that reached the same step: replace it
                logger.warning("replacing existing checkpoint directory %s", tag_dir)
                shutil.rmtree(tag_dir)
        barrier()
        t0 = time.monotonic()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, rank_state_file(tag_dir, self.rank))
        if self.rank == 0:
            for name, obj in (extra_files or {}).items():
                torch.save(obj, tag_dir / name)
            _atomic_write_text(tag_dir / META_FILE, json.dumps(meta, indent=1, default=str))
        barrier()  # every rank's files are on disk before the marker says so
        if self.rank == 0:
            write_complete_marker(tag_dir)
            write_latest(self.root, tag)
            apply_retention(self.root, self.keep_last, self.keep_best, self.best_metric, self.best_mode)
            logger.info("saved checkpoint %s in %.1f s", tag_dir, time.monotonic() - t0)
        barrier()
        return tag_dir

    def load(self, engine: Any, tag_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load ``tag_dir`` into ``engine`` (model, optimizer, scheduler) and read this rank's own state.

        Returns:
            ``(client_state, rank_state)``.
        """
        tag_dir = Path(tag_dir)
        ok, reason = verify_checkpoint(tag_dir)
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
        rank_state = torch.load(path, map_location="cpu", weights_only=False)
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
        old = [
            torch.load(rank_state_file(tag_dir, r), map_location="cpu", weights_only=False) for r in range(saved_world)
        ]
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
