"""The data set manifest: ``DIR/manifest.json`` written last by ``pretrain data build``.

It lists, per split, every shard with its sample count, size and sha256, plus the class names, the image format
and the source the shards were built from. The stream derives sample keys and shard offsets from it, ``inspect``
verifies shards against it. Every sample is labelled (a ``.cls`` member holding an index into ``classes``), so a split
with samples needs a non-empty ``classes``. Schema (version 1)::

    {"version": 1, "source": str, "format": "png" | "jpeg" | "mixed", "classes": [name, ...], "created": iso time,
     "splits": {"train": {"num_samples": int, "class_counts": {name: n},
                          "shards": [{"name": "train/shard-000000.tar", "samples": int, "bytes": int,
                                      "sha256": hex}]},
                "val": {...}},
     "skipped": [{"path": str, "reason": str}]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.fsutil import fsync_dir

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "FORMATS",
    "Manifest",
    "file_sha256",
    "ShardInfo",
    "SplitInfo",
    "load_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("png", "jpeg", "mixed")
_HINT = "run `pretrain data build SOURCE --out DIR` to (re)build it"


@dataclass
class ShardInfo:
    """One tar shard of a split."""

    name: str
    """Path relative to the data folder, e.g. ``train/shard-000000.tar``."""
    samples: int
    """Samples (keys) in the shard."""
    bytes: int
    """File size in bytes."""
    sha256: str
    """Hex sha256 of the whole file."""


@dataclass
class SplitInfo:
    """One split (``train``, ``val``): its shards in write order; sample keys run consecutively across them."""

    num_samples: int
    class_counts: dict[str, int] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        """Total size of the split's shards."""
        return sum(s.bytes for s in self.shards)


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``; field names mirror the JSON."""

    source: str
    format: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    created: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @staticmethod
    def shard_path(data_dir: str | os.PathLike, shard: ShardInfo | str) -> Path:
        """Absolute-or-relative path of ``shard`` (a :class:`ShardInfo` or its name) inside ``data_dir``."""
        name = shard.name if isinstance(shard, ShardInfo) else str(shard)
        return Path(data_dir) / name

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in schema order."""
        return {
            "version": self.version,
            "source": self.source,
            "format": self.format,
            "classes": list(self.classes),
            "created": self.created,
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "class_counts": dict(split.class_counts),
                    "shards": [
                        {"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                        for s in split.shards
                    ],
                }
                for name, split in self.splits.items()
            },
            "skipped": [dict(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Validates and converts a parsed ``manifest.json``.

        Raises:
            ValueError: A field is missing, has the wrong type, or the counts do not add up; the message names
                ``where`` and the field.
        """

        def bad(msg: str) -> ValueError:
            return ValueError(f"{where}: invalid manifest: {msg}; {_HINT}")

        if not isinstance(raw, dict):
            raise bad("top level is not a JSON object")
        if raw.get("version") != MANIFEST_VERSION:
            raise bad(f"version is {raw.get('version')!r}, this code reads version {MANIFEST_VERSION}")
        for key, tp in (("source", str), ("format", str), ("classes", list), ("splits", dict)):
            if not isinstance(raw.get(key), tp):
                raise bad(f"'{key}' is missing or not a {tp.__name__}")
        if raw["format"] not in FORMATS:
            raise bad(f"format {raw['format']!r} is not one of {list(FORMATS)}")
        classes = raw["classes"]
        if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise bad("'classes' must be distinct strings")
        splits: dict[str, SplitInfo] = {}
        for split_name, s in raw["splits"].items():
            at = f"splits.{split_name}"
            if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
                raise bad(f"{at}.shards is missing")
            shards = []
            for i, sh in enumerate(s["shards"]):
                try:
                    info = ShardInfo(str(sh["name"]), int(sh["samples"]), int(sh["bytes"]), str(sh["sha256"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise bad(f"{at}.shards[{i}] needs name, samples, bytes, sha256 ({e!r})") from None
                if Path(info.name).is_absolute() or ".." in Path(info.name).parts:
                    raise bad(f"{at}.shards[{i}].name {info.name!r} must be a path inside the data folder")
                shards.append(info)
            try:
                num_samples = int(s["num_samples"])
                class_counts = {str(k): int(v) for k, v in (s.get("class_counts") or {}).items()}
            except (KeyError, TypeError, ValueError) as e:
                raise bad(f"{at} needs num_samples and class_counts ({e!r})") from None
            if sum(sh.samples for sh in shards) != num_samples:
                raise bad(f"{at}.num_samples={num_samples} but its shards hold {sum(sh.samples for sh in shards)}")
            unknown = sorted(set(class_counts) - set(classes))
            if unknown:
                raise bad(f"{at}.class_counts names classes not in 'classes': {unknown[:5]}")
            splits[str(split_name)] = SplitInfo(num_samples, class_counts, shards)
        labelled = [name for name, split in splits.items() if split.num_samples > 0]
        if labelled and not classes:
            raise bad(
                f"'classes' is empty but split(s) {', '.join(labelled)} hold samples, each with a .cls label that "
                "indexes 'classes': the labels name no class"
            )
        skipped = raw.get("skipped") or []
        if not isinstance(skipped, list) or not all(isinstance(x, dict) for x in skipped):
            raise bad("'skipped' must be a list of {path, reason} objects")
        return cls(
            source=raw["source"],
            format=raw["format"],
            classes=list(classes),
            splits=splits,
            created=str(raw.get("created", "")),
            skipped=[{"path": str(x.get("path", "")), "reason": str(x.get("reason", ""))} for x in skipped],
            version=MANIFEST_VERSION,
        )


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Reads and validates ``data_dir/manifest.json``.

    Args:
        data_dir: Folder written by ``pretrain data build``.

    Raises:
        FileNotFoundError: The folder or its manifest does not exist (say to run ``pretrain data build``).
        ValueError: The manifest is not valid JSON or does not follow the schema.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist; {_HINT}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (no finished build in {data_dir}); {_HINT}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {_HINT}") from None
    return Manifest.from_dict(raw, where=str(path))


def write_manifest(manifest: Manifest, data_dir: str | os.PathLike) -> Path:
    """Writes ``data_dir/manifest.json`` atomically (temp file, fsync, rename) and returns its path."""
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 4 << 20) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()
