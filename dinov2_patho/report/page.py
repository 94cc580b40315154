"""The report as one self-contained HTML page: inline styles, script, images and data; no network."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

PANELS = (("training", "a. Training"), ("batches", "b. Batches"), ("tree", "c. The tree"),
          ("embedding", "d. Embedding map"), ("evaluation", "e. Evaluation"))

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:10px 20px}
header a{color:#b0bec5;margin-right:14px;text-decoration:none}
h1{font-size:20px;margin:0 0 4px} h2{border-bottom:1px solid #ccc;padding-bottom:4px}
section{padding:4px 20px 12px;max-width:1400px}
img.fig{max-width:100%;display:block;margin:6px 0} #evaluation img.fig{max-width:520px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:right} th{background:#eceff1}
td:first-child,th:first-child{text-align:left}
.note{color:#8d6e63;font-style:italic}
details pre{background:#fff;border:1px solid #ddd;padding:8px;max-height:400px;overflow:auto}
#map-box{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
#map{border:1px solid #ccc;background:#fff;cursor:crosshair}
#map-tile{min-width:240px} #map-tile img{width:224px;height:224px;image-rendering:auto;border:1px solid #ccc}
#map-legend{columns:2;font-size:12px;max-height:260px;overflow:auto}
#map-legend span{display:inline-block;width:10px;height:10px;margin-right:4px}
"""

# Draws the map on a canvas; hovering shows the nearest tile, clicking pins it. `window.reportMap`
# is the hook the browser test uses to find a point's position on screen.
_SCRIPT = """
(function () {
  var src = document.getElementById('map-data');
  if (!src) return;
  var d = JSON.parse(src.textContent), n = d.x.length;
  var canvas = document.getElementById('map'), ctx = canvas.getContext('2d');
  var select = document.getElementById('map-color'), legend = document.getElementById('map-legend');
  var img = document.getElementById('map-tile-img'), info = document.getElementById('map-tile-info');
  var size = 560, pad = 10, ratio = window.devicePixelRatio || 1, pinned = -1, colors = [];
  var base = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd','#8c564b','#e377c2','#7f7f7f',
              '#bcbd22','#17becf','#aec7e8','#ffbb78','#98df8a','#ff9896','#c5b0d5','#c49c94'];
  canvas.width = size * ratio; canvas.height = size * ratio;
  canvas.style.width = size + 'px'; canvas.style.height = size + 'px';
  ctx.scale(ratio, ratio);
  function color(c) {
    return c < base.length ? base[c] : 'hsl(' + ((c * 137.508) % 360) + ',65%,50%)';
  }
  function px(i) { return [pad + d.x[i] * (size - 2 * pad), size - pad - d.y[i] * (size - 2 * pad)]; }
  function draw() {
    var col = d.colorings[select.value];
    ctx.clearRect(0, 0, size, size);
    for (var i = 0; i < n; i++) {
      var p = px(i);
      ctx.fillStyle = color(col.codes[i]);
      ctx.beginPath(); ctx.arc(p[0], p[1], 3, 0, 6.2832); ctx.fill();
    }
    if (pinned >= 0) {
      var q = px(pinned);
      ctx.strokeStyle = '#000'; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(q[0], q[1], 7, 0, 6.2832); ctx.stroke();
    }
  }
  function drawLegend() {
    var col = d.colorings[select.value], counts = {};
    col.codes.forEach(function (c) { counts[c] = (counts[c] || 0) + 1; });
    var order = Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a]; });
    legend.innerHTML = '';
    order.slice(0, 40).forEach(function (c) {
      var row = document.createElement('div'), box = document.createElement('span');
      box.style.background = color(+c);
      row.appendChild(box);
      row.appendChild(document.createTextNode(col.names[c] + ' (' + counts[c] + ')'));
      legend.appendChild(row);
    });
    if (order.length > 40) {
      legend.appendChild(document.createTextNode('... ' + (order.length - 40) + ' more'));
    }
  }
  function show(i) {
    if (d.thumbs.length) { img.src = d.thumbs[i]; img.style.visibility = 'visible'; }
    var lines = ['row ' + d.row[i], 'slide ' + d.slide_names[d.slide[i]],
                 'level-0 x=' + d.tile_x[i] + ', y=' + d.tile_y[i]];
    Object.keys(d.colorings).forEach(function (k) {
      if (k !== 'slide') lines.push(k + ': ' + d.colorings[k].names[d.colorings[k].codes[i]]);
    });
    info.textContent = lines.join('\\n');
  }
  function nearest(ev) {
    var r = canvas.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
    var best = -1, bestD = 64;
    for (var i = 0; i < n; i++) {
      var p = px(i), dd = (p[0] - mx) * (p[0] - mx) + (p[1] - my) * (p[1] - my);
      if (dd < bestD) { bestD = dd; best = i; }
    }
    return best;
  }
  canvas.addEventListener('mousemove', function (ev) {
    var i = nearest(ev);
    if (i >= 0) show(i); else if (pinned >= 0) show(pinned);
  });
  canvas.addEventListener('click', function (ev) {
    pinned = nearest(ev);
    if (pinned >= 0) show(pinned);
    draw();
  });
  select.addEventListener('change', function () { draw(); drawLegend(); });
  window.reportMap = {
    count: n,
    position: function (i) {
      var r = canvas.getBoundingClientRect(), p = px(i);
      return {x: r.left + p[0], y: r.top + p[1]};
    },
    pinned: function () { return pinned; }
  };
  draw(); drawLegend();
})();
"""


@dataclass
class Panel:
    """One section: HTML fragments in order, and notes on what is missing or went wrong."""

    key: str
    parts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figure(self, uri: str | None, alt: str) -> None:
        if uri:
            self.parts.append(f'<img class="fig" alt="{html.escape(alt)}" src="{uri}">')

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, rows: list[list[Any]], header: bool = True) -> None:
        if not rows:
            return
        out = ["<table>"]
        for i, row in enumerate(rows):
            tag = "th" if header and i == 0 else "td"
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row) + "</tr>")
        self.parts.append("".join(out) + "</table>")

    def preformatted(self, summary: str, text: str) -> None:
        self.parts.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre>"
                          f"</details>")

    def embedding_map(self, data: dict[str, Any]) -> None:
        options = "".join(f'<option value="{html.escape(k)}">{html.escape(k)}</option>'
                          for k in data["colorings"])
        payload = inline_json(data)
        self.parts.append(
            f'<p>{len(data["x"]):,} tiles, {data["method"]}; colour by '
            f'<select id="map-color">{options}</select>'
            f' — hover a point to see its tile, click to keep it.</p>'
            '<div id="map-box"><canvas id="map"></canvas>'
            '<div id="map-tile"><img id="map-tile-img" alt="tile" style="visibility:hidden">'
            '<pre id="map-tile-info">hover or click a point</pre></div><div id="map-legend"></div></div>'
            f'<script type="application/json" id="map-data">{payload}</script>')


def inline_json(data: Any) -> str:
    """`data` as JSON to place inside a <script> element: no `<` at all, so no `</script>`, `<!--` or
    `<script` in a value (a slide id, a label) can end the element early or make the HTML parser
    swallow the page's own script after it; JSON.parse reads the escapes back unchanged."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def render(title: str, subtitle: str, panels: dict[str, Panel]) -> str:
    nav = "".join(f'<a href="#{key}">{html.escape(name)}</a>' for key, name in PANELS)
    body = []
    for key, name in PANELS:
        panel = panels.get(key, Panel(key))
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in panel.notes)
        body.append(f'<section id="{key}" class="panel"><h2>{html.escape(name)}</h2>{notes}'
                    f'{"".join(panel.parts)}</section>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<div>{html.escape(subtitle)}</div><nav>{nav}</nav></header>{''.join(body)}"
            f"<script>{_SCRIPT}</script></body></html>\n")
