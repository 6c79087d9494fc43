"""A small Server-Sent Events reader over `http.client` (no aiohttp/httpx in the venv).

Why its own module: the live stream's tests and the page's test both read GET /stream; the
reader keeps comments (heartbeats) apart from events and says when the server closed it.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any

from server_harness import Server


@dataclass
class Event:
    name: str
    data: Any  # the decoded JSON of `data:`


class StreamError(Exception):
    """GET /stream answered with an error (its status and JSON body)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class SseClient:
    """One open GET /stream; `next_event()` returns the next event, skipping comments."""

    def __init__(
        self, server: Server, query: str, headers: dict[str, str] | None = None, timeout_s=10.0
    ) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
        self.conn.request("GET", "/stream?" + query, headers=headers or {})
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            body = json.loads(self.response.read())
            self.conn.close()
            raise StreamError(self.response.status, body)
        self.content_type = self.response.getheader("content-type", "")
        self.comments: list[str] = []
        self.closed = False

    def next_event(self, timeout_s: float = 10.0) -> Event | None:
        """The next event, or None once the server ended the stream (EOF)."""
        deadline = time.monotonic() + timeout_s
        name, data = "message", []
        while time.monotonic() < deadline:
            line = self.response.readline()
            if not line:
                self.closed = True
                return None
            text = line.decode("utf-8").rstrip("\n")
            if text == "":
                if data:
                    return Event(name, json.loads("\n".join(data)))
                name = "message"
                continue
            if text.startswith(":"):
                self.comments.append(text[1:].strip())
                continue
            key, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
        raise TimeoutError(f"no event within {timeout_s} s")

    def events_until(self, predicate, timeout_s: float = 10.0) -> list[Event]:
        """Events read until one satisfies `predicate` (included); TimeoutError otherwise."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"stream ended before the expected event; saw {seen}")
            seen.append(event)
            if predicate(event):
                return seen

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stream(server: Server, query: str, timeout_s: float = 10.0, **kwargs: Any) -> SseClient:
    """Open a stream, retrying while it is refused 429: a stream a previous test closed is
    released when the server sees the connection go, a moment after the client closed it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return SseClient(server, query, **kwargs)
        except StreamError as exc:
            if exc.status != 429 or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
