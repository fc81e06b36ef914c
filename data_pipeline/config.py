"""The data sections of a run config: where the shards are and how they are read (``data``), and how images are
augmented (``augment``).

They live here, next to the code that reads them, so that ``data_pipeline`` imports nothing from ``pretrain``:
:mod:`pretrain.config` composes these sections into the run config (with its YAML merging, overrides and
closest-key errors) and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AugmentConfig", "ConfigError", "DataConfig"]


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message names the key and how to fix it."""


@dataclass
class DataConfig:
    path: str = "data/digits"
    """Folder or remote prefix (``s3://bucket/prefix``, ``https://host/path``) holding ``manifest.json``."""
    train_split: str = "train"
    """Split streamed for training."""
    val_split: str = "val"
    """Split used for evaluation (``val`` finds ``validation`` and back); empty disables evaluation."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of a remote ``path`` (e.g. ``{endpoint_url: ..., anon: true}``); credentials belong in the
    AWS environment variables or files (this mapping is written to the run's config.yaml)."""
    cache_dir: str = ""
    """Local folder caching remote shards whole for later epochs (empty: byte-range reads only)."""
    cache_max_gb: float = 50.0
    """Upper bound of ``cache_dir``'s size; least recently used shards are removed past it."""
    remote_retries: int = 5
    """Times a remote request that failed transiently (5xx, reset, timeout) is retried before its shard is skipped."""
    batch_size: int = 64
    """Micro-batch per rank (images per forward pass on one device)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Seeded in-memory shuffle buffer, in samples."""
    seed: int = 0
    """Seed of the stream order; the order of an epoch is a pure function of (seed, epoch, manifest)."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive across epochs."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    val_batch_size: int = 0
    """Evaluation batch per rank; 0 means ``batch_size``."""
    classes_from_manifest: bool = True
    """Set ``model.num_classes`` from the manifest's class list."""

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size={self.batch_size} must be positive")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1")
        if self.cache_max_gb <= 0:
            raise ConfigError(f"data.cache_max_gb={self.cache_max_gb} must be positive")
        if self.remote_retries < 0:
            raise ConfigError(f"data.remote_retries={self.remote_retries} must be >= 0")


@dataclass
class AugmentConfig:
    scale_min: float = 0.08
    """RandomResizedCrop minimum area fraction."""
    ratio_min: float = 3 / 4
    """RandomResizedCrop minimum aspect ratio."""
    ratio_max: float = 4 / 3
    """RandomResizedCrop maximum aspect ratio."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    eval_crop_ratio: float = 0.875
    """Evaluation: resize to img_size / ratio, then centre crop img_size."""
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    """Resize interpolation on the CPU side."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel normalisation mean (0..1 scale)."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel normalisation std (0..1 scale)."""
    randaug_n: int = 2
    """RandAugment: ops per image; 0 disables."""
    randaug_m: float = 9.0
    """RandAugment magnitude (0..10 scale)."""
    randaug_mstd: float = 0.5
    """RandAugment magnitude noise std."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength; 0 disables."""
    mixup_alpha: float = 0.8
    """Mixup Beta(alpha, alpha); 0 disables."""
    cutmix_alpha: float = 1.0
    """CutMix Beta(alpha, alpha); 0 disables."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    label_smoothing: float = 0.1
    """Label smoothing of the (soft) targets."""
    random_erasing: float = 0.25
    """Random erasing probability per image (pixel mode); 0 disables."""

    def __post_init__(self):
        for name in ("hflip", "mix_prob", "switch_prob", "random_erasing"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"augment.{name}={v} must be a probability in [0, 1]")
        if not 0.0 < self.scale_min <= 1.0:
            raise ConfigError(f"augment.scale_min={self.scale_min} must be in (0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"augment.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("augment.mean and augment.std need 3 values (RGB)")
        if not 0.0 < self.eval_crop_ratio <= 1.0:
            raise ConfigError(f"augment.eval_crop_ratio={self.eval_crop_ratio} must be in (0, 1]")
