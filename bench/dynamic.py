"""Benchmark dynamic PTQ: qgraph's dynamic schemes in ExecuTorch and ONNX Runtime.

Models: a ``torch.nn.TransformerEncoder`` (4 layers, d_model 256, 4 heads, feed-forward
1024, batch 1 × 64 tokens) and torchvision ``resnet18`` (random init, 10 classes, 1×3×224²).
Torch runs with 2 threads; ExecuTorch's XNNPACK threadpool and ONNX Runtime use their
defaults.

One JSON line per model and flow:

* ``fp32``: batch-1 latency of the float ``.pte`` (XNNPACK) and of the float ONNX model;
* ``qgraph-xnnpack``: ``qgraph.recipes.dynamic.quantize_dynamic(backend="xnnpack")`` — its wall time,
  the ``.pte``'s export time, size, latency and delegation;
* ``qgraph-x86``: ``quantize_dynamic(backend="x86")`` — the ``.onnx``'s export time and
  ONNX Runtime latency, and the ops ONNX Runtime fused it into;
* ``ort-quantize_dynamic``: ONNX Runtime's own ``quantize_dynamic`` of the float ONNX model
  (per-channel, 7-bit weights: what its docs advise on CPUs without VNNI), the oracle for
  the ONNX latency.

``*_diff_steps``: max |runtime − converted GraphModule| on the same input, in steps of the
reference output's range over 255 (a dynamic model's output is float, so this is the step
an 8-bit output would have); ``vs_float_steps`` the same for converted vs float.
Latency: 2 warm-up runs, then the median of 10.

    python bench/dynamic.py [--models encoder,resnet18] > dynamic.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qgraph  # noqa: E402
from qgraph.api.capture import batch_dynamic_shapes  # noqa: E402
from qgraph.backends.executorch import emitter as executorch_emitter  # noqa: E402
from qgraph.backends.onnx import emitter as onnx_emitter
from qgraph.core.timing import median_ms  # noqa: E402
from qgraph.recipes.dynamic import quantize_dynamic  # noqa: E402


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "encoder":
        layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True)
        return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval(), torch.randn(1, 64, 256)
    from qgraph.models.vision import build_torchvision

    return build_torchvision(name).eval(), torch.randn(1, 3, 224, 224)


def steps(got: torch.Tensor, ref: torch.Tensor) -> float:
    step = (ref.max() - ref.min()).item() / 255
    return round((got - ref).abs().max().item() / step, 3)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def ort_ops(path: str) -> dict:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = path + ".opt.onnx"
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    keep = ("DynamicQuantizeMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "MatMul", "Conv", "Gemm")
    return {k: ops[k] for k in keep if ops[k]}


def bench(name: str, out: str) -> None:
    model, x = build(name)
    with torch.no_grad():
        ref_float = model(x)
    fp32_pte = os.path.join(out, f"{name}_fp32.pte")
    fp32_onnx = os.path.join(out, f"{name}_fp32.onnx")
    executorch_emitter.write_pte(torch.export.export(model, (x,)), fp32_pte)
    onnx_emitter.write_onnx(model, (x,), batch_dynamic_shapes((x,)), fp32_onnx)
    emit(
        {
            "model": name,
            "flow": "fp32",
            "pte_ms": round(median_ms(qgraph.load_pte(fp32_pte), x, repeat=10, warmup=2), 2),
            "onnx_ms": round(median_ms(qgraph.load_onnx(fp32_onnx), x, repeat=10, warmup=2), 2),
        }
    )

    start = time.perf_counter()
    q = quantize_dynamic(model, (x,), backend="xnnpack")
    quantize_s = time.perf_counter() - start
    with torch.no_grad():
        ref = q(x)
    start = time.perf_counter()
    report = qgraph.export_pte(q, (x,), os.path.join(out, f"{name}_xnnpack.pte"))
    export_s = time.perf_counter() - start
    run = qgraph.load_pte(report.path)
    emit(
        {
            "model": name,
            "flow": "qgraph-xnnpack",
            "quantize_s": round(quantize_s, 2),
            "pte_export_s": round(export_s, 2),
            "pte_bytes": report.size_bytes,
            "pte_ms": round(median_ms(run, x, repeat=10, warmup=2), 2),
            "pte_delegated_fraction": round(report.delegated_fraction, 3),
            "pte_delegated_gemms": sum(report.delegated[op] for op in ("aten_linear_default", "aten_convolution_default")),
            "pte_not_delegated": dict(report.not_delegated),
            "pte_diff_steps": steps(run(x), ref),
            "vs_float_steps": steps(ref, ref_float),
        }
    )

    start = time.perf_counter()
    q = quantize_dynamic(model, (x,), backend="x86")
    quantize_s = time.perf_counter() - start
    with torch.no_grad():
        ref = q(x)
    path = os.path.join(out, f"{name}_x86.onnx")
    start = time.perf_counter()
    qgraph.export_onnx(q, (x,), path)
    export_s = time.perf_counter() - start
    run = qgraph.load_onnx(path)
    emit(
        {
            "model": name,
            "flow": "qgraph-x86",
            "quantize_s": round(quantize_s, 2),
            "onnx_export_s": round(export_s, 2),
            "onnx_ms": round(median_ms(run, x, repeat=10, warmup=2), 2),
            "onnx_fused_ops": ort_ops(path),
            "onnx_diff_steps": steps(run(x), ref),
            "vs_float_steps": steps(ref, ref_float),
        }
    )

    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    # ONNX Runtime's quantizer re-runs shape inference and trips over the value_info torch.onnx
    # records for dynamic shapes; without it, inference starts from the inputs.
    plain = onnx.load(fp32_onnx)
    del plain.graph.value_info[:]
    plain_path = os.path.join(out, f"{name}_fp32_plain.onnx")
    onnx.save(plain, plain_path)
    oracle = os.path.join(out, f"{name}_ort_dynamic.onnx")
    ort_quantize_dynamic(plain_path, oracle, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    run = qgraph.load_onnx(oracle)
    emit(
        {
            "model": name,
            "flow": "ort-quantize_dynamic",
            "onnx_ms": round(median_ms(run, x, repeat=10, warmup=2), 2),
            "onnx_fused_ops": ort_ops(oracle),
            "vs_float_steps": steps(run(x), ref_float),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="encoder,resnet18")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as out:
        for name in args.models.split(","):
            bench(name, out)


if __name__ == "__main__":
    main()
