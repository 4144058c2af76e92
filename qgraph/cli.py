"""``qgraph`` command line.

* ``qgraph demo`` — the end-to-end demo (digits CNN → PTQ/QAT → .pte/.onnx → table);
* ``qgraph inspect MODEL_SPEC`` — capture → prepare with dumps, write the HTML report and
  print where it is (nothing is opened);
* ``qgraph report DIR`` — (re)write the HTML report of a dump directory.
"""

from __future__ import annotations

import argparse
import sys


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--input-shape must look like 1,3,224,224, got {text!r}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgraph", description="qgraph: quantization compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the digits CNN, quantize it (PTQ, QAT), export .pte and .onnx")
    demo.add_argument("--out", default="out", help="directory for the exported files (default: out)")
    demo.add_argument("--fp32-epochs", type=int, default=15)
    demo.add_argument("--qat-epochs", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-low-bit", action="store_true", help="skip the W4A8 / W4A4 / W3A4 rows")
    inspect = sub.add_parser("inspect", help="capture and prepare a model with dumps; write the HTML report")
    inspect.add_argument("model", help="'digits', 'torchvision:NAME' or 'package.module:factory'")
    inspect.add_argument("--input-shape", type=_shape, default=None)
    inspect.add_argument("--mode", choices=("qat", "ptq"), default="qat")
    inspect.add_argument("--backend", default="xnnpack")
    inspect.add_argument("--dump", default="out/inspect", help="dump directory (default: out/inspect)")
    report = sub.add_parser("report", help="write DIR/index.html from the dumps in DIR")
    report.add_argument("dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from qgraph.core.errors import QGraphError

    try:
        return _run(args)
    except QGraphError as exc:  # a user error: say what to do, no traceback
        parser.exit(2, f"qgraph {args.command}: error: {exc}\n")


def _run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "demo":
        from qgraph.demo import LOW_BITS, run_demo

        low_bits = () if args.no_low_bit else LOW_BITS
        result = run_demo(args.out, args.fp32_epochs, args.qat_epochs, args.seed, low_bits=low_bits)
        print(result.table())
        print(f"\nfiles: {', '.join(result.files.values())}")
    elif args.command == "inspect":
        import qgraph
        from qgraph.model_spec import load_model_spec

        model, x = load_model_spec(args.model, args.input_shape)
        prepare = qgraph.prepare_qat if args.mode == "qat" else qgraph.prepare_ptq
        prepare(model, (x,), backend=args.backend, dump_dir=args.dump)
        print(f"dumps: {args.dump}\nreport: {qgraph.report(args.dump)}")
    elif args.command == "report":
        import qgraph

        print(qgraph.report(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
