"""What happens when a user gets something wrong, or brings inputs as users have them.

Each case runs one mistake (or one everyday input form) against a tiny model and checks that a
mistake raises the stated ``qgraph.core.errors`` class naming what is wrong, and leaves every
model (state dict and graph) and every file (bytes and mtime, no file added) as it was. The
README's "What happens when..." table is made from these cases: ``test_readme_table`` fails
with the new table when they disagree; ``QGRAPH_UPDATE_README=1`` rewrites it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.export import Dim

import qgraph
from qgraph.core.errors import (
    ConfigError,
    ExportError,
    InputError,
    ModelFileError,
    ModelFileNotFoundError,
    OutputPathError,
    QGraphError,
)
from qgraph.core.files import atomic_write_text


class Tiny(nn.Module):
    """conv-bn-relu → conv-relu → spatial mean → classifier, on 3×8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.classifier(torch.relu(self.conv2(x)).mean((2, 3)))


class WithErfinv(Tiny):
    """``erfinv`` has no ExecuTorch kernel and no ONNX function."""

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.classifier(torch.erfinv(torch.tanh(self.conv2(x)) * 0.5).mean((2, 3)))


class Tokens(nn.Module):
    """A transformers-style forward: ``input_ids`` and an optional ``attention_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


@dataclass
class Kit:
    """The models and files the cases work on; ``dir`` holds every file."""

    dir: Path
    x: torch.Tensor
    model: nn.Module
    prepared: torch.fx.GraphModule
    converted: torch.fx.GraphModule
    erfinv: torch.fx.GraphModule
    model64: nn.Module
    extra: dict[str, Any] = field(default_factory=dict)

    def models(self) -> dict[str, nn.Module]:
        return {"model": self.model, "prepared": self.prepared, "converted": self.converted, "erfinv": self.erfinv, "model64": self.model64}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    d = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = Tiny().eval()
    prepared = qgraph.prepare_ptq(model, (x,))
    qgraph.calibrate(prepared, [x], progress=False)
    converted = qgraph.convert(prepared)
    qgraph.export_pte(converted, (x[:1],), d / "model.pte")
    qgraph.export_onnx(converted, (x,), d / "model.onnx")
    erfinv = qgraph.prepare_ptq(WithErfinv().eval(), (x,))
    qgraph.calibrate(erfinv, [x], progress=False)
    for suffix in ("pte", "onnx"):
        data = (d / f"model.{suffix}").read_bytes()
        (d / f"empty.{suffix}").write_bytes(b"")
        (d / f"truncated.{suffix}").write_bytes(data[: len(data) // 2])
        (d / f"corrupt.{suffix}").write_bytes(data[:64] + bytes(b ^ 0xFF for b in data[64:400]) + data[400:])
        (d / f"existing.{suffix}").write_bytes(b"an earlier export")
    (d / "notes.txt").write_text("a file, not a folder")
    (d / "folder.pte").mkdir()
    return Kit(d, x, model, prepared, converted, qgraph.convert(erfinv), Tiny().double().eval())


@dataclass(frozen=True)
class Case:
    """``when``: what the user does (README); ``run(kit)``: does it; ``error``: what it raises
    (None: it works, and ``says`` tells what happens); ``names``: words the message must hold."""

    when: str
    run: Callable[[Kit], Any]
    error: type[Exception] | None
    names: tuple[str, ...] = ()
    says: str = ""


def _train_at_batch_8(k: Kit) -> None:
    prepared = qgraph.prepare_qat(Tiny().train(), (k.x[:1],))  # BN in training mode, batch 1
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):
        loss = prepared(torch.randn(8, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert prepared.meta["qgraph_inputs"].tensors[0].shape == (None, 3, 8, 8)


def _calibrate_loader(k: Kit) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.arange(8))
    prepared = qgraph.prepare_ptq(Tiny().eval(), (k.x,))
    qgraph.calibrate(prepared, torch.utils.data.DataLoader(data, batch_size=4), progress=False)
    qgraph.convert(prepared)


def _keyword_inputs(k: Kit) -> None:
    ids, mask = torch.randint(0, 16, (4, 6)), torch.ones(4, 6)
    prepared = qgraph.prepare_ptq(Tokens().eval(), {"input_ids": ids, "attention_mask": mask})
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(4)}] * 2
    qgraph.calibrate(prepared, batches, progress=False)
    qgraph.convert(prepared)


def _dynamic_size(k: Kit) -> None:
    shapes = {"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}
    prepared = qgraph.prepare_ptq(Tiny().eval(), (k.x,), dynamic_shapes=shapes)
    qgraph.calibrate(prepared, [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 8, 12)], progress=False)


CASES = [
    # -- inputs that do not match the captured ones
    Case(
        "calibrate with images of another size than the example (16×16, captured 8×8)",
        lambda k: qgraph.calibrate(k.prepared, [torch.randn(4, 3, 16, 16)], progress=False),
        InputError,
        ("'x'", "dims 2, 3", "dynamic_shapes="),
    ),
    Case(
        "export_pte with an example of another size than the captured one",
        lambda k: qgraph.export_pte(k.converted, (torch.randn(1, 3, 16, 16),), k.dir / "new.pte"),
        InputError,
        ("'x'", "export_pte"),
    ),
    Case(
        "calibrate with one tensor in place of a list of batches",
        lambda k: qgraph.calibrate(k.prepared, k.x, progress=False),
        ConfigError,
        ("[x]",),
    ),
    Case(
        "calibrate with float64 data on a float32 model",
        lambda k: qgraph.calibrate(k.prepared, [k.x.double()], progress=False),
        InputError,
        ("'x'", "float64", "float32"),
    ),
    Case(
        "call a prepared model with bfloat16 data",
        lambda k: k.prepared(k.x.bfloat16()),
        InputError,
        ("'x'", "bfloat16", "float32"),
    ),
    Case(
        "call a prepared model with two inputs where it takes one",
        lambda k: k.prepared(k.x, k.x),
        InputError,
        ("takes 1 input", "input_fn"),
    ),
    # -- models that cannot be prepared as they are
    Case(
        "prepare_ptq a float64 model",
        lambda k: qgraph.prepare_ptq(k.model64, (k.x.double(),)),
        ConfigError,
        ("conv1.weight", "float64", "model.float()"),
    ),
    Case(
        "prepare_ptq a model that is already prepared",
        lambda k: qgraph.prepare_ptq(k.prepared, (k.x,)),
        ConfigError,
        ("already prepared",),
    ),
    Case(
        "prepare_qat a converted model",
        lambda k: qgraph.prepare_qat(k.converted, (k.x,)),
        ConfigError,
        ("already converted",),
    ),
    Case(
        'QConfig().set_module_name("clasifier", None) (no such module)',
        lambda k: qgraph.prepare_ptq(k.model, (k.x,), config=qgraph.QConfig().set_module_name("clasifier", None)),
        ConfigError,
        ("'clasifier'", "'classifier'"),
    ),
    Case(
        'prepare with debug_node="conv2d_7" (no such node)',
        lambda k: qgraph.prepare_ptq(k.model, (k.x,), debug_node="conv2d_7"),
        ConfigError,
        ("'conv2d_7'", "'conv2d_1'"),
    ),
    # -- export
    Case(
        "export_pte a model with an op ExecuTorch has no kernel for (`torch.erfinv`)",
        lambda k: qgraph.export_pte(k.erfinv, (k.x[:1],), k.dir / "existing.pte"),
        ExportError,
        ("'erfinv'", "aten.erfinv.default", "test_bad_inputs.py", "Nothing was written"),
    ),
    Case(
        "export_onnx a model with an op ONNX has no function for (`torch.erfinv`)",
        lambda k: qgraph.export_onnx(k.erfinv, (k.x,), k.dir / "existing.onnx"),
        ExportError,
        ("'erfinv'", "erf_inv", "Nothing was written"),
    ),
    Case(
        "export to a path that is a directory",
        lambda k: qgraph.export_pte(k.converted, (k.x[:1],), k.dir / "folder.pte"),
        OutputPathError,
        ("folder.pte", "is a directory"),
    ),
    Case(
        "export to a path under a regular file",
        lambda k: qgraph.export_onnx(k.converted, (k.x,), k.dir / "notes.txt" / "m.onnx"),
        OutputPathError,
        ("notes.txt/m.onnx", "is a file"),
    ),
    Case(
        "export to a folder no file can be created in",
        lambda k: qgraph.export_onnx(k.converted, (k.x,), "/proc/qgraph/m.onnx"),
        OutputPathError,
        ("/proc/qgraph/m.onnx",),
    ),
    # -- loading runtime files
    Case("load_pte a file that does not exist", lambda k: qgraph.load_pte(k.dir / "missing.pte"), ModelFileNotFoundError, ("missing.pte",)),
    Case("load_pte an empty file", lambda k: qgraph.load_pte(k.dir / "empty.pte"), ModelFileError, ("empty.pte", "empty")),
    Case("load_pte a truncated file", lambda k: qgraph.load_pte(k.dir / "truncated.pte"), ModelFileError, ("truncated.pte", "truncated")),
    Case("load_pte a corrupt file", lambda k: qgraph.load_pte(k.dir / "corrupt.pte"), ModelFileError, ("corrupt.pte",)),
    Case("load_pte an .onnx file", lambda k: qgraph.load_pte(k.dir / "model.onnx"), ModelFileError, ("model.onnx", "load_onnx")),
    Case("load_onnx a file that does not exist", lambda k: qgraph.load_onnx(k.dir / "missing.onnx"), ModelFileNotFoundError, ("missing.onnx",)),
    Case("load_onnx an empty file", lambda k: qgraph.load_onnx(k.dir / "empty.onnx"), ModelFileError, ("empty.onnx", "empty")),
    Case("load_onnx a truncated file", lambda k: qgraph.load_onnx(k.dir / "truncated.onnx"), ModelFileError, ("truncated.onnx",)),
    Case("load_onnx a corrupt file", lambda k: qgraph.load_onnx(k.dir / "corrupt.onnx"), ModelFileError, ("corrupt.onnx",)),
    Case("load_onnx a .pte file", lambda k: qgraph.load_onnx(k.dir / "model.pte"), ModelFileError, ("model.pte", "load_pte")),
    Case(
        "run a batch-1 .pte on a batch of 4",
        lambda k: qgraph.load_pte(k.dir / "model.pte")(k.x),
        InputError,
        ("model.pte", "dim 0 is 4", "[1, 3, 8, 8]"),
    ),
    Case(
        "run an .onnx with float64 data",
        lambda k: qgraph.load_onnx(k.dir / "model.onnx")(k.x.double()),
        InputError,
        ("model.onnx", "'x'", "float64", "float32"),
    ),
    Case(
        "run an .onnx with two inputs where it takes one",
        lambda k: qgraph.load_onnx(k.dir / "model.onnx")(k.x, k.x),
        InputError,
        ("model.onnx", "takes 1 input"),
    ),
    # -- inputs as users have them
    Case(
        "prepare_qat with a batch-1 example (BN training), then train at batch 8",
        _train_at_batch_8,
        None,
        says="the batch dim stays dynamic (captured on the example repeated to batch 2)",
    ),
    Case(
        "calibrate with a DataLoader of `(images, labels)`",
        _calibrate_loader,
        None,
        says="a batch longer than the model's inputs gives its leading elements; `input_fn=` picks them itself",
    ),
    Case(
        'prepare with keyword inputs `{"input_ids": ..., "attention_mask": ...}`, calibrate on dicts with `labels`',
        _keyword_inputs,
        None,
        says="a dict is keyword inputs; keys the model was not captured with are left out",
    ),
    Case(
        'prepare with `dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}`, calibrate at 16×16 and 8×12',
        _dynamic_size,
        None,
        says="the inputs named take any size in those dims, the others keep a dynamic batch",
    ),
]


def _snapshot_models(k: Kit) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    out = {}
    for name, m in k.models().items():
        code = m.code if isinstance(m, torch.fx.GraphModule) else ""
        out[name] = ({key: v.detach().clone() for key, v in m.state_dict().items()}, code)
    return out


def _snapshot_files(k: Kit) -> dict[str, tuple[bytes, int] | None]:
    """Every file's bytes and mtime, and every folder (None), under ``k.dir``."""
    return {
        str(p.relative_to(k.dir)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(k.dir.rglob("*"))
    }


_OUTCOMES: dict[str, BaseException | None] = {}


def _outcome(case: Case, k: Kit) -> BaseException | None:
    """Run ``case`` once (the README test reuses the result) and check it changed nothing."""
    if case.when in _OUTCOMES:
        return _OUTCOMES[case.when]
    models, files = _snapshot_models(k), _snapshot_files(k)
    try:
        case.run(k)
        raised = None
    except Exception as exc:  # noqa: BLE001 - the case says which class it must be
        raised = exc
    after = _snapshot_models(k)
    for name, (state, code) in models.items():
        assert after[name][1] == code, f"{case.when}: the graph of '{name}' changed"
        assert state.keys() == after[name][0].keys(), f"{case.when}: the state of '{name}' changed"
        for key, value in state.items():
            assert torch.equal(value, after[name][0][key]), f"{case.when}: '{name}.{key}' changed"
    assert _snapshot_files(k) == files, f"{case.when}: a file was written, changed or removed"
    _OUTCOMES[case.when] = raised
    return raised


@pytest.mark.parametrize("case", CASES, ids=[c.when for c in CASES])
def test_case(case: Case, kit: Kit):
    raised = _outcome(case, kit)
    if case.error is None:
        assert raised is None, f"{case.when}: raised {raised!r}"
        return
    assert isinstance(raised, case.error), f"{case.when}: expected {case.error.__name__}, got {raised!r}"
    assert isinstance(raised, QGraphError)
    for word in case.names:
        assert word in str(raised), f"{case.when}: {word!r} not in the message {str(raised)!r}"


def _message(exc: BaseException, k: Kit) -> str:
    """The message as the README shows it: temporary and checkout paths made relative, the
    operating system's wording of an OS error (root and other users get different ones) elided."""
    text = str(exc).replace(str(k.dir), "out").replace(str(README.parent) + os.sep, "")
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        text = text.replace(cause.strerror, "…")
    return re.sub(r"\s*\n\s*", " ", text).replace("|", "\\|")


def readme_table(k: Kit) -> str:
    rows = ["| When you… | qgraph | and says |", "|---|---|---|"]
    for case in CASES:
        raised = _outcome(case, k)
        if case.error is None:
            rows.append(f"| {case.when} | works | {case.says} |")
        else:
            rows.append(f"| {case.when} | `{type(raised).__name__}` | {_message(raised, k)} |")
    return "\n".join(rows)


def test_readme_table(kit: Kit):
    """The README's table is what the cases produce (``QGRAPH_UPDATE_README=1`` rewrites it)."""
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"README.md lacks the {BEGIN} ... {END} markers"
    head, rest = text.split(BEGIN, 1)
    current, tail = rest.split(END, 1)
    table = readme_table(kit)
    if os.environ.get("QGRAPH_UPDATE_README") == "1":
        atomic_write_text(README, f"{head}{BEGIN}\n{table}\n{END}{tail}")
        return
    assert current.strip() == table, f"README.md's bad-inputs table is out of date; it should read:\n{table}"
