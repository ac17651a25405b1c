"""The wire protocols between the device and the tail server, both directions, in one place.

kserve   Open Inference Protocol (KServe v2) over HTTP, with Triton's binary extension:
         interop with Triton / KServe / tritonclient, and the fallback path
stream   one WebSocket per device and model: a session handshake once, then messages
         of (id, operating point, quantization parameters, packed payload) and answers
         of (id, class, probability)
"""

from splitexit.protocol.errors import ProtocolError, StreamError, UnsupportedMedia

__all__ = ["ProtocolError", "StreamError", "UnsupportedMedia"]
