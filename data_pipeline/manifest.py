"""The data set manifest: ``DIR/manifest.json``, written last by ``pretrain data build`` or ``pretrain data index``.

It lists, per split, every shard with its sample count, size and sha256, plus the class names, the image format
and the source the shards were built from. ``inspect`` verifies shards against it, and the stream maps a sample's
write index to its shard from the per-shard counts. Two versions, both read:

- version 1 (``pretrain data build``, our own shards): sample ``i`` of a split has the key ``{split}_{i:08d}`` and a
  ``.cls`` member holding an index into ``classes``; the stream derives keys. Each shard names its ``index`` under
  ``DIR/.index/`` (member offsets, so readers do not scan the tar; see :mod:`data_pipeline.shard_index`); shards of
  a build made before stored indexes existed name none and are scanned.
- version 2 (``pretrain data index``, shards written by any WebDataset tool): every shard names its ``index``, a JSON
  file under ``DIR/.index/`` (see :mod:`data_pipeline.indexer`) holding its samples' keys, labels, image member and
  member offsets in tar order; the stream takes keys and labels from there. The manifest also names the ``label``
  rule, the ``image_exts`` present, and per split the samples left out (``skipped_samples``, by reason).

The manifest and the ``.index/`` folder normally sit beside the shards. A store the indexer could not write (an
HTTP(S) server, a read-only bucket) is indexed into another location (``pretrain data index URL --index-out DIR``):
that manifest names where the shards are (``shard_location``, an absolute path or a URL) and shard names stay
relative to it. Locations may be local folders or remote prefixes (:class:`data_pipeline.remote.Store`).

Each stored index is recorded with its sha256 (``index_sha256``), and no reader uses an index that does not match
it: the loader checks it when it opens a shard (a shard of ``pretrain data index`` whose index changed is skipped and
counted as ``bad_index``; one of ours is scanned instead), ``plan`` and ``inspect`` refuse it. A version 1 manifest
whose shard names an index without its digest gets the index ignored (the shard is scanned, as in a build made before
stored indexes); a version 2 one is invalid (re-run ``pretrain data index``).

Every sample is labelled, so a split with samples needs a non-empty ``classes``. Schema::

    {"version": 1 | 2, "source": str, "format": "png" | "jpeg" | "mixed", "classes": [name, ...], "created": iso time,
     "splits": {"train": {"num_samples": int, "class_counts": {name: n},
                          "shards": [{"name": "train/shard-000000.tar", "samples": int, "bytes": int,
                                      "sha256": hex, "index": ".index/train/shard-000000.tar.json",
                                      "index_sha256": hex}],
                          "skipped_samples": {reason: n} (v2)},
                "val": {...}},
     "skipped": [{"path": str, "reason": str}],
     "label": "cls" | "txt" | "json:FIELD" (v2), "image_exts": [ext, ...] (v2),
     "shard_location": "s3://bucket/prefix" (only where the shards are not beside the manifest)}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.remote import Store, is_remote

__all__ = [
    "MANIFEST_NAME",
    "VAL_SPLIT_NAMES",
    "resolve_split",
    "previous_manifest",
    "same_manifest_content",
    "MANIFEST_VERSION",
    "INDEXED_MANIFEST_VERSION",
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
"""Our own shards (``pretrain data build``): keys derived from write indices."""
INDEXED_MANIFEST_VERSION = 2
"""Shards indexed by ``pretrain data index``: each shard has a stored per-shard index."""
FORMATS = ("png", "jpeg", "mixed")
_HINT = (
    "for WebDataset shards already there run `pretrain data index DIR`; to make shards from images run "
    "`pretrain data build SOURCE --out DIR`"
)
VAL_SPLIT_NAMES = ("val", "validation")
"""Names of the validation split: asking for one finds a data set's other (Hugging Face calls it ``validation``)."""


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
    index: str | None = None
    """Path of the shard's stored index (keys, labels, offsets) relative to the data folder; version 1: None for a
    build made before stored indexes existed."""
    index_sha256: str | None = None
    """Hex sha256 of the stored index file, checked by every reader of it (set whenever ``index`` is)."""


@dataclass
class SplitInfo:
    """One split (``train``, ``val``): its shards in write order; sample keys run consecutively across them."""

    num_samples: int
    class_counts: dict[str, int] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    skipped_samples: dict[str, int] = field(default_factory=dict)
    """Version 2: samples of the split's shards left out by ``pretrain data index``, per reason."""

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
    label: str = ""
    """Version 2: where labels come from (``cls``, ``txt`` or ``json:FIELD``)."""
    image_exts: list[str] = field(default_factory=list)
    """Version 2: the image extensions present, sorted."""
    shard_location: str = ""
    """Where the shards are, when not beside the manifest (an absolute path or a URL); empty: beside it."""
    root: Store | None = field(default=None, repr=False, compare=False)
    """The location it was loaded from (not stored): where stored shard indexes are found."""

    @property
    def shard_store(self) -> Store:
        """The location of the shards: ``shard_location`` (with the root's storage options), else the root."""
        if self.root is None:
            raise ValueError("the manifest was not loaded from a location: load it with load_manifest(LOCATION)")
        return self.root.with_location(self.shard_location) if self.shard_location else self.root

    @property
    def indexed(self) -> bool:
        """Whether sample keys and labels come from stored per-shard indexes (version 2)."""
        return self.version == INDEXED_MANIFEST_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @staticmethod
    def shard_path(data_dir: str | os.PathLike, shard: ShardInfo | str) -> Path:
        """Absolute-or-relative path of ``shard`` (a :class:`ShardInfo` or its name) inside ``data_dir``."""
        name = shard.name if isinstance(shard, ShardInfo) else str(shard)
        return Path(data_dir) / name

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in schema order; a version 1 manifest has exactly the version 1 fields."""
        v2 = self.indexed

        def shard(s: ShardInfo) -> dict[str, Any]:
            out: dict[str, Any] = {"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
            if v2 or s.index is not None:
                out["index"] = s.index
                out["index_sha256"] = s.index_sha256
            return out

        def split(info: SplitInfo) -> dict[str, Any]:
            out: dict[str, Any] = {
                "num_samples": info.num_samples,
                "class_counts": dict(info.class_counts),
                "shards": [shard(s) for s in info.shards],
            }
            if v2:
                out["skipped_samples"] = dict(info.skipped_samples)
            return out

        out = {
            "version": self.version,
            "source": self.source,
            "format": self.format,
            "classes": list(self.classes),
            "created": self.created,
            "splits": {name: split(info) for name, info in self.splits.items()},
            "skipped": [dict(s) for s in self.skipped],
        }
        if v2:
            out.update(label=self.label, image_exts=list(self.image_exts))
        if self.shard_location:
            out["shard_location"] = self.shard_location
        return out

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
        version = raw.get("version")
        if version not in (MANIFEST_VERSION, INDEXED_MANIFEST_VERSION):
            raise bad(f"version is {version!r}, this code reads {MANIFEST_VERSION} and {INDEXED_MANIFEST_VERSION}")
        v2 = version == INDEXED_MANIFEST_VERSION
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
            shards = [_shard_info(sh, f"{at}.shards[{i}]", v2, where, bad) for i, sh in enumerate(s["shards"])]
            try:
                num_samples = int(s["num_samples"])
                class_counts = {str(k): int(v) for k, v in (s.get("class_counts") or {}).items()}
                skipped_samples = {str(k): int(v) for k, v in (s.get("skipped_samples") or {}).items()}
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise bad(f"{at} needs num_samples and class_counts ({e!r})") from None
            if sum(sh.samples for sh in shards) != num_samples:
                raise bad(f"{at}.num_samples={num_samples} but its shards hold {sum(sh.samples for sh in shards)}")
            unknown = sorted(set(class_counts) - set(classes))
            if unknown:
                raise bad(f"{at}.class_counts names classes not in 'classes': {unknown[:5]}")
            splits[str(split_name)] = SplitInfo(num_samples, class_counts, shards, skipped_samples)
        labelled = [name for name, split in splits.items() if split.num_samples > 0]
        if labelled and not classes:
            raise bad(
                f"'classes' is empty but split(s) {', '.join(labelled)} hold samples, each with a label that "
                "indexes 'classes': the labels name no class"
            )
        skipped = raw.get("skipped") or []
        if not isinstance(skipped, list) or not all(isinstance(x, dict) for x in skipped):
            raise bad("'skipped' must be a list of {path, reason} objects")
        label, image_exts, shard_location = _optional_fields(raw, v2, bad)
        return cls(
            source=raw["source"],
            format=raw["format"],
            classes=list(classes),
            splits=splits,
            created=str(raw.get("created", "")),
            skipped=[{"path": str(x.get("path", "")), "reason": str(x.get("reason", ""))} for x in skipped],
            version=version,
            label=label if v2 else "",
            image_exts=list(image_exts) if v2 else [],
            shard_location=shard_location,
        )


def _shard_info(sh: Any, at: str, v2: bool, where: str, bad: Any) -> ShardInfo:
    """One entry of a split's ``shards``, checked (``at`` names it in messages)."""
    try:
        info = ShardInfo(str(sh["name"]), int(sh["samples"]), int(sh["bytes"]), str(sh["sha256"]))
        if v2 or sh.get("index") is not None:
            info.index, info.index_sha256 = str(sh["index"]), _digest(sh.get("index_sha256"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"{at} needs name, samples, bytes, sha256{', index' * v2} ({e!r})") from None
    if info.index is not None and info.index_sha256 is None:
        if v2:
            raise ValueError(
                f"{where}: {at} records no sha256 of its stored index (index_sha256), so the index cannot be checked; "
                "re-run `pretrain data index` on the data set to record it"
            )
        info.index = None  # an unchecked index is not used: the shard is scanned
    for what, path in (("name", info.name), ("index", info.index)):
        if path is not None and (Path(path).is_absolute() or ".." in Path(path).parts):
            raise bad(f"{at}.{what} {path!r} must be a path inside the data folder")
    return info


def _digest(value: Any) -> str | None:
    """A recorded sha256 (64 hex digits), or None when there is none.

    Raises:
        ValueError: Something else is recorded.
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"index_sha256 {str(value)[:80]!r} is not a hex sha256")
    return value


def _optional_fields(raw: dict[str, Any], v2: bool, bad: Any) -> tuple[str, list[str], str]:
    """``label``, ``image_exts`` (version 2) and ``shard_location`` of a parsed manifest, checked."""
    label, image_exts = raw.get("label", ""), raw.get("image_exts", [])
    if v2 and (not isinstance(label, str) or not label):
        raise bad("'label' (cls, txt or json:FIELD) is missing")
    if not isinstance(image_exts, list) or not all(isinstance(e, str) for e in image_exts):
        raise bad("'image_exts' must be a list of extensions")
    shard_location = raw.get("shard_location", "")
    if not isinstance(shard_location, str) or (
        shard_location and not (is_remote(shard_location) or Path(shard_location).is_absolute())
    ):
        raise bad(f"'shard_location' {shard_location!r} must be an absolute path or a URL")
    return label, image_exts, shard_location


def load_manifest(location: str | os.PathLike | Store, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Reads and validates ``LOCATION/manifest.json``.

    Args:
        location: Folder or remote prefix (``s3://``, ``https://``) written by ``pretrain data build`` or indexed by
            ``pretrain data index``, or a :class:`~data_pipeline.remote.Store`.
        storage_options: fsspec options of a remote location (see :mod:`data_pipeline.remote`).

    Raises:
        FileNotFoundError: The folder or its manifest does not exist (the message says which command makes one).
        OSError: A remote location that does not answer, or refuses access.
        ValueError: The manifest is not valid JSON or does not follow the schema.
    """
    store = location if isinstance(location, Store) else Store(location, storage_options)
    where = store.path(MANIFEST_NAME)
    if not store.remote and not store.local().is_dir():
        raise FileNotFoundError(f"data folder {store.url} does not exist; {_HINT.replace('DIR', store.url)}")
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{where} not found (no finished build or index at {store.url}); {_HINT.replace('DIR', store.url)}"
        ) from None
    except IsADirectoryError:
        raise FileNotFoundError(f"{where} is a folder, not a manifest") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a number past int's digit limit, nesting
        raise ValueError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]}); {_HINT}") from None
    manifest = Manifest.from_dict(raw, where=where)
    manifest.root = store
    return manifest


def resolve_split(manifest: Manifest, split: str) -> str:
    """The manifest's name of ``split``: itself, or for a validation split its other name (``val`` <->
    ``validation``).

    Raises:
        ValueError: The manifest has no such split (the message lists its splits).
    """
    if split in manifest.splits:
        return split
    if split in VAL_SPLIT_NAMES:
        for other in VAL_SPLIT_NAMES:
            if other in manifest.splits:
                return other
    raise ValueError(f"split {split!r} is not in the data set; its splits: {', '.join(sorted(manifest.splits))}")


def previous_manifest(location: str | os.PathLike | Store) -> Manifest | None:
    """The manifest an earlier build or index left at ``location``, or None when there is none usable."""
    try:
        return load_manifest(location)
    except (FileNotFoundError, ValueError):
        return None


def same_manifest_content(a: Manifest, b: Manifest) -> bool:
    """True when two manifests differ in their creation time at most (a re-run that found nothing new)."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("created")
    db.pop("created")
    return da == db


def write_manifest(manifest: Manifest, location: str | os.PathLike | Store) -> str:
    """Writes ``LOCATION/manifest.json`` atomically (local: temp file, fsync, rename) and returns its path or URL."""
    store = location if isinstance(location, Store) else Store(location)
    store.write_bytes(MANIFEST_NAME, (json.dumps(manifest.to_dict(), indent=1) + "\n").encode("utf-8"))
    return store.path(MANIFEST_NAME)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 4 << 20) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()
