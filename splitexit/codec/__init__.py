"""The codec: bit packing and the frame that carries a quantized tensor over the wire.

QuantizedTensor ─ encode_frame ─► bytes ─ decode_frame ─► Frame(header, tensor)
"""

from splitexit.codec.bitpack import pack, packed_size, unpack
from splitexit.codec.frame import (
    FRAME_VERSION,
    HEADER_SIZE,
    MAX_SCALE,
    QPARAM_SIZE,
    Frame,
    FrameHeader,
    decode_frame,
    encode_frame,
    read_header,
    train_dictionary,
)

__all__ = [
    "FRAME_VERSION",
    "HEADER_SIZE",
    "MAX_SCALE",
    "QPARAM_SIZE",
    "Frame",
    "FrameHeader",
    "decode_frame",
    "encode_frame",
    "pack",
    "packed_size",
    "read_header",
    "train_dictionary",
    "unpack",
]
