"""Hostile input over real HTTP: a request that breaks its decoder fails alone (4xx) and its
batch-mates are answered; no 200 ever carries a non-finite number; frames whose quantization
parameters would overflow are refused before they run."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import warnings

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import server_settings

from splitexit.bottleneck.quantize import QuantizedTensor
from splitexit.codec import encode_frame
from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request, decode_infer_response
from splitexit_server.model import IMAGE_FORMATS, ServedModel, Work

FUZZ_EXAMPLES = 60  # bounded: a few seconds

# formats Pillow opens but cannot write: their magic numbers, then garbage, reach the plugin
_OPEN_ONLY_MAGIC = {
    "BLP": b"BLP2\x01\x02\x08\x00",
    "CUR": b"\x00\x00\x02\x00\x01\x00",
    "DCX": b"\xb1\x68\xde\x3a",
    "FITS": b"SIMPLE  =                    T",
    "FLI": b"\x00\x00\x00\x00\x11\xaf",
    "GBR": b"\x00\x00\x00\x1c\x00\x00\x00\x02",
    "PSD": b"8BPS\x00\x01",
    "SUN": b"\x59\xa6\x6a\x95",
    "XPM": b"/* XPM */\n",
    "FTEX": b"FTEX",
    "MCIDAS": b"\x00\x00\x00\x00\x00\x00\x00\x04",
}


def strict_json(data: bytes) -> object:
    """json.loads that refuses NaN and Infinity (what any strict JSON parser does)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-JSON constant {constant} in the answer")

    return json.loads(data, parse_constant=refuse)


def image_corpus() -> dict[str, bytes]:
    """Every format Pillow can write, valid and corrupted (cut in half, bytes flipped), and
    garbage behind the magic numbers of formats it only reads."""
    from PIL import Image

    Image.init()
    rng = np.random.default_rng(0)
    pixels = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    corpus: dict[str, bytes] = {}
    for fmt in sorted(Image.SAVE):
        for mode in ("RGB", "L", "1"):
            buf = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # e.g. the IM format
                    pixels.convert(mode).save(buf, format=fmt)
            except Exception:
                continue
            data = buf.getvalue()
            flipped = bytes(b ^ 0x5A if i >= 8 and i % 7 == 0 else b for i, b in enumerate(data))
            corpus |= {f"{fmt}": data, f"{fmt}-half": data[: len(data) // 2]}
            corpus[f"{fmt}-flipped"] = flipped
            break
    garbage = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    for fmt, magic in _OPEN_ONLY_MAGIC.items():
        corpus[f"{fmt}-garbage"] = magic + garbage
    return corpus


@pytest.fixture(scope="module")
def a(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def live(a, module_live_server):
    s = server_settings(a, max_batch_size=64, max_queue_delay_ms=50.0, max_queue_size=512)
    server = module_live_server(s, [a])
    yield server


def frame_request(frame: bytes) -> tuple[bytes, dict[str, str]]:
    return build_binary_request("frame", [frame], outputs=["class", "probability", "logits"])


def test_a_corrupt_image_of_any_format_fails_alone_and_its_batch_mates_are_answered(live, a):
    corpus = image_corpus()
    assert {"DDS-half", "SPIDER-flipped", "BLP-garbage", "PNG-half"} <= set(corpus)
    frames = [a.frame(a.inputs(1, seed), 4, 8) for seed in range(40)]
    want = [int(a.local(f).prediction[0]) for f in frames]
    path = f"/v2/models/{a.name}/infer"

    requests = [("frame", frame_request(f)) for f in frames]
    requests += [("image", build_binary_request("image", [d])) for d in corpus.values()]
    order = np.random.default_rng(1).permutation(len(requests))  # images among the frames

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            calls = [
                c.post(path, content=requests[i][1][0], headers=requests[i][1][1]) for i in order
            ]
            answers = await asyncio.gather(*calls)
        by_index = dict(zip(order.tolist(), answers, strict=True))
        ranked = [by_index[i] for i in range(len(requests))]
        return ranked[: len(frames)], ranked[len(frames) :]

    frame_answers, image_answers = asyncio.run(main())
    for r, cls in zip(frame_answers, want, strict=True):
        assert r.status_code == 200, r.text
        assert decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))["class"][0] == cls
    for name, r in zip(corpus, image_answers, strict=True):
        fmt, _, damage = name.partition("-")
        accepted = fmt in (*IMAGE_FORMATS, "MPO") and not damage  # MPO is a JPEG
        assert r.status_code == (200 if accepted else 400), (name, r.status_code, r.text[:300])
        if not accepted:
            assert "PNG/JPEG/WEBP" in r.json()["error"], name
    m = live.state.metrics
    batches = m.execution_count.value(model=a.name)
    assert m.inference_count.value(model=a.name) / batches > 1.5  # they did share batches
    assert live.state.ready


def test_a_batch_with_an_undecodable_image_answers_the_frames_beside_it(live, a):
    model: ServedModel = live.state.models[a.name]
    dds = image_corpus()["DDS-half"]
    frames = [a.frame(a.inputs(1, seed), 2, 4) for seed in (1, 2)]
    works = [Work("frame", [frames[0]], 1), Work("image", [dds], 1), Work("frame", [frames[1]], 1)]
    first, bad, last = model.run(works)
    assert type(bad).__name__ == "BadRequest" and "cannot decode image" in bad.message
    assert int(first.prediction[0]) == int(a.local(frames[0]).prediction[0])
    assert int(last.prediction[0]) == int(a.local(frames[1]).prediction[0])


def qt_with(a, scale: float, zero_point: int = 128, seed: int = 0) -> QuantizedTensor:
    _, h, w = a.bundle.manifest.bottleneck.code_shape
    g = torch.Generator().manual_seed(seed)
    return QuantizedTensor(
        values=torch.randint(0, 256, (1, 4, h, w), dtype=torch.uint8, generator=g),
        scale=torch.tensor([scale]),
        zero_point=torch.tensor([zero_point], dtype=torch.uint8),
        bits=8,
        channels=4,
    )


def with_scale(frame: bytes, scale: float) -> bytes:
    """The frame with its first sample's scale overwritten (crc recomputed): what a hostile
    or broken device could send."""
    import zlib

    out = bytearray(frame)
    struct.pack_into("<f", out, 32, scale)
    struct.pack_into("<I", out, 28, zlib.crc32(out[32:], zlib.crc32(out[:28])))
    return bytes(out)


def test_a_frame_with_a_huge_scale_is_refused_not_answered_with_nan(live, a):
    frame = with_scale(encode_frame(qt_with(a, 0.05), a.fingerprint), 1e38)
    body, headers = frame_request(frame)
    with httpx.Client(base_url=live.url, timeout=10) as c:
        r = c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert "scale of sample 0" in r.json()["error"] and "MAX_SCALE" in r.json()["error"]


def test_every_200_for_fuzzed_quantization_parameters_is_strict_json(live, a):
    path = f"/v2/models/{a.name}/infer"
    seen: dict[int, int] = {}
    scales = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from(
        [1e-45, 1e-30, 1.0, 255.0, 65536.0, 65537.0, 1e30, 3.4e38]
    )

    with httpx.Client(base_url=live.url, timeout=10) as c:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(scale=scales, zero_point=st.integers(0, 255), seed=st.integers(0, 2**16))
        def check(scale: float, zero_point: int, seed: int) -> None:
            frame = with_scale(
                encode_frame(qt_with(a, 1.0, zero_point, seed), a.fingerprint), scale
            )
            body, headers = build_binary_request("frame", [frame], binary_outputs=False)
            r = c.post(path, content=body, headers={**headers, "X-Fuzz": "1"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400), r.text[:300]
            doc = strict_json(r.content)
            if r.status_code == 200:
                (p,) = next(o["data"] for o in doc["outputs"] if o["name"] == "probability")
                assert 0.0 <= p <= 1.0

        check()
    assert seen.get(200) and seen.get(400), seen
