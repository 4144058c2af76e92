"""``qgraph`` command line (also ``python -m qgraph``).

* ``qgraph quantize MODEL --out model.pte|model.onnx|model.pt2`` — load, quantize (PTQ,
  QAT graph calibrated in eval, dynamic, 8da4w), convert and write; prints a summary;
* ``qgraph check MODEL`` — the same quantization, then :func:`qgraph.check`'s table;
* ``qgraph coverage MODEL`` — which conv / linear layers the backend quantizes, and why not;
* ``qgraph export model.pt2 --out model.pte|model.onnx`` — a program saved by
  ``quantize --out *.pt2`` to a runtime file;
* ``qgraph inspect MODEL`` — prepare with dumps, write the HTML report, print a summary;
* ``qgraph report DIR`` — (re)write the HTML report of a dump directory;
* ``qgraph demo`` — the end-to-end demo.

A user's mistake (unknown model, missing file, bad shape, wrong extension, ...) ends with
one line ``qgraph: error: ...`` on stderr and exit status 2; ``--debug`` shows the traceback.

This module imports neither torch nor qgraph's pipeline at the top: each command imports
what it needs when it runs, so ``--help``, ``--version`` and ``report`` start in a fraction of
a second instead of the seconds importing torch takes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

MODES = ("ptq", "qat-eval", "dynamic", "8da4w")
BACKENDS = ("xnnpack", "x86")
CHECK_FORMS = ("fake_quant", "converted", "reference", "pte", "onnx")
_ONNX_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits")
_MODEL_HELP = (
    "a torchvision name (resnet18 or torchvision:resnet18, random init unless --weights), "
    "'digits', 'package.module:factory', or a .pt2 ExportedProgram (torch.export.save)"
)
_MODES_HELP = """modes:
  ptq       observers on the backend's int8 scheme, calibrated on --calib, then converted
  qat-eval  the QAT graph (fake-quant, BN folded into the conv weights as QAT simulates it),
            run over --calib in eval mode with its fake-quant ranges recording and no
            training, then converted: a QAT model as it is before its first training step
  dynamic   int8 weights, activations quantized per batch at run time (no calibration)
  8da4w     int4 group-wise weights (--group-size) and int8 per-token dynamic activations
            on every linear, everything else float (no calibration)
"""


class UsageError(Exception):
    """A mistake in the command line that needs no qgraph import to detect."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (none for options without one); descriptions
    and epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"qgraph: error: {message}\n")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224 (positive sizes, batch first)")
    return shape


def _add_model_args(p: argparse.ArgumentParser, quantize: bool = True) -> None:
    p.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--backend", choices=BACKENDS, default="xnnpack", help="whose integer kernels the scheme fits")
    p.add_argument(
        "--input-shape", type=_shape, default=None,
        help="input shape N,C,H,W the model serves and is exported with (default: 1,3,224,224 for torchvision, "
        "1,1,8,8 for digits, the program's for .pt2; required for factories)",
    )  # fmt: skip
    p.add_argument("--weights", metavar="FILE", help="state dict to load (torch.load(..., weights_only=True))")
    p.add_argument("--num-classes", type=int, default=1000, help="outputs of a torchvision model")
    if not quantize:
        return
    p.add_argument("--mode", choices=MODES, default="ptq", help="how to quantize (see below)")
    p.add_argument(
        "--calib", metavar="DIR|FILE|N",
        help="calibration data for ptq / qat-eval: a folder of images (resized, center-cropped, ImageNet-normalised), "
        "a .npy / .pt tensor N,C,H,W, or a number N of random batches (warns)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (a .pt2 program: its own batch)")
    p.add_argument("--group-size", type=int, default=32, help="8da4w: input features per int4 weight scale")
    p.add_argument("--config", metavar="FILE.toml", help="per-module overrides; schema in the README ('--config')")
    p.add_argument("--seed", type=int, default=0, help="seed of random calibration batches and example inputs")


def _parser() -> argparse.ArgumentParser:
    from qgraph import __version__  # the package __init__ is lazy: no torch

    parser = _Parser(prog="qgraph", description="qgraph: a quantization compiler for PyTorch", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"qgraph {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks, full error texts and library warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter, **kwargs)

    q = command("quantize", "quantize a model and write .pte (ExecuTorch), .onnx or .pt2 (converted program)", epilog=_MODES_HELP)
    _add_model_args(q)
    q.add_argument("--out", required=True, help="output file: .pte, .onnx, or .pt2 (torch.export.save; see `qgraph export`)")
    q.set_defaults(run=run_quantize)

    c = command("check", "quantize as `quantize` does, then compare fake-quant, converted, reference and runtimes", epilog=_MODES_HELP)
    _add_model_args(c)
    c.add_argument(
        "--targets", nargs="+", choices=CHECK_FORMS,
        help=f"forms to compare (default: {' '.join(CHECK_FORMS)}; dynamic and 8da4w have no fake_quant form)",
    )  # fmt: skip
    c.set_defaults(run=run_check)

    v = command("coverage", "list every conv / linear / matmul: quantized or not, why not, share of integer MACs", epilog=_MODES_HELP)
    _add_model_args(v)
    v.set_defaults(run=run_coverage)

    e = command("export", "write a converted program saved by `qgraph quantize --out *.pt2` as .pte or .onnx")
    e.add_argument("program", metavar="PROGRAM.pt2")
    e.add_argument("--out", required=True, help="output file: .pte or .onnx")
    e.set_defaults(run=run_export)

    i = command("inspect", "capture and prepare a model with dumps; write the HTML report and print a summary")
    _add_model_args(i, quantize=False)
    i.add_argument("--mode", choices=("qat", "ptq"), default="qat", help="which prepare pipeline")
    i.add_argument("--dump", default="out/inspect", help="dump directory")
    i.set_defaults(run=run_inspect)

    r = command("report", "write DIR/index.html from the dumps in DIR")
    r.add_argument("dir", metavar="DIR")
    r.set_defaults(run=run_report)

    d = command("demo", "train the digits CNN, quantize it (PTQ, QAT), export .pte and .onnx, print a table")
    d.add_argument("--out", default="out", help="directory for the exported files")
    d.add_argument("--fp32-epochs", type=int, default=15, help="epochs of float training")
    d.add_argument("--qat-epochs", type=int, default=5, help="epochs of quantization-aware training")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split and the training")
    d.add_argument("--no-low-bit", action="store_true", help="skip the W4A8 / W4A4 / W3A4 rows")
    d.set_defaults(run=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(), _library_logs(quiet=not args.debug):
        shown: list[str] = []
        if not args.debug:
            _only_qgraph_warnings(shown)
        try:
            status = args.run(args)
            _print_warnings(shown)
            return status
        except UsageError as exc:
            parser.error(str(exc))
        except Exception as exc:
            if args.debug or not _is_user_error(exc):
                raise
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            more = " (--debug for the full message)" if "\n" in text else ""
            parser.error(f"{first}{more}")
    return 0


def _is_user_error(exc: Exception) -> bool:
    """qgraph's own errors say what to do; anything else is a bug and keeps its traceback."""
    errors = sys.modules.get("qgraph.core.errors")  # loaded by every command that can raise one
    return errors is not None and isinstance(exc, errors.QGraphError)


_LIBRARY_LOGGERS = ("torch", "torchao", "executorch", "onnxscript", "onnx_ir")
_quiet_libraries: list[bool] = []
"""Non-empty while a command runs without ``--debug``: :func:`_torch` then lowers the
library loggers (torch sets their levels when it is imported, so not before)."""


@contextlib.contextmanager
def _library_logs(quiet: bool):
    """While a command runs: library loggers at ERROR unless ``--debug``; restored after."""
    saved = {name: logging.getLogger(name).level for name in _LIBRARY_LOGGERS}
    _quiet_libraries[:] = [True] if quiet else []
    try:
        yield
    finally:
        _quiet_libraries.clear()
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _only_qgraph_warnings(sink: list[str]) -> None:
    """Collect qgraph's own warnings in ``sink`` and drop the libraries' (inside ``catch_warnings``)."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"qgraph(\.|$)")
    warnings.showwarning = lambda message, *_: sink.append(str(message))


MAX_WARNINGS = 3


def _print_warnings(messages: list[str]) -> None:
    """One line per warning, the first :data:`MAX_WARNINGS` of them (a model can have dozens
    of layers that stay float for one reason; ``coverage`` lists them all)."""
    for message in messages[:MAX_WARNINGS]:
        print(f"qgraph: warning: {message}", file=sys.stderr)
    if len(messages) > MAX_WARNINGS:
        print(f"qgraph: warning: ... and {len(messages) - MAX_WARNINGS} more (--debug shows them; "
              "`qgraph coverage` lists every layer and why it stays float)", file=sys.stderr)  # fmt: skip


def _torch():
    """Import torch for a command (2 threads at most, as before) and quiet its loggers."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if _quiet_libraries:
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    return torch


def _check_out(path: str, allowed: tuple[str, ...]) -> None:
    if Path(path).suffix.lower() not in allowed:
        raise UsageError(f"--out {path}: the extension says what to write; use {' or '.join(allowed)}")


@contextlib.contextmanager
def _native_logs_hidden():
    """Hide what C++ code prints on file descriptor 2: ExecuTorch's XNNPACK delegate logs five
    lines of CPU probing the first time it loads a program. (qgraph's warnings are collected,
    not printed, while a command runs.)"""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# -- building the quantized model --------------------------------------------------------------
def _load(args):
    from qgraph.model_spec import load_model

    return load_model(args.model, args.input_shape, args.weights, args.num_classes)


def _mode(args):
    """``(prepare function, QConfig, needs calibration)`` for ``--mode``, with ``--config``."""
    import qgraph
    from qgraph.backends import get_backend
    from qgraph.cli_inputs import load_config
    from qgraph.core.opsets import CONV_OPS
    from qgraph.recipes.dynamic import dynamic_config, dynamic_scheme
    from qgraph.recipes.lowbit import int8_dynamic_int4_weight, llm_config

    backend = get_backend(args.backend)
    if args.mode == "ptq":
        prepare, config, scheme, calibrated = qgraph.prepare_ptq, qgraph.QConfig(), backend.default_scheme(False), True
    elif args.mode == "qat-eval":
        prepare, config, scheme, calibrated = qgraph.prepare_qat, qgraph.QConfig(), backend.default_scheme(True), True
    elif args.mode == "dynamic":
        prepare, config, scheme, calibrated = qgraph.prepare_ptq, dynamic_config(args.backend), dynamic_scheme(args.backend), False
    else:  # linears only: convs have no int4 group-wise form, so they stay float without a warning
        scheme = int8_dynamic_int4_weight(args.group_size, args.backend)
        prepare, config, calibrated = qgraph.prepare_ptq, llm_config(args.group_size, backend=args.backend), False
        for conv in CONV_OPS:
            config.set_operator(conv, None)
    if args.config:
        config = load_config(args.config, config, scheme)
    return prepare, config, calibrated


def _calibration(args, loaded, calibrated: bool):
    from qgraph.cli_inputs import calibration_batches

    if not calibrated:
        if args.calib:
            print(f"qgraph: note: --calib is not used by --mode {args.mode} (ranges are chosen at run time)", file=sys.stderr)
        return []
    if not args.calib:
        raise UsageError(f"--mode {args.mode} needs calibration data: --calib DIR|FILE|N")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: give at least 1")
    batch = loaded.input_shape[0] if loaded.is_program else args.batch_size
    batches = calibration_batches(args.calib, loaded.input_shape, batch, args.seed)
    if args.calib.isdigit():
        print(
            f"qgraph: warning: calibrating on {len(batches)} batches of random noise: ranges fit noise, not your data "
            "(give --calib a folder of images or a tensor file)",
            file=sys.stderr,
        )
    return batches


def _quantized(args, loaded):
    """``(prepared, converted, calibration batches)`` for the command line's model and mode."""
    import qgraph

    prepare, config, calibrated = _mode(args)
    batches = _calibration(args, loaded, calibrated)
    prepared = prepare(loaded.model, (loaded.capture_example(),), backend=args.backend, config=config)
    if args.mode == "ptq":
        qgraph.calibrate(prepared, batches, progress=sys.stderr.isatty())
    elif args.mode == "qat-eval":
        _observe_in_eval(prepared, batches)
    return prepared, qgraph.convert(prepared), batches


def _observe_in_eval(prepared, batches) -> None:
    """Run ``batches`` through a QAT-prepared model in eval mode (BN on running statistics,
    dropout off) with only its fake-quant modules in training mode, so that they record
    ranges; no gradients, no parameter changes."""
    import torch

    import qgraph
    from qgraph.observers.base import QUANTIZER_TYPES

    qgraph.eval_mode(prepared)
    for module in prepared.modules():
        if isinstance(module, QUANTIZER_TYPES):
            module.train()
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    qgraph.eval_mode(prepared)


def _write(quantized, out: str, record: dict) -> list[str]:
    """Write ``quantized`` to ``out`` by its extension; the summary lines.

    ``record`` holds the served ``input_shape`` (the ``.pte`` is exported with it) and whether
    the graph's batch is dynamic: the ``.onnx`` and ``.pt2`` then get an example batch of 2,
    since ``torch.export`` fixes a batch of 1.
    """
    import torch

    import qgraph
    from qgraph.api.capture import batch_dynamic_shapes

    shape = tuple(record["input_shape"])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x_any = torch.randn(max(2, shape[0]), *shape[1:]) if record["dynamic_batch"] else x
    suffix = Path(out).suffix.lower()
    if suffix == ".pte":
        report = qgraph.export_pte(quantized, (x,), out)
        outside = sum(report.not_delegated.values())
        lines = [f"wrote {out}: {_size(report.size_bytes)}, ExecuTorch program for input {_dims(x.shape)}"]
        lines.append(f"XNNPACK delegate: {100 * report.delegated_fraction:.1f} % of ops ({outside} outside)")
        if report.not_delegated:
            lines.append("outside the delegate: " + ", ".join(f"{op} ×{n}" for op, n in report.not_delegated.most_common(5)))
        return lines
    if suffix == ".onnx":
        import onnx

        qgraph.export_onnx(quantized, (x_any,), out)
        graph = onnx.load(out, load_external_data=False).graph
        ops = Counter(n.op_type for n in graph.node)
        batch = graph.input[0].type.tensor_type.shape.dim[0]
        integer = ", ".join(f"{k} ×{v}" for k, v in sorted(ops.items()) if k in _ONNX_QUANT_OPS) or "none"
        lines = [f"wrote {out}: {_size(Path(out).stat().st_size)}, ONNX model, {sum(ops.values())} nodes, "
                 f"batch {batch.dim_param or batch.dim_value}"]  # fmt: skip
        return [*lines, f"quantization nodes: {integer}"]
    from qgraph.model_spec import save_program

    dynamic = batch_dynamic_shapes((x_any,)) if record["dynamic_batch"] else None
    save_program(torch.export.export(quantized, (x_any,), dynamic_shapes=dynamic), out, record)
    return [f"wrote {out}: {_size(Path(out).stat().st_size)}, converted program (torch.export.save); "
            f"`qgraph export {out} --out model.pte|model.onnx` writes a runtime file"]  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _dims(shape) -> str:
    return "×".join(map(str, shape))


def _layers_line(report) -> str:
    quantized = sum(1 for layer in report.layers if layer.quantized)
    return (
        f"layers quantized: {quantized} of {len(report.layers)} conv / linear / matmul "
        f"({100 * report.integer_mac_fraction:.1f} % of MACs in integer arithmetic)"
    )


# -- commands ------------------------------------------------------------------------------------
def run_quantize(args) -> int:
    _check_out(args.out, (".pte", ".onnx", ".pt2"))
    _torch()
    import qgraph
    from qgraph.tools.coverage import coverage

    loaded = _load(args)
    prepared, quantized, _ = _quantized(args, loaded)
    record = {
        "qgraph": qgraph.__version__, "backend": args.backend, "mode": args.mode,
        "input_shape": list(loaded.input_shape), "dynamic_batch": not loaded.is_program,
    }  # fmt: skip
    lines = _write(quantized, args.out, record)
    print(f"quantized {loaded.name} ({args.mode}, {args.backend} scheme)")
    print(_layers_line(coverage(quantized)))
    print("\n".join(lines))
    return 0


def run_check(args) -> int:
    calibrated = args.mode in ("ptq", "qat-eval")
    forms = args.targets or [f for f in CHECK_FORMS if calibrated or f != "fake_quant"]
    if "fake_quant" in forms and not calibrated:
        raise UsageError(f"--targets fake_quant: --mode {args.mode} observes nothing before converting, so it has no fake-quant form")
    _torch()
    import qgraph

    loaded = _load(args)
    prepared, quantized, batches = _quantized(args, loaded)
    n = loaded.input_shape[0]
    x = batches[0][:n] if batches and len(batches[0]) >= n else loaded.example(seed=args.seed)
    with contextlib.nullcontext() if args.debug else _native_logs_hidden():
        report = qgraph.check(prepared, quantized, (x,), targets=tuple(forms), verbose=False)
    print(report.to_text())
    return 0


def run_coverage(args) -> int:
    _torch()
    from qgraph.tools.coverage import coverage

    loaded = _load(args)
    prepare, config, _ = _mode(args)
    prepared = prepare(loaded.model, (loaded.capture_example(),), backend=args.backend, config=config)
    report = coverage(prepared)
    print(report.to_text())
    print(_layers_line(report))
    return 0


def run_export(args) -> int:
    _check_out(args.out, (".pte", ".onnx"))
    if Path(args.program).suffix.lower() != ".pt2":
        raise UsageError(f"export {args.program}: expected a .pt2 program written by `qgraph quantize --out *.pt2`")
    _torch()
    from qgraph.api.modes import eval_mode
    from qgraph.core.meta import CONVERTED_KEY
    from qgraph.core.errors import ConfigError
    from qgraph.model_spec import load_program

    program, record = load_program(args.program)
    if record is None:
        raise ConfigError(f"{args.program} was not written by `qgraph quantize --out *.pt2`; quantize it first: qgraph quantize {args.program} ...")
    missing = sorted({"backend", "input_shape", "dynamic_batch"} - set(record))
    if missing:
        raise ConfigError(f"{args.program}: its qgraph.json lacks {missing}; write it again with `qgraph quantize --out *.pt2`")
    converted = eval_mode(program.module())  # a converted program serves inference (torch.onnx warns otherwise)
    converted.meta[CONVERTED_KEY] = {"backend": record["backend"]}
    print("\n".join(_write(converted, args.out, record)))
    return 0


def run_inspect(args) -> int:
    _torch()
    import qgraph
    from qgraph.observers.base import QUANTIZER_TYPES
    from qgraph.tools.coverage import coverage

    loaded = _load(args)
    prepare = qgraph.prepare_qat if args.mode == "qat" else qgraph.prepare_ptq
    prepared = prepare(loaded.model, (loaded.capture_example(),), backend=args.backend, dump_dir=args.dump)
    quantizers = sum(1 for n in prepared.graph.nodes if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), QUANTIZER_TYPES))
    print(f"{loaded.name}: prepared for {args.mode.upper()} on {args.backend}: {len(prepared.graph.nodes)} nodes, {quantizers} quantizers")
    print(_layers_line(coverage(prepared)))
    print(f"dumps: {args.dump}\nreport: {qgraph.report(args.dump)}")
    return 0


def run_report(args) -> int:
    from qgraph.tools.report import write_report  # no torch: starts in a fraction of a second

    if not Path(args.dir).is_dir():
        raise UsageError(f"report {args.dir}: no such folder (write dumps with `qgraph inspect MODEL --dump {args.dir}`)")
    try:
        print(write_report(args.dir))
    except FileNotFoundError as exc:
        raise UsageError(f"report {args.dir}: no pass dumps in this folder (write them with `qgraph inspect MODEL --dump {args.dir}`)") from exc
    return 0


def run_demo(args) -> int:
    _torch()
    from qgraph.demo import LOW_BITS, run_demo as demo

    result = demo(args.out, args.fp32_epochs, args.qat_epochs, args.seed, low_bits=() if args.no_low_bit else LOW_BITS)
    print(result.table())
    print(f"\nfiles: {', '.join(result.files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
