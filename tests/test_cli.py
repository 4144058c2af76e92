"""The command line: ``qgraph inspect`` and ``qgraph report`` end to end, and its errors."""

from __future__ import annotations

import pytest

from qgraph.cli import main


def test_inspect_writes_dumps_and_report_and_prints_where(tmp_path, capsys):
    dump = tmp_path / "dumps"
    assert main(["inspect", "digits", "--mode", "ptq", "--dump", str(dump)]) == 0
    out = capsys.readouterr().out
    report = dump / "index.html"
    assert f"report: {report}" in out and report.is_file()
    # one text dump per prepare pass, in pipeline order
    names = sorted(p.name for p in (dump / "prepare_ptq").glob("*.txt") if p.name != "index.txt")
    assert names == ["000_input.txt", "001_stochastic_depth.txt", "002_chunk_to_slices.txt", "003_fold_conv_bn.txt",
                     "004_annotate.txt", "005_resolve_specs.txt", "006_insert_quantizers.txt"]  # fmt: skip
    assert "<html" in report.read_text(encoding="utf-8")[:200].lower()


def test_report_rewrites_the_page_of_a_dump_dir(tmp_path, capsys):
    dump = tmp_path / "d"
    main(["inspect", "digits", "--dump", str(dump)])
    (dump / "index.html").unlink()
    capsys.readouterr()
    assert main(["report", str(dump)]) == 0
    assert capsys.readouterr().out.strip() == str(dump / "index.html")
    assert (dump / "index.html").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "nosuchthing"], "use 'digits', 'torchvision:NAME' or 'package.module:factory'"),
        (["inspect", "os:getcwd", "--input-shape", "1,3"], "returned str, not an nn.Module"),
        (["inspect", "digits", "--backend", "tpu"], "tpu"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--dump", str(tmp_path / "d")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
