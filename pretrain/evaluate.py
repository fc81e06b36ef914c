"""Top-1, top-5 and loss over a whole split, exact on any number of ranks; shared by the trainer and ``pretrain eval``.

The eval loader gives every sample exactly once across the ranks (padding rows are marked invalid), each rank sums
loss, hits and its count of valid rows, and one all-reduce of those sums gives the split's numbers: the result does not
depend on the rank count (the loss up to float summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from data_pipeline.config import AugmentConfig
from pretrain.metrics import topk_correct

__all__ = ["build_eval_loader", "eval_metrics", "evaluate_models"]


@torch.no_grad()
def evaluate_models(
    models: Sequence[nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    world_size: int = 1,
) -> torch.Tensor:
    """Sums over the valid rows of every batch, for each model, all-reduced over the ranks.

    Args:
        models: Models in eval mode (a DeepSpeed engine is fine); each sees the same batches.
        batches: This rank's eval batches: ``image`` uint8 (B, 3, S, S), ``label`` (B,), ``valid`` (B,).
        normalize: uint8 images on ``device`` -> the float input of the models.
        device: Where the models run.
        world_size: Ranks taking part (> 1 all-reduces over the default process group).

    Returns:
        float64 (len(models), 4): loss sum, top-1 hits, top-5 hits, valid rows.
    """
    sums = torch.zeros(len(models), 4, dtype=torch.float64)  # loss, top1, top5, count
    with torch.random.fork_rng(devices=[]):  # loader iteration must not move the global RNG stream
        for batch in batches:
            images = normalize(batch["image"].to(device))
            labels, valid = batch["label"].to(device), batch["valid"].to(device)
            for i, model in enumerate(models):
                logits = model(images.to(next(model.parameters()).dtype)).float()
                ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
                top1, top5 = topk_correct(logits, labels, valid)
                sums[i] += torch.stack([(ce * valid).sum(), top1, top5, valid.sum()]).double().cpu()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    return sums


def eval_metrics(sums: torch.Tensor, suffixes: Sequence[str] = ("",)) -> dict[str, Any]:
    """``val_loss{suffix}``, ``val_top1{suffix}``, ``val_top5{suffix}`` per model, then ``val_samples``."""
    out: dict[str, Any] = {}
    for i, suffix in enumerate(suffixes):
        n = max(1.0, float(sums[i, 3]))
        out[f"val_loss{suffix}"] = float(sums[i, 0]) / n
        out[f"val_top1{suffix}"] = float(sums[i, 1]) / n
        out[f"val_top5{suffix}"] = float(sums[i, 2]) / n
    out["val_samples"] = int(sums[0, 3])
    return out


def build_eval_loader(
    data_path: str | Path,
    split: str,
    augment: AugmentConfig,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Any:
    """This rank's loader of ``split`` with the run's eval transform (resize, centre crop): every sample once."""
    from data_pipeline.loader import build_loader
    from data_pipeline.transforms import build_transforms

    _, eval_tf = build_transforms(augment, img_size)
    return build_loader(
        data_path,
        split,
        train=False,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=0,  # unused without shuffling: eval order is the write order
        shuffle_buffer=1,
        transform=eval_tf,
        persistent_workers=False,
        image_size=img_size,
    )
