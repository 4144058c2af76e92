"""One operator vocabulary: sets of ATen / quantized_decomposed overloads live in qgraph.core.opsets.

A set of ops written in two places drifts (``MATMUL_OPS`` once held ``mm`` in one module and
not in another). This test reads every module of ``qgraph/``, ``passes/`` and ``backends/``
and fails on a set, tuple or list of two or more op overloads, or on a module-level name
bound to a set of op overloads, anywhere but ``qgraph/core/opsets.py``. Matching a single
op (``is_op(node, {aten.add.Tensor})``) is not a vocabulary and is allowed. qgraph's own ops
(``torch.ops.qgraph*``) are named in the ``qgraph/ops`` module that registers them.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path

import torch

from qgraph.core import opsets

ROOT = Path(__file__).resolve().parents[2]
VOCABULARY = ROOT / "qgraph" / "core" / "opsets.py"
NAMESPACES = {"aten", "qd", "quantized_decomposed"}


def _chain(node: ast.AST) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def is_overload(node: ast.AST) -> bool:
    """``aten.conv2d.default``, ``qd.quantize_per_tensor.tensor``, ``torch.ops.aten.relu.default``."""
    parts = _chain(node)
    if parts[:2] == ["torch", "ops"]:
        parts = parts[2:]
    return len(parts) == 3 and parts[0] in NAMESPACES


def op_sets(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every op-set definition in ``source``."""
    tree = ast.parse(source)
    found = []
    membership = set()  # tuples / lists used as a set: `x in (...)`, `is_op(n, (...))`
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn)) for o in node.ops):
            membership.update(id(c) for c in node.comparators)
        if isinstance(node, ast.Call) and _chain(node.func)[-1:] == ["is_op"]:
            membership.update(id(a) for a in node.args[1:])
    for node in ast.walk(tree):
        as_set = isinstance(node, ast.Set) or (isinstance(node, (ast.Tuple, ast.List)) and id(node) in membership)
        if as_set and sum(is_overload(e) for e in node.elts) >= 2:
            found.append((node.lineno, ast.unparse(node)[:80]))
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            displays = [n for n in ast.walk(node.value) if isinstance(n, (ast.Set, ast.Tuple, ast.List))]
            if any(is_overload(e) for d in displays for e in d.elts):
                found.append((node.lineno, ast.unparse(node)[:80]))
    return sorted(set(found))


def test_no_module_defines_its_own_op_set():
    offenders = []
    for folder in ("qgraph", "passes", "backends"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == VOCABULARY:
                continue
            for line, text in op_sets(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not offenders, "op sets outside qgraph/core/opsets.py (add or reuse one there):\n" + "\n".join(offenders)


def test_the_check_sees_a_private_op_set():
    """The scan above can fail: a module-level set, an inline pair and a tuple chain are found;
    a single op to match is not."""
    source = (
        "MY_OPS = frozenset({aten.add.Tensor})\n"
        "def f(n):\n"
        "    return is_op(n, {aten.mul.Tensor, torch.ops.aten.mul_.Tensor}) or is_op(n, {aten.relu.default})\n"
        "CHAIN = (qd.choose_qparams.tensor, qd.quantize_per_tensor.tensor)\n"
        "def g(n):\n"
        "    if n.target in (qd.quantize_per_channel.default, qd.dequantize_per_channel.default):\n"
        "        return qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default\n"
    )
    assert [line for line, _ in op_sets(source)] == [1, 3, 4, 6]


def test_every_vocabulary_entry_is_a_real_overload():
    for name in dir(opsets):
        value = getattr(opsets, name)
        if name.isupper() and isinstance(value, (frozenset, tuple)):
            assert value, name
            for op in value:
                assert isinstance(op, torch._ops.OpOverload) or op is operator.getitem, f"{name} holds {op!r}"
