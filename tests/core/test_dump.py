"""The JSON dumps: dtypes, quant ranges, specs, rules and qparams groups as fields.

A small two-branch conv-bn-relu net whose branches meet in a cat is prepared for QAT on
XNNPACK and on x86, then converted; the tests read the fields of ``NNN_<pass>.json`` and
``index.json``, never the text dumps.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qgraph
import qgraph.core.dump
from qgraph.core.dump import DescribedGraph, graph_record
from qgraph.core.dump_format import INDEX_SCHEMA, PASS_SCHEMA
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.observers.base import FakeQuantize
from qgraph.quant.specs import PerChannel, QuantAnnotation, QuantSpec, SharedSpec


class TwoBranchNet(nn.Module):
    """conv-bn-relu and conv-relu on the input, concatenated, then a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.conv2(x))
        return self.head(torch.cat([a, b], 1))


def _dumps(tmp_path: Path, backend: str) -> Path:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    prepared = qgraph.prepare_qat(TwoBranchNet(), (x,), backend=backend, dump_dir=tmp_path)
    prepared(x)
    qgraph.convert(prepared.eval(), dump_dir=tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def xnnpack_dumps(tmp_path_factory) -> Path:
    return _dumps(tmp_path_factory.mktemp("xnnpack"), "xnnpack")


def _record(root: Path, stage: str, pass_name: str) -> dict:
    (path,) = (root / stage).glob(f"[0-9][0-9][0-9]_{pass_name}.json")
    record = json.loads(path.read_text())
    assert record["schema"] == PASS_SCHEMA and record["pass"] == pass_name
    return record


def _edge(record: dict, src: str, dst: str) -> dict:
    (edge,) = [e for e in record["edges"] if e["src"] == src and e["dst"] == dst]
    return edge


def _edges_into(record: dict, dst: str) -> list[dict]:
    return [e for e in record["edges"] if e["dst"] == dst]


def _node(record: dict, name: str) -> dict:
    (node,) = [n for n in record["nodes"] if n["name"] == name]
    return node


def _range(fields: dict) -> tuple:
    return fields["dtype"], fields["quant_min"], fields["quant_max"]


# ---------------------------------------------------------------------------- prepare


def test_annotate_puts_dtype_range_spec_and_rule_on_the_conv_edges(xnnpack_dumps):
    record = _record(xnnpack_dumps, "prepare_qat", "annotate")
    act = _edge(record, "x", "conv2d_1")
    assert _range(act) == ("int8", -128, 127)
    assert act["rule"] == "conv_relu" and act["source"] == "annotation"
    spec = act["spec"]
    assert (spec["scheme"], spec["granularity"], spec["bits"], spec["dynamic"]) == ("affine", "per_tensor", 8, False)
    weight = _edge(record, "conv2_weight", "conv2d_1")
    assert _range(weight) == ("int8", -127, 127)
    spec = weight["spec"]
    assert (spec["scheme"], spec["granularity"], spec["axis"]) == ("symmetric", "per_channel", 0)
    bias = _edge(record, "conv2_bias", "conv2d_1")  # XNNPACK keeps the bias in float
    assert bias["spec"] is None and bias["dtype"] == "float32" and bias["group"] is None
    node = _node(record, "conv2d_1")
    assert node["rule"] == "conv_relu" and node["input_specs"]["x"]["quant_min"] == -128


def test_cat_inputs_share_one_group_before_and_after_quantizers(xnnpack_dumps):
    annotated = _record(xnnpack_dumps, "prepare_qat", "annotate")
    into_cat = _edges_into(annotated, "cat")
    assert len(into_cat) == 2
    assert {e["group"] for e in into_cat} == {"relu"}  # the second input is "shared with" the first
    assert {_range(e) for e in into_cat} == {("int8", -128, 127)}
    assert sorted(annotated["groups"]["relu"]) == sorted([e["src"], "cat"] for e in into_cat)
    cat = _node(annotated, "cat")
    assert "shares" in cat["output_spec"] and cat["group"] == "relu" and cat["spec"]["quant_max"] == 127
    conv_groups = [_edge(annotated, src, "conv2d_1")["group"] for src in ("x", "conv2_weight")]
    assert conv_groups == ["x->conv2d_1", "conv2_weight->conv2d_1"]  # one group per edge: nothing shared

    quantized = _record(xnnpack_dumps, "prepare_qat", "insert_quantizers")
    into_cat = _edges_into(quantized, "cat")
    (group,) = {e["group"] for e in into_cat}  # one fake-quant module for the whole group
    assert {_node(quantized, e["src"])["kind"] for e in into_cat} == {"quantizer"}
    assert {quantized_node["target"] for quantized_node in (_node(quantized, e["src"]) for e in into_cat)} == {group}
    fq = _node(quantized, into_cat[0]["src"])["quantizer"]
    assert fq["class"] == "FakeQuantize" and fq["spec"]["quant_min"] == -128 and fq["observed_range"] is None
    # the edge into a fake-quant carries the float value it quantizes
    assert all(e["spec"] is None for e in quantized["edges"] if _node(quantized, e["dst"])["kind"] == "quantizer")


def test_index_json_gives_seconds_modified_and_node_counts(xnnpack_dumps):
    for stage in ("prepare_qat", "convert"):
        index = json.loads((xnnpack_dumps / stage / "index.json").read_text())
        assert index["schema"] == INDEX_SCHEMA
        first, *passes = index["passes"]
        assert first["stem"] == "000_input" and first["seconds"] is None
        assert passes and all(p["seconds"] > 0 for p in passes)
        for entry in index["passes"]:
            record = _record(xnnpack_dumps, stage, entry["pass"])
            assert entry["node_count"] == record["node_count"] == len(record["nodes"])
            assert entry["modified"] == record["modified"]
            assert (xnnpack_dumps / stage / f"{entry['stem']}.txt").exists()  # text dumps stay
    by_pass = {p["pass"]: p for p in json.loads((xnnpack_dumps / "prepare_qat" / "index.json").read_text())["passes"]}
    assert by_pass["insert_quantizers"]["modified"] and not by_pass["stochastic_depth"]["modified"]


def test_x86_conv_input_edge_is_uint8_and_its_bias_int32(tmp_path):
    record = _record(_dumps(tmp_path, "x86"), "prepare_qat", "annotate")
    assert _range(_edge(record, "x", "conv2d_1")) == ("uint8", 0, 255)
    bias = _edge(record, "conv2_bias", "conv2d_1")
    assert _range(bias) == ("int32", -(2**31), 2**31 - 1)
    assert bias["spec"]["type"] == "DerivedSpec" and ["x", "conv2d_1"] in bias["spec"]["derived_from"]
    assert {e["group"] for e in _edges_into(record, "cat")} == {"relu"}


# ---------------------------------------------------------------------------- convert


def test_converted_edges_take_ranges_from_quantize_and_dequantize_arguments(xnnpack_dumps):
    record = _record(xnnpack_dumps, "convert", "quantize_weights")
    kinds = {n["name"]: n["kind"] for n in record["nodes"]}
    q_to_dq = [e for e in record["edges"] if kinds[e["src"]] == "quantize" and kinds[e["dst"]] == "dequantize"]
    assert q_to_dq and {_range(e) for e in q_to_dq} == {("int8", -128, 127)}
    assert {e["source"] for e in q_to_dq} == {"quantize"}
    weights = [e for e in record["edges"] if kinds[e["src"]] == "constant" and kinds[e["dst"]] == "dequantize"]
    int8_weights = [e for e in weights if e["dtype"] == "int8"]
    assert int8_weights and {_range(e) for e in int8_weights} == {("int8", -127, 127)}
    assert {e["spec"].get("axis") for e in int8_weights} == {0}  # per-channel dequantize
    out_of_dq = [e for e in record["edges"] if kinds[e["src"]] == "dequantize"]
    assert out_of_dq and all(e["dtype"] == "float32" and e["quant_min"] is None for e in out_of_dq)


# ---------------------------------------------------------------------------- the protocol, by hand


def _graph_with_annotations(annotations: dict[str, QuantAnnotation]) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.create_node("call_function", torch.ops.aten.relu.default, (x,), name="relu")
    b = graph.create_node("call_function", torch.ops.aten.neg.default, (a,), name="neg")
    c = graph.create_node("call_function", torch.ops.aten.add.Tensor, (a, b), name="add")
    graph.output(c)
    gm = torch.fx.GraphModule(nn.Module(), graph)
    for node in gm.graph.nodes:
        if node.name in annotations:
            node.meta[ANNOTATION_KEY] = annotations[node.name]
    return gm


def test_shares_chains_resolve_to_the_spec_at_their_end():
    int8 = QuantSpec()
    gm = _graph_with_annotations(
        {
            "relu": QuantAnnotation("r", "relu", {}, int8),
            "neg": QuantAnnotation("n", "neg", {"relu": SharedSpec("relu")}, SharedSpec(("relu", "neg"))),
            "add": QuantAnnotation("a", "add", {"relu": SharedSpec("neg"), "neg": SharedSpec(("relu", "add"))}),
        }
    )
    record = graph_record(gm)
    edges = {(e["src"], e["dst"]): e for e in record["edges"]}
    for key in [("relu", "neg"), ("relu", "add"), ("neg", "add")]:  # chains of 1, 3 and 4 hops
        assert edges[key]["group"] == "relu" and edges[key]["spec"]["text"] == int8.short()
        assert edges[key]["rule"] == {"neg": "n", "add": "a"}[key[1]]  # the rule of the edge's consumer
    assert edges[("x", "relu")]["spec"] is None
    assert sorted(record["groups"]["relu"]) == [["neg", "add"], ["relu", "add"], ["relu", "neg"]]


def test_a_shares_cycle_or_an_unknown_meta_object_is_not_quantized():
    gm = _graph_with_annotations(
        {
            "neg": QuantAnnotation("n", "neg", {"relu": SharedSpec(("neg", "add"))}),
            "add": QuantAnnotation("a", "add", {"neg": SharedSpec(("relu", "neg"))}),
        }
    )
    graph = DescribedGraph(gm)
    assert graph.resolve(("relu", "neg")) == (None, None)
    edges = {(e["src"], e["dst"]): e for e in graph_record(gm)["edges"]}
    assert edges[("relu", "neg")]["spec"] is None and edges[("relu", "neg")]["group"] is None

    gm = _graph_with_annotations({})
    next(n for n in gm.graph.nodes if n.name == "neg").meta[ANNOTATION_KEY] = object()  # describes nothing
    record = graph_record(gm)
    assert _node(record, "neg")["rule"] is None and all(e["spec"] is None for e in record["edges"])


def test_quantizer_modules_and_specs_describe_themselves():
    spec = QuantSpec(symmetric=True, narrow_range=True, granularity=PerChannel(axis=1))
    fields = spec.dump_fields()
    assert (fields["quant_min"], fields["quant_max"], fields["axis"], fields["scheme"]) == (-127, 127, 1, "symmetric")
    fq = FakeQuantize(QuantSpec(), point="relu")
    fq(torch.tensor([-1.0, 3.0]))
    described = fq.dump_fields()
    assert described["kind"] == "quantizer" and described["point"] == "relu"
    assert described["observed_range"] == [-1.0, 3.0] and described["text"].startswith("FakeQuantize(")
    json.dumps(described)  # plain data


# ---------------------------------------------------------------------------- layering


def test_core_dump_imports_torch_and_core_only():
    source = Path(qgraph.core.dump.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    qgraph_modules = {m for m in imported if m.startswith("qgraph")}
    assert qgraph_modules and all(m.startswith("qgraph.core.") for m in qgraph_modules), qgraph_modules
    third_party = {m.split(".")[0] for m in imported} - {"qgraph", "torch", "__future__"} - set(sys.stdlib_module_names)
    assert not third_party, third_party


def test_importing_core_dump_loads_no_higher_layer():
    code = (
        "import sys, qgraph.core.dump\n"
        "bad = ('qgraph.quant', 'qgraph.observers', 'qgraph.passes', 'qgraph.backends', 'qgraph.api', "
        "'qgraph.tools', 'onnx', 'executorch', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
