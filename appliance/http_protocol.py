"""Sanic's HTTP/1.1 protocol with one fix: a request line whose URL httptools rejects gets the
API's JSON 400 instead of a dropped connection and a traceback in the log.

Why a subclass, passed with `app.run(protocol=AppHttpProtocol)` (Sanic's supported hook for a
custom protocol): Sanic 25 parses the request line in `Http.http1_request_header`; when the URL
is not one httptools accepts (a NUL or another control byte: `GET /\\x00 HTTP/1.1`), building the
`Request` raises `BadURL`. To render that error Sanic builds a stand-in request in
`Http.create_empty_request` from the same URL, which raises `BadURL` again, outside any handler:
no response is sent, the connection is dropped and `sanic.error` logs a 2 KB traceback per
request. No error handler can help: the failure happens before there is a request to handle.

The fix overrides only `create_empty_request`, which runs on the error path alone: when the
URL cannot make a request, the stand-in gets the URL `*` (what Sanic itself uses when no URL
was read), so the original `BadURL` reaches `JsonErrorHandler` and becomes a 400 `bad_request`
JSON body, `Connection: close`. The parsing and response methods (`http1_request_header`,
`http1_response_header`, `read`, which Sanic compiles per app) are inherited untouched, so the
hot path is the same code; the subclasses add no slots and no per-request work.
"""

from __future__ import annotations

from sanic.exceptions import BadRequest
from sanic.http import Http
from sanic.server.protocols.http_protocol import HttpProtocol


class AppHttp(Http):
    """`Http` whose error path survives a URL that cannot make a `Request` (see module doc)."""

    __slots__ = ()

    def create_empty_request(self) -> None:
        try:
            super().create_empty_request()
        except BadRequest:  # BadURL, an alias
            # Sanic's own fallback for "no URL read yet"; the original error is still the one
            # being rendered (the caller holds it), so its message names the bad URL.
            self.url = None
            super().create_empty_request()


class AppHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with `AppHttp` as the per-connection handler."""

    __slots__ = ()
    HTTP_CLASS = AppHttp
