"""Encryption at rest: AES-256-GCM for log records, checkpoints, warm segments and archives.

Why this module owns every byte of the scheme: the nonce rule below is the one thing that, got
wrong once, breaks both the secrecy and the integrity of everything under the key, so it lives
in one place (`DataCipher`) and every file kind goes through it. The cipher is
`cryptography`'s `AESGCM` (OpenSSL, AES-NI); nothing cryptographic is written here by hand.

Nonces (96 bits, must never repeat under one key). Each `DataCipher` instance (one per process:
the appliance, the warm sealer child, fsck, restore) draws a random 96-bit start and hands out
start, start + 1, start + 2, ... (mod 2**96) under a lock; the nonce is stored next to its
ciphertext. Why not derive it from what the record already has:
- not the lsn: a group whose write fails hands its lsns out again, and a torn tail trimmed at
  start is rewritten with new records under the same lsns; the old bytes may still be on the
  disk (a failed fsync, a copy), and two messages under one nonce leak the XOR of their values
  and GCM's authentication key;
- not a file name or offset: fsck --repair rewrites segments, restore copies files, and a
  checkpoint for the same lsn can be written twice by two processes.
A random start per instance plus a counter collides only if two instances' ranges overlap:
about n_instances**2 * records_per_instance / 2**96, negligible for any real key lifetime.
(Purely random nonces per message would be bounded by 2**32 messages per key, which a busy
appliance reaches in hours.)

Associated data binds every ciphertext to where it belongs, so a record or chunk copied into
another file, another position or another symbol fails authentication: log records bind their
whole header (kind, lsn, first_index, receive time, publisher, sequence, count, key id) and the
symbol; file chunks bind the file's header (kind, key id, a random file id), a context given by
the caller (checkpoint: lsn, symbol, hot and total), the chunk's index and whether it is last
(a truncated file is caught).

Key id: the first 4 bytes of HMAC-SHA256(key, "hft-appliance data key id v1"), written in every
log record and file header, so a wrong key is reported up front as a wrong key naming a file
("data key does not match ..."), not as a generic authentication failure, and the id reveals
nothing about the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_NONCE_MOD = 1 << (8 * NONCE_BYTES)
_KEY_ID_LABEL = b"hft-appliance data key id v1"

# Files (checkpoint values, warm segments): a 24-byte header, then chunks.
FILE_MAGIC = b"HFTENC01"
FILE_HEADER = struct.Struct("<8s4sI8s")  # magic, kind (4 ASCII bytes), key id, random file id
CHUNK_HEADER = struct.Struct("<II12s")  # plaintext length, flags, nonce
CHUNK_LAST = 1
_CHUNK_AD = struct.Struct("<QII")  # index, plaintext length, flags
KIND_WARM = b"WARM"
KIND_CHECKPOINT = b"CKPT"


class KeyFileError(ValueError):
    """`security.data_key_file` is unusable (missing, wrong size, readable by others)."""


class DataKeyError(Exception):
    """The data on disk was written with another key, or not encrypted as configured.

    The appliance refuses to start (exit status 2) and changes nothing on disk."""


class DecryptError(ValueError):
    """Authentication failed: the bytes were changed, moved, or written with another key."""


def key_id(key: bytes) -> int:
    """A 32-bit fingerprint of the key, stored in every file (reveals nothing of the key)."""
    digest = hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big")


def key_id_hex(kid: int) -> str:
    return f"{kid:08x}"


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a data key file: exactly 32 raw bytes, not readable by group or others.

    Why refuse (not warn) a group/other-readable file: whoever can read the key file can read
    every encrypted file, so a permissive mode silently voids encryption at rest.
    """
    where = f"security.data_key_file {str(path)!r}"
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(KEY_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"{where}: not a regular file")
    if mode & 0o077:
        raise KeyFileError(
            f"{where}: mode {stat.S_IMODE(mode):04o} lets group or others read it; "
            "run chmod 600 on it"
        )
    if len(data) != KEY_BYTES:
        size = f"{len(data)}" if len(data) <= KEY_BYTES else f"more than {KEY_BYTES}"
        raise KeyFileError(
            f"{where}: must hold exactly {KEY_BYTES} raw bytes (AES-256), it holds {size}; "
            "make one with: head -c 32 /dev/urandom > FILE && chmod 600 FILE"
        )
    return data


class DataCipher:
    """AES-256-GCM under one key, with this instance's nonce sequence (module docstring).

    Thread-safe. Pickling sends the key (the warm sealer child gets it through its pipe, never
    on a command line) and the copy draws its own nonce start. The key never appears in repr.
    """

    __slots__ = ("_aead", "_key", "_lock", "_next", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self.key_id = key_id(self._key)
        self._next = int.from_bytes(os.urandom(NONCE_BYTES), "big")
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[DataCipher], tuple[bytes]]:
        return (DataCipher, (self._key,))

    def __repr__(self) -> str:
        return f"DataCipher(key id {self.key_id_hex})"

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.key_id)

    def nonce(self) -> bytes:
        with self._lock:
            value = self._next
            self._next = (value + 1) % _NONCE_MOD
        return value.to_bytes(NONCE_BYTES, "big")

    def seal(self, data: bytes | memoryview, aad: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext with its 16-byte tag)."""
        nonce = self.nonce()
        return nonce, self._aead.encrypt(nonce, data, aad)

    def seal_parts(self, parts: Sequence[bytes | memoryview], aad: bytes) -> tuple[bytes, bytes]:
        """`seal` of the concatenation of `parts`, without concatenating them first: GCM is a
        stream cipher, so feeding the parts in turn gives the very bytes `seal` would (and
        `open` reads it back whole). One part takes `seal`'s one-call path."""
        if len(parts) == 1:
            return self.seal(parts[0], aad)
        nonce = self.nonce()
        encryptor = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(aad)
        pieces = [encryptor.update(part) for part in parts]
        pieces.append(encryptor.finalize())
        pieces.append(encryptor.tag)
        return nonce, b"".join(pieces)

    def open(self, nonce: bytes | memoryview, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """The plaintext; raises `DecryptError` if anything was changed or the key differs."""
        try:
            return self._aead.decrypt(bytes(nonce), sealed, aad)
        except InvalidTag:
            raise DecryptError("authentication failed") from None


def load_cipher(data_key_file: str) -> DataCipher | None:
    """The cipher for `[security] data_key_file` ("" = encryption off: None)."""
    return DataCipher(load_key(data_key_file)) if data_key_file else None


# --- chunked files -----------------------------------------------------------------------------


def is_encrypted_file(prefix: bytes) -> bool:
    return prefix[: len(FILE_MAGIC)] == FILE_MAGIC


def file_key_id(prefix: bytes) -> int:
    """The key id in an encrypted file's header (`prefix`: at least its first 24 bytes)."""
    return FILE_HEADER.unpack_from(prefix)[2]


def seal_chunks(
    cipher: DataCipher, kind: bytes, chunks: Iterable[bytes | memoryview], context: bytes = b""
) -> Iterator[bytes]:
    """The bytes of an encrypted file, piece by piece: its header, then one piece per chunk
    (the last flagged as last; no chunks at all give one empty last chunk)."""
    header = FILE_HEADER.pack(FILE_MAGIC, kind, cipher.key_id, os.urandom(8))
    yield header
    index = 0
    pending: bytes | memoryview | None = None
    for chunk in chunks:
        if pending is not None:
            yield _seal_chunk(cipher, header, context, index, pending, 0)
            index += 1
        pending = chunk
    yield _seal_chunk(cipher, header, context, index, b"" if pending is None else pending, 1)


def _seal_chunk(
    cipher: DataCipher,
    header: bytes,
    context: bytes,
    index: int,
    data: bytes | memoryview,
    flags: int,
) -> bytes:
    aad = header + context + _CHUNK_AD.pack(index, len(data), flags)
    nonce, sealed = cipher.seal(data, aad)
    return CHUNK_HEADER.pack(len(data), flags, nonce) + sealed


def open_chunks(
    cipher: DataCipher,
    kind: bytes,
    data: bytes | memoryview,
    context: bytes = b"",
    *,
    limit: int | None = None,
) -> Iterator[bytes]:
    """Decrypt an encrypted file's chunks in order (the first `limit` only, if given).

    Raises `DecryptError` for a wrong kind, a changed or moved byte, a truncated file (no last
    chunk) or bytes after the last chunk; check `file_key_id` first for a clear wrong-key
    message.
    """
    view = memoryview(data)
    if len(view) < FILE_HEADER.size or not is_encrypted_file(bytes(view[:8])):
        raise DecryptError("not an encrypted file")
    header = bytes(view[: FILE_HEADER.size])
    if FILE_HEADER.unpack(header)[1] != kind:
        raise DecryptError(f"not an encrypted {kind.decode()} file")
    at = FILE_HEADER.size
    index = 0
    while limit is None or index < limit:
        if at + CHUNK_HEADER.size > len(view):
            raise DecryptError("truncated (no last chunk)")
        length, flags, nonce = CHUNK_HEADER.unpack_from(view, at)
        end = at + CHUNK_HEADER.size + length + TAG_BYTES
        if end > len(view):
            raise DecryptError("truncated chunk")
        aad = header + context + _CHUNK_AD.pack(index, length, flags)
        yield cipher.open(nonce, view[at + CHUNK_HEADER.size : end], aad)
        at, index = end, index + 1
        if flags & CHUNK_LAST:
            if at != len(view) and limit is None:
                raise DecryptError("bytes after the last chunk")
            return


def read_first_chunk(cipher: DataCipher, kind: bytes, path: Path) -> bytes:
    """Decrypt only chunk 0 of the file at `path` (a warm segment's header), reading no more."""
    with open(path, "rb") as handle:
        prefix = handle.read(FILE_HEADER.size + CHUNK_HEADER.size)
        if len(prefix) < FILE_HEADER.size + CHUNK_HEADER.size:
            raise DecryptError("truncated header")
        (length, _, _) = CHUNK_HEADER.unpack_from(prefix, FILE_HEADER.size)
        body = handle.read(length + TAG_BYTES)
    return next(open_chunks(cipher, kind, prefix + body, limit=1))


# --- checking a data directory against the configured key --------------------------------------


def mismatch(cipher: DataCipher | None, found_kid: int | None, path: Path) -> str | None:
    """Why a file written with key id `found_kid` (None: plain) cannot be read with `cipher`
    (None: encryption off), or None when it can. The messages name the file and the key ids."""
    if cipher is None:
        if found_kid is None:
            return None
        return (
            f"{path} is encrypted (key id {key_id_hex(found_kid)}) but [security] "
            "data_key_file is not set: set it to the key these files were written with"
        )
    if found_kid is None:
        return (
            f"{path} is not encrypted but [security] data_key_file is set (key id "
            f"{cipher.key_id_hex}): encryption at rest needs a data directory written with "
            "it; start over an empty [durability] dir (archive first), or unset the key"
        )
    if found_kid != cipher.key_id:
        return (
            f"data key does not match the key these files were written with (key id "
            f"{key_id_hex(found_kid)}, file {path}; the configured key has key id "
            f"{cipher.key_id_hex}): set [security] data_key_file to the original key; "
            "nothing was changed"
        )
    return None


def check(cipher: DataCipher | None, found_kid: int | None, path: Path) -> None:
    """Raise `DataKeyError` when `mismatch` finds a reason."""
    reason = mismatch(cipher, found_kid, path)
    if reason is not None:
        raise DataKeyError(reason)
