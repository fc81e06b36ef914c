"""Collective checkpoint save and load of a training run: every rank writes its share, rank 0 writes COMPLETE last
and applies retention; a resume checks the signature and the digests, loads the newest usable checkpoint (DeepSpeed's
files as plain data), sets bad ones aside, and reshards ZeRO-1/2 partitions when the number of ranks changed.

A run registers its engine and its other stateful components (:class:`~pretrain.run_state.Components`: the trainer's
counters, each rank's data position and RNGs, the EMA) once; :meth:`CheckpointManager.save` collects their state and
:meth:`CheckpointManager.restore` puts it back. Its :class:`~pretrain.run_state.SaveSchedule` says when a save is due.
The layout, the marker, verification, signatures and retention are :mod:`pretrain.checkpoint`'s (testable without
DeepSpeed); this module runs the collective part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pretrain import trust
from pretrain.checkpoint import (
    FORCE_WEIGHTS_ONLY_ENV,
    META_FILE,
    CheckpointMismatchError,
    CheckpointSaveError,
    UntrustedCheckpoint,
    apply_retention,
    check_signature,
    checkpoint_dir_bytes,
    checkpoint_files,
    list_checkpoints,
    load_plain,
    plain_loads,
    rank_state_file,
    read_meta,
    reject_checkpoint,
    sha256_file,
    tag_for_step,
    untrusted_message,
    verify_checkpoint,
    write_complete_marker,
    zero3_reshard_refused,
)
from pretrain.config import Config, config_digest, model_shape_digest
from pretrain.run_state import Components, SaveSchedule
from pretrain.rundir import write_atomic, write_latest

__all__ = ["CheckpointManager", "checkpoint_meta", "run_identity"]

logger = logging.getLogger(__name__)


def run_identity(cfg: Config, world_size: int) -> dict[str, Any]:
    """What a checkpoint's client state records of the run that wrote it: its config and model shape digests and
    its number of ranks."""
    return {
        "config_digest": config_digest(cfg),
        "model_shape_digest": model_shape_digest(cfg),
        "world_size": world_size,
    }


def checkpoint_meta(
    cfg: Config,
    step: int,
    epoch: int,
    world_size: int,
    metrics: dict[str, Any],
    best_metric: float | None,
    best_step: int | None,
) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint at ``step``: what a resume checks (:func:`check_resume_compatible`), what
    ``pretrain export`` and ``pretrain status`` read, the last eval's metrics and the best one so far."""
    return {
        "step": step,
        "epoch": epoch,
        "world_size": world_size,
        "batch_size": cfg.data.batch_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "max_steps": cfg.trainer.max_steps,
        "config_digest": config_digest(cfg),
        "model_shape_digest": model_shape_digest(cfg),
        "model_config": dataclasses.asdict(cfg.model),
        "layer_decay": cfg.optim.layer_decay,
        "metrics": dict(metrics),
        "best_metric": best_metric,
        "best_step": best_step,
        "time": time.time(),
    }


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
        trusted: ``--trust-checkpoint``: load checkpoints that are not signed by this user (still as plain data).
        schedule: When a checkpoint is due (never, by default: the caller saves when it likes).

    A training run registers what it saves besides the engine (:meth:`track`): then :meth:`restore` loads the newest
    usable checkpoint into the engine and every component, and :meth:`save` collects and writes them all.
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
        trusted: bool = False,
        schedule: SaveSchedule | None = None,
    ):
        self.trusted = trusted
        self.schedule = schedule or SaveSchedule(0, 0.0, False, rank == 0)
        self._engine: Any = None
        self._components: Components | None = None
        self.root = Path(ckpt_root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode

    def track(self, engine: Any, components: Components) -> None:
        """Save and restore ``engine`` (model, optimizer, LR scheduler) and ``components`` with every checkpoint."""
        self._engine, self._components = engine, components

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Collective: write the tracked engine and components as checkpoint ``tag_for_step(step)`` with ``meta``
        (see :meth:`write`); the schedule's clock restarts."""
        parts = self._tracked()
        extra = {name: c.state_dict() for name, c in parts.files.items()}
        tag_dir = self.write(self._engine, step, parts.client_state(), parts.rank.state_dict(), meta, extra)
        self.schedule.saved(step)
        return tag_dir

    def restore(self, explicit: str | Path | None = None) -> Path | None:
        """Collective: load the newest usable checkpoint (``explicit``: that one, see :meth:`load_newest`) into the
        tracked engine and components, client state first. Returns it, or None when there is none."""
        parts = self._tracked()
        loaded = self.load_newest(self._engine, explicit=explicit, extra=tuple(parts.files))
        if loaded is None:
            return None
        tag_dir, client, rank_state = loaded
        parts.restore(client, rank_state, rank_state["files"])
        self.schedule.saved_step = int(read_meta(tag_dir).get("step", -1))  # no save is due for the step it holds
        return tag_dir

    def _tracked(self) -> Components:
        if self._components is None:
            raise RuntimeError("CheckpointManager.track() names what to save before save() or restore()")
        return self._components

    def write(
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

        Rank 0 checks the candidate's signature, then every file's sha256. One that is not signed by this user is
        refused (unless ``trusted``): every rank raises :class:`UntrustedCheckpoint` and nothing is set aside. One that
        fails verification or fails to load on any rank is reported with the reason and set aside under ``rejected/``
        (never deleted), and the next older one is tried. An ``explicit`` checkpoint is never set aside: its failure
        is an error. ``extra`` names our own files of the checkpoint (e.g. ``ema.pt``) loaded on every rank into
        ``rank_state["files"]``, so they take part in the check.

        Returns:
            ``(tag_dir, client_state, rank_state)``, or None when no usable checkpoint is left.

        Raises:
            UntrustedCheckpoint: On every rank alike, naming ``--trust-checkpoint``.
        """
        from pretrain.distributed import all_reduce_max, broadcast_object

        while True:
            pick, why, refused = None, "", ""
            if self.rank == 0:
                try:
                    pick, why = self._pick(explicit)
                except (UntrustedCheckpoint, trust.TrustKeyError) as e:
                    refused = str(e)
            pick, why, refused = broadcast_object((pick, why, refused))  # type: ignore[misc]
            if refused:
                raise UntrustedCheckpoint(refused)
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

    def _pick(self, explicit: str | Path | None) -> tuple[str | None, str]:
        """Rank 0: ``(checkpoint, "")`` to load, or ``(None, why)`` for an ``explicit`` one that does not verify."""
        if explicit is None:
            return self._newest_verified(), ""
        if not self.trusted:
            signed, why = check_signature(explicit)
            if not signed:
                raise UntrustedCheckpoint(untrusted_message(explicit, why))
        ok, why = verify_checkpoint(explicit)
        return (str(explicit), "") if ok else (None, why)

    def _newest_verified(self) -> str | None:
        """Rank 0: the newest checkpoint that verifies; newer ones that do not are set aside with their reason.

        Raises:
            UntrustedCheckpoint: The newest complete one is not signed by this user (and not ``trusted``).
        """
        for info in reversed(list_checkpoints(self.root)):
            if info.complete and not info.signed and not self.trusted:
                raise UntrustedCheckpoint(untrusted_message(info.path, info.signature))
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
            verified: Rank 0 already checked the signature and the digests (:meth:`load_newest`); only sizes are
                checked here.

        Returns:
            ``(client_state, rank_state)``.

        Raises:
            UntrustedCheckpoint: Not ``verified``, and the checkpoint is not signed by this user (nor ``trusted``).
        """
        tag_dir = Path(tag_dir)
        if not verified and not self.trusted and not (signed := check_signature(tag_dir))[0]:
            raise UntrustedCheckpoint(untrusted_message(tag_dir, signed[1]))
        ok, reason = verify_checkpoint(tag_dir, digests=not verified)
        if not ok:
            raise RuntimeError(f"checkpoint {tag_dir} is not usable: {reason}")
        saved_world = int(read_meta(tag_dir).get("world_size") or self.world_size)
        if saved_world != self.world_size:
            return self._load_resharded(engine, tag_dir, saved_world)
        with plain_loads():
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
        conversion is deleted. Stage 0 checkpoints are not partitioned and load as they are. Stage 3 is refused
        (:func:`~pretrain.checkpoint.zero3_reshard_refused` says why).

        Every rank continues the data stream at old rank 0's position (the same global sample; the loader checks that
        the global batch is unchanged), rank 0 carries the corrupt-sample counts of all old ranks, and ``rng`` is None:
        the old per-rank RNG streams do not map onto the new ranks.
        """
        from pretrain.distributed import barrier, broadcast_object

        t0 = time.monotonic()
        universal = None
        load_root = tag_dir.parent
        if engine.zero_optimization_stage() == 3:
            raise CheckpointMismatchError(f"{tag_dir}: {zero3_reshard_refused(saved_world, self.world_size)}")
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
            with plain_loads():
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


_UNIVERSAL_PLAIN = (
    "import runpy, sys, torch; from pretrain.checkpoint import deepspeed_plain_types; "
    "torch.serialization.add_safe_globals(deepspeed_plain_types()); sys.argv[0] = 'ds_to_universal'; "
    "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')"
)  # DeepSpeed's converter, its loads forced to weights_only (the environment) with its plain types allowed


def _to_universal(tag_dir: Path, out: Path) -> None:
    """``deepspeed.checkpoint.ds_to_universal`` of ``tag_dir`` into ``out`` (replaced), in a subprocess whose every
    ``torch.load`` is plain (:func:`plain_loads`)."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-c", _UNIVERSAL_PLAIN, "--input_folder", str(tag_dir),
        "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state",
    ]  # fmt: skip
    env = {**os.environ, FORCE_WEIGHTS_ONLY_ENV: "1"}
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(
            f"could not convert {tag_dir} to a DeepSpeed universal checkpoint for a resume on another number of "
            f"ranks (exit {done.returncode}); relaunch with the checkpoint's number of ranks. Output:\n{tail}"
        )
