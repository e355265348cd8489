"""Checkpoints that are written atomically and verified before use.

File layout: one header line of JSON ``{"magic": ..., "version": 1, "size": N, "sha256": H}``
followed by exactly N bytes of ``torch.save`` payload whose SHA-256 is H. A crash while writing
leaves the previous file intact (temp file + fsync + os.replace); a file that was truncated or
altered later fails the size or hash check and is refused instead of silently resuming from
garbage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any

import torch

MAGIC = "spattn-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or of an unknown format."""


def save_checkpoint(path: str, state: Any) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = json.dumps({"magic": MAGIC, "version": VERSION, "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # The temp file lives in the destination directory so os.replace is a same-filesystem rename.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"load_checkpoint: {path} does not exist") from None
    newline = data.find(b"\n")
    if newline < 0 or newline > 4096:
        raise CheckpointError(f"load_checkpoint: {path} is not a spattn checkpoint "
                              "(no header line); the file is corrupted or truncated")
    try:
        header = json.loads(data[:newline])
    except ValueError:
        raise CheckpointError(f"load_checkpoint: {path} has an unreadable header; "
                              "the file is corrupted") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise CheckpointError(f"load_checkpoint: {path} is not a spattn checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(f"load_checkpoint: {path} has format version "
                              f"{header.get('version')}; this build reads version {VERSION}")
    payload = data[newline + 1:]
    size = header.get("size")
    if len(payload) != size:
        raise CheckpointError(f"load_checkpoint: {path} is truncated or padded: header says "
                              f"{size} payload bytes, file holds {len(payload)}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.get("sha256"):
        raise CheckpointError(f"load_checkpoint: {path} is corrupted: payload sha256 {digest} "
                              f"does not match the recorded {header.get('sha256')}")
    # weights_only: even a checksummed file should not be able to run code when loaded.
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
