"""What the command line reads besides the model: calibration data and the ``--config`` file.

Calibration data (``--calib``) is one of

* a folder of images (PNG, JPEG, GIF, WebP; read with ``torchvision.io``, in sorted name
  order): each is read as RGB, its shorter side resized to the input's and center-cropped to
  ``H×W`` (the usual ImageNet evaluation transform), scaled to [0, 1] and normalised with the
  ImageNet mean (0.485, 0.456, 0.406) and standard deviation (0.229, 0.224, 0.225);
* a ``.npy`` (``numpy.load``, no pickles) or ``.pt`` (``torch.load(weights_only=True)``)
  file holding one tensor of shape ``N×C×H×W`` (or one sample ``C×H×W``);
* an integer ``N``: ``N`` batches of standard normal noise. Ranges then fit noise, not your
  data, so the command warns.

The config file (``--config overrides.toml``, read with ``tomllib``) keeps layers in float or
quantizes them, by module path or module type::

    strict = false                  # true: a conv / linear no rule quantizes is an error
    keep_first_last_float = false   # true: the first and last conv / linear stay float

    [module_name]                   # regular expression on the module path (re.fullmatch;
    "fc" = "float"                  #   a match also covers the module's submodules)
    "layer4\\\\.1\\\\..*" = "quantize"

    [module_type]                   # importable class path
    "torch.nn.Linear" = "float"

``"float"`` keeps matching layers in float, ``"quantize"`` gives them the mode's scheme
(the backend's int8 scheme, its dynamic scheme, or 8da4w); as in :class:`qgraph.QConfig`, a
module name wins over a module type. Any other key or value is an error naming it.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qgraph.core.errors import ConfigError
from qgraph.quant.config import QConfig
from qgraph.quant.rules import QuantScheme

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CONFIG_KEYS = {"strict", "keep_first_last_float", "module_name", "module_type"}
_ACTIONS = ("float", "quantize")


def calibration_batches(source: str, input_shape: tuple[int, ...], batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """The batches ``--calib source`` names, each ``≤ batch_size × input_shape[1:]``."""
    sample = tuple(input_shape[1:])
    if source.isdigit():
        count = int(source)
        if count < 1:
            raise ConfigError("--calib 0: give at least one batch")
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(batch_size, *sample, generator=g) for _ in range(count)]
    path = Path(source)
    if path.is_dir():
        data = _read_images(path, sample)
    elif path.is_file() and path.suffix in (".npy", ".pt"):
        data = _read_tensor(path, sample)
    elif not path.exists():
        raise ConfigError(f"--calib {source}: no such file or folder (give a folder of images, a .npy / .pt file or a number)")
    else:
        raise ConfigError(f"--calib {source}: expected a folder of images, a .npy / .pt tensor file or a number of random batches")
    return list(torch.split(data, batch_size))


def _read_images(folder: Path, sample: tuple[int, ...]) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    if len(sample) != 3 or sample[0] != 3:
        raise ConfigError(
            f"--calib {folder}: images feed inputs of shape N×3×H×W, this model takes N×{'×'.join(map(str, sample))}; "
            "give a .npy / .pt tensor file instead"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    height, width = sample[1:]
    images = []
    for file in files:
        try:
            image = decode_image(str(file), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise ConfigError(f"--calib: cannot read image {file} ({exc})") from exc
        image = F.center_crop(F.resize(image, min(height, width), antialias=True), [height, width])
        images.append(F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(images)


def _read_tensor(path: Path, sample: tuple[int, ...]) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        try:
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise ConfigError(f"--calib {path}: not an array numpy.load reads without pickles ({exc})") from exc
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and runtime errors alike mean "not a tensor file"
            raise ConfigError(f"--calib {path}: not a file torch.load(weights_only=True) reads ({type(exc).__name__})") from exc
        if not isinstance(data, torch.Tensor):
            raise ConfigError(f"--calib {path}: holds a {type(data).__name__}, not one tensor")
    if tuple(data.shape) == sample:
        data = data.unsqueeze(0)
    if tuple(data.shape[1:]) != sample or len(data) == 0:
        want = "×".join(map(str, sample))
        raise ConfigError(f"--calib {path}: shape {tuple(data.shape)} is not N×{want} (the model's input without the batch)")
    if not data.is_floating_point():
        raise ConfigError(f"--calib {path}: dtype {data.dtype}, expected float inputs")
    return data.float()


def load_config(path: str, base: QConfig, scheme: QuantScheme) -> QConfig:
    """``base`` with the overrides of the TOML file at ``path``; ``"quantize"`` means ``scheme``."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"--config {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(table) - _CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; the keys are {sorted(_CONFIG_KEYS)}")
    for flag in ("strict", "keep_first_last_float"):
        if flag in table:
            if not isinstance(table[flag], bool):
                raise ConfigError(f"--config {path}: {flag} = {table[flag]!r}, expected true or false")
            setattr(base, flag, table[flag])
    _apply(path, "module_name", table.get("module_name", {}), scheme, lambda key, s: base.set_module_name(_regex(path, key), s))
    _apply(path, "module_type", table.get("module_type", {}), scheme, lambda key, s: base.set_module_type(_class(path, key), s))
    return base


def _apply(path: str, section: str, entries: object, scheme: QuantScheme, setter: Callable) -> None:
    if not isinstance(entries, dict):
        raise ConfigError(f"--config {path}: [{section}] must be a table of \"key\" = \"float\" | \"quantize\"")
    for key, action in entries.items():
        if action not in _ACTIONS:
            raise ConfigError(f"--config {path}: [{section}] {key!r} = {action!r}; use \"float\" or \"quantize\"")
        setter(key, None if action == "float" else scheme)


def _regex(path: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--config {path}: [module_name] {pattern!r} is not a regular expression ({exc})") from exc
    return pattern


def _class(path: str, dotted: str) -> type:
    module_name, _, name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"--config {path}: [module_type] {dotted!r} cannot be imported ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"--config {path}: [module_type] {dotted!r} is not an nn.Module class")
    return cls
