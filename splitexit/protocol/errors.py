"""Errors of the wire protocols: bytes that do not follow them, with what a reader can act on.

ProtocolError            bytes that are not what the protocol says (status 400)
├── UnsupportedMedia     a KServe request in a media type or encoding not accepted (415)
└── StreamError          a stream handshake, message or answer that cannot be read
"""

from __future__ import annotations

from splitexit.errors import SplitexitError


class ProtocolError(SplitexitError, ValueError):
    """A request, response, message or answer that does not follow its protocol.

    `status` is the HTTP status a server answers it with.
    """

    status = 400


class UnsupportedMedia(ProtocolError):
    """A KServe v2 request body in a Content-Type or Content-Encoding that is not accepted."""

    status = 415


class StreamError(ProtocolError):
    """A stream handshake, message or answer that breaks the stream layout (see `stream`)."""
