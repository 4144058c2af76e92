"""Inputs as users have them: batch-1 examples, keyword inputs, data loaders, dynamic sizes,
and the input check every prepared and converted model runs before its graph."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.export import Dim

import qgraph
from qgraph.api.inputs import INPUTS_KEY, batch_inputs, split_inputs
from qgraph.core.errors import CaptureError, InputError
from qgraph.observers.base import QUANTIZER_TYPES
from tests.conftest import ConvBnNet, randomize_bn


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


class BatchOne(nn.Module):
    """Runs only at batch 1: its reshape names the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.reshape(1, 12))


class FullyConvolutional(nn.Module):
    """conv-bn-relu → spatial mean: any height and width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def _ranges(prepared: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Every observer's recorded min and max, in module order."""
    return [torch.stack([m.min_val, m.max_val]) for m in prepared.modules() if isinstance(m, QUANTIZER_TYPES) and hasattr(m, "min_val")]


def test_split_inputs_reads_tensors_tuples_and_dicts():
    t = torch.zeros(1)
    assert split_inputs(t) == ((t,), {})
    assert split_inputs([t, t]) == ((t, t), {})
    assert split_inputs({"input_ids": t}) == ((), {"input_ids": t})
    with pytest.raises(InputError, match="got int"):
        split_inputs(3)


def test_batch_1_example_keeps_the_batch_dynamic_and_computes_the_same(conv_bn_net, image_batch):
    """Prepared from a batch-1 example or from a batch of 6: the same graph, the same numbers.

    Exact equality: both graphs run the same ops in the same order on the same data."""
    one = qgraph.prepare_ptq(conv_bn_net, (image_batch[:1],))
    six = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    assert one.meta[INPUTS_KEY].tensors[0].shape == (None, 3, 8, 8)
    for p in (one, six):
        qgraph.calibrate(p, [image_batch], progress=False)
    assert str(one.graph) == str(six.graph)
    torch.testing.assert_close(one(image_batch), six(image_batch), rtol=0, atol=0)
    torch.testing.assert_close(qgraph.convert(one)(image_batch[:3]), qgraph.convert(six)(image_batch[:3]), rtol=0, atol=0)


def test_qat_with_batch_norm_prepares_at_batch_1_and_trains_at_batch_8():
    torch.manual_seed(0)
    model = randomize_bn(ConvBnNet()).train()
    prepared = qgraph.prepare_qat(model, (torch.randn(1, 3, 8, 8),))
    bn_means = [b.clone() for n, b in prepared.named_buffers() if n.endswith("running_mean")]
    assert bn_means, "the QAT graph keeps BN statistics as buffers"
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):
        loss = prepared(torch.randn(8, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    after = [b for n, b in prepared.named_buffers() if n.endswith("running_mean")]
    assert any(not torch.equal(a, b) for a, b in zip(bn_means, after)), "BN statistics trained at batch 8"
    assert prepared.eval()(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_model_that_needs_batch_1_is_captured_as_given_and_says_so():
    prepared = qgraph.prepare_ptq(BatchOne().eval(), (torch.randn(1, 12),))
    assert prepared.meta[INPUTS_KEY].tensors[0].shape == (1, 12)
    with pytest.raises(InputError, match=r"dim 0 is 2, but the model takes 1"):
        prepared(torch.randn(2, 12))


def test_wrong_size_names_input_dims_and_a_dynamic_shapes_hint_that_works(conv_bn_net, image_batch):
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    big = torch.randn(2, 3, 16, 16)
    with pytest.raises(InputError) as info:
        qgraph.calibrate(prepared, [big], progress=False)
    message = str(info.value)
    assert "input 'x'" in message and "dims 2, 3 are 16, 16" in message and "takes 8, 8" in message
    hint = re.search(r"dynamic_shapes=(\{.*\})\) with torch.export.Dim", message)
    assert hint, message
    shapes = eval(hint.group(1), {"Dim": Dim})  # the hint as the user would paste it
    assert shapes == {"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}
    dynamic = qgraph.prepare_ptq(FullyConvolutional().eval(), (image_batch,), dynamic_shapes=shapes)
    assert dynamic.meta[INPUTS_KEY].tensors[0].shape == (None, 3, None, None)
    qgraph.calibrate(dynamic, [big, image_batch], progress=False)
    assert qgraph.convert(dynamic)(torch.randn(1, 3, 12, 10)).shape == (1, 4)


def test_sizes_the_model_ties_together_are_named_when_broken(conv_bn_net, image_batch):
    """ConvBnNet flattens 8 × (H/2) × (W/2) features into a linear of width 128: H and W may
    vary only together; torch.export's guard says so, qgraph names the inputs."""
    shapes = {"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,), dynamic_shapes=shapes)
    qgraph.calibrate(prepared, [torch.randn(2, 3, 4, 16)], progress=False)  # 2 × 8: the same width
    with pytest.raises(InputError, match=r"inputs \(x: \[2, 3, 16, 16\]\) break a condition .*== 128") as info:
        qgraph.calibrate(prepared, [torch.randn(2, 3, 16, 16)], progress=False)
    assert isinstance(info.value.__cause__, AssertionError)
    with pytest.raises(InputError, match="break a condition"):
        copy.deepcopy(prepared)(torch.randn(2, 3, 16, 16))


def test_dynamic_shapes_naming_no_input_is_refused(conv_bn_net, image_batch):
    with pytest.raises(CaptureError, match=r"names \['y'\]"):
        qgraph.prepare_ptq(conv_bn_net, (image_batch,), dynamic_shapes={"y": {0: Dim.AUTO}})


def test_dtype_mismatch_names_input_and_both_dtypes_at_the_first_call(conv_bn_net, image_batch):
    prepared = qgraph.prepare_qat(copy.deepcopy(conv_bn_net).train(), (image_batch,))
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(InputError, match=rf"input 'x' of the model is {str(dtype)[6:]}, but the model takes float32"):
            prepared(image_batch.to(dtype))


def test_the_check_survives_deep_copies_and_convert(conv_bn_net, image_batch):
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(prepared, [image_batch], progress=False)
    for model in (copy.deepcopy(prepared), qgraph.convert(prepared), copy.deepcopy(qgraph.convert(prepared))):
        with pytest.raises(InputError, match="dim 1 is 4"):
            model(torch.randn(2, 4, 8, 8))
        hooks = list(model._forward_pre_hooks.values())
        assert hooks.count(hooks[0]) == 1, "one check per model, not one per copy"


def test_calibrate_takes_image_label_batches_dicts_input_fn_and_num_batches(conv_bn_net, image_batch):
    """A loader of (images, labels) calibrates exactly as the images alone; ``num_batches``
    stops where it says (exact: the observers see the same values)."""
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8), torch.arange(12))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    images = [b for b, _ in loader]
    prepared = lambda: qgraph.prepare_ptq(conv_bn_net, (image_batch,))  # noqa: E731
    reference = qgraph.calibrate(prepared(), images, progress=False)
    from_pairs = qgraph.calibrate(prepared(), loader, progress=False)
    from_fn = qgraph.calibrate(prepared(), [{"img": b} for b in images], progress=False, input_fn=lambda b: b["img"])
    for p in (from_pairs, from_fn):
        for a, b in zip(_ranges(reference), _ranges(p)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    first_two = qgraph.calibrate(prepared(), images[:2], progress=False)
    stopped = qgraph.calibrate(prepared(), loader, progress=False, num_batches=2)
    assert any(not torch.equal(a, b) for a, b in zip(_ranges(reference), _ranges(first_two)))
    for a, b in zip(_ranges(first_two), _ranges(stopped)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(InputError, match="got 2 positional inputs"):
        qgraph.calibrate(prepared(), loader, progress=False, input_fn=lambda b: tuple(b))


def test_keyword_inputs_prepare_calibrate_and_call_by_name_or_position():
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 16, (4, 6)), (torch.rand(4, 6) > 0.3).float()
    model = Tokens().eval()
    prepared = qgraph.prepare_ptq(model, {"input_ids": ids, "attention_mask": mask})
    captured = prepared.meta[INPUTS_KEY]
    assert captured.names == ("input_ids", "attention_mask") and captured.num_positional == 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(4)}
    assert batch_inputs(prepared, batch) == ((), {"input_ids": ids, "attention_mask": mask})
    qgraph.calibrate(prepared, [batch], progress=False)
    by_name = prepared(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(prepared(ids, mask), by_name, rtol=0, atol=0)
    with pytest.raises(InputError, match="Did you mean 'attention_mask'"):
        prepared(input_ids=ids, attn_mask=mask)
    with pytest.raises(InputError, match="missing input 'attention_mask'"):
        prepared(input_ids=ids)
    with pytest.raises(InputError, match="'input_ids' of the model is float32, but the model takes int64"):
        prepared(ids.float(), mask)


def test_capture_mixes_positional_and_keyword_inputs():
    ids, mask = torch.randint(0, 16, (4, 6)), torch.ones(4, 6)
    gm = qgraph.capture(Tokens().eval(), (ids,), kwargs={"attention_mask": mask})
    assert gm.meta[INPUTS_KEY].names == ("input_ids", "attention_mask") and gm.meta[INPUTS_KEY].num_positional == 1
    torch.testing.assert_close(gm(ids, attention_mask=mask), gm(ids, mask), rtol=0, atol=0)
