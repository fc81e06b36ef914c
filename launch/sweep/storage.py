"""Ray Tune's files in a sweep directory: signed as Ray Tune writes them, checked before it reads them.

Ray Tune keeps its experiment in ``<sweep>/tune/`` and unpickles much of it on ``Tuner.restore``: ``tuner.pkl``, the
trials inside ``experiment_state-*.json`` (cloudpickle in JSON), the searcher's state (a pickle despite its ``.json``
name), a trial's ``error.pkl``. Anyone who can write the sweep directory could put code there. So Ray Tune reaches
``tune/`` only through :func:`signed_filesystem`, the file system its ``RunConfig(storage_filesystem=...)`` and
``Tuner.restore`` take: the local file system, except that every ``.json`` and ``.pkl`` file written through it gets
a signature (:func:`pretrain.trust.write_signed`, a sidecar ``.<name>.hmac`` with an HMAC of the content under the
user's key), and every one read through it is checked against that signature, on the very bytes Ray Tune then
gets. A file that fails is an :class:`UntrustedSweepFile` error, never unpickled. Other files (checkpoint tensors,
logs) pass through untouched; checkpoints carry their own signed COMPLETE marker.

Before a resume, :func:`unverified_files` checks the whole directory so that ``pretrain sweep --resume`` refuses with
one message (naming ``--trust-sweep``) instead of failing inside Ray Tune; with ``--trust-sweep``, :func:`adopt`
signs what is there, as it is.

Why a file system and not a check of the directory after each save: Ray Tune saves from a thread while trials run, and
a file signed after it was written could have been replaced in between; here the bytes are signed before they reach
the directory. Ray Tune's local staging copies (its session directory under ``/tmp/ray``) are this user's own.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.fs

from pretrain import trust

__all__ = [
    "SignedLocalHandler",
    "UntrustedSweepFile",
    "adopt",
    "is_signed_type",
    "signed_filesystem",
    "unverified_files",
]

logger = logging.getLogger(__name__)

_SIGNED_SUFFIXES = (".json", ".pkl")


class UntrustedSweepFile(OSError):
    """A Ray Tune state file of the sweep directory that does not carry this user's signature."""


def is_signed_type(path: str | Path) -> bool:
    """Whether ``path`` is one of the files Ray Tune may unpickle (``.json``, ``.pkl``), hence signed."""
    name = Path(path).name
    return name.endswith(_SIGNED_SUFFIXES) and not trust.is_sidecar(name)


class _SigningWriter(io.BytesIO):
    """Collects what Ray Tune writes; on close the signature goes to the sidecar first, then the file (atomically)."""

    def __init__(self, path: str, initial: bytes = b""):
        super().__init__()
        self.write(initial)
        self._path = path

    def close(self) -> None:
        if not self.closed:
            trust.write_signed(self._path, self.getvalue())
        super().close()


def _verified_bytes(path: str) -> bytes:
    data = Path(path).read_bytes()
    ok, why = trust.check_file(path, data)
    if not ok:
        raise UntrustedSweepFile(f"{path} is not signed by your key ({why}): not loaded")
    return data


class SignedLocalHandler(pyarrow.fs.FileSystemHandler):
    """A pyarrow file system handler over the local file system that signs and checks ``.json``/``.pkl`` files."""

    def __init__(self) -> None:
        self.local = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, SignedLocalHandler)

    def __hash__(self) -> int:
        return hash(SignedLocalHandler)

    def get_type_name(self) -> str:
        return "vitpretrain-signed-local"

    def normalize_path(self, path: str) -> str:
        return self.local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return [i for i in self.local.get_file_info(selector) if not trust.is_sidecar(i.base_name)]

    def create_dir(self, path: str, recursive: bool) -> None:
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self.local.delete_file(path)
        trust.sidecar_path(path).unlink(missing_ok=True)

    def move(self, src: str, dest: str) -> None:
        self.local.move(src, dest)
        if trust.sidecar_path(src).exists():
            os.replace(trust.sidecar_path(src), trust.sidecar_path(dest))

    def copy_file(self, src: str, dest: str) -> None:
        if is_signed_type(src):
            trust.write_signed(dest, _verified_bytes(src))
        else:
            self.local.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        if is_signed_type(path):
            return pyarrow.BufferReader(_verified_bytes(path))
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        if is_signed_type(path):
            return pyarrow.BufferReader(_verified_bytes(path))
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        if is_signed_type(path):
            return pyarrow.PythonFile(_SigningWriter(path), mode="w")
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        if is_signed_type(path):
            initial = _verified_bytes(path) if Path(path).exists() else b""
            return pyarrow.PythonFile(_SigningWriter(path, initial), mode="w")
        return self.local.open_append_stream(path, metadata=metadata)


def signed_filesystem() -> pyarrow.fs.PyFileSystem:
    """The file system Ray Tune gets for the sweep directory (see the module docstring)."""
    return pyarrow.fs.PyFileSystem(SignedLocalHandler())


def unverified_files(root: str | Path) -> list[tuple[str, str]]:
    """``(relative path, reason)`` of every ``.json``/``.pkl`` file under ``root`` that is not signed by this user."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and is_signed_type(p):
            ok, why = trust.check_file(p)
            if not ok:
                out.append((p.relative_to(root).as_posix(), why))
    return out


def adopt(root: str | Path) -> int:
    """``--trust-sweep``: sign every unsigned ``.json``/``.pkl`` file under ``root`` as it is; returns how many."""
    root = Path(root)
    unsigned = unverified_files(root)
    for rel, _ in unsigned:
        path = root / rel
        trust.sign_file(path, path.read_bytes())
    if unsigned:
        logger.warning("--trust-sweep: signed %d file(s) of %s as they are", len(unsigned), root)
    return len(unsigned)
