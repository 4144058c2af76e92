"""Write checks that name the user's path, read checks for runtime files, the input spec
check, and the helpers that find the node an exporter failed on."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch.fx.traceback import NodeSource, NodeSourceAction

from qgraph.core.errors import InputError, ModelFileError, ModelFileNotFoundError, OutputPathError
from qgraph.core.files import atomic_write_bytes, check_writable, read_head
from qgraph.core.inputs import TensorSpec, check_count, check_tensor
from qgraph.core.node_info import failing_node, origin_name


def test_write_errors_name_the_users_path_and_write_nothing(tmp_path):
    (tmp_path / "dir.bin").mkdir()
    (tmp_path / "file").write_text("x")
    for path, words in (
        (tmp_path / "dir.bin", "is a directory"),
        (tmp_path / "file" / "sub" / "m.bin", "is a file, not a folder"),
        ("/proc/qgraph/m.bin", "cannot create files in '/proc'"),
    ):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        for call in (check_writable, lambda p: atomic_write_bytes(p, b"data")):
            with pytest.raises(OutputPathError, match=words) as info:
                call(path)
            assert f"'{path}'" in str(info.value) and ".tmp" not in str(info.value)
            assert isinstance(info.value, OSError)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    check_writable(tmp_path / "new" / "deeper" / "m.bin")  # missing folders are made at write time
    assert not (tmp_path / "new").exists()


def test_read_head_tells_missing_directory_and_empty_apart(tmp_path):
    with pytest.raises(ModelFileNotFoundError) as info:
        read_head(tmp_path / "nope.pte", "ExecuTorch program")
    assert isinstance(info.value, FileNotFoundError) and "nope.pte" in str(info.value)
    with pytest.raises(ModelFileError, match="is a directory"):
        read_head(tmp_path, "ONNX model")
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(ModelFileError, match="is empty"):
        read_head(tmp_path / "e", "ONNX model")
    (tmp_path / "f").write_bytes(b"0123456789")
    assert read_head(tmp_path / "f", "ONNX model", size=4) == (b"0123", 10)


def test_check_tensor_names_input_dims_and_sizes():
    spec = TensorSpec("x", torch.float32, (None, 3, 8, 8))
    check_tensor("the model", spec, torch.zeros(5, 3, 8, 8))
    with pytest.raises(InputError, match=r"input 'x' of the model has shape \[5, 3, 9, 8\]: dim 2 is 9, but the model takes 8"):
        check_tensor("the model", spec, torch.zeros(5, 3, 9, 8))
    with pytest.raises(InputError, match="3 dims"):
        check_tensor("the model", spec, torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="is a list"):
        check_tensor("the model", spec, [torch.zeros(1)])
    with pytest.raises(InputError, match="hint for 2, 3"):
        check_tensor("m", spec, torch.zeros(1, 3, 4, 4), shape_hint=lambda s, dims: f"hint for {', '.join(map(str, dims))}")
    bound = TensorSpec("input0", torch.float32, (1, 3, 8, 8))
    check_tensor("p", bound, torch.zeros(1, 3, 4, 8), sizes_are_bounds=True)
    with pytest.raises(InputError, match="at most 1"):
        check_tensor("p", bound, torch.zeros(2, 3, 8, 8), sizes_are_bounds=True)
    check_tensor("p", TensorSpec("t", None, (None,)), torch.zeros(3, dtype=torch.int8))  # any dtype
    with pytest.raises(InputError, match=r"takes 1 input \(x: float32\[\*, 3, 8, 8\]\), got 2"):
        check_count("the model", [spec], 2)


def test_failing_node_and_origin_name():
    gm = torch.fx.symbolic_trace(lambda x: torch.tanh(torch.relu(x)))

    def verify(graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.tanh:
                raise ValueError(f"op {node.target} is not allowed")

    try:
        try:
            verify(gm.graph)
        except ValueError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as exc:
        found = failing_node(exc)
    assert found is not None and found.target is torch.tanh
    assert failing_node(RuntimeError("no traceback")) is None
    assert origin_name(found) == found.name  # no from_node: its own name
    copy_ = torch.fx.symbolic_trace(lambda x: torch.tanh(torch.relu(x)))
    renamed = next(n for n in copy_.graph.nodes if n.target is torch.tanh)
    renamed.name = "aten_tanh_default"
    renamed.meta["from_node"] = [NodeSource(found, "an exporter", NodeSourceAction.CREATE)]
    assert origin_name(renamed) == found.name
