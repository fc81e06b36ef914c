"""Exceptions of the data pipeline: what a transform raises for a sample it cannot use.

The stream catches :class:`CorruptSample`, counts it under ``reason`` and skips the sample; any other exception
from a transform is a bug and stops training.
"""

from __future__ import annotations

import logging

__all__ = ["CorruptSample", "DECODE_ERROR", "MISSING_IMAGE", "MISSING_LABEL"]

logger = logging.getLogger(__name__)

DECODE_ERROR = "decode_error"
"""The image bytes are not a decodable image (garbage, truncated, unsupported)."""
MISSING_LABEL = "missing_label"
"""A sample has no ``.cls`` member."""
MISSING_IMAGE = "missing_image"
"""A sample has no image member (or an empty one)."""


class CorruptSample(Exception):
    """A sample that cannot be used; the stream counts it under ``reason`` and skips it.

    Args:
        reason: Short machine-readable cause, e.g. ``"decode_error"``; the counters are keyed by it.
        detail: Human-readable detail for the (rate-limited) log line.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)  # both in args, so the exception pickles across DataLoader workers
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
