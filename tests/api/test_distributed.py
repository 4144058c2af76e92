"""Distributed QAT (DDP, FSDP2) and sharded calibration: two gloo processes on 127.0.0.1.

The tests share one spawn of two ranks (``torch.multiprocessing``, one thread each) that
run the workers below and save what they computed; the test process compares the ranks with
each other and with one process run on the *global batch* — at every step the concatenation
of the ranks' batches. What must hold, and how exactly:

* after DDP QAT on different data per rank, ``convert`` (no extra forward) gives the same
  model on both ranks: qparams, weights and outputs equal bit for bit; a control run with
  qgraph's collectives off (``rank_local``) differs, so the comparison can fail;
* sharded calibration equals one process calibrated on all shards bit for bit, for
  min-max, moving-average and histogram observers (min, max and integer counts are exact;
  the float model computes each sample alike in any batch, checked as a premise);
* ``qgraph::sync_batch_norm`` against ``aten.batch_norm`` on the global batch: outputs,
  gradients and running statistics within 1e-5 relative (float32 summation order only);
* FSDP2 ``fully_shard`` on a prepared one-layer Llama trains and converts, identically on
  both ranks;
* ``examples/qat_ddp.py`` runs under ``torchrun`` and reports that the ranks agree.

Every worker's collectives time out after 60 s, and each test after ``TIMEOUT`` s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import qgraph
from qgraph.core.errors import ConfigError
from qgraph.models.digits import DigitsCNN
from qgraph.models.llama import Llama, LlamaConfig
from qgraph.observers.base import FakeQuantize, Observer
from qgraph.observers.histogram import HistogramObserver
from qgraph.ops.sync_batch_norm import SYNC_BATCH_NORM
from qgraph.quant.specs import PerChannel, QuantSpec

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TIMEOUT = 300
BATCH = 8
STEPS = 4
aten = torch.ops.aten


# --- running two ranks ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, worker, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        torch.save(worker(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(worker, tmp_path: Path) -> list:
    """``worker(rank)`` on two gloo ranks; the list of what each returned."""
    mp.spawn(_rank_main, args=(free_port(), worker, str(tmp_path)), nprocs=WORLD, join=True, daemon=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def shard(rank: int, step: int, shape=(BATCH, 1, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: different data per rank (rank 1's twice as large)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.rand(shape, generator=g) * (1 + rank) - 0.25 * rank, torch.randint(0, 10, (shape[0],), generator=g)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(shard(r, step) for r in range(WORLD)))
    return torch.cat(xs), torch.cat(ys)


def artefacts(gm: torch.fx.GraphModule) -> dict:
    """What a converted model is: its tensors, the literal arguments of its nodes (scales and
    zero points of activations are floats and ints there) and its output on a fixed input."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = gm(x)
    literals = [[repr(a) for a in n.args if not isinstance(a, torch.fx.Node)] for n in gm.graph.nodes]
    return {
        "state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
        "args": list(zip([str(n.target) for n in gm.graph.nodes], literals)),  # a float's repr round-trips
        "out": out,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    differing = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
    assert not differing, f"tensors differ: {differing}"
    assert a["args"] == b["args"]
    assert torch.equal(a["out"], b["out"])


# --- DDP QAT ----------------------------------------------------------------------------


def prepared_digits(sync: bool) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    prepared = qgraph.prepare_qat(DigitsCNN(dropout=0.0).train(), (torch.rand(BATCH, 1, 8, 8),))
    return qgraph.sync_batch_norm(prepared) if sync else prepared


def train(model, batches, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def ddp_qat(rank: int, sync: bool) -> dict:
    prepared = prepared_digits(sync)
    ddp = DistributedDataParallel(prepared)
    train(ddp, [shard(rank, s) for s in range(STEPS)])
    qgraph.freeze_observers(prepared)
    qgraph.freeze_bn_stats(prepared)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = qgraph.convert(ddp)  # right after training, no extra forward; the wrapper's module
    try:
        qgraph.sync_batch_norm(ddp)
        refused_wrapper = False
    except ConfigError:  # it must be called on the prepared graph, before wrapping
        refused_wrapper = True
    return {
        "quantized": artefacts(quantized),
        "prepared": {k: v.detach().clone() for k, v in prepared.state_dict().items()},
        "warned": any("sync_batch_norm" in str(w.message) for w in caught),
        "refused_wrapper": refused_wrapper,
    }


def ddp_worker(rank: int) -> dict:
    with qgraph.rank_local():  # control: qgraph issues no collective, as before this feature
        local = ddp_qat(rank, sync=False)
    return {"synced": ddp_qat(rank, sync=True), "bn_not_synced": ddp_qat(rank, sync=False), "local": local}


@pytest.mark.timeout(TIMEOUT)
def test_ddp_qat_ranks_convert_identically(ranks):
    r0, r1 = (r["ddp"] for r in ranks)
    assert_same(r0["synced"]["quantized"], r1["synced"]["quantized"])
    assert not r0["synced"]["warned"] and r0["synced"]["refused_wrapper"]
    with pytest.raises(AssertionError):  # the control: without qgraph's collectives ranks differ
        assert_same(r0["local"]["quantized"], r1["local"]["quantized"])


@pytest.mark.timeout(TIMEOUT)
def test_observers_agree_without_sync_batch_norm_and_convert_warns(ranks):
    r0, r1 = (r["ddp"] for r in ranks)
    observer_keys = [k for k in r0["bn_not_synced"]["prepared"] if k.endswith(("min_val", "max_val"))]
    bn_keys = [k for k in r0["bn_not_synced"]["prepared"] if k.endswith(("running_mean", "running_var"))]
    assert observer_keys and bn_keys
    for k in observer_keys:
        assert torch.equal(r0["bn_not_synced"]["prepared"][k], r1["bn_not_synced"]["prepared"][k]), k
    assert any(not torch.equal(r0["bn_not_synced"]["prepared"][k], r1["bn_not_synced"]["prepared"][k]) for k in bn_keys)
    assert r0["bn_not_synced"]["warned"] and r1["bn_not_synced"]["warned"]


@pytest.mark.timeout(TIMEOUT)
def test_ddp_qat_is_one_process_on_the_global_batch(ranks):
    """Synced DDP vs one process on the concatenated batches, same seed and steps.

    Tolerance: 1e-3 absolute on weights, statistics and ranges. The two differ only in float
    summation order (per-rank BN sums and DDP's gradient average vs one batch), but a
    rounding difference can move a fake-quantized weight across a rounding edge and the
    next steps carry that on (measured here: 1.3e-4 at worst, on the classifier). Local
    statistics and ranges (the control) move the model by more than 0.1 (measured: 1.4).
    """
    one = prepared_digits(sync=False)
    train(one, [global_batch(s) for s in range(STEPS)])
    reference = one.state_dict()
    synced, local = ranks[0]["ddp"]["synced"]["prepared"], ranks[0]["ddp"]["local"]["prepared"]
    keys = [k for k, v in reference.items() if v.is_floating_point() and v.numel()]
    worst = {k: (synced[k] - reference[k]).abs().max().item() for k in keys}
    assert max(worst.values()) < 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    local_worst = max((local[k] - reference[k]).abs().max().item() for k in keys)
    assert local_worst > 0.1


# --- sync_batch_norm, the op --------------------------------------------------------------


def bn_inputs(rank: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3 + rank, 4, 5, 5, generator=g) * (1 + rank) + rank  # unequal batch sizes
    grad = torch.randn(x.shape, generator=g)
    return x, grad


def bn_params() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(99)
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    return weight.requires_grad_(), bias.requires_grad_(), torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5


def sync_bn_worker(rank: int) -> dict:
    x, grad = bn_inputs(rank)
    x.requires_grad_()
    weight, bias, mean, var = bn_params()
    y = SYNC_BATCH_NORM(x, weight, bias, mean, var, True, 0.1, 1e-5, False)
    (y * grad).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": weight.grad, "db": bias.grad, "mean": mean, "var": var}


@pytest.mark.timeout(TIMEOUT)
def test_sync_batch_norm_is_batch_norm_of_the_global_batch(ranks):
    ranks = [r["sync_bn"] for r in ranks]
    xs, grads = zip(*(bn_inputs(r) for r in range(WORLD)))
    x = torch.cat(xs).requires_grad_()
    weight, bias, mean, var = bn_params()
    y = aten.batch_norm.default(x, weight, bias, mean, var, True, 0.1, 1e-5, False)
    (y * torch.cat(grads)).sum().backward()
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, **close)
    # each rank holds the gradient of its own loss term; the sum over ranks is the global one
    torch.testing.assert_close(sum(r["dw"] for r in ranks), weight.grad, **close)
    torch.testing.assert_close(sum(r["db"] for r in ranks), bias.grad, **close)
    for r in ranks:
        assert torch.equal(r["mean"], ranks[0]["mean"]) and torch.equal(r["var"], ranks[0]["var"])
        torch.testing.assert_close(r["mean"], mean, **close)
        torch.testing.assert_close(r["var"], var, **close)


# --- sharded calibration ----------------------------------------------------------------

CALIBRATION_STEPS = 3


def calibration_configs() -> dict[str, qgraph.QConfig]:
    from qgraph.backends import xnnpack_scheme

    scheme = xnnpack_scheme()
    moving = scheme.activation.with_(observer="moving_average_minmax", averaging_constant=0.3)
    return {
        "minmax": qgraph.QConfig(scheme=scheme),
        "moving_average": qgraph.QConfig(scheme=dataclasses.replace(scheme, activation=moving)),
        "histogram": qgraph.QConfig(scheme=scheme.with_histogram("mse")),
    }


def float_digits() -> torch.nn.Module:
    torch.manual_seed(0)
    return DigitsCNN().eval()


def calibrated(name: str, batches) -> torch.fx.GraphModule:
    model = float_digits()
    prepared = qgraph.prepare_ptq(model, (batches[0],), config=calibration_configs()[name])
    return qgraph.calibrate(prepared, batches)


OBSERVER_SPECS = {
    "per_channel_moving_average": QuantSpec(
        dtype=torch.int8, granularity=PerChannel(axis=1), observer="moving_average_minmax", averaging_constant=0.3
    ),
    "histogram": QuantSpec(dtype=torch.int8, observer="histogram"),
}


def observer_states(rank: int | None) -> dict:
    """Observers fed rank ``rank``'s batches (None: the global batches, in one process)."""
    states = {}
    for name, spec in OBSERVER_SPECS.items():
        obs = HistogramObserver(spec) if spec.observer == "histogram" else Observer(spec)
        fq = FakeQuantize(spec).train() if spec.observer != "histogram" else None
        for step in range(CALIBRATION_STEPS):
            x = global_batch(step)[0] if rank is None else shard(rank, step)[0]
            obs(x)
            if fq is not None:
                fq(x)
        states[name] = {k: v.clone() for k, v in obs.state_dict().items()}
        if fq is not None:
            states[name + "_fake_quant"] = {k: v.clone() for k, v in fq.state_dict().items()}
    return states


def calibration_worker(rank: int) -> dict:
    batches = [shard(rank, s)[0] for s in range(CALIBRATION_STEPS)]
    err = io.StringIO()
    result = {}
    with contextlib.redirect_stderr(err):
        for name in calibration_configs():
            result[name] = artefacts(qgraph.convert(calibrated(name, batches)))
    result["stderr"] = err.getvalue()
    result["observers"] = observer_states(rank)
    return result


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("name", ["minmax", "moving_average", "histogram"])
def test_sharded_calibration_equals_one_process(ranks, name):
    batches = [global_batch(s)[0] for s in range(CALIBRATION_STEPS)]
    model = float_digits()
    with torch.no_grad():  # premise: the float model computes each sample alike in any batch
        for s, batch in enumerate(batches):
            assert torch.equal(model(batch), torch.cat([model(shard(r, s)[0]) for r in range(WORLD)]))
    reference = artefacts(qgraph.convert(calibrated(name, batches)))
    for rank in ranks:
        assert_same(rank["calibration"][name], reference)
    local = artefacts(qgraph.convert(calibrated(name, [shard(0, s)[0] for s in range(CALIBRATION_STEPS)])))
    with pytest.raises(AssertionError):  # rank 0's shard alone calibrates another model
        assert_same(local, reference)


@pytest.mark.timeout(TIMEOUT)
def test_observers_see_the_global_batch(ranks):
    """Per-channel moving averages and histogram counts, observer by observer, bit for bit."""
    reference = observer_states(None)
    for rank in ranks:
        for name, state in reference.items():
            for key, value in state.items():
                assert torch.equal(rank["calibration"]["observers"][name][key], value), (name, key)


@pytest.mark.timeout(TIMEOUT)
def test_calibrate_progress_bar_on_rank_zero_only(ranks):
    assert "calibrate" in ranks[0]["calibration"]["stderr"]
    assert ranks[1]["calibration"]["stderr"] == ""


# --- FSDP2 ------------------------------------------------------------------------------


def llama_config() -> qgraph.QConfig:
    """Static int8 everywhere but adds: the causal mask's -inf stays out of any observer."""
    return qgraph.QConfig().set_operator(aten.add.Tensor, None)


def fsdp_worker(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=16)
    prepared = qgraph.prepare_qat(Llama(cfg).train(), (torch.zeros(2, 16, dtype=torch.long),), config=llama_config())
    fully_shard(prepared)
    sharded = all(isinstance(p, DTensor) for p in prepared.parameters())
    before = prepared.tok_embeddings.weight.full_tensor().clone()
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(3):
        # rank 1 sees only the upper half of the vocabulary: different activation ranges
        tokens = torch.randint(128 * rank, 128 * (rank + 1), (4, 16), generator=g)
        loss = F.cross_entropy(prepared(tokens)[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    moved = not torch.equal(before, prepared.tok_embeddings.weight.full_tensor())
    qgraph.freeze_observers(prepared)
    quantized = qgraph.convert(prepared)  # gathers the shards: every rank calls it
    prepared.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fake_quant, converted = prepared(tokens), quantized(tokens)
    state = {k: v.detach().clone() for k, v in quantized.state_dict().items()}
    return {"sharded": sharded, "moved": moved, "losses": losses, "state": state,
            "fake_quant": fake_quant, "converted": converted}  # fmt: skip


@pytest.mark.timeout(TIMEOUT)
def test_fsdp2_llama_trains_and_converts(ranks):
    r0, r1 = (r["fsdp"] for r in ranks)
    assert r0["sharded"] and r0["moved"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"]), "ranks converted different models"
    assert torch.equal(r0["converted"], r1["converted"])
    # the gathered model is the trained one: eval-mode fake-quant and the converted graph agree.
    # Tolerance: convert stores the same qparams and folded weights, so they agree to float
    # rounding of the dequantized matmuls (1e-4 absolute on logits of order 1).
    torch.testing.assert_close(r0["converted"], r0["fake_quant"], rtol=0, atol=1e-4)


# --- one spawn for all of the above: starting two ranks costs more than their work ---------


def all_workers(rank: int) -> dict:
    return {"ddp": ddp_worker(rank), "sync_bn": sync_bn_worker(rank),
            "calibration": calibration_worker(rank), "fsdp": fsdp_worker(rank)}  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(all_workers, tmp_path_factory.mktemp("ranks"))


# --- the README's example ---------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
def test_example_qat_ddp_runs_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(ROOT / "examples" / "qat_ddp.py"), "--epochs", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT - 20, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranks agree: True" in done.stdout, done.stdout
