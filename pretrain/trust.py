"""Signatures that a person who can write a run or sweep directory cannot forge: HMAC-SHA256 with a per-user key.

DeepSpeed's checkpoint files and Ray Tune's experiment state are pickles, which can run code when they are loaded.
The sha256 digests in a checkpoint's COMPLETE marker catch corruption, not a person who can write the directory: they
recompute the digests. An HMAC over what we wrote, with a key that only this user can read, is what they cannot
recompute. Verified before anything is unpickled:

- a checkpoint's COMPLETE marker (:func:`sign_record` / :func:`check_record`): it lists every file with its sha256, so
  one signature covers the whole checkpoint;
- Ray Tune's state files and the sweep's ``sweep.yaml`` (:func:`write_signed` / :func:`check_file`): a sidecar
  ``.<name>.hmac`` next to each file holds the HMAC of its content.

The key: 32 random bytes in ``$VITPRETRAIN_KEY_FILE`` if set, else ``$XDG_CONFIG_HOME/vitpretrain/key``, else
``~/.config/vitpretrain/key``. It is created on first use, mode 0600 in a 0700 directory, and refused when another user
could read or replace it. On a cluster the home directory is shared by the user's jobs on every node, so each rank and
each requeued job signs and verifies with the same key; where it is not shared, point ``VITPRETRAIN_KEY_FILE`` at a
private file that every node sees.

Standard library only (``hmac``, ``secrets``): ``pretrain status``, the sweep driver and submitit's job entry use it
without importing torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import uuid
from pathlib import Path
from typing import Any

from pretrain.rundir import write_atomic

__all__ = [
    "KEY_ENV",
    "SIDECAR_SUFFIX",
    "TrustKeyError",
    "check_file",
    "check_record",
    "is_sidecar",
    "key_id",
    "key_path",
    "load_key",
    "sidecar_path",
    "sign_file",
    "sign_record",
    "write_signed",
]

KEY_ENV = "VITPRETRAIN_KEY_FILE"
"""Environment variable naming the key file (default: ``$XDG_CONFIG_HOME/vitpretrain/key``)."""
SIDECAR_SUFFIX = ".hmac"
_KEY_BYTES = 32
_HMAC_FIELD, _SIGNER_FIELD = "hmac_sha256", "signed_by"
_keys: dict[str, bytes] = {}  # key file -> key, read once per process


class TrustKeyError(RuntimeError):
    """The signing key cannot be created or read, or other users could read or replace it (the message says how to fix
    it)."""


def key_path() -> Path:
    """Where this user's key lives (see the module docstring)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "vitpretrain" / "key"


def load_key() -> bytes:
    """This user's key, created on first use (0600; an ``os.link`` of a private file, so concurrent first uses on
    several nodes agree on one key).

    Raises:
        TrustKeyError: It cannot be created or read, has the wrong size, or is not private to this user.
    """
    path = key_path()
    if str(path) in _keys:
        return _keys[str(path)]
    if not path.exists():
        _create_key(path)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as e:
        raise TrustKeyError(f"cannot read the signing key {path}: {e}") from e
    if st.st_uid != os.geteuid():
        raise TrustKeyError(f"the signing key {path} belongs to uid {st.st_uid}, not to you: move it away (a new one "
                            f"is made on first use) or set {KEY_ENV} to your own key file")  # fmt: skip
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TrustKeyError(f"the signing key {path} can be read or written by other users (mode "
                            f"{stat.S_IMODE(st.st_mode):o}): run chmod 600 {path}")  # fmt: skip
    if len(data) != _KEY_BYTES:
        raise TrustKeyError(f"the signing key {path} has {len(data)} bytes, not {_KEY_BYTES}: move it away (a new one "
                            "is made on first use; what it signed must then be trusted explicitly)")  # fmt: skip
    _keys[str(path)] = data
    return data


def _create_key(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise TrustKeyError(f"cannot create the signing key {path}: {e}; set {KEY_ENV} to a private path you can "
                            "write") from e  # fmt: skip


def _mac(purpose: str, data: bytes) -> str:
    return hmac.new(load_key(), purpose.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def key_id() -> str:
    """A short name of this user's key (an HMAC of a constant: it tells keys apart and reveals nothing of the key)."""
    return _mac("key-id", b"")[:16]


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_record(purpose: str, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``signed_by`` (:func:`key_id`) and ``hmac_sha256`` over its canonical JSON added; ``purpose``
    (e.g. ``checkpoint``) keeps a signature made for one kind of record from passing as another."""
    out = {k: v for k, v in record.items() if k not in (_HMAC_FIELD, _SIGNER_FIELD)}
    out[_SIGNER_FIELD] = key_id()
    out[_HMAC_FIELD] = _mac(purpose, _canonical(out))
    return out


def check_record(purpose: str, record: dict[str, Any]) -> tuple[bool, str]:
    """``(True, "signed by you")`` when ``record`` carries a valid :func:`sign_record` signature of this user's key,
    else ``(False, reason)``: not signed, signed with another key, or changed after it was signed."""
    sig = record.get(_HMAC_FIELD)
    if not isinstance(sig, str):
        return False, "it carries no signature"
    body = {k: v for k, v in record.items() if k != _HMAC_FIELD}
    try:
        ok = hmac.compare_digest(_mac(purpose, _canonical(body)), sig)
    except (TypeError, ValueError):  # a value JSON cannot hold canonically (NaN) was put in
        ok = False
    if ok:
        return True, "signed by you"
    if body.get(_SIGNER_FIELD) != key_id():
        return False, f"it was signed with another key ({body.get(_SIGNER_FIELD)!s:.16}; yours is {key_id()})"
    return False, "its signature does not match: it was changed after it was signed"


# ----------------------------------------------------------------------------------------------------- signed files


def sidecar_path(path: str | Path) -> Path:
    """The signature file of ``path``: ``.<name>.hmac`` beside it (hidden: checkpoint listings skip dot files)."""
    path = Path(path)
    return path.with_name(f".{path.name}{SIDECAR_SUFFIX}")


def is_sidecar(name: str) -> bool:
    return name.startswith(".") and name.endswith(SIDECAR_SUFFIX)


def _read_sidecar(path: Path) -> list[str]:
    try:
        macs = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return []
    return [m for m in macs if isinstance(m, str)] if isinstance(macs, list) else []


def sign_file(path: str | Path, data: bytes) -> None:
    """Record ``data`` as a content of ``path`` this user wrote (its sidecar keeps this and the previous signature, so
    a writer killed between the sidecar and the file leaves a pair that verifies)."""
    path = Path(path)
    mac = _mac("file", data)
    kept = [m for m in _read_sidecar(path)[-1:] if m != mac]
    write_atomic(sidecar_path(path), json.dumps([*kept, mac]).encode())


def write_signed(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (atomically) with its signature: the sidecar first, then the file."""
    sign_file(path, data)
    write_atomic(Path(path), data)


def check_file(path: str | Path, data: bytes | None = None) -> tuple[bool, str]:
    """``(True, "signed by you")`` when ``data`` (default: the file's content) is what this user wrote to ``path``,
    else ``(False, reason)``. Verify the bytes you then use: pass them as ``data``."""
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            return False, f"it cannot be read ({e})"
    macs = _read_sidecar(path)
    if not macs:
        return False, f"it has no signature ({sidecar_path(path).name})"
    mac = _mac("file", data)
    if any(hmac.compare_digest(mac, m) for m in macs):
        return True, "signed by you"
    return False, "its signature does not match (changed after it was written, or signed with another key)"
