"""Optional ONNX export of a bundle or a net, plus a Triton model for the tail.

    out_dir/
      head/segment_{i}.onnx        input [N, *input_shape] ─► features (last: the code z)
      exits/<name>.onnx            features ─► logits
      tail.onnx                    zero-filled dequantized code [N, C, h, w] ─► logits
      triton/<name>_tail/
        config.pbtxt               onnxruntime backend, dynamic batching
        labels.txt                 class names (Triton's classification extension)
        1/model.onnx               the raw tail, dequantization inside the graph:

          code UINT8 [N, C, h, w], scale FLOAT [N], zero_point UINT8 [N]
            ─ (code - zero_point) * scale ─ decoder ─ tail stages ─► logits FLOAT [N, K]

Every graph has a dynamic batch axis. The TorchScript-based exporter (`dynamo=False`, no
onnxscript needed) is tried first, the torch.export-based one second. A loaded bundle's
pieces are TorchScript modules: they go through the TorchScript-based exporter only, and the
raw tail wraps the scripted tail in a scripted wrapper. Needs the `export`
extra (`pip install 'splitexit[export]'`) to check the graphs and run them.

`onnx_parity` runs the graphs with onnxruntime next to the TorchScript pieces on seeded
sample inputs (max abs difference per piece, argmax agreement of exits and tail) and
refuses graphs that disagree; the manifest's `onnx` field records the result, and the
device checks its records against it. `add_onnx` gives an existing bundle its graphs
without changing its fingerprint (which covers the weights, not the files).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitexit.errors import BundleError
from splitexit.splitnet import SplitExitNet

from .load import Bundle, load_bundle, quiet_torchscript
from .manifest import ONNX_DIR, sha256_file, write_manifest

DEFAULT_OPSET = 17
RAW_TAIL_INPUTS = ("code", "scale", "zero_point")
PARITY_SAMPLES = 64
PARITY_RTOL = 1e-3  # max abs difference allowed, relative to the largest reference value
PARITY_MIN_AGREEMENT = 0.98  # argmax agreement below this refuses the graphs


class RawTail(nn.Module):
    """Dequantize full-channel codes inside the graph, then run decoder + tail."""

    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        self.tail = tail

    def forward(
        self, code: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        zp = zero_point.to(torch.float32).view(-1, 1, 1, 1)
        x = (code.to(torch.float32) - zp) * scale.to(torch.float32).view(-1, 1, 1, 1)
        logits: torch.Tensor = self.tail(x)
        return logits


def raw_tail(tail: nn.Module) -> nn.Module:
    """`RawTail(tail)`, scripted when `tail` is TorchScript (a loaded bundle's tail).

    The TorchScript-based exporter traces an eager module, and a trace cannot call into a
    ScriptModule held by an eager wrapper ("not part of the active trace"); a scripted
    wrapper around the scripted tail is one ScriptModule, which it exports as is.
    """
    wrapper = RawTail(tail).eval()
    if isinstance(tail, torch.jit.ScriptModule):
        with quiet_torchscript():
            return torch.jit.script(wrapper)
    return wrapper


def export_onnx(
    bundle_or_net: Bundle | SplitExitNet,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    example_input_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = 64,
) -> dict[str, Path]:
    """Export head segments, exits, tail and a Triton raw-tail model to `out_dir`.

    A `Bundle` (loaded with all parts; its pieces are TorchScript, exported as such)
    supplies the name, input shape and class names; a `SplitExitNet` needs
    `example_input_shape` (C, H, W). Returns {piece: path}, pieces being
    "segment_<i>", "exit_<name>", "tail", "raw_tail" and "triton_config".
    """
    segments, exits, tail, input_shape, name, class_names = _pieces(
        bundle_or_net, name, example_input_shape, class_names
    )
    out = Path(out_dir)
    (out / "head").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *input_shape), generator=gen)
    with torch.no_grad():
        for i, (segment, exit_name) in enumerate(segments):
            path = paths[f"segment_{i}"] = out / "head" / f"segment_{i}.onnx"
            _export(segment, (x,), path, ["input"], ["features"], opset)
            x = segment(x)
            if exit_name is not None:
                (out / "exits").mkdir(exist_ok=True)
                path = paths[f"exit_{exit_name}"] = out / "exits" / f"{exit_name}.onnx"
                _export(exits[exit_name], (x,), path, ["features"], ["logits"], opset)
        paths["tail"] = out / "tail.onnx"
        _export(tail, (x,), paths["tail"], ["code"], ["logits"], opset)
        logits = tail(x)

        code_shape = tuple(int(s) for s in x.shape[1:])
        model_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + "_tail"
        triton = out / "triton" / model_name
        (triton / "1").mkdir(parents=True, exist_ok=True)
        raw = (
            torch.randint(0, 256, (2, *code_shape), dtype=torch.uint8, generator=gen),
            torch.rand(2, generator=gen) / 100 + 1e-3,
            torch.randint(0, 256, (2,), dtype=torch.uint8, generator=gen),
        )
        paths["raw_tail"] = triton / "1" / "model.onnx"
        _export(raw_tail(tail), raw, paths["raw_tail"], list(RAW_TAIL_INPUTS), ["logits"], opset)
    num_classes = int(logits.shape[1])
    labels = bool(class_names) and len(class_names) == num_classes  # type: ignore[arg-type]
    if labels:
        (triton / "labels.txt").write_text("".join(f"{c}\n" for c in class_names))  # type: ignore[union-attr]
    paths["triton_config"] = triton / "config.pbtxt"
    paths["triton_config"].write_text(
        triton_config(model_name, code_shape, num_classes, max_batch_size, labels=labels)
    )
    return paths


def triton_config(
    model_name: str,
    code_shape: Sequence[int],
    num_classes: int,
    max_batch_size: int = 64,
    *,
    labels: bool = False,
) -> str:
    """Triton `config.pbtxt` for the raw tail (onnxruntime backend, dynamic batching).

    Triton leaves the batch axis out of `dims`; the per-sample scalars `scale` and
    `zero_point` travel as [1] and are reshaped to the graph's [N].
    """
    dims = ", ".join(str(int(d)) for d in code_shape)
    label = '\n    label_filename: "labels.txt"' if labels else ""
    return f"""name: "{model_name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "code"
    data_type: TYPE_UINT8
    dims: [ {dims} ]
  }},
  {{
    name: "scale"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: "zero_point"
    data_type: TYPE_UINT8
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]{label}
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
"""


# --------------------------------------------------------------------------------- parity


def onnx_parity(
    segments: Sequence[nn.Module],
    exits: Mapping[int, tuple[str, nn.Module]],
    tail: nn.Module,
    onnx_dir: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    samples: int = PARITY_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the graphs in `onnx_dir` (layout above) beside the torch pieces on seeded inputs.

    Every graph gets the torch piece's own input. Returns the manifest's `onnx` record:
    opset, onnxruntime version, samples, `max_abs_diff` per piece and `argmax_agreement`
    per exit and the tail. Raises BundleError when a piece differs by more than
    PARITY_RTOL of its output's scale or agrees on fewer than PARITY_MIN_AGREEMENT argmaxes.
    """
    import onnx
    import onnxruntime as ort

    root = Path(onnx_dir)
    gen = torch.Generator().manual_seed(seed)
    amplitude = torch.rand((samples, 1, 1, 1), generator=gen) * 2 + 0.5
    x = torch.randn((samples, *input_shape), generator=gen) * amplitude
    diffs: dict[str, float] = {}
    agreement: dict[str, float] = {}

    def compare(piece: str, rel: str, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        sess = ort.InferenceSession(str(root / rel), providers=["CPUExecutionProvider"])
        [got] = sess.run(None, {sess.get_inputs()[0].name: inp.numpy()})
        want: torch.Tensor = module(inp)
        diff = float((torch.from_numpy(got) - want).abs().max())
        diffs[piece] = diff
        if diff > PARITY_RTOL * max(1.0, float(want.abs().max())):
            raise BundleError(
                f"the ONNX graph of {piece} differs from its TorchScript piece by {diff:.3g} "
                "on sample inputs: export with another opset, or ship TorchScript only"
            )
        if want.dim() == 2:
            agreement[piece] = float(
                (torch.from_numpy(got).argmax(1) == want.argmax(1)).float().mean()
            )
            if agreement[piece] < PARITY_MIN_AGREEMENT:
                raise BundleError(
                    f"the ONNX graph of {piece} agrees with TorchScript on "
                    f"{agreement[piece]:.1%} of sample argmaxes; refusing it"
                )
        return want

    with torch.no_grad():
        f = x
        for i, segment in enumerate(segments):
            f = compare(f"segment_{i}", f"head/segment_{i}.onnx", segment, f)
            if i in exits:
                name, branch = exits[i]
                compare(f"exit_{name}", f"exits/{name}.onnx", branch, f)
        compare("tail", "tail.onnx", tail, f)
    opset = onnx.load(str(root / "tail.onnx"), load_external_data=False).opset_import[0].version
    return {
        "opset": int(opset),
        "onnxruntime": ort.__version__,
        "samples": samples,
        "inputs": f"seeded normal (seed {seed}), per-sample amplitude 0.5..2.5",
        "max_abs_diff": diffs,
        "argmax_agreement": agreement,
    }


def add_onnx(
    path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET, triton: bool = False
) -> dict[str, Any]:
    """Export ONNX graphs of a bundle directory's TorchScript pieces into it, check their
    parity, and list them in its manifest; the fingerprint does not change. Returns the
    parity record. Replaces graphs the bundle already has; `triton` keeps the Triton model
    (onnx/triton/, a second copy of the tail) too."""
    src = Path(path)
    if not src.is_dir():
        raise BundleError(f"{src} is not a bundle directory (archives are read-only)")
    bundle = load_bundle(src)
    m = bundle.manifest
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=src.parent) as tmp:
        out = Path(tmp) / ONNX_DIR
        export_onnx(bundle, out, opset=opset)
        exit_at = {e.segment: (e.name, bundle.exits[e.name]) for e in m.exits}
        record = onnx_parity(bundle.segments, exit_at, bundle.tail, out, m.input_shape)
        if not triton:
            shutil.rmtree(out / "triton")
        shutil.rmtree(src / ONNX_DIR, ignore_errors=True)
        shutil.move(str(out), src / ONNX_DIR)
    files = {k: v for k, v in m.files.items() if not k.startswith(f"{ONNX_DIR}/")}
    for file in sorted((src / ONNX_DIR).rglob("*")):
        if file.is_file():
            files[file.relative_to(src).as_posix()] = sha256_file(file)
    new = dataclasses.replace(m, files=dict(sorted(files.items())), onnx=record)
    if new.compute_fingerprint() != m.fingerprint or not new.has_onnx:
        raise BundleError("adding ONNX graphs would change the fingerprint; this is a bug")
    write_manifest(src, new)
    return record


# -------------------------------------------------------------------------------- helpers


def _pieces(
    source: Bundle | SplitExitNet,
    name: str | None,
    input_shape: Sequence[int] | None,
    class_names: Sequence[str] | None,
) -> tuple[
    list[tuple[nn.Module, str | None]],
    dict[str, nn.Module],
    nn.Module,
    tuple[int, ...],
    str,
    Sequence[str] | None,
]:
    if isinstance(source, Bundle):
        if source.device.type != "cpu":
            raise ValueError("export ONNX from a bundle loaded on the CPU (device='cpu')")
        m = source.manifest
        exit_at = {e.segment: e.name for e in m.exits}
        segments: list[tuple[nn.Module, str | None]] = [
            (s, exit_at.get(i)) for i, s in enumerate(source.segments)
        ]
        exits: dict[str, nn.Module] = dict(source.exits)
        return (
            segments,
            exits,
            source.tail,
            tuple(input_shape or m.input_shape),
            name or m.name,
            class_names if class_names is not None else m.class_names,
        )
    if input_shape is None:
        raise ValueError("exporting a SplitExitNet needs example_input_shape=(C, H, W)")
    shape = tuple(int(s) for s in input_shape)
    net = copy.deepcopy(source).cpu().float().eval()
    return (
        [(segment.eval(), exit_name) for segment, exit_name in net.segments()],
        dict(net.exits.items()),
        net.tail_module().eval(),
        shape[1:] if len(shape) == 4 else shape,
        name or "model",
        class_names,
    )


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> None:
    """Export with a dynamic batch axis: TorchScript-based exporter, else torch.export-based.

    The module is put in eval mode first: the exporter restores the mode it found, and a
    wrapper in training mode would switch every shared submodule to training on the way out.
    """
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # a ScriptModule's forward has no Python signature to match the inputs against
            warnings.filterwarnings("ignore", "no signature found", UserWarning)
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={n: {0: "batch"} for n in [*input_names, *output_names]},
                do_constant_folding=True,
            )
    except Exception as legacy:
        if isinstance(module, torch.jit.ScriptModule):
            raise RuntimeError(f"ONNX export of {path.name} failed: {legacy}") from legacy
        try:
            batch = torch.export.Dim("batch", min=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=True,
                    opset_version=max(opset, 18),  # its lowest; converting down can fail
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=tuple({0: batch} for _ in args),
                    external_data=False,
                    verbose=False,
                )
        except Exception as e:
            raise RuntimeError(
                f"ONNX export of {path.name} failed with both exporters: TorchScript-based: "
                f"{legacy}; torch.export-based: {e}"
            ) from e
    _check(path)


def _check(path: Path) -> None:
    try:
        import onnx
    except ImportError:  # the graph was written; checking needs the `export` extra
        return
    onnx.checker.check_model(str(path))
