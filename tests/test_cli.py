"""The command line end to end: every subcommand, what it prints, and one-line errors.

``quantize`` runs torchvision resnet18 at 1×3×64×64, calibrated on four PNG images written
here, to ``.pte`` and to ``.onnx``; the other commands run the digits CNN (8×8 inputs) to
stay fast. Commands run in this process through :func:`qgraph.cli.main`, except the start-up
checks, which need a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import qgraph
from qgraph.cli import main
from qgraph.demo import output_scale
from qgraph.model_spec import load_program

RESNET = ["resnet18", "--input-shape", "1,3,64,64"]


def run(capsys, *argv: str) -> str:
    """Run ``qgraph argv``; it must succeed and print nothing on stderr. Its stdout."""
    assert main(list(argv)) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    return captured.out


def fails(capsys, *argv: str) -> str:
    """Run ``qgraph argv``; it must exit 2 with one line on stderr. That line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qgraph: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four random RGB PNGs of 80×96 (not the input size: the command resizes and crops)."""
    import torchvision

    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        torchvision.io.write_png((torch.rand(3, 80, 96, generator=g) * 255).to(torch.uint8), str(folder / f"{i}.png"))
    return folder


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    """Sixteen digits-shaped samples as a .npy file."""
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    return path


def test_quantize_resnet18_from_images_to_pte(tmp_path, capsys, images):
    out = tmp_path / "r18.pte"
    text = run(capsys, "quantize", *RESNET, "--calib", str(images), "--out", str(out))
    assert "layers quantized: 21 of 21 conv / linear / matmul (100.0 % of MACs" in text
    assert f"wrote {out}:" in text and "XNNPACK delegate:" in text
    y = qgraph.load_pte(out)(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_quantize_resnet18_x86_to_onnx_with_a_dynamic_batch(tmp_path, capsys, images):
    out = tmp_path / "r18.onnx"
    text = run(capsys, "quantize", f"torchvision:{RESNET[0]}", *RESNET[1:], "--backend", "x86", "--calib", str(images), "--out", str(out))
    assert "layers quantized: 21 of 21" in text and "QuantizeLinear ×" in text and "DequantizeLinear ×" in text
    assert qgraph.load_onnx(out)(torch.randn(3, 3, 64, 64)).shape == (3, 1000)


def test_quantize_to_pt2_then_export_gives_the_converted_programs_numbers(tmp_path, capsys, digits_data):
    program = tmp_path / "d.pt2"
    text = run(capsys, "quantize", "digits", "--mode", "qat-eval", "--calib", str(digits_data), "--out", str(program))
    assert "quantized digits (qat-eval, xnnpack scheme)" in text and "layers quantized: 3 of 3" in text
    converted, record = load_program(str(program))
    assert record == {
        "qgraph": qgraph.__version__, "backend": "xnnpack", "mode": "qat-eval", "input_shape": [1, 1, 8, 8], "dynamic_batch": True
    }  # fmt: skip
    run(capsys, "export", str(program), "--out", str(tmp_path / "d.pte"))
    run(capsys, "export", str(program), "--out", str(tmp_path / "d.onnx"))
    reference = converted.module()
    x = torch.from_numpy(np.load(digits_data))
    with torch.no_grad():
        ref = reference(x)
    # qgraph's XNNPACK .pte and the x86-free ONNX model of the digits CNN compute the
    # converted graph's integers (tests/test_conformance.py): within one output step.
    step = output_scale(reference)
    pte = qgraph.load_pte(tmp_path / "d.pte")
    assert max((pte(x[i : i + 1]) - ref[i : i + 1]).abs().max().item() for i in range(4)) <= step * 1.001
    assert (qgraph.load_onnx(tmp_path / "d.onnx")(x) - ref).abs().max().item() <= step * 1.001


def test_dynamic_and_8da4w_need_no_calibration(tmp_path, capsys):
    text = run(capsys, "quantize", "digits", "--mode", "dynamic", "--out", str(tmp_path / "d.onnx"))
    assert "layers quantized: 3 of 3" in text and "DynamicQuantizeLinear ×2" in text
    text = run(capsys, "quantize", "digits", "--mode", "8da4w", "--out", str(tmp_path / "d.pte"))
    assert "layers quantized: 1 of 3" in text  # the linear; convs have no int4 group-wise form, stay float, no warning


def test_config_file_keeps_modules_in_float(tmp_path, capsys, digits_data):
    config = tmp_path / "c.toml"
    config.write_text('[module_name]\n"classifier\\\\.2" = "float"\n[module_type]\n"torch.nn.Conv2d" = "float"\n"torch.nn.Linear" = "quantize"\n')
    text = run(capsys, "coverage", "digits", "--config", str(config))
    assert "layers quantized: 0 of 3" in text  # a module name wins over a module type
    config.write_text('[module_type]\n"torch.nn.Conv2d" = "float"\n')
    text = run(capsys, "quantize", "digits", "--calib", str(digits_data), "--config", str(config), "--out", str(tmp_path / "d.pt2"))
    assert "layers quantized: 1 of 3" in text


def test_weights_and_a_program_file_are_models(tmp_path, capsys, digits_data):
    from qgraph.models.digits import DigitsCNN

    model = DigitsCNN().eval()
    torch.nn.init.constant_(model.classifier[2].bias, 3.0)  # every logit near 3: random weights give near 0
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    run(capsys, "quantize", "digits", "--weights", str(tmp_path / "w.pt"), "--calib", str(digits_data), "--out", str(tmp_path / "d.pt2"))
    converted, _ = load_program(str(tmp_path / "d.pt2"))
    x = torch.from_numpy(np.load(digits_data))
    with torch.no_grad():
        assert (converted.module()(x) - model(x)).abs().max().item() < 0.1  # a few int8 steps of a range around 3
    torch.export.save(torch.export.export(model, (x[:2],)), tmp_path / "float.pt2")
    text = run(capsys, "quantize", str(tmp_path / "float.pt2"), "--calib", str(digits_data), "--out", str(tmp_path / "p.pt2"))
    assert f"quantized {tmp_path / 'float.pt2'} (ptq" in text and "layers quantized: 3 of 3" in text


def test_random_calibration_warns_in_one_line(tmp_path, capsys):
    assert main(["quantize", "digits", "--calib", "2", "--out", str(tmp_path / "d.pt2")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "qgraph: warning: calibrating on 2 batches of random noise: ranges fit noise, not your data "
        "(give --calib a folder of images or a tensor file)"
    ]


def depthwise_net() -> torch.nn.Module:
    """Five depthwise convs: dynamic quantization keeps each in float with a warning."""
    return torch.nn.Sequential(*[torch.nn.Conv2d(4, 4, 3, padding=1, groups=4) for _ in range(5)])


def test_a_factory_model_and_many_warnings_in_a_few_lines(capsys):
    assert main(["coverage", f"{__name__}:depthwise_net", "--input-shape", "1,4,8,8", "--mode", "dynamic"]) == 0
    out, err = capsys.readouterr()
    assert "layers quantized: 0 of 5" in out and out.count("depthwise conv: the runtime has no dynamically") == 5
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("qgraph: warning: ") for line in lines)
    assert "'conv2d' (aten.conv2d.default) in module '0'" in lines[0] and "stays in float" in lines[0]
    assert "... and 2 more (--debug shows them" in lines[3]


def test_check_prints_the_table_of_every_form(capsys, digits_data):
    text = run(capsys, "check", "digits", "--calib", str(digits_data), "--targets", "fake_quant", "converted", "reference", "pte")
    assert "largest difference per quantized tensor" in text and "reference|pte" in text and "conv_relu" in text
    # (run() checked stderr is empty: ExecuTorch's CPU-probing lines are hidden)


def test_coverage_lists_layers_and_reasons(capsys):
    text = run(capsys, "coverage", "digits", "--mode", "dynamic", "--backend", "x86")
    assert "integer MACs: 100.0 %" in text and "classifier.2" in text


def test_inspect_writes_dumps_and_report_and_prints_a_summary(tmp_path, capsys):
    dump = tmp_path / "dumps"
    text = run(capsys, "inspect", "digits", "--mode", "ptq", "--dump", str(dump))
    report = dump / "index.html"
    assert f"report: {report}" in text and report.is_file()
    assert "digits: prepared for PTQ on xnnpack: 27 nodes, 10 quantizers" in text
    assert "layers quantized: 3 of 3" in text
    names = sorted(p.name for p in (dump / "prepare_ptq").glob("*.txt") if p.name != "index.txt")
    assert names == ["000_input.txt", "001_stochastic_depth.txt", "002_chunk_to_slices.txt", "003_fold_conv_bn.txt",
                     "004_annotate.txt", "005_resolve_specs.txt", "006_insert_quantizers.txt"]  # fmt: skip
    (dump / "index.html").unlink()
    assert run(capsys, "report", str(dump)).strip() == str(report) and report.is_file()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"qgraph {qgraph.__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "nosuchthing", "--calib", "1", "--out", "m.pte"], "unknown model 'nosuchthing'"),
        (["quantize", "resnet", "--calib", "1", "--out", "m.pte"], "did you mean resnet50 or resnet34 or resnet18?"),
        (["inspect", "os:getcwd", "--input-shape", "1,3"], "returned str, not an nn.Module"),
        (["coverage", "mypkg.models:build"], "needs --input-shape"),
        (["quantize", "digits", "--weights", "missing.pt", "--out", "m.pte"], "--weights missing.pt: no such file"),
        (["quantize", "missing.pt2", "--calib", "1", "--out", "m.pte"], "missing.pt2: no such file"),
        (["quantize", "digits", "--input-shape", "1,0,8", "--out", "m.pte"], "'1,0,8' is not a shape"),
        (["quantize", "digits", "--calib", "1", "--out", "m.tflite"], "use .pte or .onnx or .pt2"),
        (["quantize", "digits", "--out", "m.pte"], "--mode ptq needs calibration data"),
        (["quantize", "digits", "--calib", "missing_dir", "--out", "m.pte"], "--calib missing_dir: no such file or folder"),
        (["quantize", "digits", "--backend", "tpu", "--out", "m.pte"], "invalid choice: 'tpu'"),
        (["quantize", "digits", "--mode", "int3", "--out", "m.pte"], "invalid choice: 'int3'"),
        (["export", "m.onnx", "--out", "m.pte"], "expected a .pt2 program"),
        (["check", "digits", "--mode", "dynamic", "--targets", "fake_quant"], "has no fake-quant form"),
        (["report", "missing_dumps"], "report missing_dumps: no such folder"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_a_user_mistake_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in fails(capsys, *argv)
    assert not list(tmp_path.iterdir())  # nothing written


def test_file_mistakes_name_the_file(tmp_path, capsys, images):
    (tmp_path / "bad.toml").write_text('[module_name]\n"fc" = "int4"\n')
    assert "[module_name] 'fc' = 'int4'; use \"float\" or \"quantize\"" in fails(capsys, "coverage", "digits", "--config", str(tmp_path / "bad.toml"))
    (tmp_path / "bad.toml").write_text("precision = 8\n")
    assert "unknown key(s) ['precision']" in fails(capsys, "coverage", "digits", "--config", str(tmp_path / "bad.toml"))
    assert "images feed inputs of shape N×3×H×W" in fails(capsys, "quantize", "digits", "--calib", str(images), "--out", "m.pte")
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), np.float32))
    assert "is not N×1×8×8" in fails(capsys, "quantize", "digits", "--calib", str(tmp_path / "x.npy"), "--out", "m.pte")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "w.pt")
    assert "does not fit the model" in fails(capsys, "quantize", "digits", "--weights", str(tmp_path / "w.pt"), "--out", "m.pte")
    assert "qgraph export" in fails(capsys, "quantize", str(_converted_program(tmp_path)), "--out", "m.pte")
    assert "not written by `qgraph quantize" in fails(capsys, "export", str(_float_program(tmp_path)), "--out", str(tmp_path / "m.pte"))
    (tmp_path / "empty").mkdir()
    assert "no pass dumps" in fails(capsys, "report", str(tmp_path / "empty"))


def _float_program(tmp_path):
    from qgraph.models.digits import DigitsCNN

    torch.export.save(torch.export.export(DigitsCNN().eval(), (torch.randn(2, 1, 8, 8),)), tmp_path / "f.pt2")
    return tmp_path / "f.pt2"


def _converted_program(tmp_path):
    from qgraph.model_spec import save_program

    save_program(torch.export.load(_float_program(tmp_path)), str(tmp_path / "c.pt2"), {"backend": "xnnpack"})
    return tmp_path / "c.pt2"


def test_help_version_and_report_start_without_torch(tmp_path, capsys):
    """The deterministic half of the start-up claim: these paths never import torch."""
    main(["inspect", "digits", "--dump", str(tmp_path / "d")])
    capsys.readouterr()
    code = f"""
import contextlib, io, json, sys
from qgraph.cli import main
for argv in (["--help"], ["--version"], ["quantize", "--help"]):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        main(argv)
with contextlib.redirect_stdout(io.StringIO()):
    main(["report", {str(tmp_path / "d")!r}])
print(json.dumps([m for m in ("torch", "numpy", "onnx", "executorch") if m in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
    assert (tmp_path / "d" / "index.html").is_file()


def test_help_starts_in_under_a_second():
    """``qgraph --help`` in a fresh interpreter: under 1 s (the requirement).

    Measured here: 0.1-0.4 s, almost all of it the interpreter's own start on 2 cores other
    processes share; importing torch would add 5-11 s. The fastest of three runs is taken so
    that one stall of the shared machine does not decide it.
    """
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qgraph", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0, times
