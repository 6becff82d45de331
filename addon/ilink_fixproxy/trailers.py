"""HTTP/1 trailers: refused at once with a clear error, instead of a connection that hangs.

mitmproxy (11 and 12) does not implement trailers: when a chunked body ends with trailer fields,
its HTTP/1 reader raises NotImplementedError from inside the proxy layer. The layer dies, nothing
answers, and the gateway waits for its own timeout (the send is neither delivered nor refused).
No addon hook runs at that point (the request's body is still being read), so the reader itself
is wrapped: that one error becomes what mitmproxy does for any malformed HTTP/1 body (an h11
ProtocolError: the connection is closed and the stream gets a protocol error, so the flow ends
with an error and an answer's trailers give the client a 502), plus, for a request, a 400 that
says why before the close.
"""

from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

_MARK = "_ilink_fixproxy_trailers_refused"


def install() -> bool:
    """Wrap mitmproxy's HTTP/1 body reader once; False when its layout is not the one known
    (then nothing is changed: mitmproxy behaves as it always did)."""
    try:
        from mitmproxy.connection import ConnectionState
        from mitmproxy.proxy import commands
        from mitmproxy.proxy.layers.http import _http1
        from mitmproxy.proxy.layers.http._base import ReceiveHttp
    except ImportError:  # pragma: no cover - another mitmproxy layout
        return False
    conn_cls = getattr(_http1, "Http1Connection", None)
    original = getattr(conn_cls, "read_body", None)
    if (
        original is None
        or not inspect.isgeneratorfunction(original)
        or not hasattr(_http1, "make_error_response")
        or not hasattr(_http1, "Http1Server")
    ):
        return False
    if getattr(original, _MARK, False):
        return True

    def read_body(self: Any, event: Any) -> Generator[Any, Any, None]:
        try:
            yield from original(self, event)
        except NotImplementedError as e:  # "HTTP trailers are not implemented yet."
            message = f"HTTP/1 protocol error: {e}"
            if isinstance(self, _http1.Http1Server) and self.conn.state & ConnectionState.CAN_WRITE:
                # mitmproxy only closes a client whose request body it cannot read; say why
                yield commands.SendData(
                    self.conn,
                    _http1.make_error_response(
                        400, f"{e} Send the request without trailers (ilink-fixproxy runs on mitmproxy)."
                    ),
                )
            # then as for any malformed body: close, and the stream's protocol error (the error
            # hook records it; an answer's trailers become a 502 for the client)
            yield commands.CloseConnection(self.conn)
            # the class's default code, as mitmproxy passes it (required, an ErrorCode, in 12.x)
            error = self.ReceiveProtocolError(self.stream_id, message, code=self.ReceiveProtocolError.code)
            yield ReceiveHttp(error)

    setattr(read_body, _MARK, True)
    conn_cls.read_body = read_body  # type: ignore[union-attr]
    return True
