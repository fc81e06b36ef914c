"""Labels of shards made by other tools: where a sample's label is (``--label``), and which values are labels at all.

A label is read from one member of the sample, decoded by WebDataset's own ``autodecode.basichandlers`` (``.cls``:
``int``, ``.txt``: UTF-8 text, ``.json``: ``json.loads``), so it means what it means to a ``webdataset.WebDataset``
user. What the shards hold is not trusted: every value is bounded before it is decoded or kept, and anything that is
not a usable label is a :class:`SkipSample` with a reason (``missing_label`` or ``bad_label``) and a detail that says
what was found, never an exception that stops the indexer or a value that grows without bound:

- a label member larger than a label can be (:data:`MAX_MEMBER_BYTES`: 64 bytes of ``.cls``, 64 KiB of ``.txt``,
  1 MiB of ``.json``) is not decoded;
- JSON nested deeper than Python's parser goes (its recursion limit, about 1,000 levels) or with a number past
  Python's digit limit does not parse;
- an integer is a class index: ``0 <= i < 2**31`` (an int32 in the batches), below the number of classes when they are
  known (``--classes``, ``classes.txt``), and below :data:`MAX_CLASSES_FROM_LABELS` when the classes are numbered from
  the labels (``0..K-1`` with K the largest label + 1: one stray huge label would otherwise make billions of classes);
- ``true``/``false``, floats (``NaN``, ``Infinity``, ``3.0``), ``null``, lists and objects are not labels;
- a string is a class name: at most :data:`MAX_CLASS_NAME_CHARS` characters, on one line, without control characters
  (it goes into the manifest's class list and must survive a ``classes.txt`` round trip); surrounding blanks are
  stripped and an empty one is a missing label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.errors import MISSING_LABEL
from data_pipeline.remote import Store, is_remote
from data_pipeline.shard_specs import parse_classes

__all__ = [
    "BAD_LABEL",
    "MAX_CLASSES_FROM_LABELS",
    "MAX_CLASS_INDEX",
    "MAX_CLASS_NAME_CHARS",
    "MAX_MEMBER_BYTES",
    "LabelRule",
    "SkipSample",
    "check_label",
    "read_classes",
]

BAD_LABEL = "bad_label"
"""A label that does not parse, is no class index or class name, or names no class of the class list."""
MAX_CLASS_INDEX = 2**31 - 1
"""Largest integer label: the batches hold labels as int32-safe int64."""
MAX_CLASSES_FROM_LABELS = 1 << 20
"""Most classes numbered from integer labels without a class list (``--classes`` lifts it to the list's length)."""
MAX_CLASS_NAME_CHARS = 1000
"""Longest class name kept (ImageNet's longest names are under 200 characters)."""
MAX_MEMBER_BYTES = {"cls": 64, "txt": 64 << 10, "json": 1 << 20}
"""Largest label member decoded, per ``--label`` kind."""


class SkipSample(Exception):
    """A sample left out of the index, counted under ``reason``; ``detail`` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _show(value: Any) -> str:
    """A short, safe rendering of a decoded value for messages."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _one_line_printable(name: str) -> bool:
    return len(name.splitlines()) == 1 and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name)


def check_label(value: Any, num_classes: int | None) -> int | str:
    """``value`` (decoded from a label member) as a class index or a stripped class name.

    Args:
        value: What the label member decoded to.
        num_classes: The number of classes when a class list is given; None: classes are numbered from the labels.

    Raises:
        SkipSample: ``missing_label`` (an empty name) or ``bad_label`` (anything else that is not a label; the
            detail says what).
    """
    if isinstance(value, str):
        name = value.strip()
        if not name:
            raise SkipSample(MISSING_LABEL, "an empty label")
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise SkipSample(BAD_LABEL, f"a class name of {len(name)} characters (at most {MAX_CLASS_NAME_CHARS})")
        if not _one_line_printable(name):
            raise SkipSample(BAD_LABEL, f"the class name {_show(name)} holds a line break or control character")
        return name
    if isinstance(value, bool) or not isinstance(value, int):
        what = "null" if value is None else type(value).__name__
        raise SkipSample(BAD_LABEL, f"{_show(value)} ({what}) is neither a class index nor a class name")
    if value < 0:
        raise SkipSample(BAD_LABEL, f"the class index {_show(value)} is negative")
    if value > MAX_CLASS_INDEX:
        raise SkipSample(BAD_LABEL, f"the class index {_show(value)} is not below 2**31")
    if num_classes is not None and value >= num_classes:
        raise SkipSample(BAD_LABEL, f"the class index {value} is not below the {num_classes} classes of the list")
    if num_classes is None and value >= MAX_CLASSES_FROM_LABELS:
        raise SkipSample(
            BAD_LABEL,
            f"the class index {value} would number {value + 1} classes from the labels (at most "
            f"{MAX_CLASSES_FROM_LABELS} without --classes FILE)",
        )
    return value


@dataclass(frozen=True)
class LabelRule:
    """Where a sample's label is: ``cls``, ``txt`` or ``json:FIELD``."""

    kind: str
    field: str = ""

    @classmethod
    def parse(cls, spec: str) -> LabelRule:
        """``cls`` | ``txt`` | ``json:FIELD``.

        Raises:
            ValueError: Any other spec.
        """
        kind, colon, name = spec.partition(":")
        if kind in ("cls", "txt") and not colon:
            return cls(kind)
        if kind == "json" and name and all(name.split(".")):
            return cls(kind, name)
        raise ValueError(f"--label {spec!r}: use cls, txt or json:FIELD (e.g. json:label)")

    def __str__(self) -> str:
        return f"json:{self.field}" if self.kind == "json" else self.kind

    @property
    def member(self) -> str:
        """The member (extension) the label is read from."""
        return self.kind

    def read(self, members: Mapping[str, bytes], num_classes: int | None = None) -> int | str:
        """The label of a sample: an int (class index) or a str (class name), checked by :func:`check_label`.

        Args:
            members: The sample's members by extension (only the label's is read).
            num_classes: The number of classes of the class list, if there is one.

        Raises:
            SkipSample: ``missing_label`` (no member, no field, an empty name) or ``bad_label`` (too large, does not
                decode, or not a label).
        """
        from webdataset.autodecode import basichandlers  # webdataset's decoders by extension: int / str / JSON

        data = members.get(self.kind)
        if data is None:
            raise SkipSample(MISSING_LABEL, f"no .{self.kind}")
        limit = MAX_MEMBER_BYTES[self.kind]
        if len(data) > limit:
            raise SkipSample(BAD_LABEL, f".{self.kind} of {len(data)} bytes (a label takes at most {limit})")
        try:
            value = basichandlers(self.kind, data)
        except RecursionError:
            raise SkipSample(BAD_LABEL, f".{self.kind} nests deeper than the JSON parser goes") from None
        except ValueError as e:  # int(b"x"), bad UTF-8, JSONDecodeError, a number past the digit limit
            raise SkipSample(BAD_LABEL, f".{self.kind} does not decode ({type(e).__name__}: {str(e)[:80]})") from None
        for part in self.field.split(".") if self.field else ():
            if not isinstance(value, dict) or part not in value:
                raise SkipSample(MISSING_LABEL, f"no field {self.field} in .json")
            value = value[part]
        return check_label(value, num_classes)


def read_classes(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Class names, one per line, from a local file or a remote one (surrounding blanks and empty lines ignored).

    Raises:
        ValueError: The file cannot be read, is empty, names a class twice, or holds a name that is not one
            (longer than :data:`MAX_CLASS_NAME_CHARS`, or with control characters).
    """
    where = str(location)
    try:
        if is_remote(where):
            folder, _, name = where.rstrip("/").rpartition("/")
            text = Store(folder, storage_options).read_bytes(name).decode("utf-8")
        else:
            text = Path(location).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--classes {where}: cannot read it ({e})") from None
    names = parse_classes(text, f"--classes {where}")
    for i, name in enumerate(names):
        if len(name) > MAX_CLASS_NAME_CHARS or not _one_line_printable(name):
            raise ValueError(
                f"--classes {where}: class {i} ({_show(name)}) is not a class name: at most {MAX_CLASS_NAME_CHARS} "
                "characters without control characters"
            )
    return names
