"""Tokens, principals and rate limits (appliance.auth, appliance.rate_limit), in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.auth import (
    Principal,
    Tokens,
    TokensFileError,
    new_token,
    token_sha256,
    tokens_file_entry,
)
from appliance.rate_limit import RateLimits, retry_after_header


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    return path


def test_a_file_of_entries_authenticates_by_hash(tmp_path: Path) -> None:
    a, b = new_token(), new_token()
    path = write(tmp_path, tokens_file_entry("a", a, "read") + tokens_file_entry("b", b, "admin"))
    tokens = Tokens.from_file(path)
    assert len(tokens) == 2
    assert tokens.authenticate(a) == Principal("a", "read")
    assert tokens.from_authorization(f"Bearer {b}").name == "b"
    assert tokens.from_authorization(f"bearer   {b}  ").name == "b"  # scheme is case-insensitive
    for header in (None, "", b, f"Basic {b}", f"Bearer {b}x", "Bearer"):
        assert tokens.from_authorization(header) is None, header
    assert a not in path.read_text()  # only its hash is stored
    assert token_sha256(a) in path.read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[tokens]]\nname = "x"\nsha256 = "abc"\nrole = "read"\n', "sha256"),
        ('[[tokens]]\nname = "x"\nsha256 = "' + "0" * 64 + '"\nrole = "root"\n', "role"),
        ('[[tokens]]\nname = "x"\nsha256 = "' + "0" * 64 + '"\nrole = "read"\nx = 1\n', "x"),
        ("[[tokens]\n", "not valid TOML"),
        (
            '[[tokens]]\nname = "x"\nsha256 = "' + "0" * 64 + '"\nrole = "read"\n'
            '[[tokens]]\nname = "x"\nsha256 = "' + "1" * 64 + '"\nrole = "read"\n',
            "used twice",
        ),
        (
            '[[tokens]]\nname = "x"\nsha256 = "' + "0" * 64 + '"\nrole = "read"\n'
            '[[tokens]]\nname = "y"\nsha256 = "' + "0" * 64 + '"\nrole = "read"\n',
            "listed twice",
        ),
    ],
)
def test_a_bad_file_names_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(TokensFileError, match=expected) as info:
        Tokens.from_file(write(tmp_path, text))
    assert "tokens.toml" in str(info.value)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TokensFileError, match="cannot read"):
        Tokens.from_file(tmp_path / "absent.toml")


def test_roles_are_ordered_and_patterns_match_case_sensitively() -> None:
    reader = Principal("r", "read", ("EUR/*", "GBP/USD"))
    admin = Principal("a", "admin")
    assert reader.has_role("read") and not reader.has_role("write")
    assert admin.has_role("read") and admin.has_role("write") and admin.has_role("admin")
    assert reader.may_access("EUR/USD") and reader.may_access("GBP/USD")
    assert not reader.may_access("eur/usd") and not reader.may_access("GBP/USDX")
    assert admin.may_access("anything")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_request_bucket_allows_a_second_of_burst_then_the_rate() -> None:
    clock = Clock()
    limits = RateLimits(0, 0, clock)
    slow = Principal("s", "read", max_requests_per_s=4)
    assert [limits.take_request(slow) for _ in range(4)] == [0.0] * 4
    wait = limits.take_request(slow)
    assert wait == pytest.approx(0.25)
    clock.now += 0.25
    assert limits.take_request(slow) == 0.0
    assert limits.take_request(Principal("free", "read")) == 0.0  # no limit, no default


def test_the_default_applies_to_entries_without_limits() -> None:
    clock = Clock()
    limits = RateLimits(1, 100, clock)
    p = Principal("p", "write")
    assert limits.take_request(p) == 0.0 and limits.take_request(p) > 0
    assert limits.take_values(p, 100) == 0.0
    assert limits.take_values(p, 50) == pytest.approx(0.5)
    assert retry_after_header(0.01) == {"Retry-After": "1"}
    assert retry_after_header(2.2) == {"Retry-After": "3"}


@given(
    st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 400)), min_size=1, max_size=200),
    st.floats(10, 1000),
)
def test_granted_values_never_exceed_one_second_plus_the_rate(
    steps: list[tuple[float, int]], rate: float
) -> None:
    """Over any run: granted <= rate x elapsed + one second's allowance (the bucket)."""
    clock = Clock()
    limits = RateLimits(0, 0, clock)
    p = Principal("p", "write", max_values_per_s=rate)
    start, granted = clock.now, 0.0
    for advance, amount in steps:
        clock.now += advance
        if limits.take_values(p, amount) == 0.0:
            granted += min(amount, rate)
        assert granted <= rate * (clock.now - start) + rate + 1e-6


def test_the_openapi_document_states_the_security_of_each_route() -> None:
    from openapi_spec_validator import validate

    from appliance.config import build_config
    from appliance.openapi import build_openapi

    secured = build_openapi(build_config({"auth": {"mode": "token", "tokens_file": "t.toml"}}))
    validate(secured)
    assert secured["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    paths = secured["paths"]
    assert paths["/stats/"]["get"]["security"] == [{"bearerAuth": []}]
    assert {"401", "403", "429"} <= set(paths["/add_batch/"]["post"]["responses"])
    assert "security" not in paths["/health"]["get"] and "security" not in paths["/live"]["get"]
    assert paths["/symbols/{symbol}"]["delete"]["security"] == [{"bearerAuth": []}]
    open_doc = build_openapi(build_config({}))
    validate(open_doc)
    assert "security" not in open_doc["paths"]["/stats/"]["get"]
