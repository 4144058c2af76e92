(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const META = JSON.parse($("#qgraph-meta").textContent);
  const STR = JSON.parse($("#qgraph-strings").textContent);
  const FIELDS = META.fields, CLASSES = META.edge_classes;
  const NODE_W = 168, NODE_H = 34, GAP_X = 22, GAP_Y = 30, MARGIN = 16;
  const AUTO_COLLAPSE_ABOVE = 500, COLLAPSED_TARGET = 250;
  const cache = new Map();
  const state = { k: -1, P: null, view: null, sel: null, showConst: false, filter: "",
                  depth: 0, collapsed: new Set(), expanded: new Set(), query: "", zoom: 1, tab: "diff" };

  const s = (i) => (i < 0 ? null : STR[i]);
  const esc = (t) => String(t == null ? "" : t).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // ------------------------------------------------------------------ decoding
  function rawPass(k) { return JSON.parse(document.getElementById("pass-" + k).textContent); }

  function decodeGraph(raw) {
    const nodes = raw.nodes.map((row, i) => {
      const n = { i: i };
      FIELDS.forEach((f, j) => { n[f] = s(row[j]); });
      n.module = n.module || "";
      n.stack = row[FIELDS.length].map(s).join("\n");
      const inp = row[FIELDS.length + 1], inputs = [];
      for (let j = 0; j < inp.length; j += 2) inputs.push([s(inp[j]), s(inp[j + 1])]);
      n.inputs = inputs;
      return n;
    });
    const edges = [], preds = nodes.map(() => []), succs = nodes.map(() => []);
    for (let j = 0; j < raw.edges.length; j += 3) {
      const e = { s: raw.edges[j], d: raw.edges[j + 1], c: CLASSES[raw.edges[j + 2]] };
      edges.push(e); preds[e.d].push(e.s); succs[e.s].push(e.d);
    }
    const byName = new Map(nodes.map((n) => [n.name, n]));
    return { nodes, edges, preds, succs, byName };
  }

  function decodePass(k) {
    if (cache.has(k)) return cache.get(k);
    const raw = rawPass(k);
    const graph = raw.same_as != null ? decodePass(raw.same_as).graph : decodeGraph(raw);
    const status = new Map();
    raw.added.forEach((i) => status.set(i, "added"));
    raw.changed.forEach((i) => status.set(i, "changed"));
    // listing: [text, node name] pairs; diff: [tag, text, node name] triples (name -1 when none)
    const listing = [], diff = [];
    for (let j = 0; j < raw.listing.length; j += 2) listing.push([s(raw.listing[j]), s(raw.listing[j + 1])]);
    if (raw.diff) for (let j = 0; j < raw.diff.length; j += 3) diff.push([raw.diff[j], s(raw.diff[j + 1]), s(raw.diff[j + 2])]);
    const P = { k, meta: META.passes[k], graph, status, listing, diff: raw.diff ? diff : null };
    cache.set(k, P);
    return P;
  }

  // ------------------------------------------------------------------ view model
  function inFilter(n) {
    const f = state.filter;
    return !f || n.module === f || n.module.startsWith(f + ".");
  }
  function visible(n) { return (state.showConst || n.kind !== "constant") && inFilter(n); }

  function groupOf(n, depth) {
    if (!n.module || n.kind === "input" || n.kind === "output") return null;
    const parts = n.module.split(".");
    for (let j = 1; j <= parts.length; j++) {
      const p = parts.slice(0, j).join(".");
      if (state.collapsed.has(p)) return p;
    }
    if (!depth) return null;
    for (let j = depth; j <= parts.length; j++) {
      const p = parts.slice(0, j).join(".");
      if (!state.expanded.has(p)) return p;
    }
    return null;
  }

  function buildUnits(G, depth) {
    const units = [], unitOf = new Int32Array(G.nodes.length).fill(-1), byKey = new Map();
    for (const n of G.nodes) {
      if (!visible(n)) continue;
      const g = groupOf(n, depth), key = g === null ? "n:" + n.name : "g:" + g;
      let u = byKey.get(key);
      if (!u) {
        u = { id: units.length, key, group: g, kind: g === null ? n.kind : "group", nodes: [] };
        units.push(u); byKey.set(key, u);
      }
      u.nodes.push(n); unitOf[n.i] = u.id;
    }
    return { units, unitOf };
  }

  function buildEdges(G, unitOf) {
    const edges = new Map();
    for (const e of G.edges) {
      const a = unitOf[e.s], b = unitOf[e.d];
      if (a < 0 || b < 0 || a === b) continue;
      const key = a + ">" + b, old = edges.get(key);
      if (!old) edges.set(key, { a, b, c: e.c, s: e.s, d: e.d });
      else if (old.c === "float" && e.c !== "float") old.c = e.c;
    }
    return [...edges.values()];
  }

  // Layer = longest path from the inputs, in graph order. Boxes no input reaches (weights and
  // the ops that prepare them from constants) sit as late as possible: just above their user.
  // Only edges that go forward in graph order count (grouping modules can make cycles).
  function assignLayers(units, edges) {
    const layer = new Int32Array(units.length), preds = units.map(() => []), succs = units.map(() => []);
    const fromInput = units.map((u) => u.entry);
    for (const e of edges) if (e.a < e.b) { preds[e.b].push(e.a); succs[e.a].push(e.b); }
    for (const u of units) {
      for (const p of preds[u.id]) { layer[u.id] = Math.max(layer[u.id], layer[p] + 1); fromInput[u.id] ||= fromInput[p]; }
    }
    for (let i = units.length - 1; i >= 0; i--) {
      if (fromInput[i] || !succs[i].length) continue;
      layer[i] = Math.min(...succs[i].map((v) => layer[v])) - 1;
    }
    // Side effects nothing uses (BN's num_batches_tracked += 1) go next to their graph-order neighbour.
    let recent = 0;
    units.forEach((u, i) => {
      if (fromInput[i]) recent = layer[i];
      else if (!succs[i].length) layer[i] = Math.max(layer[i], recent);
    });
    const low = Math.min(0, ...layer);
    return layer.map((l) => l - low);
  }

  function place(units, layer) {
    const rows = [];
    units.forEach((u) => { (rows[layer[u.id]] = rows[layer[u.id]] || []).push(u); });
    const widest = Math.max(1, ...rows.map((r) => (r ? r.length : 0)));
    const width = widest * (NODE_W + GAP_X) - GAP_X + 2 * MARGIN;
    rows.forEach((row, y) => {
      if (!row) return;
      const offset = (width - (row.length * (NODE_W + GAP_X) - GAP_X)) / 2;
      row.forEach((u, x) => { u.x = offset + x * (NODE_W + GAP_X); u.y = MARGIN + y * (NODE_H + GAP_Y); });
    });
    return { width, height: Math.max(60, 2 * MARGIN + rows.length * (NODE_H + GAP_Y) - GAP_Y) };
  }

  // Entries of the drawing: graph inputs, and boxes fed by nodes the module filter hides.
  function markEntries(G, units, unitOf) {
    const hiddenProducer = (p) => unitOf[p] < 0 && G.nodes[p].kind !== "constant";
    for (const u of units) u.entry = u.kind === "input" || u.nodes.some((n) => G.preds[n.i].some(hiddenProducer));
  }

  function buildView(P, depth) {
    const G = P.graph, { units, unitOf } = buildUnits(G, depth);
    markEntries(G, units, unitOf);
    const edges = buildEdges(G, unitOf);
    const size = place(units, assignLayers(units, edges));
    return { units, unitOf, edges, width: size.width, height: size.height };
  }

  function countUnits(P, depth) { return buildUnits(P.graph, depth).units.length; }

  // Large graphs open collapsed at the deepest module depth that keeps the drawing small.
  function chooseDepth(P) {
    if (countUnits(P, 0) <= AUTO_COLLAPSE_ABOVE) return 0;
    const deepest = Math.max(1, ...P.graph.nodes.map((n) => (n.module ? n.module.split(".").length : 0)));
    for (let d = Math.min(deepest, 6); d >= 1; d--) if (countUnits(P, d) <= COLLAPSED_TARGET) return d;
    return 1;
  }

  // ------------------------------------------------------------------ drawing
  function shapeSvg(kind) {
    const w = NODE_W, h = NODE_H;
    switch (kind) {
      case "quantizer":
        return `<polygon class="shape" points="10,0 ${w - 10},0 ${w},${h / 2} ${w - 10},${h} 10,${h} 0,${h / 2}"/>`;
      case "quantize": return `<polygon class="shape" points="0,0 ${w},0 ${w - 14},${h} 14,${h}"/>`;
      case "dequantize": return `<polygon class="shape" points="14,0 ${w - 14},0 ${w},${h} 0,${h}"/>`;
      case "input": case "output": return `<rect class="shape" width="${w}" height="${h}" rx="${h / 2}"/>`;
      case "group": return `<rect class="shape" width="${w}" height="${h}" rx="3"/>`;
      default: return `<rect class="shape" width="${w}" height="${h}" rx="6"/>`;
    }
  }

  function shortTarget(n) {
    if (n.kind === "quantizer" && n.quantizer_class) return n.quantizer_class;
    return String(n.target || "").replace(/^aten\./, "").replace(/^quantized_decomposed\./, "").replace(/\.default$/, "");
  }
  // Names differ at their end (conv2d_12, dequantize_per_tensor_default_7): keep both ends.
  function clip(t, m) {
    if (t.length <= m) return t;
    return t.slice(0, Math.ceil((m - 1) / 2)) + "\u2026" + t.slice(t.length - Math.floor((m - 1) / 2));
  }
  const unitName = (u) => (u.group !== null ? u.group : u.nodes[0].name);

  function unitSvg(P, u) {
    let cls = "node k-" + u.kind, attrs, label, sub, title;
    if (u.group !== null) {
      const st = u.nodes.map((n) => P.status.get(n.i)).filter(Boolean);
      if (st.includes("added")) cls += " added"; else if (st.length) cls += " changed";
      attrs = `data-group="${esc(u.group)}"`;
      label = u.group.split(".").slice(-2).join(".");
      sub = u.nodes.length + " nodes";
      title = `${u.group} (${u.nodes.length} nodes): click to open`;
    } else {
      const n = u.nodes[0], st = P.status.get(n.i);
      if (st) cls += " " + st;
      attrs = `data-name="${esc(n.name)}"`;
      label = n.name; sub = shortTarget(n); title = n.name + (n.module ? " @ " + n.module : "");
    }
    return `<g class="${cls}" ${attrs} transform="translate(${u.x},${u.y})">${shapeSvg(u.kind)}` +
      `<text x="${NODE_W / 2}" y="14">${esc(clip(label, 24))}</text>` +
      `<text class="sub" x="${NODE_W / 2}" y="27">${esc(clip(sub, 27))}</text><title>${esc(title)}</title></g>`;
  }

  function edgeSvg(view, e) {
    const A = view.units[e.a], B = view.units[e.b];
    const x1 = A.x + NODE_W / 2, y1 = A.y + NODE_H, x2 = B.x + NODE_W / 2, y2 = B.y;
    const dy = Math.max(GAP_Y, Math.abs(y2 - y1) / 3);
    const long = B.y - A.y > 4 * (NODE_H + GAP_Y) ? " long" : "";
    return `<path class="edge c-${e.c}${long}" data-a="${e.a}" data-b="${e.b}" ` +
      `data-src="${esc(unitName(A))}" data-dst="${esc(unitName(B))}" ` +
      `d="M${x1},${y1} C${x1},${y1 + dy} ${x2},${y2 - dy} ${x2},${y2}"/>`;
  }

  function renderGraph() {
    const P = state.P, svg = $("#graph");
    const view = state.view = buildView(P, state.depth);
    svg.setAttribute("viewBox", `0 0 ${view.width} ${view.height}`);
    applyZoom();
    if (!P.graph.nodes.length) {
      svg.innerHTML = `<text x="20" y="30">no graph data (JSON) for this pass: see the listing</text>`;
      $("#view-note").textContent = "";
      return;
    }
    svg.innerHTML = view.edges.map((e) => edgeSvg(view, e)).join("") + view.units.map((u) => unitSvg(P, u)).join("");
    const groups = view.units.filter((u) => u.group !== null).length;
    $("#view-note").textContent = `${view.units.length} boxes drawn for ${P.graph.nodes.length} nodes` +
      (groups ? `; ${groups} module groups (click one to open it)` : "");
    applySearch(false);
    if (state.sel) markSelected(state.sel, false);
  }

  function applyZoom() {
    const v = state.view, svg = $("#graph");
    if (!v) return;
    svg.setAttribute("width", Math.ceil(v.width * state.zoom));
    svg.setAttribute("height", Math.ceil(v.height * state.zoom));
  }

  // ------------------------------------------------------------------ text panes
  function lineDiv(cls, text, name) {
    return `<div class="${cls}"${name ? ` data-name="${esc(name)}"` : ""}>${esc(text) || " "}</div>`;
  }

  function renderListing() {
    $("#listing").innerHTML = state.P.listing.map(([t, name]) => lineDiv("ln", t, name)).join("");
  }

  function renderDiff() {
    const P = state.P, box = $("#diff");
    if (P.diff === null) { box.innerHTML = `<p class="note">First pass of the stage: nothing to compare with.</p>`; return; }
    if (!P.diff.length) { box.innerHTML = `<p class="note">No change to the listing.</p>`; return; }
    const cls = ["ctx", "add", "del", "hdr", "hunk"], prefix = [" ", "+", "-", "", ""];
    box.innerHTML = P.diff.map(([tag, t, name]) => lineDiv(cls[tag], prefix[tag] + t, name)).join("");
  }

  function showTab(tab) {
    state.tab = tab;
    document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
    $("#diff").classList.toggle("hidden", tab !== "diff");
    $("#listing").classList.toggle("hidden", tab !== "listing");
  }

  // ------------------------------------------------------------------ node panel
  function frames(stack) {
    const out = [], re = /File "([^"]+)", line (\d+), in (\S+)\n?\s*(.*)/g;
    let m;
    while ((m = re.exec(stack))) out.push({ file: m[1], line: m[2], fn: m[3], code: m[4] });
    return out;
  }
  const isLib = (f) => /\/torch\/(nn|fx|_|autograd|utils)/.test(f.file) || /\/torch\/[^/]+\.py$/.test(f.file);

  function stackHtml(stack) {
    const fr = frames(stack);
    if (!fr.length) return esc(stack || "(none)");
    return fr.map((f) => `<span class="${isLib(f) ? "lib" : "user"}">` +
      `${esc(f.file)}:${f.line} in ${esc(f.fn)}\n    ${esc(f.code)}</span>`).join("\n");
  }

  function sourceText(stack) {
    const fr = frames(stack), user = fr.filter((f) => !isLib(f));
    const f = user.length ? user[user.length - 1] : fr[fr.length - 1];
    return f ? `${f.file}:${f.line}  ${f.code}` : "(no stack trace)";
  }

  function specHtml(n) {
    // what the rule wrote (maybe "shared with ..."), then the spec it resolves to
    const declared = n.output_spec || (n.rule ? "float" : null);
    let out = declared && n.quant && n.quant !== declared ? `${declared} = ${n.quant}` : declared || n.quant || "\u2014";
    if (n.group) out += ` (qparams group ${n.group})`;
    out = `<div class="out">out: ${esc(out)}</div>`;
    const ins = n.inputs.map(([name, spec]) => `<li data-input="${esc(name)}">%${esc(name)}: ${esc(spec)}</li>`).join("");
    return out + (ins ? `<ul class="inputs">${ins}</ul>` : "");
  }

  // Each prefix of the module path is a link that collapses that module into one box.
  function moduleLinks(module) {
    if (!module) return "\u2014";
    const parts = module.split(".");
    return parts.map((part, j) => `<a class="collapse" data-module="${esc(parts.slice(0, j + 1).join("."))}" ` +
      `title="collapse ${esc(parts.slice(0, j + 1).join("."))} into one box">${esc(part)}</a>`).join(".");
  }

  function navLinks(P, idx) {
    const names = idx.map((i) => esc(P.graph.nodes[i].name));
    return names.map((name) => `<a class="nav" data-name="${name}">%${name}</a>`).join(" ") || "\u2014";
  }

  function showPanel(n) {
    const P = state.P, panel = $("#node-panel");
    const set = (sel, t) => { $(sel, panel).textContent = t == null || t === "" ? "\u2014" : t; };
    panel.classList.remove("empty");
    panel.dataset.name = n.name;
    set(".name", n.name);
    const st = P.status.get(n.i);
    $(".status", panel).textContent = st ? `${st} by pass ${P.meta.stem}` : "";
    set(".kind", n.kind + " (" + n.op + ")");
    set(".target", n.target); set(".value", n.value); set(".rule", n.rule);
    set(".quantizer", n.quantizer); set(".module-type", n.module_type);
    $(".module", panel).innerHTML = moduleLinks(n.module);
    set(".source", n.stack ? sourceText(n.stack) : null);
    set(".line", n.line);
    $(".spec", panel).innerHTML = specHtml(n);
    $(".stack", panel).innerHTML = stackHtml(n.stack);
    $(".preds", panel).innerHTML = navLinks(P, P.graph.preds[n.i]);
    $(".succs", panel).innerHTML = navLinks(P, P.graph.succs[n.i]);
  }

  function clearPanel() { const p = $("#node-panel"); p.classList.add("empty"); delete p.dataset.name; }

  // ------------------------------------------------------------------ selection
  function markSelected(name, scroll) {
    const svg = $("#graph");
    svg.querySelectorAll(".selected").forEach((e) => e.classList.remove("selected"));
    svg.querySelectorAll(".edge.hl").forEach((e) => e.classList.remove("hl"));
    const n = state.P.graph.byName.get(name), v = state.view;
    if (!n || !v) return;
    const uid = v.unitOf[n.i];
    const g = uid < 0 ? null : svg.querySelector(`g.node[data-name="${CSS.escape(name)}"]`) ||
      svg.querySelector(`g.node[data-group="${CSS.escape(v.units[uid].group || "")}"]`);
    if (g) g.classList.add("selected");
    if (uid >= 0) {
      svg.querySelectorAll(`.edge[data-a="${uid}"], .edge[data-b="${uid}"]`).forEach((e) => e.classList.add("hl"));
    }
    if (scroll && uid >= 0) {
      const u = v.units[uid], wrap = $("#graph-wrap");
      wrap.scrollTo({ left: (u.x + NODE_W / 2) * state.zoom - wrap.clientWidth / 2,
                      top: (u.y + NODE_H / 2) * state.zoom - wrap.clientHeight / 2 });
    }
  }

  function markLines(name) {
    document.querySelectorAll(".pane .sel").forEach((e) => e.classList.remove("sel"));
    if (!name) return;
    document.querySelectorAll(`.pane [data-name="${CSS.escape(name)}"]`).forEach((e) => e.classList.add("sel"));
    const pane = $("#" + state.tab), line = pane && pane.querySelector(".sel");
    if (line) line.scrollIntoView({ block: "nearest" });
  }

  function select(name, scroll) {
    const n = state.P.graph.byName.get(name);
    if (!n) return;
    state.sel = name;
    showPanel(n); markSelected(name, scroll); markLines(name); writeHash();
  }

  // Make the node drawable (constants, module filter, collapsed groups), then select it.
  function reveal(name) {
    const n = state.P.graph.byName.get(name);
    if (!n) return;
    let redraw = false;
    if (n.kind === "constant" && !state.showConst) {
      state.showConst = true; $("#show-constants").checked = true; redraw = true;
    }
    if (!inFilter(n)) { state.filter = ""; $("#module-filter").value = ""; redraw = true; }
    for (let g = groupOf(n, state.depth); g !== null; g = groupOf(n, state.depth)) {
      if (state.collapsed.has(g)) state.collapsed.delete(g); else state.expanded.add(g);
      redraw = true;
    }
    if (redraw) renderGraph();
    select(name, true);
  }

  function collapseModule(prefix) {
    state.collapsed.add(prefix);
    for (const p of [...state.expanded]) if (p === prefix || p.startsWith(prefix + ".")) state.expanded.delete(p);
    renderGraph();
    if (state.sel) markSelected(state.sel, true);
  }

  function openGroup(prefix) {
    if (state.collapsed.has(prefix)) state.collapsed.delete(prefix); else state.expanded.add(prefix);
    renderGraph();
  }

  // ------------------------------------------------------------------ search
  function matches(n, q) {
    return n.name.toLowerCase().includes(q) || String(n.target).toLowerCase().includes(q) ||
      n.module.toLowerCase().includes(q);
  }

  function applySearch(list) {
    const q = state.query.trim().toLowerCase(), svg = $("#graph"), P = state.P;
    svg.classList.toggle("searching", !!q);
    svg.querySelectorAll(".node.match").forEach((e) => e.classList.remove("match"));
    if (!q) { $("#search-results").innerHTML = ""; $("#search-count").textContent = ""; return; }
    const rank = (n) => {  // exact name first, then names that start with the query
      const name = n.name.toLowerCase();
      return name === q ? 0 : name.startsWith(q) ? 1 : name.includes(q) ? 2 : 3;
    };
    const found = P.graph.nodes.filter((n) => matches(n, q)).sort((a, b) => rank(a) - rank(b) || a.i - b.i);
    const hitUnits = new Set(found.map((n) => state.view.unitOf[n.i]).filter((u) => u >= 0));
    svg.querySelectorAll(".node").forEach((g, j) => { if (hitUnits.has(j)) g.classList.add("match"); });
    $("#search-count").textContent = `${found.length} match${found.length === 1 ? "" : "es"}`;
    if (list === false) return;
    $("#search-results").innerHTML = found.slice(0, 200).map((n) =>
      `<li class="result" data-name="${esc(n.name)}" title="${esc(n.module)}">%${esc(n.name)} ` +
      `<span class="kind">${esc(n.kind)} ${esc(shortTarget(n))}</span></li>`).join("") +
      (found.length > 200 ? `<li class="more">${found.length - 200} more\u2026</li>` : "");
  }

  // ------------------------------------------------------------------ passes
  function fillModuleFilter(P) {
    const counts = new Map();
    for (const n of P.graph.nodes) {
      if (!n.module) continue;
      const parts = n.module.split(".");
      for (let j = 1; j <= parts.length; j++) {
        const p = parts.slice(0, j).join(".");
        counts.set(p, (counts.get(p) || 0) + 1);
      }
    }
    const sel = $("#module-filter");
    sel.innerHTML = `<option value="">(all)</option>` + [...counts.keys()].sort().map((p) =>
      `<option value="${esc(p)}">${esc(p)} (${counts.get(p)})</option>`).join("");
    if (!counts.has(state.filter)) state.filter = "";
    sel.value = state.filter;
  }

  function selectPass(k, nodeName) {
    const P = state.P = decodePass(k);
    state.k = k; state.collapsed.clear(); state.expanded.clear();
    document.querySelectorAll("li.pass").forEach((li) => li.classList.toggle("active", +li.dataset.k === k));
    $("#pass-title").textContent = `${P.meta.stage} / ${P.meta.stem}  (${P.meta.nodes} nodes, ` +
      `${P.meta.added} added, ${P.meta.changed} changed)`;
    fillModuleFilter(P);
    state.depth = chooseDepth(P);
    $("#collapse-depth").value = String(state.depth);
    renderDiff(); renderListing(); renderGraph();
    applySearch();
    const name = nodeName || state.sel;
    if (name && P.graph.byName.has(name)) reveal(name); else { state.sel = null; clearPanel(); writeHash(); }
  }

  function writeHash() {
    const m = META.passes[state.k];
    const h = "#" + [m.stage, m.stem].concat(state.sel ? [state.sel] : []).map(encodeURIComponent).join("/");
    if (location.hash !== h) history.replaceState(null, "", h);
  }

  function passFromHash() {
    const parts = location.hash.slice(1).split("/").map(decodeURIComponent);
    const k = META.passes.findIndex((m) => m.stage === parts[0] && m.stem === parts[1]);
    return k < 0 ? null : { k, node: parts[2] || null };
  }

  function defaultPass() {
    const first = META.passes.length ? META.passes[0].stage : null;
    let k = 0;
    META.passes.forEach((m, j) => { if (m.stage === first) k = j; });
    return k;
  }

  // ------------------------------------------------------------------ events
  function bind() {
    $("#passes").addEventListener("click", (ev) => {
      const li = ev.target.closest("li.pass");
      if (li) selectPass(+li.dataset.k);
    });
    $("#graph").addEventListener("click", (ev) => {
      const g = ev.target.closest("g.node");
      if (!g) return;
      if (g.dataset.group !== undefined) openGroup(g.dataset.group); else select(g.dataset.name, false);
    });
    const onNav = (ev) => {
      const el = ev.target.closest("[data-name]");
      if (el) reveal(el.dataset.name);
    };
    $("#search-results").addEventListener("click", onNav);
    $("#node-panel").addEventListener("click", (ev) => {
      const link = ev.target.closest("a.collapse");
      if (link) collapseModule(link.dataset.module); else if (ev.target.closest("a.nav")) onNav(ev);
    });
    $("#diff").addEventListener("click", onNav);
    $("#listing").addEventListener("click", onNav);
    $("#search").addEventListener("input", (ev) => { state.query = ev.target.value; applySearch(); });
    $("#search").addEventListener("keydown", (ev) => {
      const first = $("#search-results li.result");
      if (ev.key === "Enter" && first) reveal(first.dataset.name);
      if (ev.key === "Escape") { ev.target.value = ""; state.query = ""; applySearch(); }
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "/" && document.activeElement !== $("#search")) { ev.preventDefault(); $("#search").focus(); }
    });
    $("#show-constants").addEventListener("change", (ev) => { state.showConst = ev.target.checked; renderGraph(); });
    $("#collapse-depth").addEventListener("change", (ev) => {
      state.depth = +ev.target.value; state.collapsed.clear(); state.expanded.clear(); renderGraph();
    });
    $("#module-filter").addEventListener("change", (ev) => { state.filter = ev.target.value; renderGraph(); });
    $("#expand-all").addEventListener("click", () => {
      state.depth = 0; state.collapsed.clear(); state.expanded.clear();
      $("#collapse-depth").value = "0"; renderGraph();
    });
    $("#zoom-in").addEventListener("click", () => { state.zoom = Math.min(2, state.zoom * 1.25); applyZoom(); });
    $("#zoom-out").addEventListener("click", () => { state.zoom = Math.max(0.05, state.zoom / 1.25); applyZoom(); });
    $("#zoom-fit").addEventListener("click", () => {
      state.zoom = Math.min(1, $("#graph-wrap").clientWidth / state.view.width); applyZoom();
    });
    document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
      showTab(b.dataset.tab); markLines(state.sel);
    }));
  }

  bind();
  if (META.passes.length) {
    const start = passFromHash();
    selectPass(start ? start.k : defaultPass(), start ? start.node : null);
  }
  document.body.dataset.ready = "1";
})();
