"""Who is calling: bearer tokens with a role and symbol patterns, read from a tokens file.

Why hashes in the file: the file names each token by the SHA-256 of its text, so a leaked
tokens file (a config repository, a backup) grants nothing; `hft-appliance token new` prints a
token once and the entry to add. Tokens are long random strings (256 bits), so an unsalted
SHA-256 is enough to make them unrecoverable from the file, and a lookup by hash leaks nothing
through timing that would help guess one.

Roles are ordered, `read` < `write` < `admin`: a role grants everything below it. Symbol
patterns are `fnmatch` patterns matched case-sensitively (`EUR/*`); a token without
`symbols` may touch every symbol. The same `Principal` answers for REST, the control socket and
the ZeroMQ ZAP handler, so every path grants the same things to the same token.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Role = Literal["read", "write", "admin"]
ROLES: tuple[Role, ...] = ("read", "write", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
TOKEN_PREFIX = "hft_"  # makes a token recognisable in a secret scanner or a leaked log
_BEARER = re.compile(r"^\s*Bearer\s+(\S+)\s*$", re.IGNORECASE)
_HEADER_CACHE_SIZE = 1024
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
RatePerSecond = Annotated[float, Meta(ge=0)]


class TokensFileError(Exception):
    """The tokens file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Principal:
    """A token's name, role, symbol patterns and rate limits (0 = the [auth] default)."""

    name: str
    role: Role
    symbols: tuple[str, ...] | None = None  # None: every symbol
    max_requests_per_s: float = 0.0
    max_values_per_s: float = 0.0

    def has_role(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]

    def may_access(self, symbol: str) -> bool:
        if self.symbols is None:
            return True
        return any(fnmatchcase(symbol, pattern) for pattern in self.symbols)


class _Entry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    sha256: Sha256Hex
    role: Role
    symbols: list[Annotated[str, Meta(min_length=1, max_length=256)]] | None = None
    max_requests_per_s: RatePerSecond = 0.0
    max_values_per_s: RatePerSecond = 0.0


class _File(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[_Entry] = []


class Tokens:
    """The tokens of one appliance: SHA-256 of the token text -> Principal."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._by_hash = dict(principals)
        # Authorization header -> principal, for headers that named a known token: a client
        # sends the same header on every request, and hashing it each time was most of the
        # cost of auth per request. Only known tokens enter, so it is bounded by the tokens'
        # spellings; cleared past _HEADER_CACHE_SIZE all the same.
        self._by_header: dict[str, Principal] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> Tokens:
        """Read and check a tokens file; raises TokensFileError (one line naming the file)."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
            parsed = msgspec.convert(raw, _File)
        except OSError as exc:
            message = f"cannot read tokens file {str(path)!r}: {exc.strerror}"
            raise TokensFileError(message) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TokensFileError(f"tokens file {str(path)!r} is not valid TOML: {exc}") from None
        except msgspec.ValidationError as exc:
            raise TokensFileError(f"tokens file {str(path)!r}: {exc}") from None
        return cls.from_entries(parsed.tokens, where=str(path))

    @classmethod
    def from_entries(cls, entries: Iterable[_Entry], where: str = "tokens") -> Tokens:
        by_hash: dict[str, Principal] = {}
        names: set[str] = set()
        for entry in entries:
            if entry.name in names:
                raise TokensFileError(f"{where}: the name {entry.name!r} is used twice")
            if entry.sha256 in by_hash:
                raise TokensFileError(f"{where}: the token of {entry.name!r} is listed twice")
            names.add(entry.name)
            symbols = tuple(entry.symbols) if entry.symbols is not None else None
            by_hash[entry.sha256] = Principal(
                entry.name, entry.role, symbols, entry.max_requests_per_s, entry.max_values_per_s
            )
        return cls(by_hash)

    def __len__(self) -> int:
        return len(self._by_hash)

    def principals(self) -> list[Principal]:
        return list(self._by_hash.values())

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a token's text, or None for an unknown token."""
        return self._by_hash.get(token_sha256(token))

    def from_authorization(self, header: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer <token>` header; None if absent, not a
        bearer token, or unknown (all three are 401 `unauthorized`)."""
        if not header:
            return None
        principal = self._by_header.get(header)
        if principal is not None:
            return principal
        match = _BEARER.match(header)
        principal = self.authenticate(match.group(1)) if match else None
        if principal is not None:
            if len(self._by_header) >= _HEADER_CACHE_SIZE:
                self._by_header.clear()
            self._by_header[header] = principal
        return principal

    def by_name(self) -> dict[str, Principal]:
        """Token name -> principal (the CURVE clients file names tokens)."""
        return {principal.name: principal for principal in self._by_hash.values()}


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    """A fresh random token: the prefix and 256 bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def tokens_file_entry(name: str, token: str, role: Role, symbols: Iterable[str] = ()) -> str:
    """The `[[tokens]]` TOML entry of a token, to append to the tokens file."""
    lines = [
        "[[tokens]]",
        f"name = {_toml_string(name)}",
        f'sha256 = "{token_sha256(token)}"',
        f'role = "{role}"',
    ]
    patterns = list(symbols)
    if patterns:
        lines.append("symbols = [" + ", ".join(_toml_string(p) for p in patterns) + "]")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    # A TOML basic string is a JSON string for everything msgspec's encoder emits.
    return msgspec.json.encode(text).decode()
