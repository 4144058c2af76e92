"""``qgraph`` command line: ``qgraph demo`` runs the end-to-end demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qgraph", description="qgraph: quantization compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the digits CNN, quantize it (PTQ, QAT), export .pte and .onnx")
    demo.add_argument("--out", default="out", help="directory for the exported files (default: out)")
    demo.add_argument("--fp32-epochs", type=int, default=15)
    demo.add_argument("--qat-epochs", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        import torch

        from qgraph.demo import run_demo

        torch.set_num_threads(min(2, torch.get_num_threads()))
        result = run_demo(args.out, args.fp32_epochs, args.qat_epochs, args.seed)
        print(result.table())
        print(f"\nfiles: {', '.join(result.files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
