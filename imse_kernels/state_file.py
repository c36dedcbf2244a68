"""Durable, checksummed state files: atomic writes, whole-file reads and SHA-256 verification.

Every file the library writes and later reads back (code banks, the cached evaluation model, results) goes
through here so that
  * a write never destroys the previous version: the bytes go to a temporary file in the same folder,
    are flushed and fsync'ed, then `os.replace`d over the target (a kill or a full disk mid-write leaves
    the old file, plus at most one `.<name>.<pid>.<random>.tmp` file from a killed process);
  * a read takes the whole file into memory, so nothing refers to the file afterwards (a memory-mapped
    load dies with SIGBUS when the file is later rewritten shorter in place);
  * tensors and metadata carry SHA-256 digests, since safetensors itself has no checksum and random
    damage to tensor bytes would otherwise load silently with different values.
"""
import errno
import hashlib
import json
import os
import secrets
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

#: Suffix of the metadata key that holds the SHA-256 of the JSON stored under the key itself.
DIGEST_SUFFIX = ".sha256"


class StateFileError(ValueError):
    """A state file is damaged, truncated or not what it claims to be."""


# ------------------------------------------------------------------------------------ reading and writing

def read_bytes(path: "os.PathLike | str") -> bytes:
    """The whole file, read into memory (no memory map survives the call)."""
    with open(path, "rb") as f:
        return f.read()


def atomic_write_bytes(path: "os.PathLike | str", data: "bytes | bytearray | memoryview") -> None:
    """Replace `path` by `data` atomically and durably: temp file in the same folder, fsync, os.replace,
    fsync of the folder. On any exception the temp file is removed, the old target is left as it was
    and the exception propagates."""
    path = os.fspath(path)
    if os.path.islink(path):  # write where the link points, keep the link
        path = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    tmp, fd = None, -1
    try:
        while fd < 0:
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            except FileExistsError:
                continue
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = None
    except BaseException:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    _fsync_folder(folder)


def atomic_write_text(path: "os.PathLike | str", text: str, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` of `text` encoded (newlines are written as they are in `text`)."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_folder(folder: str) -> None:
    """Make the rename durable; skipped where folders cannot be opened or synced (e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ checksums

def sha256_hex(data: "bytes | bytearray | memoryview") -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of `t` (CPU, C order, native byte order), as safetensors stores them."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_manifest(tensors: dict[str, Tensor]) -> dict[str, dict]:
    """name → {dtype, shape, sha256 of the raw bytes}: what `check_tensors` verifies on reading."""
    return {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": sha256_hex(tensor_bytes(t))}
            for k, t in sorted(tensors.items())}


def check_tensors(tensors: dict[str, Tensor], manifest: Any) -> Optional[str]:
    """The first disagreement between `tensors` and a `tensor_manifest` (naming the tensor), or None."""
    if not isinstance(manifest, dict):
        return f"the tensor manifest is missing or malformed ({type(manifest).__name__})"
    missing = sorted(set(manifest) - set(tensors))
    if missing:
        return f"tensor {missing[0]!r} listed in the metadata is missing from the file"
    extra = sorted(set(tensors) - set(manifest))
    if extra:
        return f"tensor {extra[0]!r} is not listed in the metadata (renamed or foreign?)"
    for k in sorted(manifest):
        m, t = manifest[k], tensors[k]
        if not isinstance(m, dict):
            return f"the manifest entry of tensor {k!r} is malformed"
        if m.get("dtype") != dtype_name(t.dtype):
            return f"tensor {k!r} has dtype {dtype_name(t.dtype)}, the metadata says {m.get('dtype')!r}"
        if m.get("shape") != list(t.shape):
            return f"tensor {k!r} has shape {list(t.shape)}, the metadata says {m.get('shape')!r}"
        if m.get("sha256") != sha256_hex(tensor_bytes(t)):
            return f"tensor {k!r} is damaged (the SHA-256 of its bytes does not match the metadata)"
    return None


# ------------------------------------------------------------------------------------ safetensors + digests

class Loaded(NamedTuple):
    """What `loads_safetensors` found: tensors (own memory), the JSON under the key (None: no such key),
    and whether it was verified (metadata digest and every tensor's dtype, shape and SHA-256)."""
    tensors: dict[str, Tensor]
    meta: Optional[dict]
    verified: bool


def dumps_safetensors(tensors: dict[str, Tensor], key: str, meta: dict) -> bytes:
    """safetensors bytes; metadata `key` holds `meta` as JSON plus a `tensors` manifest, `key + '.sha256'`
    the SHA-256 of that JSON text."""
    if "tensors" in meta:
        raise ValueError("dumps_safetensors: meta must not have a 'tensors' key (the manifest goes there)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(dict(meta, tensors=tensor_manifest(tensors)), sort_keys=True)
    from safetensors.torch import save

    return save(tensors, metadata={key: text, key + DIGEST_SUFFIX: sha256_hex(text.encode())})


def loads_safetensors(data: bytes, key: str) -> Loaded:
    """Parse safetensors bytes written by `dumps_safetensors` (or an older writer without digests:
    then `verified` is False). Raises `StateFileError` saying what is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError, OverflowError) as err:
        raise StateFileError(f"not a readable safetensors file (corrupted or truncated?): {err}") from err
    info = header.get("__metadata__") or {}
    text = info.get(key)
    if text is None:
        return Loaded(tensors, None, False)
    digest = info.get(key + DIGEST_SUFFIX)
    if digest is not None and digest != sha256_hex(text.encode()):
        raise StateFileError(f"metadata {key!r} is damaged (its SHA-256 does not match {key + DIGEST_SUFFIX!r})")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise StateFileError(f"metadata {key!r} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise StateFileError(f"metadata {key!r} is not a JSON object")
    if digest is None:
        return Loaded(tensors, meta, False)
    problem = check_tensors(tensors, meta.get("tensors"))
    if problem:
        raise StateFileError(problem)
    return Loaded(tensors, meta, True)

