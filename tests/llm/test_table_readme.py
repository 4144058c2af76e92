"""``python -m qgraph.llm.table`` rewrites a README only when given one (``--readme PATH``)."""

from __future__ import annotations

import pytest

from qgraph.core.errors import ConfigError
from qgraph.llm import table as llm_table
from qgraph.llm.table import BEGIN, END, LlmTable, Row, write_readme


def _table() -> LlmTable:
    result = LlmTable(group_size=32, rows=[Row("fp32 checkpoint", 5.5, "500 steps")], recovered=0.8)
    result.sizes = {"8da4w .pte": 300 * 1024, "fp32 .pte": 1800 * 1024}
    result.checkpoint = {"params": 460_000, "steps": 500, "seconds": 60.0, "threads": 2, "eval_tokens": 16384}
    return result


def test_the_section_between_the_markers_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold table\n{END}\n\nafter\n", encoding="utf-8")
    assert write_readme(_table(), readme)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# title\n\n" + BEGIN + "\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old table" not in text and "| fp32 checkpoint" in text


def test_a_file_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "NOTES.md"
    readme.write_text("no markers\n", encoding="utf-8")
    assert not write_readme(_table(), readme)
    assert readme.read_text(encoding="utf-8") == "no markers\n"


def test_a_missing_readme_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        write_readme(_table(), tmp_path / "README.md")


def test_cli_refuses_a_missing_readme_before_any_training(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("run_table must not start")

    monkeypatch.setattr(llm_table, "run_table", no_training)
    with pytest.raises(SystemExit) as info:
        llm_table.main(["--out", str(tmp_path), "--readme", str(tmp_path / "missing.md")])
    assert info.value.code == 2 and "no such file" in capsys.readouterr().err


def test_cli_default_prints_and_writes_no_readme(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llm_table, "run_table", lambda *args, **kwargs: _table())
    monkeypatch.setattr(llm_table.torch, "set_num_threads", lambda n: None)  # leave the session's threads
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(f"{BEGIN}\nkeep\n{END}\n", encoding="utf-8")
    assert llm_table.main(["--out", str(tmp_path / "out")]) == 0
    assert "| fp32 checkpoint" in capsys.readouterr().out
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == f"{BEGIN}\nkeep\n{END}\n"
    assert (tmp_path / "out" / "llm_table.json").is_file()
