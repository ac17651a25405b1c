"""One served bundle: checks on the event loop, batches in a worker thread, warm-up, metadata.

    frames ─ read_header on the event loop (fingerprint ─ 409, shape / bits / size ─ 400)
           ─ batcher ─┐
    images ───────────┤  worker thread, one batch:
                      ├─ frames: decode (crc, zstd bounded by the header) ─ check ─┐
                      └─ images: decode ─ HeadRunner (preprocess, head) ─ encode ──┤
                                        one tail call for the whole batch ◄───────┘
                                        ─ split per request ─► Answer

Frames of any operating point share a batch: dequantized and zero-filled they all have the
code shape. The `image` input runs the whole split model on the server (the "offload
everything" baseline) at the bundle's best operating point, through the same head runner
and quantizer a device uses. Head and tail run on the runtime the settings choose.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitexit.bottleneck.quantize import QuantizedTensor
from splitexit.bundle.load import Bundle, load_bundle
from splitexit.codec import HEADER_SIZE, FrameHeader, encode_frame, read_header
from splitexit.errors import FingerprintMismatch, FrameError
from splitexit.protocol.kserve import INPUT_FRAME, INPUT_IMAGE
from splitexit.runtime.head import HeadRunner
from splitexit.runtime.tail import TailAnswer, TailRunner
from splitexit_server.admission import Admission
from splitexit_server.batcher import BatcherFactory, DynamicBatcher, Job
from splitexit_server.errors import BadRequest
from splitexit_server.metrics import ServerMetrics
from splitexit_server.settings import Settings

log = logging.getLogger("server.model")

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # the `image` input's decoders; no others are tried


@dataclass(frozen=True)
class Work:
    """One request's payload: its input kind, its elements (frames or images), its samples."""

    kind: str
    elements: Sequence[bytes]
    samples: int


@dataclass(frozen=True)
class Answer:
    """One request's answer: logits [n, K] f32, class [n] i64, probability [n] f32; with
    seconds waited for the batch and the batch's decode + model time, when run batched."""

    logits: np.ndarray
    prediction: np.ndarray
    probability: np.ndarray
    queue_s: float | None = None
    compute_s: float | None = None


def load_bundles(settings: Settings) -> list[Bundle]:
    """Load and verify every bundle in `settings` (raises BundleError naming the bad file);
    the runners load the pieces their runtime needs."""
    return [
        load_bundle(p, parts=(), device=settings.device, trusted_keys=settings.trusted_keys)
        for p in settings.bundles
    ]


class ServedModel:
    """A bundle's tail behind a dynamic batcher; `ready` once warmed up."""

    def __init__(
        self,
        bundle: Bundle,
        settings: Settings,
        metrics: ServerMetrics,
        batcher_factory: BatcherFactory | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        self.settings = settings
        self.metrics = metrics
        self.name = m.name
        self.fingerprint = bundle.fingerprint
        self.version = self.fingerprint[:16]
        self.ready = False
        self.images = settings.images
        runtime = settings.runtime_options()
        self.head = HeadRunner(bundle, runtime=runtime) if self.images else None
        b = m.bottleneck
        self.max_samples = settings.max_batch_size
        self.max_raw_bytes = (
            settings.max_batch_size * b.code_shape[0] * b.code_shape[1] * (b.code_shape[2])
        )
        runners = [
            TailRunner(
                bundle,
                max_samples=self.max_samples,
                max_raw_bytes=self.max_raw_bytes,
                runtime=runtime,
            )
            for _ in range(settings.workers_per_model)
        ]
        self.runtime = runners[0].backend.name  # "torch" or "onnxruntime"
        self._runners: queue.SimpleQueue[TailRunner] = queue.SimpleQueue()
        for runner in runners:
            self._runners.put(runner)
        self.admission = Admission(
            settings.queue_delay_target_s,
            settings.max_batch_size,
            settings.workers_per_model,
            settings.retry_after_s,
        )
        self.batcher = (batcher_factory or DynamicBatcher)(
            self.process,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_s,
            max_queue_size=settings.max_queue_size,
            workers=settings.workers_per_model,
            name=self.name,
        )
        metrics.pending.set_function(lambda: self.batcher.pending, model=self.name)
        metrics.model_ready.set_function(lambda: float(self.ready), model=self.name)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (INPUT_FRAME, INPUT_IMAGE) if self.images else (INPUT_FRAME,)

    # ------------------------------------------------------------------ event-loop side

    def prepare(
        self, input_name: str, elements: Sequence[bytes], *, header_sent: bool = True
    ) -> Work:
        """Cheap checks before queueing; raises FrameError (400) or FingerprintMismatch (409).

        `header_sent` False: the frames were rebuilt from stream messages, their headers never
        crossed the wire, and the frame bytes counted leave them out.
        """
        if input_name == INPUT_IMAGE:
            return Work(INPUT_IMAGE, elements, len(elements))
        samples = 0
        for i, data in enumerate(elements):
            try:
                header = read_header(
                    data, max_samples=self.max_samples, max_raw_bytes=self.max_raw_bytes
                )
                self.check_header(header)
            except FingerprintMismatch:
                raise
            except FrameError as e:
                raise FrameError(f"frame {i}: {e}" if len(elements) > 1 else str(e)) from None
            samples += header.batch_size
            self.metrics.frames.inc(
                model=self.name, channels=header.sent_channels, bits=header.bits
            )
            sent = len(data) if header_sent else len(data) - HEADER_SIZE
            self.metrics.frame_bytes.inc(sent, model=self.name)
        if samples > self.max_samples:
            raise FrameError(
                f"the request's frames carry {samples} samples; this server runs at most "
                f"{self.max_samples} per request (max_batch_size): split the request"
            )
        return Work(INPUT_FRAME, elements, samples)

    def check_header(self, h: FrameHeader) -> None:
        """Refuse a frame from another bundle (409) or one that does not fit this one (400)."""
        if h.fingerprint != self.fingerprint[:16]:
            raise FingerprintMismatch(h.fingerprint, self.fingerprint)
        b = self.manifest.bottleneck
        c, height, width = b.code_shape
        if h.channels != c or (h.height, h.width) != (height, width):
            raise FrameError(
                f"frame code is C={h.channels} x {h.height}x{h.width}, but model {self.name!r} "
                f"expects C={c} x {height}x{width}"
            )
        if h.bits not in b.bits:
            raise FrameError(
                f"frame uses {h.bits} bits; model {self.name!r} supports {list(b.bits)}"
            )

    # --------------------------------------------------------------------- worker side

    def process(self, jobs: Sequence[Job]) -> list[Answer | Exception]:
        """Run one batch (called by the batcher in a worker thread); a job that waited past
        the queue-delay target is dropped uncomputed (429, see `splitexit_server.admission`)."""
        now = time.perf_counter()
        target = self.admission.target_s
        keep = [j for j in jobs if now - j.enqueued <= target]
        answers = iter(self.run([j.payload for j in keep], jobs=keep) if keep else [])
        return [
            next(answers)
            if now - j.enqueued <= target
            else self.admission.late(self.name, now - j.enqueued)
            for j in jobs
        ]

    def run(
        self, works: Sequence[Work], *, jobs: Sequence[Job] | None = None
    ) -> list[Answer | Exception]:
        """Decode every request, answer all in one tail call; a bad request fails alone.

        Metrics are recorded when `jobs` (the batcher's view of the requests) are given.
        """
        start = time.perf_counter()
        runner = self._runners.get()
        try:
            results: list[Any] = [None] * len(works)
            codes: list[list[QuantizedTensor]] = [[] for _ in works]
            for i, w in enumerate(works):
                if w.kind == INPUT_FRAME:
                    try:
                        codes[i] = [runner.decode(f) for f in w.elements]
                    except FrameError as e:  # FingerprintMismatch included
                        results[i] = e
                    except Exception as e:  # decoding trusts nothing: still this input's fault
                        results[i] = FrameError(f"{type(e).__name__}: {e}")
            image_jobs = [i for i, w in enumerate(works) if w.kind == INPUT_IMAGE]
            pixels = self._decode_images(works, image_jobs, results)
            decoded_images = time.perf_counter()
            if pixels:
                self._run_head(pixels, codes)
            flat = [qt for i, cs in enumerate(codes) if results[i] is None for qt in cs]
            answers = iter(runner.run_codes(flat))
            for i, cs in enumerate(codes):
                if results[i] is None:
                    results[i] = _finite(_join([next(answers) for _ in cs]))
            done = time.perf_counter()
        finally:
            self._runners.put(runner)
        if jobs is not None:
            self.admission.record_batch(done - start)
            self._record(jobs, works, results, start, decoded_images - start, done - decoded_images)
            results = [
                dataclasses.replace(r, queue_s=start - job.enqueued, compute_s=done - start)
                if isinstance(r, Answer)
                else r
                for r, job in zip(results, jobs, strict=True)
            ]
        return results

    def _decode_images(
        self, works: Sequence[Work], indices: list[int], results: list[Any]
    ) -> dict[int, list[np.ndarray]]:
        from splitexit.preprocess import decode_image

        out: dict[int, list[np.ndarray]] = {}
        limit = self.settings.max_image_pixels
        for i in indices:
            try:
                out[i] = [
                    decode_image(data, max_pixels=limit, formats=IMAGE_FORMATS)
                    for data in works[i].elements
                ]
            except Exception as e:  # whatever a decoder raises fails this request alone
                results[i] = BadRequest(f"image input ({'/'.join(IMAGE_FORMATS)} only): {e}")
        return out

    def _run_head(
        self, pixels: dict[int, list[np.ndarray]], codes: list[list[QuantizedTensor]]
    ) -> None:
        assert self.head is not None
        x = [self.head.preprocess(a[None]) for arrays in pixels.values() for a in arrays]
        z = self.head.run(_concat(x), exits=False).z
        k, bits = self.best_operating_point
        qt = self.head.encode(z, bits, k)
        row = 0
        for i, arrays in pixels.items():
            rows = slice(row, row + len(arrays))
            row += len(arrays)
            part = (qt.values[rows], qt.scale[rows], qt.zero_point[rows])
            codes[i] = [QuantizedTensor(*part, bits=bits, channels=qt.channels)]

    def _record(
        self,
        jobs: Sequence[Job],
        works: Sequence[Work],
        results: Sequence[Any],
        start: float,
        decode_s: float,
        compute_s: float,
    ) -> None:
        m, name = self.metrics, self.name
        done = zip(works, results, strict=True)
        samples = sum(w.samples for w, r in done if isinstance(r, Answer))
        for job in jobs:
            m.queue_duration.observe(start - job.enqueued, model=name)
        m.decode_duration.observe(decode_s, model=name)
        if samples:
            m.compute_duration.observe(compute_s, model=name)
            m.batch_size.observe(samples, model=name)
            m.inference_count.inc(samples, model=name)
            m.execution_count.inc(model=name)

    # ------------------------------------------------------------------------ warm-up

    @property
    def best_operating_point(self) -> tuple[int, int]:
        """(k, bits) with the best measured accuracy, else all channels at the most bits."""
        b = self.manifest.bottleneck
        measured = [p for p in self.manifest.operating_points if p.accuracy is not None]
        if measured:
            best = max(measured, key=lambda p: (p.accuracy, p.channels, p.bits))
            return best.channels, best.bits
        return b.channels, max(b.bits)

    def operating_points(self) -> list[tuple[int, int]]:
        """Every (k, bits) a device is expected to send: the manifest's, plus all-channels."""
        b = self.manifest.bottleneck
        points = {(p.channels, p.bits) for p in self.manifest.operating_points}
        points |= {(b.channels, bits) for bits in b.bits}
        return sorted(points)

    def synthetic_frame(self, k: int, bits: int, n: int = 1, seed: int = 0) -> bytes:
        """A valid frame of random codes at (k, bits) for this bundle."""
        g = np.random.default_rng(seed)
        _, h, w = self.manifest.bottleneck.code_shape
        qt = QuantizedTensor(
            values=g.integers(0, 1 << bits, (n, k, h, w), dtype=np.uint8),
            scale=np.full((n,), 0.05, dtype=np.float32),
            zero_point=np.full((n,), (1 << bits) // 2, dtype=np.uint8),
            bits=bits,
            channels=self.manifest.bottleneck.channels,
        )
        return encode_frame(
            qt,
            self.fingerprint,
            level=self.manifest.codec.zstd_level,
            dictionary=self.bundle.dictionary,
        )

    def warmup(self) -> None:
        """Real inferences at every operating point, at batch 1 and full batch, twice each
        (TorchScript's profiling executor optimises on the second call); then ready."""
        start = time.perf_counter()
        points = self.operating_points()
        singles = [Work(INPUT_FRAME, [self.synthetic_frame(k, b)], 1) for k, b in points]
        cycle = itertools.cycle(points)
        full = [
            Work(INPUT_FRAME, [self.synthetic_frame(*next(cycle), seed=i)], 1)
            for i in range(self.settings.max_batch_size)
        ]
        batches: list[list[Work]] = [[w] for w in singles] + [full]
        if self.images:
            from splitexit.preprocess import encode_image

            c = self.bundle.preprocess.channels
            h, w = self.bundle.preprocess.size
            png = encode_image(np.zeros((h, w, c), dtype=np.uint8))
            batches.append([Work(INPUT_IMAGE, [png], 1)])
        for batch in batches:
            for _ in range(2):
                for r in self.run(batch):
                    if isinstance(r, Exception):
                        raise RuntimeError(f"warm-up of model {self.name!r} failed: {r}") from r
        # What is alive now (the models, the runtimes, the app) lives as long as the server:
        # kept out of the collector's full passes, which would otherwise scan it all again
        # and again under load, stopping the event loop for tens of milliseconds each time.
        # (Unfrozen first: what an earlier freeze kept and is garbage now is collected.)
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info(
            "model ready",
            extra={
                "model": self.name,
                "fingerprint": self.fingerprint,
                "operating_points": points,
                "warmup_s": round(time.perf_counter() - start, 3),
            },
        )

    # ----------------------------------------------------------------------- metadata

    def metadata(self) -> dict[str, Any]:
        """The model metadata response (OIP), with splitexit's details under `parameters`."""
        m = self.manifest
        b = m.bottleneck
        inputs = [{"name": INPUT_FRAME, "datatype": "BYTES", "shape": [-1]}]
        if self.images:
            inputs.append({"name": INPUT_IMAGE, "datatype": "BYTES", "shape": [-1]})
        k = len(m.class_names)
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "splitexit_torchscript"
            if self.runtime == "torch"
            else f"splitexit_{self.runtime}",
            "inputs": inputs,
            "outputs": [
                {"name": "class", "datatype": "INT64", "shape": [-1]},
                {"name": "probability", "datatype": "FP32", "shape": [-1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            ],
            "parameters": {
                "fingerprint": self.fingerprint,
                "split_point": m.split_point,
                "bottleneck": {
                    "channels": b.channels,
                    "code_shape": list(b.code_shape),
                    "bits": list(b.bits),
                },
                "operating_points": [
                    {"channels": p.channels, "bits": p.bits, "accuracy": p.accuracy}
                    for p in m.operating_points
                ],
                "best_operating_point": list(self.best_operating_point),
                "max_batch_size": self.settings.max_batch_size,
                "class_names": list(m.class_names),
                "preprocessing": dict(m.preprocessing),
            },
        }


def _concat(parts: list[Any]) -> Any:
    """Concatenate preprocessed batches of the runner's array kind along the batch axis."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def _finite(answer: Answer) -> Answer | BadRequest:
    """The answer, or a 400 when the model's output for this input is not finite (an input
    far outside what the model was trained on): the server never sends NaN or infinity."""
    if np.isfinite(answer.logits).all() and np.isfinite(answer.probability).all():
        return answer
    return BadRequest(
        "the model's output for this input is not finite: the input is far outside the "
        "range the model was trained on (check the frame's quantization parameters)"
    )


def _join(answers: Sequence[TailAnswer]) -> Answer:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(a, name)) for a in answers])

    return Answer(cat("logits"), cat("prediction"), cat("probability"))
