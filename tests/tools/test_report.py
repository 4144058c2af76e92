"""The HTML pass report: drawn and clicked in headless Chromium, offline, written atomically.

The browser tests drive Debian's ``/usr/bin/chromium`` through the ``playwright`` Python
package (no ``playwright install``: nothing is downloaded). Without either the tests fail
and say what to install, so a missing browser never passes silently. Screenshots go to
``out/test-artifacts/`` for a human to look at.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

import qgraph
from qgraph.models.vision import build_torchvision
from qgraph.tools.report import edge_class, spec_class, write_report

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
    page.page.select_option("#module-filter", "conv2")
    modules = page.page.eval_on_selector_all("#graph g.node[data-name]", "els => els.map(e => e.dataset.name)")
    assert modules and "conv2d" not in modules  # only conv2's nodes are drawn
    page.close()


def test_report_needs_dumps(tmp_path):
    with pytest.raises(FileNotFoundError, match="dump_dir="):
        write_report(tmp_path)


def test_unchanged_pass_is_stored_once(small_dump):
    text = write_report(small_dump).read_text()
    datas = [json.loads(m) for m in re.findall(r'<script type="application/json" id="pass-\d+">(.*?)</script>', text)]
    assert any("same_as" in d for d in datas)  # e.g. resolve_specs changes no node of this graph


# ---------------------------------------------------------------------------- edge dtypes


def _node(name, kind="op", line="", **fields):
    return {"name": name, "kind": kind, "line": line, "value": "f32[2, 8]", "input_specs": {}, **fields}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("int8[-128,127] affine PerTensor", "int8"),
        ("uint8[0,255] affine PerTensor", "uint8"),
        ("int8[-8,7] sym PerGroup", "int4"),
        ("int32[-2147483648,2147483647] sym PerTensor", "int32"),
        ("DerivedSpec", "int32"),
        ("float", "float"),
        ("shared with relu", None),
    ],
)
def test_spec_class(spec, expected):
    assert spec_class(spec) == expected


def test_edge_class_follows_shared_specs_quantizers_and_qdq_arguments():
    nodes = {
        "relu": _node("relu", output_spec="uint8[0,255] affine PerTensor"),
        "pool": _node("pool", output_spec="shared with ('relu', 'pool')", input_specs={"relu": "shared with relu"}),
        "fq": _node("fq", kind="quantizer", quantizer="FakeQuantize(int8[-8,7] sym PerChannel(axis=0), range=[-1, 1])"),
        "q": _node("q", kind="quantize", line="%q = call_function[qd.quantize_per_tensor](%x, 0.1, 0, -8, 7, int8)"),
        "w": _node("w", kind="constant", value="int8[8, 8]"),
        "dq": _node("dq", kind="dequantize", line="%dq = call_function[qd.dequantize](%w, %s, %z, 0, -127, 127, int8)"),
        "add": _node("add"),
    }
    assert edge_class(nodes["relu"], nodes["pool"], nodes) == "uint8"
    assert edge_class(nodes["fq"], nodes["add"], nodes) == "int4"
    assert edge_class(nodes["q"], nodes["add"], nodes) == "int4"
    assert edge_class(nodes["w"], nodes["dq"], nodes) == "int8"
    assert edge_class(nodes["dq"], nodes["add"], nodes) == "float"
