"""compare / plot_layer_histograms: per-layer SQNR against the float model.

The mobilenet_v2 tests use torchvision's random initialisation with batch-norm statistics
estimated from the test data: with the default running statistics (mean 0, variance 1)
the untrained network's activations shrink about tenfold per stage, to 1e-9 in the last
blocks — far below the smallest scale an int8 observer returns — so every deep layer would
quantize to zero and there would be nothing to rank.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image
from torch import nn

import qgraph
from qgraph.core.meta import QUANTIZER_KEY, SIMULATED_BN_KEY
from qgraph.models.vision import build_torchvision, settle_batch_norm
from qgraph.observers.base import Observer
from qgraph.tools.compare import LayerErrorReport, compare, plot_layer_histograms, sqnr_db

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INT8_ISOLATED_MIN_DB = 20.0
"""int8 on a range fitted to the data: 6 dB per bit less the peak-to-RMS headroom gives
about 35-45 dB (38-46 dB measured here); 20 dB leaves room for heavy-tailed layers of an
untrained network and still fails for a clipped or 100x too coarse range (< 10 dB)."""
FLOAT_PATH_MIN_DB = 60.0
"""With quantizers passed through only BN folding changes numerics: float32 rounding,
1e-6..1e-5 relative (98-130 dB measured). 60 dB is 0.1 % relative error, far above that
and far below any int8 error, so a mismatched node (about 0 dB) cannot pass."""


def _batches(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return _batches(2, (2, 3, 64, 64), seed=1)


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    model = build_torchvision("mobilenet_v2")
    return settle_batch_norm(model, _batches(2, (4, 3, 64, 64), seed=2))


@pytest.fixture(scope="module")
def float_graph(mobilenet, batches) -> torch.fx.GraphModule:
    """The float model captured once; compare accepts it in place of the module."""
    return qgraph.capture(mobilenet, (batches[0],))


@pytest.fixture(scope="module")
def calibrated(mobilenet, batches) -> torch.fx.GraphModule:
    prepared = qgraph.prepare_ptq(mobilenet, (batches[0],))
    return qgraph.calibrate(prepared, batches, progress=False)


@pytest.fixture(scope="module")
def clean_reports(mobilenet, calibrated, batches) -> dict[str, LayerErrorReport]:
    return {
        "prepared": compare(mobilenet, calibrated, batches),
        "converted": compare(mobilenet, qgraph.convert(calibrated), batches),
    }


def _single_use_output_observers(prepared: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(module name, point) of observers called once, at a node's output, in graph order."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), Observer):
            calls.setdefault(node.target, []).append(node)
    found = []
    for target, nodes in calls.items():
        point = nodes[0].meta[QUANTIZER_KEY]
        if len(nodes) == 1 and isinstance(point, str) and nodes[0].args[0].op != "placeholder":
            found.append((target, point))
    return found


def _corrupt(calibrated, factor: float, depth: float) -> tuple[str, torch.fx.GraphModule]:
    """A copy of ``calibrated`` whose observer at ``depth`` (0..1 of the network) has its range × ``factor``."""
    prepared = copy.deepcopy(calibrated)
    prepared.meta = dict(calibrated.meta)  # deepcopy leaves meta behind; convert reads it
    candidates = _single_use_output_observers(prepared)
    target, point = candidates[int(depth * len(candidates))]
    observer = prepared.get_submodule(target)
    observer.min_val.mul_(factor)
    observer.max_val.mul_(factor)
    return point, prepared


# -- the math ----------------------------------------------------------------------------
def test_sqnr_db_definition():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert math.isnan(sqnr_db(math.nan, 1.0))


def test_sqnr_accumulates_energy_over_batches():
    """The last quantized point of a lone linear is the model output: recompute its SQNR by hand.

    Tolerance 1e-9 relative: both sides sum the same float64 squares, in a different order.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    data = _batches(3, (4, 16), seed=3)
    quantized = qgraph.convert(qgraph.calibrate(qgraph.prepare_ptq(model, (data[0],)), data, progress=False))
    report = compare(model, quantized, data)
    with torch.no_grad():
        pairs = [(model(x).double(), quantized(x).double()) for x in data]
    signal = sum(float(ref.square().sum()) for ref, _ in pairs)
    noise = sum(float((ref - q).square().sum()) for ref, q in pairs)
    row = report["linear"]
    assert row.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    assert report.batches == 3


# -- ranking -----------------------------------------------------------------------------
@pytest.mark.parametrize("factor, depth", [(0.01, 0.5), (100.0, 0.3)], ids=["range_100x_narrow", "range_100x_wide"])
def test_corrupted_layer_ranks_first(float_graph, calibrated, batches, clean_reports, factor, depth):
    """A range 100x too narrow (clips) or too wide (rounds to zero) must top the ranking.

    Cumulative SQNR alone would not do: the damage spreads, and layers after the culprit
    measure as low or lower (-1..0 dB against 0.3..4 dB at the culprit in these cases).
    """
    point, prepared = _corrupt(calibrated, factor, depth)
    converted = qgraph.convert(prepared)
    forms = {"converted": converted, "prepared": prepared} if factor < 1 else {"converted": converted}
    for form, quantized in forms.items():
        report = compare(float_graph, quantized, batches)
        assert report.rows[0].name == point, (form, report.to_text(5))
        assert report.rows[0].isolated_sqnr_db < 10.0
        assert clean_reports[form][point].isolated_sqnr_db > INT8_ISOLATED_MIN_DB
        assert report.worst(1)[0].name == point


def test_clean_int8_sqnr_is_plausible(clean_reports):
    for form, report in clean_reports.items():
        assert not report.unmatched, form
        assert all(row.isolated_sqnr_db > INT8_ISOLATED_MIN_DB for row in report), report.to_text(3)
        first_conv = min(report, key=lambda r: r.index if r.op.startswith("conv") and "->" not in r.name else 1e9)
        # Only the input and the first weights are quantized before it.
        assert first_conv.sqnr_db > INT8_ISOLATED_MIN_DB, first_conv


def test_prepared_and_converted_agree(clean_reports):
    """Fake-quant with observer qparams is what convert emits: same points, SQNR within 0.5 dB.

    0.5 dB: the two round ``x / scale`` with different kernels (x * (1/scale) vs the fused
    fake-quant), which moves a few values by one step; the SQNR of deep layers, already
    low, feels that most.
    """
    prepared, converted = clean_reports["prepared"], clean_reports["converted"]
    assert {r.name for r in converted} <= {r.name for r in prepared}
    for row in converted:
        assert row.isolated_sqnr_db == pytest.approx(prepared[row.name].isolated_sqnr_db, abs=0.5), row.name
        assert row.sqnr_db == pytest.approx(prepared[row.name].sqnr_db, abs=0.5), row.name


def test_bn_folded_conv_is_compared_with_the_bn_output(clean_reports):
    rows = [r for r in clean_reports["converted"] if r.name.startswith("conv2d")]
    assert rows and all(r.float_node.startswith("batch_norm") for r in rows)


# -- unquantized paths -------------------------------------------------------------------
def test_float_path_through_prepared_graph_is_nearly_exact(float_graph, calibrated, batches):
    report = compare(float_graph, calibrated, batches, simulate_quantization=False)
    assert len(report) > 50 and not report.unmatched
    assert all(row.sqnr_db > FLOAT_PATH_MIN_DB for row in report), report.to_text(3)


def test_float_path_without_rewrites_is_exact():
    """No BN to fold: the prepared graph runs the very same float ops, so SQNR is inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    data = _batches(2, (2, 3, 8, 8), seed=4)
    prepared = qgraph.calibrate(qgraph.prepare_ptq(model, (data[0],)), data, progress=False)
    report = compare(model, prepared, data, simulate_quantization=False)
    assert len(report) >= 3
    assert all(row.sqnr_db == math.inf for row in report)
    assert all(row.isolated_sqnr_db < math.inf for row in report)  # int8 itself is not exact


def test_qat_simulated_bn_is_matched_and_left_alone(conv_bn_net, image_batch, tmp_path):
    """QAT in train form: compare runs an eval-form copy; the user's model stays in train form."""
    model = conv_bn_net.train()
    prepared = qgraph.freeze_bn_stats(qgraph.prepare_qat(model, (image_batch,)))
    with torch.no_grad():
        prepared(image_batch)  # fake-quant ranges from a training step; BN keeps the model's statistics
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    model.eval()
    batches = [image_batch, image_batch.flip(0)]
    report = compare(model, prepared, batches)
    float_path = compare(model, prepared, batches, simulate_quantization=False)
    assert not report.unmatched and len(report) >= 4
    assert all(row.sqnr_db > FLOAT_PATH_MIN_DB for row in float_path), float_path.to_text()
    assert all(row.isolated_sqnr_db > INT8_ISOLATED_MIN_DB for row in report), report.to_text()
    assert prepared.training
    plot = plot_layer_histograms(model, prepared, batches, "conv2d", tmp_path / "qat_conv2d.png")
    _assert_png(plot)
    assert all(n.meta[SIMULATED_BN_KEY].form == "train" for n in prepared.graph.nodes if SIMULATED_BN_KEY in n.meta)
    assert _same_state(before, prepared.state_dict())


# -- report, plots, no side effects ------------------------------------------------------
def test_report_text_and_worst(clean_reports):
    report = clean_reports["converted"]
    assert [r.name for r in report.worst(3)] == [r.name for r in report.rows[:3]]
    by_cumulative = report.worst(len(report), by="sqnr_db")
    assert [r.sqnr_db for r in by_cumulative] == sorted(r.sqnr_db for r in report)
    text = report.to_text(5)
    assert "isolated SQNR dB" in text and report.rows[0].name in text
    assert len(text.splitlines()) == 1 + 2 + 5


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_plots_are_png(mobilenet, float_graph, calibrated, batches, tmp_path):
    converted = qgraph.convert(calibrated)
    report = compare(mobilenet, converted, batches, plot_path=tmp_path / "sqnr.png")
    _assert_png(tmp_path / "sqnr.png")
    conv = next(r for r in report.in_graph_order() if r.op.startswith("conv") and "->" not in r.name)
    for form, quantized in (("converted", converted), ("prepared", calibrated)):
        for layer in (conv.anchor, report.rows[0].name):
            path = plot_layer_histograms(float_graph, quantized, batches, layer, tmp_path / f"{form}_{layer}.png")
            _assert_png(path)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_are_not_modified(mobilenet, calibrated, batches, tmp_path):
    model_state = {k: v.clone() for k, v in mobilenet.state_dict().items()}
    prepared_state = {k: v.clone() for k, v in calibrated.state_dict().items()}
    code = calibrated.code
    compare(mobilenet, calibrated, batches)
    plot_layer_histograms(mobilenet, calibrated, batches, "conv2d_2", tmp_path / "h.png")
    assert _same_state(model_state, mobilenet.state_dict())
    assert _same_state(prepared_state, calibrated.state_dict())
    assert calibrated.code == code and not mobilenet.training


def test_errors_name_the_problem(float_graph, calibrated, batches, tmp_path):
    with pytest.raises(qgraph.ConfigError, match="no batches"):
        compare(float_graph, calibrated, [])
    with pytest.raises(qgraph.ConfigError, match="no quantized point or layer"):
        plot_layer_histograms(float_graph, calibrated, batches[:1], "no_such_layer", tmp_path / "unused.png")
    assert not list(tmp_path.iterdir())
    with pytest.raises(qgraph.ConfigError, match="needs a prepared model"):
        compare(float_graph, qgraph.convert(calibrated), batches[:1], simulate_quantization=False)


def test_unseeded_fake_quant_is_an_error(conv_bn_net, image_batch):
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    with pytest.raises(qgraph.ConfigError, match="never saw data"):
        compare(conv_bn_net, prepared, [image_batch])
