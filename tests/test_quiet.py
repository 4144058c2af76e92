"""qgraph.core.quiet: C++ stderr lines and known library warnings stay off the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from qgraph.core.quiet import VERBOSE_ENV, quiet

PYTREE_NOTE = "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile"


def test_fd2_is_dropped_on_success(capfd):
    with quiet(native_stderr=True):
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_fd2_comes_back_when_the_block_fails(capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with quiet(native_stderr=True):
            os.write(2, b"dropped? no: the block fails\n")
            raise RuntimeError("boom")
    assert capfd.readouterr().err == "dropped? no: the block fails\n"


def test_nested_blocks_restore_stderr_once(capfd):
    with quiet(native_stderr=True):
        with quiet(native_stderr=True):
            os.write(2, b"inner\n")
        os.write(2, b"outer\n")
    os.write(2, b"visible\n")
    assert capfd.readouterr().err == "visible\n"


def test_without_native_stderr_fd2_is_left_alone(capfd):
    """Around whole exports only the known messages are filtered: a warning meant for the
    user still reaches stderr."""
    with quiet():
        os.write(2, b"for the user\n")
    assert capfd.readouterr().err == "for the user\n"


def test_verbose_env_turns_it_off(capfd, monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with quiet(native_stderr=True):
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"


def test_known_log_record_dropped_others_kept(caplog):
    logger = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"), quiet():
        logger.warning("%s. Calling register_constant() on Enum subclasses is deprecated", PYTREE_NOTE)
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_only_the_exporters_own_warnings_are_dropped():
    exporter = compile('import warnings; warnings.warn("translation note")', "<torch.onnx>", "exec")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            exec(exporter, {"__name__": "torch.onnx._internal.exporter._core"})
            warnings.warn("the user's own warning")
    assert [str(w.message) for w in seen] == ["the user's own warning"]


SCRIPT = textwrap.dedent(
    """
    import torch, qgraph
    from qgraph.models.digits import DigitsCNN
    x = torch.randn(2, 1, 8, 8)
    prepared = qgraph.prepare_ptq(DigitsCNN().eval(), (x,))
    qgraph.calibrate(prepared, [x], progress=False)
    q = qgraph.convert(prepared)
    report = qgraph.export_pte(q, (x[:1],), "m.pte")
    for _ in range(2):
        qgraph.load_pte(report.path)(x[:1])
    qgraph.load_onnx(qgraph.export_onnx(q, (x,), "m.onnx"))(x)
    print("done")
    """
)


@pytest.mark.parametrize("verbose", ["0", "1"])
def test_export_and_load_write_nothing_to_stderr(tmp_path, verbose):
    """A fresh process (the KernelPreference note and the CPU probe come once per process):
    export and load of both formats leave stderr empty; with QGRAPH_VERBOSE=1 the pinned
    torch / torchao still log the pytree note, which shows what the quiet run kept out."""
    env = {**os.environ, VERBOSE_ENV: verbose}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    if verbose == "0":
        assert done.stderr == ""
    else:
        assert "KernelPreference" in done.stderr
