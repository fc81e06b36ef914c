"""Which shards make each split of a data location, named the ways WebDataset users name them.

- the folder layout: one split per subfolder, ``LOCATION/<split>/*.tar``;
- a glob per split, relative to the location (``--split-glob train='*-train-*.tar'``);
- WebDataset's own shard spec, a brace list (``train-{000000..000099}.tar``, also ``{a,b}``; ``::`` joins several
  specs), expanded by ``braceexpand``, the package WebDataset expands its URLs with. Brace lists need no listing of
  the location, which plain HTTP servers rarely give: each name is taken as it is, and one that does not exist is
  named and left out when it is read. A brace list may hold glob characters too (``part{1,2}/*.tar``).

Every name is a path inside the location: a spec that reaches out of it (``..``, an absolute path, a URL) is refused
(the stored index of a shard goes to ``.index/<shard name>.json`` under the index location, which such a name would
leave), with the way to index those shards instead.

Shards are uncompressed ``.tar`` files: the loader reads a sample's members at their offsets, which a gzip stream
does not allow. Compressed shards (``.tar.gz``, ``.tgz``, ...) with no uncompressed twin beside them are refused with
the command that decompresses them (:class:`CompressedShards`).
"""

from __future__ import annotations

import glob as globlib
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import PurePosixPath

from braceexpand import braceexpand

from data_pipeline.remote import Store
from data_pipeline.shard_index import STORED_INDEX_DIR

__all__ = ["COMPRESSED_SUFFIXES", "CompressedShards", "expand_shard_spec", "find_splits", "parse_classes"]

COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


class CompressedShards(ValueError):
    """Compressed shards that have no uncompressed twin; the message names them and the command that fixes them."""


def expand_shard_spec(spec: str) -> list[str]:
    """The names a WebDataset shard spec stands for: ``::``-separated parts, each brace-expanded, in order."""
    return [name for part in spec.split("::") if part for name in braceexpand(part)]


def _is_shard(name: str) -> bool:
    return name.endswith(".tar") and not name.startswith(f"{STORED_INDEX_DIR}/")


def _compressed_twinless(names: Iterable[str]) -> list[str]:
    names = list(names)
    tars = {n for n in names if n.endswith(".tar")}
    out = []
    for n in names:
        suffix = next((s for s in COMPRESSED_SUFFIXES if n.endswith(s)), None)
        if suffix is not None and n[: -len(suffix)] + ".tar" not in tars:
            out.append(n)
    return sorted(out)


def _compressed_error(store: Store, names: list[str]) -> CompressedShards:
    example = names[0]
    suffix = next(s for s in COMPRESSED_SUFFIXES if example.endswith(s))
    tool = {".gz": "gzip", ".tgz": "gzip", ".bz2": "bzip2", ".tbz2": "bzip2", ".xz": "xz", ".txz": "xz"}.get(
        "." + suffix.rsplit(".", 1)[1], "zstd"
    )
    plain = example[: -len(suffix)] + ".tar"
    if store.remote:
        fix = f"`aws s3 cp {store.path(example)} - | {tool} -dc | aws s3 cp - {store.path(plain)}` (or download, "
        fix += f"`{tool} -dc`, upload)"
    else:
        folder = store.path(example.rpartition("/")[0]) if "/" in example else store.url
        fix = (
            f'`for f in {folder}/*{suffix}; do {tool} -dc "$f" > "${{f%{suffix}}}.tar"; done` (the .tar files go '
            "beside the compressed ones, which are then ignored)"
        )
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return CompressedShards(
        f"{store.path(example)}{more} are compressed shards: the loader reads each sample at its offset in the tar, "
        f"which a compressed stream does not allow. Decompress them: {fix}; then run `pretrain data index` again"
    )


def _check_inside(store: Store, split: str, spec: str, name: str) -> None:
    """Refuses a name (from ``split``'s ``spec``) that is not a path inside the location."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name):
        raise ValueError(
            f"--split-glob {split}={spec}: {name} is not a path inside {store.url} (no '..', no absolute path or URL): "
            "shards are named relative to DIR, and their index goes under DIR/.index/; to index shards elsewhere, "
            "pass their folder as DIR (with --index-out LOCATION to write the index somewhere else)"
        )


def _matches(store: Store, split: str, spec: str) -> tuple[list[str], list[str]]:
    """``(shards, compressed files)`` a split spec names: brace-expanded, each part globbed if it has glob
    characters (else taken as it is).

    Raises:
        ValueError: A name that is not a path inside the location, or not a ``.tar``.
    """
    shards: list[str] = []
    compressed: list[str] = []
    try:
        names = expand_shard_spec(spec)
    except ValueError as e:  # braceexpand's UnbalancedBracesError
        raise ValueError(f"--split-glob {split}={spec}: {e}") from None
    for name in names:
        _check_inside(store, split, spec, name)
        if globlib.has_magic(name):
            found = store.glob(name)
            shards += [n for n in found if _is_shard(n)]
            compressed += _compressed_twinless(found)
        elif name.endswith(".tar"):
            shards.append(name)
        elif name.endswith(COMPRESSED_SUFFIXES):
            compressed.append(name)
        else:
            raise ValueError(f"{name} (from {spec!r}) is not a .tar shard")
    if compressed:
        compressed = _compressed_twinless(compressed + shards)
    return shards, compressed


def find_splits(store: Store, split_globs: dict[str, str] | None = None) -> dict[str, list[str]]:
    """``{split: [shard name relative to the location, ...]}``, each split's shards sorted by name.

    Args:
        store: The data location.
        split_globs: ``{split: glob or brace list relative to the location}``; default: one split per subfolder
            holding ``*.tar``.

    Raises:
        CompressedShards: Compressed shards without an uncompressed twin (the message says how to decompress them).
        ValueError: No shard found, a spec matching nothing or naming a path outside the location, a shard in two
            splits, shards directly in the location without ``split_globs`` (their split is unknown), or a location
            that cannot be listed without one.
    """
    if split_globs:
        splits: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        for split, spec in split_globs.items():
            names, compressed = _matches(store, split, spec)
            if compressed:
                raise _compressed_error(store, compressed)
            names = sorted(set(names))
            if not names:
                raise ValueError(f"--split-glob {split}={spec} matches no .tar file in {store.url}")
            for name in names:
                if name in owner:
                    raise ValueError(f"{name} matches the specs of both {owner[name]} and {split}")
                owner[name] = split
            splits[split] = names
        return splits
    top = store.glob("*")
    compressed = _compressed_twinless(top)
    if [n for n in top if _is_shard(n)] or compressed:
        example = next(n for n in sorted(top) if _is_shard(n) or n in compressed)
        raise ValueError(
            f"shards lie directly in {store.url} (e.g. {example}), so their split is unknown: name it, e.g. "
            "--split-glob train='*train*.tar' --split-glob val='*val*.tar' (or a brace list, "
            "train='train-{000000..000099}.tar')"
        )
    folders = [d for d in store.subfolders() if not d.startswith(".")]
    splits = {}
    for d in folders:
        found = store.glob(f"{d}/*")
        compressed = _compressed_twinless(found)
        if compressed:
            raise _compressed_error(store, compressed)
        names = sorted(n for n in found if _is_shard(n))
        if names:
            splits[d] = names
    if not splits:
        raise ValueError(
            f"no .tar shards in {store.url}: expected LOCATION/<split>/*.tar, or pass --split-glob SPLIT=GLOB (a glob "
            "or a brace list such as train='train-{000000..000099}.tar')"
        )
    return splits


def parse_classes(text: str, where: str) -> list[str]:
    """Class names, one per line (surrounding blanks and empty lines ignored).

    Raises:
        ValueError: No name, or a name twice; the message names ``where``.
    """
    names = [n for n in (line.strip() for line in text.splitlines()) if n]
    if not names:
        raise ValueError(f"{where}: no class names (one per line)")
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise ValueError(f"{where}: {len(twice)} names occur twice, e.g. {twice[0]!r}")
    return names
