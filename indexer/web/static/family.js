/* The family viewer: draws one `index show --format json` document with cytoscape.js (dagre layout)
 * and fills the detail panel when a model is clicked.
 *
 * Two modes, chosen by the page: a standalone file carries its data in <script id="family-data">; the web
 * app's page has <section id="family" data-show="/api/show/..." data-detail="/api/detail/"> and fetches.
 * Every repo id and card string is untrusted: text goes in through textContent only, never innerHTML.
 */
(function () {
  "use strict";

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function conf(c) { return c === null || c === undefined ? "\u2013" : Number(c).toFixed(2); }
  function num(v, digits) { return v === null || v === undefined ? "\u2013" : Number(v).toPrecision(digits || 4); }
  function day(s) { return s ? String(s).slice(0, 10) : "date ?"; }
  function encodePath(repo) { return repo.split("/").map(encodeURIComponent).join("/"); }
  function familyHref(repo) { return "/family/" + encodePath(repo); }

  // --- the graph ----------------------------------------------------------------------------------
  function colourOf(data, relation) { return data.relations[relation] || "#0891b2"; }

  function elements(data) {
    var shown = {}, out = [];
    data.nodes.forEach(function (n) { shown[n.repo_id] = true; });
    data.nodes.forEach(function (n) {
      var classes = ["model"];
      if (n.focus) classes.push("focus");
      if (n.agrees_with_declared === false) classes.push("disagree");
      out.push({ group: "nodes", classes: classes.join(" "), data: {
        id: n.repo_id, kind: "model", colour: colourOf(data, n.relation),
        label: n.repo_id + "\n" + n.relation + " \u00b7 " + conf(n.confidence) } });
      if (n.shown_parent) {
        var c = n.confidence === null ? 0.25 : n.confidence;
        out.push({ group: "edges", classes: "lineage", data: {
          id: "e\u0000" + n.repo_id, source: n.shown_parent, target: n.repo_id,
          colour: colourOf(data, n.relation), width: 1 + 5 * c } });
      }
      (n.other_parents || []).forEach(function (p) {  // a merge's further parents
        if (shown[p.repo_id]) {
          out.push({ group: "edges", classes: "merge-parent", data: {
            id: "m\u0000" + p.repo_id + "\u0000" + n.repo_id, source: p.repo_id, target: n.repo_id,
            colour: colourOf(data, "merge"), width: 1 + 5 * p.weight } });
        }
      });
      if (n.agrees_with_declared === false) {
        n.declared_base_model.split(";").map(function (s) { return s.trim(); }).forEach(function (d) {
          if (d && shown[d] && d !== n.shown_parent) {
            out.push({ group: "edges", classes: "declared", data: {
              id: "d\u0000" + d + "\u0000" + n.repo_id, source: d, target: n.repo_id } });
          }
        });
      }
    });
    data.collapsed.forEach(function (c) {
      out.push({ group: "nodes", classes: "collapsed", data: { id: c.id, kind: "collapsed", label: c.label } });
      out.push({ group: "edges", classes: "more", data: { id: "e\u0000" + c.id, source: c.parent, target: c.id } });
    });
    return out;
  }

  var STYLE = [
    { selector: "node", style: { "shape": "round-rectangle", "width": 200, "height": 40,
      "background-color": "data(colour)", "label": "data(label)", "color": "#fff", "font-size": 10,
      "text-wrap": "wrap", "text-max-width": 190, "text-valign": "center", "text-halign": "center" } },
    { selector: "node.focus", style: { "border-width": 4, "border-color": "#0f172a" } },
    { selector: "node.disagree", style: { "border-width": 4, "border-color": "#dc2626", "border-style": "double" } },
    { selector: "node.collapsed", style: { "background-color": "#f8fafc", "color": "#334155", "border-width": 1,
      "border-style": "dashed", "border-color": "#94a3b8" } },
    { selector: "node:selected", style: { "overlay-color": "#facc15", "overlay-opacity": 0.35, "overlay-padding": 4 } },
    { selector: "edge", style: { "curve-style": "taxi", "taxi-direction": "rightward", "width": "data(width)", "line-color": "data(colour)",
      "target-arrow-shape": "triangle", "target-arrow-color": "data(colour)", "arrow-scale": 0.8 } },
    { selector: "edge.more", style: { "width": 1, "line-style": "dashed", "line-color": "#94a3b8",
      "target-arrow-shape": "none" } },
    { selector: "edge.merge-parent", style: { "line-style": "dashed" } },
    { selector: "edge.declared", style: { "width": 2, "line-style": "dashed", "line-color": "#dc2626",
      "target-arrow-color": "#dc2626", "label": "declared", "font-size": 9, "color": "#dc2626",
      "curve-style": "unbundled-bezier", "control-point-distances": 70, "control-point-weights": 0.5 } }
  ];

  function draw(data, container) {
    // tall enough that a column of ~18 siblings still reads at the fitted zoom
    container.style.height = Math.max(420, Math.min(900, 40 * (data.nodes.length + data.collapsed.length))) + "px";
    var cy = cytoscape({ container: container, elements: elements(data), style: STYLE,
      wheelSensitivity: 0.3, minZoom: 0.02, maxZoom: 1.6 });
    // dagre (through cytoscape-dagre): layered, crossings minimised, generations left to right
    cy.layout({ name: "dagre", rankDir: "LR", nodeSep: 10, rankSep: 70, edgeSep: 6, padding: 20,
      fit: true, animate: false }).run();
    return cy;
  }

  // --- the legend, the summary and the table of models --------------------------------------------
  function legend(data, box) {
    Object.keys(data.relations).sort().forEach(function (rel) {
      var item = el("span", { "class": "legend-item" });
      var sw = el("span", { "class": "swatch" });
      sw.style.background = data.relations[rel];
      item.appendChild(sw);
      item.appendChild(document.createTextNode(rel));
      box.appendChild(item);
    });
    var dis = el("span", { "class": "legend-item disagree" }, "red border / dashed edge: disagrees with the declared base");
    box.appendChild(dis);
  }

  function table(data, box, pick) {
    var head = el("tr");
    ["model", "relation", "confidence", "distance", "uploaded", "declared base (when it disagrees)"].forEach(function (h) {
      head.appendChild(el("th", {}, h));
    });
    box.appendChild(head);
    data.nodes.forEach(function (n) {
      var tr = el("tr", { "data-repo": n.repo_id });
      if (n.focus) tr.className = "focus";
      var b = el("button", { "class": "pick", "type": "button" }, n.repo_id);
      b.addEventListener("click", function () { pick(n.repo_id); });
      var first = el("td"); first.appendChild(b); tr.appendChild(first);
      tr.appendChild(el("td", {}, n.relation));
      tr.appendChild(el("td", { "class": "num" }, conf(n.confidence)));
      tr.appendChild(el("td", { "class": "num" }, num(n.distance)));
      tr.appendChild(el("td", {}, day(n.created_at)));
      tr.appendChild(el("td", { "class": n.agrees_with_declared === false ? "disagree" : "" },
        n.agrees_with_declared === false ? n.declared_base_model : ""));
      box.appendChild(tr);
    });
  }

  // --- the detail panel ---------------------------------------------------------------------------
  function repoList(names, linked) {
    if (!names.length) return "\u2013";
    var ul = el("ul");
    names.forEach(function (r) {
      var li = el("li");
      li.appendChild(linked ? el("a", { href: familyHref(r) }, r) : document.createTextNode(r));
      ul.appendChild(li);
    });
    return ul;
  }

  function fill(panel, title, rows) {
    panel.querySelector("#detail-title").textContent = title;
    var dl = panel.querySelector("#detail-fields");
    dl.textContent = "";
    rows.forEach(function (row) {
      dl.appendChild(el("dt", {}, row[0]));
      var dd = el("dd", { "data-field": row[1] });
      if (row[2] instanceof Node) dd.appendChild(row[2]); else dd.textContent = String(row[2]);
      dl.appendChild(dd);
    });
  }

  function declared(base, agrees) {
    if (!base) return "(none declared)";
    var span = el("span", { "class": agrees === false ? "disagree" : "agree" },
      base + (agrees === false ? " \u2014 disagrees" : agrees ? " \u2014 agrees" : ""));
    return span;
  }

  function nodeRows(data, n) {  // what the view itself knows (the standalone file)
    var kids = data.nodes.filter(function (m) { return m.shown_parent === n.repo_id; }).map(function (m) { return m.repo_id; });
    return [["relation", "relation", n.relation], ["confidence", "confidence", conf(n.confidence)],
      ["distance", "distance", num(n.distance)], ["parent", "parent", n.parent || "(root)"],
      ["declared base", "declared_base_model", declared(n.declared_base_model, n.agrees_with_declared)],
      ["uploaded", "created_at", n.created_at || "unknown"], ["revision", "revision", n.revision],
      ["models below", "subtree", n.subtree], ["children", "children", repoList(kids, false)]];
  }

  function sketchText(s) {
    if (!s) return "\u2013";
    return "v" + s.sketch_version + " \u00b7 " + s.dim + " dims \u00b7 " + s.layers + " layers \u00b7 mean kurtosis " +
      num(s.mean_kurtosis, 3);
  }

  function detailRows(d) {  // the web app's /api/detail document
    var q = d.query;
    var chain = q.ancestry.map(function (s) { return s.parent; });
    return [["relation", "relation", d.relation || "\u2013"], ["confidence", "confidence", conf(d.confidence)],
      ["distance", "distance", num(d.distance)], ["parent", "parent", q.parent === null ? "(not placed)" : q.parent || "(root)"],
      ["merged from", "other_parents", d.other_parents && d.other_parents.length ?
        d.other_parents.map(function (p) { return p[0] + " (" + Number(p[1]).toFixed(2) + ")"; }).join(", ") : "\u2013"],
      ["declared base", "declared_base_model", declared(q.declared_base_model, q.agrees_with_declared)],
      ["uploaded", "created_at", q.created_at || "unknown"], ["indexed", "indexed_at", q.indexed_at],
      ["revision", "revision", q.revision], ["status", "status", q.status + (q.reason ? " (" + q.reason + ")" : "")],
      ["bytes read", "bytes_read", d.bytes_read === null ? "\u2013" : Number(d.bytes_read).toLocaleString("en")],
      ["weights", "weights_format", (d.weights_format || "\u2013") + (d.details ? " \u00b7 " + d.details : "")],
      ["parameters", "n_parameters", d.n_parameters ? Number(d.n_parameters).toLocaleString("en") : "\u2013"],
      ["sketch", "sketch", sketchText(d.sketch)], ["ancestry", "ancestry", repoList(chain, true)],
      ["children", "children", repoList(q.children, true)], ["siblings", "siblings", repoList(q.siblings, true)]];
  }

  // --- wiring -------------------------------------------------------------------------------------
  function start(data, detailBase) {
    var panel = document.getElementById("detail");
    var summary = document.getElementById("summary");
    if (summary) summary.textContent = data.summary;
    legend(data, document.getElementById("legend"));
    var byId = {};
    data.nodes.forEach(function (n) { byId[n.repo_id] = n; });
    var cy = draw(data, document.getElementById("cy"));
    function pick(id) {
      var node = cy.getElementById(id);
      cy.elements().unselect();
      node.select();
      panel.setAttribute("data-selected", id);
      if (node.data("kind") === "collapsed") {
        var c = data.collapsed.filter(function (x) { return x.id === id; })[0];
        fill(panel, c.label, [["parent", "parent", c.parent], ["hidden", "hidden", c.count + " children, " + c.models + " models"],
          ["see them", "hint", "index show " + c.parent + " --depth 1 --max-children " + Math.max(c.count + 1, 21)]]);
        return;
      }
      if (!detailBase) { fill(panel, id, nodeRows(data, byId[id])); panel.setAttribute("data-state", "ready"); return; }
      panel.setAttribute("data-state", "loading");
      fetch(detailBase + encodePath(id)).then(function (r) { return r.json(); }).then(function (d) {
        if (panel.getAttribute("data-selected") !== id) return;  // a later click won
        if (d.error) { fill(panel, id, [["error", "error", d.error]]); } else { fill(panel, id, detailRows(d)); }
        panel.setAttribute("data-state", "ready");
      });
    }
    cy.on("tap", "node", function (evt) { pick(evt.target.id()); });
    table(data, document.getElementById("models"), pick);
    window.familyGraph = cy;  // for people poking at the page in devtools, and for the browser tests
    document.body.setAttribute("data-drawn-ms", String(Math.round(performance.now())));  // bench/web.py reads it
    document.body.setAttribute("data-state", "drawn");
  }

  function boot() {
    var inline = document.getElementById("family-data");
    if (inline) { start(JSON.parse(inline.textContent), null); return; }
    var section = document.getElementById("family");
    if (!section) return;
    fetch(section.getAttribute("data-show") + window.location.search).then(function (r) { return r.json(); }).then(function (data) {
      if (data.error) { document.getElementById("summary").textContent = data.error; return; }
      start(data, section.getAttribute("data-detail"));
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot); else boot();
})();
