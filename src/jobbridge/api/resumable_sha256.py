"""A SHA-256 whose running state can be saved and restored, so a restarted API need not re-hash a TB.

hashlib cannot export its state. OpenSSL's libcrypto (already loaded by Python's ``_hashlib``) still
exports the low-level ``SHA256_Init/Update/Final`` whose ``SHA256_CTX`` is a plain 112-byte struct: copying
those bytes *is* the state. ctypes calls release the GIL, so hashing runs beside the event loop, and the
speed is hashlib's (same SHA-NI code). Where that library is not available :func:`new_sha256` falls back to
hashlib, whose state cannot be saved: a restart then re-hashes from the start, which is slower, not wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
from functools import lru_cache
from typing import Any, Protocol


class ResumableHash(Protocol):
    """What the prefix hasher needs from a SHA-256."""

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash more bytes."""

    def hexdigest(self) -> str:
        """The digest of everything so far (the state itself is left unchanged)."""

    def state(self) -> bytes | None:
        """The running state as bytes, or None when it cannot be saved."""

    def copy(self) -> ResumableHash:
        """An independent hash with the same state (to try a chunk before committing to it)."""


class _Ctx(ctypes.Structure):
    """OpenSSL's ``SHA256_CTX`` (``SHA_LONG`` is 32 bits on every platform OpenSSL 3 supports)."""

    _fields_ = (
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    )


STATE_SIZE = ctypes.sizeof(_Ctx)


@lru_cache(maxsize=1)
def _libcrypto() -> Any:
    """libcrypto with the SHA256 functions typed, or None when it cannot be found or lacks them."""
    name = ctypes.util.find_library("crypto")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.SHA256_Init.argtypes = [ctypes.c_void_p]
        lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    if not _self_test(lib):
        return None
    return lib


def _self_test(lib: Any) -> bool:
    """Refuse a libcrypto whose context layout is not the one above (it would hash wrongly)."""
    ctx = _Ctx()
    lib.SHA256_Init(ctypes.byref(ctx))
    probe = b"jobbridge" * 20
    buffer = ctypes.create_string_buffer(probe, len(probe))
    lib.SHA256_Update(ctypes.byref(ctx), buffer, len(probe))
    out = (ctypes.c_ubyte * 32)()
    lib.SHA256_Final(out, ctypes.byref(ctx))
    return bytes(out) == hashlib.sha256(probe).digest()


class OpenSSLSha256:
    """SHA-256 on libcrypto's context, whose bytes can be saved and restored."""

    def __init__(self, lib: Any, state: bytes | None = None) -> None:
        self._lib = lib
        if state is None:
            self._ctx = _Ctx()
            lib.SHA256_Init(ctypes.byref(self._ctx))
        else:
            self._ctx = _Ctx.from_buffer_copy(state)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash ``data`` (no copy for writable buffers; the GIL is released while hashing)."""
        if isinstance(data, bytes):
            self._lib.SHA256_Update(ctypes.byref(self._ctx), data, len(data))
            return
        view = memoryview(data)
        if view.readonly:
            self.update(view.tobytes())
            return
        if not view.nbytes:
            return
        array = (ctypes.c_char * view.nbytes).from_buffer(view)
        self._lib.SHA256_Update(ctypes.byref(self._ctx), array, view.nbytes)

    def hexdigest(self) -> str:
        """Finish a copy of the context, so hashing could go on."""
        copy = _Ctx.from_buffer_copy(bytes(self._ctx))
        out = (ctypes.c_ubyte * 32)()
        self._lib.SHA256_Final(out, ctypes.byref(copy))
        return bytes(out).hex()

    def state(self) -> bytes:
        """The context's bytes."""
        return bytes(self._ctx)

    def copy(self) -> OpenSSLSha256:
        """A copy of the context."""
        return OpenSSLSha256(self._lib, self.state())


class HashlibSha256:
    """The fallback: hashlib, whose state cannot be saved."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash ``data``."""
        self._hash.update(data)

    def hexdigest(self) -> str:
        """The digest so far."""
        return self._hash.hexdigest()

    def state(self) -> None:
        """hashlib cannot export its state."""
        return None

    def copy(self) -> HashlibSha256:
        """hashlib's own copy."""
        twin = HashlibSha256()
        twin._hash = self._hash.copy()
        return twin


def _valid_state(state: bytes) -> bool:
    if len(state) != STATE_SIZE:
        return False
    ctx = _Ctx.from_buffer_copy(state)
    return bool(ctx.md_len == 32 and ctx.num < 64)


def new_sha256(state: bytes | None = None) -> ResumableHash | None:
    """A SHA-256, resumed from ``state`` when given; None when ``state`` cannot be resumed here."""
    lib = _libcrypto()
    if state is not None:
        if lib is None or not _valid_state(state):
            return None
        return OpenSSLSha256(lib, state)
    return OpenSSLSha256(lib) if lib is not None else HashlibSha256()


def can_resume() -> bool:
    """True when hash states can be saved (libcrypto found and its layout checked)."""
    return _libcrypto() is not None
