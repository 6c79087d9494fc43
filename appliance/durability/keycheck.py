"""The up-front data key check: is every file under a data directory readable with the key?

Why up front, before recovery or the warm tier's scan touch anything: with a wrong key every
record and segment would fail authentication, which recovery would report as corruption (and
`fsck --repair` would quarantine as such). Reading the key id in each file's header first turns
that into one clear message naming a file and both key ids, with nothing on disk changed
(no torn tail trimmed, no `*.tmp` removed, no retention). A data directory mixing plain and
encrypted files is refused the same way: encryption is turned on over an empty data directory
(docs/security.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from appliance.durability import wal
from appliance.durability.checkpoint import finished, manifest_key_id
from appliance.durability.encryption import DataCipher, check, file_key_id, is_encrypted_file
from appliance.durability.warm_segment import MAGIC as WARM_MAGIC
from appliance.durability.warm_segment import SUFFIX as WARM_SUFFIX

_PREFIX_BYTES = 24


def check_data_dir(data_dir: str | os.PathLike[str], cipher: DataCipher | None) -> None:
    """Raise `encryption.DataKeyError` naming the first file that `cipher` (None: encryption
    off) cannot read because of its key (another key, encrypted, or plain). Reads headers only."""
    root = Path(data_dir)
    for path in wal.list_segments(wal.wal_dir(root)):
        has_record, kid = wal.segment_key_id(path)
        if has_record:
            check(cipher, kid, path)
    for _, path in finished(root):
        readable, hex_kid = manifest_key_id(path)
        if readable:
            check(cipher, _parse_hex(hex_kid), path / "manifest.json")
    warm = root / "warm"
    if warm.is_dir():
        for path in sorted(warm.glob("*/*" + WARM_SUFFIX)):
            with open(path, "rb") as handle:
                prefix = handle.read(_PREFIX_BYTES)
            if is_encrypted_file(prefix) and len(prefix) == _PREFIX_BYTES:
                check(cipher, file_key_id(prefix), path)
            elif prefix.startswith(WARM_MAGIC):
                check(cipher, None, path)


def _parse_hex(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 16)
    except ValueError:
        return -1  # matches no key: reported as written with another key
