/* Small SVG charts for the dashboard: line charts over time and grouped bars.
   No dependencies; every element is built with the DOM (no inline styles or scripts). */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function text(parent, x, y, content, cls, anchor) {
    var t = el("text", { x: x, y: y, "class": cls || "axis", "text-anchor": anchor || "start" }, parent);
    t.textContent = content;
    return t;
  }

  var UNITS = ["", "Ki", "Mi", "Gi", "Ti", "Pi"];

  function bytes(v) {
    var i = 0;
    while (Math.abs(v) >= 1024 && i < UNITS.length - 1) { v /= 1024; i += 1; }
    return (v >= 10 || i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + UNITS[i] + "B";
  }

  function number(v) {
    if (Math.abs(v) >= 1e6) { return (v / 1e6).toFixed(1) + "M"; }
    if (Math.abs(v) >= 1e4) { return (v / 1e3).toFixed(0) + "k"; }
    if (Math.abs(v) >= 100) { return v.toFixed(0); }
    if (Math.abs(v) >= 1) { return v.toFixed(1); }
    return v === 0 ? "0" : v.toFixed(2);
  }

  function niceMax(v) {
    if (!(v > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i += 1) {
      if (steps[i] * p >= v) { return steps[i] * p; }
    }
    return 10 * p;
  }

  function clock(ms) {
    var d = new Date(ms);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  /* series: [{name, points: [[timeMs, value], ...]}]; opts: {format, span (ms), empty} */
  function line(container, series, opts) {
    opts = opts || {};
    var format = opts.format === "bytes" ? bytes : number;
    var width = Math.max(container.clientWidth || 0, 280);
    var height = opts.height || 180;
    var m = { l: 64, r: 12, t: 10, b: 24 };
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height,
      "class": "plot", role: "img" });
    var all = [];
    series.forEach(function (s) { all = all.concat(s.points); });
    var now = opts.until || Date.now();
    var first = Math.min.apply(null, all.map(function (p) { return p[0]; }).concat([now - 60000]));
    /* zoom on the data while it covers less than the window (a fresh export) */
    var t0 = opts.span ? Math.max(now - opts.span, first - 10000) : first;
    var t1 = Math.max.apply(null, all.map(function (p) { return p[0]; }).concat([now]));
    var vmax = niceMax(Math.max.apply(null, all.map(function (p) { return p[1]; })
      .concat([opts.format === "bytes" ? 1024 : 0])));
    var w = width - m.l - m.r, h = height - m.t - m.b;
    function X(t) { return m.l + (t1 === t0 ? w : (t - t0) / (t1 - t0) * w); }
    function Y(v) { return m.t + h - v / vmax * h; }
    for (var i = 0; i <= 4; i += 1) {
      var v = vmax * i / 4, y = Y(v);
      el("line", { x1: m.l, x2: m.l + w, y1: y, y2: y, "class": i ? "grid" : "baseline" }, svg);
      text(svg, m.l - 6, y + 4, format(v) + (opts.suffix || ""), "axis", "end");
    }
    for (var j = 0; j <= 3; j += 1) {
      var t = t0 + (t1 - t0) * j / 3;
      text(svg, X(t), height - 6, clock(t), "axis", j === 0 ? "start" : (j === 3 ? "end" : "middle"));
    }
    series.forEach(function (s, k) {
      var pts = s.points.filter(function (p) { return p[0] >= t0; });
      if (!pts.length) { return; }
      var d = pts.map(function (p, n) {
        return (n ? "L" : "M") + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1);
      }).join(" ");
      el("path", { d: d, "class": "series s" + (k % 8) }, svg);
      if (pts.length === 1) {
        el("circle", { cx: X(pts[0][0]), cy: Y(pts[0][1]), r: 3, "class": "dot s" + (k % 8) }, svg);
      }
    });
    if (!all.length) {
      text(svg, m.l + w / 2, m.t + h / 2, opts.empty || "no data yet", "empty", "middle");
    }
    container.replaceChildren(svg);
    if (series.length > 1 || opts.legend) {
      var legend = document.createElement("div");
      legend.className = "legend";
      series.forEach(function (s, k) {
        var item = document.createElement("span");
        item.className = "key s" + (k % 8);
        var last = s.points.length ? s.points[s.points.length - 1][1] : 0;
        item.textContent = s.name + " " + format(last) + (opts.suffix || "");
        legend.appendChild(item);
      });
      container.appendChild(legend);
    }
  }

  /* data: {features: [{key, label}], groups: [{label, sessions, shares: [0..1]}]} */
  function bars(container, data) {
    var groups = data.groups, features = data.features;
    var width = Math.max(container.clientWidth || 0, 480);
    var barH = 10, gap = 8, labelW = 200, right = 48;
    var rowH = groups.length * barH + gap;
    var height = features.length * rowH + 30;
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height,
      "class": "plot bars", role: "img" });
    var w = width - labelW - right;
    for (var i = 0; i <= 4; i += 1) {
      var x = labelW + w * i / 4;
      el("line", { x1: x, x2: x, y1: 0, y2: height - 20, "class": i ? "grid" : "baseline" }, svg);
      text(svg, x, height - 6, (25 * i) + "%", "axis", "middle");
    }
    features.forEach(function (f, r) {
      var y0 = r * rowH;
      text(svg, labelW - 8, y0 + groups.length * barH / 2 + 4, f.label, "label", "end");
      groups.forEach(function (g, k) {
        var share = g.shares[r] || 0;
        var y = y0 + k * barH;
        var rect = el("rect", { x: labelW, y: y, width: Math.max(w * share, share ? 1 : 0),
          height: barH - 2, "class": "bar s" + (k % 8) }, svg);
        var title = el("title", {}, rect);
        title.textContent = g.label + ": " + Math.round(share * 100) + "% of " + g.sessions;
        if (share > 0) {
          text(svg, labelW + w * share + 4, y + barH - 3, Math.round(share * 100) + "%", "value");
        }
      });
    });
    container.replaceChildren(svg);
    var legend = document.createElement("div");
    legend.className = "legend";
    groups.forEach(function (g, k) {
      var item = document.createElement("span");
      item.className = "key s" + (k % 8);
      item.textContent = g.label + " (" + g.sessions + ")";
      legend.appendChild(item);
    });
    container.appendChild(legend);
  }

  window.Charts = { line: line, bars: bars, bytes: bytes, number: number };
})();
