"""SepViT's window plans: the token map side of each stage, a plan checked or fitted to an input size, and the plan
that keeps every block's window count at another size (used to adapt pretrained weights)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["check_window_sizes", "fit_window_sizes", "keep_counts_plan", "stage_resolutions"]

logger = logging.getLogger(__name__)


def stage_resolutions(img_size: int, num_stages: int = 4) -> list[int]:
    """Side length of the token map of each stage: conv 7x7/4 (pad 3), then conv 3x3/2 (pad 1) per stage."""
    res = [(img_size - 1) // 4 + 1]  # ceil(img_size / 4)
    for _ in range(num_stages - 1):
        res.append((res[-1] - 1) // 2 + 1)  # ceil(r / 2)
    return res


def _expand_window_sizes(window_sizes: Sequence[int | Sequence[int]], depths: Sequence[int]) -> list[list[int]]:
    """Per-stage entries may be one int (every block of the stage) or a list with one size per block."""
    if isinstance(window_sizes, (str, bytes)) or len(window_sizes) != len(depths):
        raise ValueError(
            f"window_sizes must have one entry per stage ({len(depths)} stages, depths {list(depths)}), "
            f"got {window_sizes!r}"
        )
    out = []
    for s, (entry, depth) in enumerate(zip(window_sizes, depths)):
        sizes = [entry] * depth if isinstance(entry, int) else list(entry)
        if len(sizes) != depth:
            raise ValueError(f"window_sizes[{s}] (stage {s + 1}) needs {depth} sizes, one per block, got {entry!r}")
        for b, w in enumerate(sizes):
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"window_sizes[{s}][{b}] (stage {s + 1}, block {b}) must be a positive int, got {w!r}")
        out.append(sizes)
    return out


def fit_window_sizes(
    window_sizes: Sequence[int | Sequence[int]], depths: Sequence[int], img_size: int
) -> list[list[int]]:
    """Adapt a window plan to ``img_size``: each size becomes the largest divisor of its stage resolution <= it.

    Args:
        window_sizes: per stage, one int or a list of per-block sizes (e.g. the official ``[[7], [7, 14], ...]``).
        depths: blocks per stage.
        img_size: input side length.

    Returns:
        Per-block window sizes that the model accepts at ``img_size``; for ``sepvit_lite`` at 32 this turns the
        official plan into ``[[4], [4, 4], [2] * 6, [1, 1]]``.
    """
    sizes = _expand_window_sizes(window_sizes, depths)
    res = stage_resolutions(img_size, len(depths))
    return [[max(d for d in range(1, min(w, r) + 1) if r % d == 0) for w in stage] for stage, r in zip(sizes, res)]


def check_window_sizes(
    window_sizes: Sequence[int | Sequence[int]], depths: Sequence[int], img_size: int
) -> list[list[int]]:
    """Expand, clamp sizes larger than the stage to the stage, and reject sizes that do not divide it."""
    sizes = _expand_window_sizes(window_sizes, depths)
    res = stage_resolutions(img_size, len(depths))
    checked = []
    for s, (stage, r) in enumerate(zip(sizes, res)):
        row = []
        for b, w in enumerate(stage):
            if w > r:
                logger.debug("stage %d block %d: window %d clamped to the %dx%d stage", s + 1, b, w, r, r)
                w = r  # one window covering the stage: global attention, no PWA (the official stage 4)
            if r % w:
                divisors = ", ".join(str(d) for d in range(1, r + 1) if r % d == 0)
                multiple = 4 * 2**s * w  # input sizes whose stage-(s+1) resolution is a multiple of w
                raise ValueError(
                    f"window_sizes[{s}][{b}]={w} (stage {s + 1}, block {b}) does not divide the {r}x{r} token map "
                    f"of stage {s + 1} at img_size={img_size}: use a window size that divides {r} ({divisors}), an "
                    f"img_size that is a multiple of {multiple} (e.g. {multiple * max(1, round(img_size / multiple))}"
                    f"), or window_sizes={fit_window_sizes(sizes, depths, img_size)} "
                    "(pretrain.models.sepvit_windows.fit_window_sizes)"
                )
            row.append(w)
        checked.append(row)
    return checked


def keep_counts_plan(src: list[list[int]], src_res: list[int], res: list[int]) -> list[list[int]] | None:
    """Window sizes at ``res`` with the same window count per block as ``src`` at ``src_res`` (None if none)."""
    plan = []
    for stage, rs, rt in zip(src, src_res, res):
        row = []
        for w in stage:
            count = rs // w  # windows per side
            if rt % count:
                return None
            row.append(rt // count)
        plan.append(row)
    return plan
