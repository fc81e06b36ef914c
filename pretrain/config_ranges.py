"""The valid range of every numeric field of the run config: a table, checked when a config is built.

A value outside its range is a :class:`ConfigError` naming the field and the range (``optim.lr=inf must be positive
and finite, in (0, 100]``): no field of a run config means anything at inf or NaN, and an absurd value (a seed beyond
what numpy takes, an image size of 10**9) fails before anything starts instead of deep inside a run. A test checks
that every numeric field of :class:`pretrain.config.Config` has a rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from data_pipeline.config import ConfigError

__all__ = ["NUMERIC_RULES", "Range", "check_ranges"]


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take: a finite number (an integer for int fields) between ``lo`` and ``hi``.

    ``hi=math.inf`` leaves the top open but still excludes infinity: no field of a run config means anything at inf or
    NaN, and a float that slips through (``optim.lr=inf``) trains to NaN without a word.
    """

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""
    """Said after the range, e.g. how to convert a value given on another scale."""

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a finite number"
        if self.lo == 0 and self.lo_open and not integer:
            kind = "positive and finite,"
        if self.hi == math.inf:
            return f"{kind} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"{kind} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_STEPS = Range(0, 10**12)  # a step count or interval; 0 where the field says it disables
_COUNT = Range(1, 10**12)
_PROB = Range(0, 1)
_FRACTION = Range(0, 1, hi_open=True)  # a rate where 1 would remove everything (drop rates, decays, betas)
_SEED = Range(0, 2**32 - 1)  # numpy's limit for a seed; torch and Python accept it too
_LR = Range(0, 100)
_BATCH = Range(1, 2**20)

NUMERIC_RULES: dict[str, Range] = {
    "model.num_classes": Range(0, 10**7),
    "model.img_size": Range(1, 8192),
    "model.drop_path_rate": _FRACTION,
    "model.drop_rate": _FRACTION,
    "optim.lr": Range(0, 100, lo_open=True),
    "optim.weight_decay": Range(0, 10),
    "optim.betas": _FRACTION,
    "optim.eps": Range(0, 1, lo_open=True),
    "optim.momentum": _FRACTION,
    "optim.grad_clip": Range(0, hint="(0 disables)"),
    "optim.layer_decay": Range(0, 1, lo_open=True, hint="(1.0 disables)"),
    "schedule.warmup_steps": _STEPS,
    "schedule.warmup_lr": _LR,
    "schedule.min_lr": _LR,
    "trainer.max_steps": _COUNT,
    "trainer.eval_every_steps": Range(0, 10**12, hint="(0: only at the end)"),
    "trainer.log_every_steps": _COUNT,
    "trainer.seed": _SEED,
    "trainer.grad_accum_steps": Range(1, 2**16),
    "trainer.global_batch_size": Range(0, 2**40, hint="(0: not checked)"),
    "trainer.ema_decay": Range(0, 1, hi_open=True, hint="(0 disables)"),
    "trainer.max_nonfinite_steps": _COUNT,
    "checkpoint.every_steps": Range(0, 10**12, hint="(0 disables)"),
    "checkpoint.every_minutes": Range(0, 10**7, hint="(0 disables)"),
    "checkpoint.keep_last": Range(1, 10**6, hint="(resume needs one)"),
    "checkpoint.keep_best": Range(0, 10**6),
    "logging.corrupt_log_every": _COUNT,
    "deepspeed.zero_stage": Range(0, 3),
    "data.cache_max_gb": Range(0, 10**9, lo_open=True),
    "data.remote_retries": Range(0, 1000),
    "data.batch_size": _BATCH,
    "data.num_workers": Range(0, 512),
    "data.shuffle_buffer": Range(1, 10**9),
    "data.seed": _SEED,
    "data.prefetch_factor": Range(1, 1024),
    "data.val_batch_size": Range(0, 2**20, hint="(0: data.batch_size)"),
    "augment.scale_min": Range(0, 1, lo_open=True),
    "augment.ratio_min": Range(0, 100, lo_open=True),
    "augment.ratio_max": Range(0, 100, lo_open=True),
    "augment.hflip": _PROB,
    "augment.eval_crop_ratio": Range(0, 1, lo_open=True),
    "augment.mean": Range(0, 1, hint="(0..1 scale: divide 0..255 values by 255)"),
    "augment.std": Range(0, 1, lo_open=True, hint="(0..1 scale: divide 0..255 values by 255)"),
    "augment.randaug_n": Range(0, 16, hint="(0 disables)"),
    "augment.randaug_m": Range(0, 10),
    "augment.randaug_mstd": Range(0, 10),
    "augment.color_jitter": Range(0, 1, hint="(0 disables)"),
    "augment.mixup_alpha": Range(0, 100, hint="(0 disables)"),
    "augment.cutmix_alpha": Range(0, 100, hint="(0 disables)"),
    "augment.mix_prob": _PROB,
    "augment.switch_prob": _PROB,
    "augment.label_smoothing": _FRACTION,
    "augment.random_erasing": _PROB,
}
"""The valid range of every numeric field of :class:`Config` (a list field: of each item), checked when a config is
built: a value outside is a :class:`ConfigError` naming the field and its range. A test checks that every numeric
field has a rule."""


def check_ranges(section: Any, name: str = "") -> None:
    """Check the numeric fields of one config section (``name``: its key in :class:`Config`, e.g. ``optim``) against
    :data:`NUMERIC_RULES`; a float field without a rule (in a schema other than :class:`Config`) must be finite.

    Raises:
        ConfigError: ``optim.lr=inf must be a finite number in (0, 100]``.
    """
    for f in dataclasses.fields(section):
        key = f"{name}.{f.name}" if name else f.name
        value = getattr(section, f.name)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            rule = NUMERIC_RULES.get(key) if name else None
            shown = f"{key}[{i}]" if i is not None else key
            if rule is None:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{shown}={item} must be a finite number")
                continue
            if not rule.admits(item):
                hint = f" {rule.hint}" if rule.hint else ""
                raise ConfigError(f"{shown}={item!r} must be {rule.describe(isinstance(item, int))}{hint}")
