"""The pass manager: declared ordering, lint after every pass, dumps, errors naming passes."""

from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph import PassError, PassOrderError
from qgraph.backends.rules.xnnpack import XNNPACK
from qgraph.core.pass_manager import Pass, PassManager, PassResult
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.insert_quantizers import InsertQuantizers
from qgraph.passes.prepare.resolve_specs import ResolveSpecs


class _Breaks(Pass):
    name = "breaks"

    def call(self, gm):
        # Use a node before it is defined: graph.lint() must catch it.
        last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            gm.graph.call_function(torch.ops.aten.relu.default, (last,))
        return PassResult(gm, True)


class _Nothing(Pass):
    name = "nothing"

    def call(self, gm):
        return PassResult(gm, False)


def test_order_is_checked_when_the_pipeline_is_built():
    wrong_order = r"InsertQuantizers requires ResolveSpecs to run before it.*runs only \[Annotate\] before it"
    with pytest.raises(PassOrderError, match=wrong_order):
        PassManager([Annotate(XNNPACK, is_qat=True), InsertQuantizers(is_qat=True), ResolveSpecs()])
    PassManager([Annotate(XNNPACK, is_qat=True), ResolveSpecs(), InsertQuantizers(is_qat=True)])  # in order: accepted


def test_a_required_pass_missing_from_the_pipeline_is_named():
    with pytest.raises(PassOrderError, match=r"ResolveSpecs requires Annotate, which the pipeline .* does not run"):
        PassManager([ResolveSpecs(), InsertQuantizers(is_qat=True)])


class _First(Pass):
    name = "first"


class _Second(Pass):
    name = "second"
    requires = (_First,)


class _Third(Pass):
    name = "third"
    requires = (_Second,)


def test_a_cycle_in_requires_is_named(monkeypatch):
    monkeypatch.setattr(_First, "requires", (_Third,))
    # The cycle is found from the passes' declarations even with only one of them in the pipeline.
    with pytest.raises(PassOrderError, match=r"cycle \((_First|_Second|_Third) -> .* -> \1\)") as info:
        PassManager([_Third()])
    assert all(name in str(info.value) for name in ("_First", "_Second", "_Third"))
    monkeypatch.setattr(_First, "requires", (_First,))
    with pytest.raises(PassOrderError, match=r"cycle \(_First -> _First\)"):
        PassManager([_First()])


class _FirstVariant(_First):
    name = "first_variant"


def test_a_subclass_of_a_required_pass_meets_the_requirement():
    PassManager([_FirstVariant(), _Second()])
    with pytest.raises(PassOrderError, match="_Second requires _First to run before it"):
        PassManager([_Second(), _FirstVariant()])


def test_requires_are_checked_transitively_only_for_cycles():
    # _Third requires _Second requires _First: a pipeline of the three in order is accepted; one
    # without _First is refused at _Second, which requires it directly.
    PassManager([_First(), _Second(), _Third()])
    with pytest.raises(PassOrderError, match="_Second requires _First, which the pipeline"):
        PassManager([_Second(), _Third()])


def test_a_subclass_of_a_required_pass_satisfies_the_requirement():
    class _Annotates(Annotate):  # e.g. apply_pt2e_annotations: annotates from elsewhere
        name = "annotates"

        def __init__(self):
            pass

    PassManager([_Annotates(), ResolveSpecs()])  # accepted
    with pytest.raises(PassOrderError, match="ResolveSpecs requires Annotate"):
        PassManager([_Nothing(), ResolveSpecs()])


def test_failing_pass_is_named_with_the_passes_before_it(conv_bn_net, image_batch):
    gm = qgraph.capture(conv_bn_net, (image_batch,))
    with pytest.raises(PassError, match=r"_Breaks failed after \[_Nothing\]"):
        PassManager([_Nothing(), _Breaks()])(gm)


def _dump(stage, pass_name: str, suffix: str):
    return next(stage.glob(f"[0-9][0-9][0-9]_{pass_name}.{suffix}"))


def test_dumps_after_every_pass(tmp_path, conv_bn_net, image_batch):
    qgraph.prepare_qat(conv_bn_net, (image_batch,), dump_dir=tmp_path)
    stage = tmp_path / "prepare_qat"
    names = sorted(p.name for p in stage.glob("*.txt"))
    assert names[-1] == "index.txt" and names[0] == "000_input.txt"
    # numbered in pipeline order, one per pass; the passes this test is about in their order
    assert [int(n[:3]) for n in names[:-1]] == list(range(len(names) - 1))
    order = [n[4:-4] for n in names[:-1]]
    core = ["fuse_conv_bn_qat", "annotate", "resolve_specs", "insert_quantizers"]
    assert [n for n in order if n in core] == core
    annotated = _dump(stage, "annotate", "txt").read_text()
    assert "out int8[-128,127] affine PerTensor" in annotated and "<- conv_relu" in annotated
    diff = _dump(stage, "insert_quantizers", "diff").read_text()
    assert "+%fq_" in diff
    index = (stage / "index.txt").read_text()
    fuse_line = next(line for line in index.splitlines() if "fuse_conv_bn_qat" in line)
    assert "True" in fuse_line
    # resolve_specs adds no node: its dump equals the annotate one and its diff is empty;
    # no stochastic depth in this model, so that pass changed nothing either.
    assert _dump(stage, "resolve_specs", "diff").read_text() == ""
    assert _dump(stage, "stochastic_depth", "diff").read_text() == ""


def test_env_variable_turns_dumps_on(tmp_path, monkeypatch, conv_bn_net, image_batch):
    monkeypatch.setenv("QGRAPH_DUMP", str(tmp_path))
    qgraph.convert(_calibrated(conv_bn_net, image_batch))
    assert (tmp_path / "prepare_ptq" / "index.txt").exists()
    assert (tmp_path / "convert" / "004_quantize_weights.txt").exists()


def _calibrated(model, x):
    p = qgraph.prepare_ptq(model, (x,))
    qgraph.calibrate(p, [x], progress=False)
    return p


def test_annotate_requires_nothing_and_resolve_requires_annotate():
    assert Annotate.requires == () and ResolveSpecs.requires == (Annotate,)
