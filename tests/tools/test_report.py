"""The HTML pass report: drawn and clicked in headless Chromium, offline, written atomically.

The browser tests drive Debian's ``/usr/bin/chromium`` through the ``playwright`` Python
package (no ``playwright install``: nothing is downloaded). Without either the tests fail
and say what to install, so a missing browser never passes silently. Screenshots go to
``out/test-artifacts/`` for a human to look at.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import qgraph
import qgraph.tools.report
from qgraph.models.vision import build_torchvision
from qgraph.tools.report import ASSETS, EDGE_CLASSES, asset, edge_class, listing_diff, read_stage, write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"


# ---------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get update && apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing: `.venv/bin/python -m pip install playwright` "
            "(do not run `playwright install`; the tests use /usr/bin/chromium)"
        )
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """One report page; records script errors and every request that is not a local file."""

    def __init__(self, browser, html: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1600, "height": 1000})
        self.errors: list[str] = []
        self.remote: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("request", lambda req: req.url.startswith("file://") or self.remote.append(req.url))
        self.page.goto(html.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready='1']")

    def texts(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")

    def panel(self, field: str) -> str:
        return self.page.inner_text(f"#node-panel {field}")

    def close(self) -> None:
        assert self.errors == [], f"script errors in the report: {self.errors}"
        assert self.remote == [], f"the report fetched something that is not a local file: {self.remote}"
        self.page.close()


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.page.screenshot(path=str(path))
    return path


# ---------------------------------------------------------------------------- resnet18 (QAT)


def test_resnet18_report_shows_passes_drawing_diff_and_conv_panel(browser, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    prepared = qgraph.prepare_qat(build_torchvision("resnet18"), (x,), dump_dir=tmp_path)
    with torch.no_grad():
        prepared(x)
    qgraph.convert(prepared.eval(), dump_dir=tmp_path)
    html = write_report(tmp_path)
    assert html == tmp_path / "index.html"

    page = Page(browser, html)
    assert page.texts("h3.stage") == ["prepare_qat", "convert"]
    qat_passes = page.page.eval_on_selector_all(
        'li.pass[data-stage="prepare_qat"]', "els => els.map(e => e.dataset.pass)"
    )
    assert qat_passes == [
        "input", "stochastic_depth", "chunk_to_slices", "fuse_conv_bn_qat", "annotate", "resolve_specs",
        "insert_quantizers",
    ]  # fmt: skip

    page.page.click('li.pass[data-stage="prepare_qat"][data-pass="annotate"]')
    assert page.page.locator("#graph g.node.k-constant").count() == 0  # constants hidden by default
    assert page.page.locator("#diff .add").count() > 0 and page.page.locator("#diff .del").count() > 0
    conv_inputs = page.page.eval_on_selector_all(
        '#graph path.edge[data-dst="conv2d"]', "els => els.map(e => e.getAttribute('class'))"
    )
    assert any("c-int8" in c for c in conv_inputs), conv_inputs  # activation and weight edges are int8

    page.page.click('g.node[data-name="conv2d"]')
    assert page.panel(".name") == "conv2d"
    assert "int8[-128,127] affine PerTensor" in page.panel(".spec")
    assert "int8[-127,127] sym PerChannel(axis=0)" in page.panel(".spec")
    assert page.panel(".rule") == "conv_relu"
    assert page.panel(".module") == "conv1" and "Conv2d" in page.panel(".module-type")
    assert "torchvision/models/resnet.py" in page.panel(".stack")
    assert page.page.locator('g.node[data-name="conv2d"].selected').count() == 1
    print("screenshot:", _screenshot(page, "report_resnet18.png"))

    assert page.page.url.endswith("#prepare_qat/004_annotate/conv2d")  # a link to this view
    page.page.reload()
    page.page.wait_for_selector("body[data-ready='1']")
    assert page.panel(".name") == "conv2d" and page.panel(".rule") == "conv_relu"

    page.page.click('li.pass[data-stage="prepare_qat"][data-pass="insert_quantizers"]')
    assert page.page.locator("#graph g.node.k-quantizer.added").count() > 0  # fake-quants this pass added
    assert page.panel(".name") == "conv2d"  # the selection follows to the next pass
    page.page.click('li.pass[data-stage="convert"][data-pass="quantize_weights"]')
    assert page.page.locator("#graph g.node.k-quantize").count() > 0
    assert page.page.locator("#graph g.node.k-dequantize").count() > 0
    page.page.check("#show-constants")
    assert page.page.locator("#graph g.node.k-constant").count() > 0
    page.close()


# ---------------------------------------------------------------------------- vit_b_16 (PTQ)


def test_vit_b_16_report_search_finds_and_opens_a_node(browser, tmp_path):
    start = time.perf_counter()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    qgraph.prepare_ptq(build_torchvision("vit_b_16").eval(), (x,), dump_dir=tmp_path)
    html = write_report(tmp_path)
    json_bytes = sum(p.stat().st_size for p in tmp_path.glob("*/*.json"))
    assert html.stat().st_size < json_bytes / 3, "strings and unchanged passes should be stored once"

    page = Page(browser, html)
    page.page.click('li.pass[data-stage="prepare_ptq"][data-pass="insert_quantizers"]')
    drawn = page.page.locator("#graph g.node").count()
    assert 0 < drawn <= 300, f"a ~800-node pass should open collapsed into module groups, drew {drawn}"

    page.page.fill("#search", "linear_5")
    page.page.click('#search-results li[data-name="linear_5"]')  # opens the module group it sits in
    node = page.page.locator('g.node[data-name="linear_5"]')
    assert node.count() == 1 and "selected" in node.get_attribute("class")
    page.page.click("#node-panel")  # clear focus, then click the node in the drawing itself
    node.click()
    assert page.panel(".name") == "linear_5"
    assert page.panel(".rule") == "linear"
    assert "int8[-128,127] affine PerTensor" in page.panel(".spec")
    assert "self_attention" in page.panel(".module")
    assert "torchvision/models/vision_transformer.py" in page.panel(".stack")
    print("screenshot:", _screenshot(page, "report_vit_b_16.png"))

    page.page.click('#node-panel .module a.collapse[data-module="encoder.layers.encoder_layer_1"]')
    assert page.page.locator('g.node[data-group="encoder.layers.encoder_layer_1"].selected').count() == 1
    assert page.page.locator('g.node[data-name="linear_5"]').count() == 0
    page.close()
    print(f"vit_b_16 report test: {time.perf_counter() - start:.1f}s")


# ---------------------------------------------------------------------------- small graph, no browser


@pytest.fixture
def small_dump(conv_bn_net, image_batch, tmp_path) -> Path:
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,), dump_dir=tmp_path)
    qgraph.calibrate(prepared, [image_batch], progress=False)
    qgraph.convert(prepared, dump_dir=tmp_path)
    return tmp_path


def test_report_is_self_contained_and_offline(small_dump):
    text = write_report(small_dump).read_text()
    assert re.search(r"https?://", text) is None
    assert re.search(r"<(link|img|iframe)\b|<script[^>]*\bsrc=|@import|url\(", text) is None
    assert '<li class="pass' in text and "prepare_ptq" in text and "convert" in text


def test_report_is_written_atomically(small_dump, monkeypatch):
    html = write_report(small_dump)
    before = html.read_text()
    (small_dump / "prepare_ptq" / "000_input.txt").write_text("%x = placeholder[x]()  | changed\n")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_report(small_dump)
    assert html.read_text() == before  # the old page is intact
    assert [p.name for p in small_dump.iterdir() if p.name.endswith(".tmp")] == []  # no leftovers


def test_small_report_in_browser_listing_module_filter_and_text_only_pass(browser, small_dump):
    next((small_dump / "prepare_ptq").glob("*_fold_conv_bn.json")).unlink()  # an older dump: text only
    page = Page(browser, write_report(small_dump))
    page.page.click('li.pass[data-stage="prepare_ptq"][data-pass="fold_conv_bn"]')
    assert "no graph data" in page.page.text_content("#graph")
    page.page.click("#tab-listing")
    assert page.page.locator("#listing .ln").count() > 5

    page.page.click('li.pass[data-stage="prepare_ptq"][data-pass="annotate"]')
    page.page.click('#listing .ln[data-name="conv2d"]')  # a listing line selects its node
    assert page.panel(".name") == "conv2d" and page.panel(".rule")
    page.page.click('#listing .ln[data-name="flatten"]')  # a shared spec, resolved through two hops
    out = page.page.inner_text("#node-panel .spec .out")
    assert out == "out: shared with ('max_pool2d', 'flatten') = int8[-128,127] affine PerTensor (qparams group relu_1)"
    page.page.select_option("#module-filter", "conv2")
    modules = page.page.eval_on_selector_all("#graph g.node[data-name]", "els => els.map(e => e.dataset.name)")
    assert modules and "conv2d" not in modules  # only conv2's nodes are drawn
    page.close()


def test_report_module_reads_dumps_without_torch():
    """``qgraph report DIR`` starts without torch: the report reads files, not graphs."""
    code = "import sys, qgraph.tools.report; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_report_needs_dumps(tmp_path):
    with pytest.raises(FileNotFoundError, match="dump_dir="):
        write_report(tmp_path)


def test_unchanged_pass_is_stored_once(small_dump):
    text = write_report(small_dump).read_text()
    datas = [json.loads(m) for m in re.findall(r'<script type="application/json" id="pass-\d+">(.*?)</script>', text)]
    assert any("same_as" in d for d in datas)  # e.g. resolve_specs changes no node of this graph


# ---------------------------------------------------------------------------- reads JSON fields only


def test_report_reads_json_fields_not_the_text_dumps(small_dump):
    """Garbling every text dump of a pass that has its JSON leaves the page as it was."""
    before = write_report(small_dump).read_text()
    for path in [*small_dump.glob("*/[0-9][0-9][0-9]_*.txt"), *small_dump.glob("*/[0-9][0-9][0-9]_*.diff")]:
        path.write_text("%not = a[listing](of) :: this graph\n")
    (small_dump / "prepare_ptq" / "index.txt").write_text("999_bogus True 12.5 7\n")
    assert write_report(small_dump).read_text() == before


def test_diff_from_json_listings_equals_the_diff_file(small_dump):
    """The page's diff is computed from two passes' node lines; it says what ``.diff`` says."""
    passes = read_stage(small_dump / "convert")
    prefix = {"context": " ", "added": "+", "removed": "-", "header": "", "hunk": ""}
    compared = 0
    for before, after in zip(passes, passes[1:]):
        ours = [prefix[tag] + text for tag, text, _ in listing_diff(before, after)]
        theirs = (small_dump / "convert" / f"{after.stem}.diff").read_text().splitlines()
        assert ours == theirs, after.stem
        names = {name for tag, _, name in listing_diff(before, after) if tag in ("added", "removed")}
        assert None not in names  # every changed line knows its node
        compared += bool(ours)
    assert compared >= 2  # freeze_qparams and quantize_weights change the graph


def test_pass_seconds_and_modified_come_from_index_json(small_dump):
    index = json.loads((small_dump / "prepare_ptq" / "index.json").read_text())
    page = write_report(small_dump).read_text()
    meta = json.loads(re.search(r'<script type="application/json" id="qgraph-meta">(.*?)</script>', page).group(1))
    shown = {m["stem"]: (m["seconds"], m["modified"]) for m in meta["passes"] if m["stage"] == "prepare_ptq"}
    assert shown == {e["stem"]: (e["seconds"], e["modified"]) for e in index["passes"]}


def test_json_of_another_format_version_is_shown_as_text(small_dump):
    path = next((small_dump / "prepare_ptq").glob("*_annotate.json"))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "schema": "qgraph.dump/1"}))
    passes = {p.name: p for p in read_stage(small_dump / "prepare_ptq")}
    assert passes["annotate"].record is None
    assert passes["annotate"].listing and all(name is None for _, name in passes["annotate"].listing)


# ---------------------------------------------------------------------------- edge dtypes


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"dtype": "int8", "quant_min": -128, "quant_max": 127}, "int8"),
        ({"dtype": "int8", "quant_min": -127, "quant_max": 127}, "int8"),
        ({"dtype": "uint8", "quant_min": 0, "quant_max": 255}, "uint8"),
        ({"dtype": "int8", "quant_min": -8, "quant_max": 7}, "int4"),  # 16 values: 4 bits in int8
        ({"dtype": "uint8", "quant_min": 0, "quant_max": 15}, "int4"),
        ({"dtype": "int8", "quant_min": -16, "quant_max": 15}, "int8"),  # 32 values: 5 bits
        ({"dtype": "int32", "quant_min": -(2**31), "quant_max": 2**31 - 1}, "int32"),
        ({"dtype": "int16", "quant_min": -(2**15), "quant_max": 2**15 - 1}, "quant"),
        ({"dtype": "float32", "quant_min": None, "quant_max": None}, "float"),
        ({"dtype": "int8", "quant_min": None, "quant_max": None}, "int8"),  # an int8 value, range unknown
        ({"dtype": "int64", "quant_min": None, "quant_max": None}, "float"),  # indices and counters
        ({"dtype": None}, "float"),
    ],
)
def test_edge_class_from_fields(fields, expected):
    assert edge_class(fields) == expected


def test_edge_colours_follow_the_json_edges(small_dump):
    """Every drawn edge's class is :func:`edge_class` of the dumped edge it stands for."""
    page = write_report(small_dump).read_text()
    meta = json.loads(re.search(r'<script type="application/json" id="qgraph-meta">(.*?)</script>', page).group(1))
    k = next(i for i, m in enumerate(meta["passes"]) if m["stage"] == "prepare_ptq" and m["pass"] == "annotate")
    data = json.loads(re.search(rf'<script type="application/json" id="pass-{k}">(.*?)</script>', page).group(1))
    record = json.loads(next((small_dump / "prepare_ptq").glob("*_annotate.json")).read_text())
    names = [n["name"] for n in record["nodes"]]
    drawn = {(names[a], names[b]): EDGE_CLASSES[c] for a, b, c in zip(*[iter(data["edges"])] * 3)}
    assert drawn == {(e["src"], e["dst"]): edge_class(e) for e in record["edges"]}
    assert drawn[("x", "conv2d")] == "int8" and "float" in drawn.values()


# ---------------------------------------------------------------------------- assets


def test_report_assets_script_parses_with_node(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: `node --check` is the JavaScript parser this test runs")
    script = tmp_path / "report.js"
    script.write_text(asset("report.js"))
    result = subprocess.run([node, "--check", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_node_check_fails_on_a_broken_script(tmp_path):
    """The parse check above can fail: a missing brace is a syntax error to ``node --check``."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: `node --check` is the JavaScript parser this test runs")
    script = tmp_path / "broken.js"
    script.write_text(asset("report.js").rstrip().removesuffix("})();"))
    assert subprocess.run([node, "--check", str(script)], capture_output=True, timeout=60).returncode != 0


class _TagChecker(HTMLParser):
    """Records every end tag that does not close the innermost open element."""

    VOID = {"meta", "input", "br", "img", "link", "hr", "col", "source", "wbr", "area", "base", "embed", "track"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> at line {self.getpos()[0]} closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()


def _html_problems(text: str) -> list[str]:
    checker = _TagChecker()
    checker.feed(text)
    checker.close()
    return checker.problems + [f"<{tag}> is never closed" for tag in checker.open]


def test_report_assets_html_is_well_formed():
    template = asset("report.html")
    assert _html_problems(template) == []
    assert _html_problems("<main><div></main>")  # the checker can fail
    placeholders = set(re.findall(r"\$(\w+)", template))
    assert placeholders == {"title", "css", "passes", "data", "js"}


def test_written_report_is_well_formed_and_fills_every_placeholder(small_dump):
    page = write_report(small_dump).read_text()
    assert _html_problems(page) == []
    assert "$" not in page.split("<script", 1)[0]  # head, style and sidebar: nothing left unfilled


def _css_rules(css: str) -> list[str]:
    """Top-level rules of a style sheet without at-rules, checking braces as it goes."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    assert "@" not in css, "the check below does not handle at-rules; extend it"
    rules, depth, start = [], 0, 0
    for i, ch in enumerate(css):
        if ch == "{":
            assert depth == 0, f"nested brace at {css[max(0, i - 40) : i]!r}"
            depth = 1
        elif ch == "}":
            assert depth == 1, f"unbalanced }} at {css[max(0, i - 40) : i]!r}"
            depth = 0
            rules.append(css[start : i + 1].strip())
            start = i + 1
    assert depth == 0 and not css[start:].strip(), "text after the last rule"
    return rules


def test_report_assets_css_is_well_formed():
    rules = _css_rules(asset("report.css"))
    assert len(rules) > 50
    for rule in rules:
        selector, body = rule[:-1].split("{")
        assert selector.strip(), rule
        for declaration in filter(str.strip, body.split(";")):
            prop, sep, value = declaration.partition(":")
            assert sep and re.fullmatch(r"\s*-?[a-z-]+\s*", prop) and value.strip(), f"bad declaration in {rule!r}"
    with pytest.raises(AssertionError):
        _css_rules("a { color: red; } }")


def test_chromium_keeps_every_css_rule(browser):
    """Chromium's own CSS parser drops a rule it cannot parse: it must keep all of them."""
    css = asset("report.css")
    page = browser.new_page()
    page.set_content(f"<style>{css}</style>")
    kept = page.evaluate("document.styleSheets[0].cssRules.length")
    page.close()
    assert kept == len(_css_rules(css))


def test_report_assets_are_ascii_and_declared_as_package_data():
    """ASCII, because the page is written as ASCII (``<script>`` does not decode ``&#...;``),
    and every asset file matches a ``package-data`` pattern, so that a wheel ships it."""
    for name in ASSETS:
        asset(name).encode("ascii")
    folder = Path(qgraph.tools.report.__file__).parent / "report_assets"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ASSETS)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["qgraph.tools"]
    for name in ASSETS:
        assert any(fnmatch.fnmatch(f"report_assets/{name}", p) for p in patterns), name


def test_setuptools_build_copies_the_report_assets(tmp_path):
    """``build_py`` is the step of ``pip install .`` / ``pip wheel`` that lays out the package,
    package data included (a full wheel build would need the ``wheel`` package offline). It
    runs on a clean copy of the sources: an old ``*.egg-info/SOURCES.txt`` would add files that
    ``pyproject.toml`` does not declare."""
    root, src, lib = Path(__file__).resolve().parents[2], tmp_path / "src", tmp_path / "lib"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("qgraph", "passes", "backends", "models"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "--build-lib", str(lib)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ASSETS:
        assert (lib / "qgraph" / "tools" / "report_assets" / name).read_text() == asset(name)
