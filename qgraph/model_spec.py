"""Load a model from a short text spec, for the command line.

* ``resnet18`` or ``torchvision:resnet18`` — a torchvision classification model built from
  its definition (random init, ``num_classes`` outputs; load trained weights with
  ``weights=``), input ``1×3×224×224``;
* ``digits`` — the demo's digits CNN (random init), input ``1×1×8×8``;
* ``package.module:factory`` — any importable callable returning an ``nn.Module``; give the
  input shape;
* ``model.pt2`` — an ``ExportedProgram`` saved with ``torch.export.save``, used as it is;
  its input shape is that of the program's example inputs.

``weights`` is a state dict file read with ``torch.load(..., weights_only=True)`` (a plain
state dict, or a checkpoint holding one under ``"state_dict"`` or ``"model"``).

The input shape is the one the model serves (batch 1 by default) and the one the ``.pte``
is exported with. :meth:`LoadedModel.capture_example` has a batch of at least 2: with a
batch of 1, ``torch.export`` would fix the batch size of the captured graph.
"""

from __future__ import annotations

import difflib
import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from qgraph.core.errors import ConfigError
from qgraph.core.files import atomic_write_bytes

CONVERTED_PROGRAM_RECORD = "qgraph.json"
"""Extra file that ``qgraph quantize --out *.pt2`` stores beside a converted program."""
_FORMS = "a torchvision name (resnet18 or torchvision:resnet18), 'digits', 'package.module:factory' or a .pt2 file"


@dataclass
class LoadedModel:
    """A model (or exported program) and the shape of the input it serves."""

    name: str
    model: nn.Module | torch.export.ExportedProgram
    input_shape: tuple[int, ...]

    @property
    def is_program(self) -> bool:
        return isinstance(self.model, torch.export.ExportedProgram)

    def example(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        """A random input of the served shape (or with ``batch`` samples)."""
        shape = (batch or self.input_shape[0], *self.input_shape[1:])
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    def capture_example(self) -> torch.Tensor:
        """The example to capture with: batch ≥ 2 keeps the batch dimension dynamic; a
        program keeps the batch it was exported with."""
        return self.example(None if self.is_program else max(2, self.input_shape[0]))


def load_model(
    spec: str,
    input_shape: tuple[int, ...] | None = None,
    weights: str | None = None,
    num_classes: int = 1000,
) -> LoadedModel:
    """Build the model ``spec`` names; every refusal is a :class:`ConfigError` saying what to give."""
    if spec.endswith(".pt2"):
        if weights is not None:
            raise ConfigError(f"--weights applies to models built from code, not to the program {spec}")
        return _load_program(spec, input_shape)
    if input_shape is not None and (len(input_shape) < 2 or min(input_shape) < 1):
        raise ConfigError(f"input shape {','.join(map(str, input_shape))}: give a batch and at least one more positive size")
    if spec == "digits":
        from qgraph.models.digits import DigitsCNN

        loaded = LoadedModel(spec, DigitsCNN(), input_shape or (1, 1, 8, 8))
    elif spec.startswith("torchvision:") or ":" not in spec:
        loaded = LoadedModel(spec, _torchvision(spec.removeprefix("torchvision:"), num_classes), input_shape or (1, 3, 224, 224))
    else:
        loaded = _load_factory(spec, input_shape)
    if weights is not None:
        _load_weights(loaded.model, weights)
    loaded.model.eval()
    return loaded


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    from qgraph.models.vision import build_torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; use {_FORMS}"
        raise ConfigError(f"unknown model {name!r}: not a torchvision classification model{hint}")
    return build_torchvision(name, num_classes=num_classes)


def _load_factory(spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model spec {spec!r} is not understood; use {_FORMS}")
    if input_shape is None:
        raise ConfigError(f"model {spec!r} needs --input-shape, e.g. --input-shape 1,3,224,224")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model {spec!r}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return LoadedModel(spec, model, input_shape)


def _load_weights(model: nn.Module, path: str) -> None:
    state = _torch_load(path, "--weights")
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--weights {path}: not a state dict (a mapping of parameter names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"--weights {path} does not fit the model: {detail[:300]}") from exc


def _torch_load(path: str, what: str) -> object:
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what} {path}: not a file torch.load(weights_only=True) reads ({first})") from exc


def _load_program(path: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    program, record = load_program(path)
    if record is not None:
        raise ConfigError(f"{path} is a program qgraph already quantized; write it as .pte / .onnx with `qgraph export {path}`")
    args = program.example_inputs[0] if program.example_inputs else ()
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise ConfigError(f"{path}: the command line feeds programs of one tensor input; this one takes {len(args)} inputs")
    shape = tuple(args[0].shape)
    if input_shape is not None and tuple(input_shape) != shape:
        raise ConfigError(f"{path} was exported for inputs of shape {','.join(map(str, shape))}; drop --input-shape")
    return LoadedModel(path, program, shape)


def load_program(path: str) -> tuple[torch.export.ExportedProgram, dict | None]:
    """A saved ``ExportedProgram`` and the record ``qgraph quantize`` stored with it (None
    for any other program)."""
    import qgraph.ops.qdq  # noqa: F401  the quantize / dequantize ops a converted program calls

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    extra = {CONVERTED_PROGRAM_RECORD: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # a zip, pickle or schema error: not a program torch.export reads
        raise ConfigError(f"{path}: not a program torch.export.load reads ({type(exc).__name__}: {exc})") from exc
    return program, json.loads(extra[CONVERTED_PROGRAM_RECORD]) if extra[CONVERTED_PROGRAM_RECORD] else None


def save_program(program: torch.export.ExportedProgram, path: str, record: dict) -> None:
    """``torch.export.save`` with ``record`` as :data:`CONVERTED_PROGRAM_RECORD`, atomically
    (saved to memory first: ``torch.export.save`` warns about a file name not ending in .pt2)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={CONVERTED_PROGRAM_RECORD: json.dumps(record)})
    atomic_write_bytes(path, buffer.getvalue())
