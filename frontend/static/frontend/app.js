/* The dashboard's behaviour: live panels (template partials polled), plots fed by the JSON
   API, copy and download buttons. Reads only: every change goes through a form
   (CSRF-protected). */
(function () {
  "use strict";

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) { throw new Error(url + ": " + r.status); }
        return r.json();
      });
  }

  function every(ms, fn) {
    var busy = false;
    function tick() {
      if (busy || document.hidden) { return; }
      busy = true;
      Promise.resolve().then(fn).catch(function (e) { console.warn(e); })
        .then(function () { busy = false; });
    }
    tick();
    return window.setInterval(tick, ms);
  }

  /* ---- live partials: <div data-poll="url" data-interval="2000"> */
  function pollPanels() {
    document.querySelectorAll("[data-poll]").forEach(function (panel) {
      var url = panel.getAttribute("data-poll");
      var ms = parseInt(panel.getAttribute("data-interval") || "2000", 10);
      var timer = window.setInterval(function () {
        if (document.hidden) { return; }
        fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
          .then(function (r) {
            if (r.redirected || !r.ok) {
              if (r.redirected) { window.clearInterval(timer); window.location.reload(); }
              throw new Error(url + ": " + r.status);
            }
            return r.text();
          })
          .then(function (html) {
            panel.innerHTML = html;
            panel.setAttribute("data-updated", String(Date.now()));
          })
          .catch(function (e) { console.warn(e); });
      }, ms);
    });
  }

  /* ---- copy buttons */
  function copyButtons() {
    document.addEventListener("click", function (event) {
      var button = event.target.closest("button.copy");
      if (!button) { return; }
      var value = button.getAttribute("data-copy");
      var done = function () {
        button.textContent = "Copied";
        window.setTimeout(function () { button.textContent = "Copy"; }, 1500);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(value).then(done, function () { select(button); });
      } else {
        select(button);
      }
    });
    function select(button) {
      var code = button.previousElementSibling;
      var range = document.createRange();
      range.selectNodeContents(code);
      var sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      button.textContent = "Press Ctrl+C";
    }
  }

  /* ---- download buttons: save the text of an element as a file (a key shown once) */
  function downloadButtons() {
    document.addEventListener("click", function (event) {
      var button = event.target.closest("button.download");
      if (!button) { return; }
      var source = document.getElementById(button.getAttribute("data-download"));
      if (!source) { return; }
      var blob = new Blob([source.textContent], { type: "application/x-pem-file" });
      var link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = button.getAttribute("data-filename") || "download.pem";
      document.body.appendChild(link);
      link.click();
      window.setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
    });
  }

  /* ---- selects that apply themselves (filters) */
  function autoSubmit() {
    document.querySelectorAll("select.autosubmit").forEach(function (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    });
  }

  /* ---- overview: total and per-export throughput, live */
  function overviewChart() {
    var box = document.getElementById("throughput-chart");
    if (!box) { return; }
    var url = box.getAttribute("data-rates");
    var span = 5 * 60 * 1000;
    var total = [], perExport = {};
    every(2000, function () {
      return getJSON(url).then(function (data) {
        var t = Date.now(), sum = 0;
        data.exports.forEach(function (e) {
          var v = (e.bytes_read_per_s || 0) + (e.bytes_written_per_s || 0);
          sum += v;
          (perExport[e.name] = perExport[e.name] || []).push([t, v]);
        });
        total.push([t, sum]);
        var cut = t - span;
        total = total.filter(function (p) { return p[0] >= cut; });
        var series = [{ name: "total", points: total }];
        Object.keys(perExport).sort().forEach(function (name) {
          perExport[name] = perExport[name].filter(function (p) { return p[0] >= cut; });
          series.push({ name: name, points: perExport[name] });
        });
        window.Charts.line(box, series, { format: "bytes", suffix: "/s", span: span, legend: true });
      });
    });
  }

  /* ---- export page: ops, bytes and latency over time from history + live counters */
  function sumOf(v) {
    if (v === null || v === undefined) { return 0; }
    if (typeof v === "number") { return v; }
    if (Array.isArray(v)) { return v.reduce(function (a, b) { return a + b; }, 0); }
    return Object.keys(v).reduce(function (a, k) { return a + v[k]; }, 0);
  }

  function exportCharts() {
    var box = document.getElementById("export-charts");
    if (!box) { return; }
    var historyUrl = box.getAttribute("data-history");
    var liveUrl = box.getAttribute("data-live");
    var select = document.getElementById("history-window");
    var samples = [];  // cumulative: {t, ops, br, bw, ls, lc}

    function add(s) {
      if (samples.length && s.t <= samples[samples.length - 1].t) { return; }
      samples.push(s);
    }

    function draw() {
      var seconds = parseInt(select.value, 10);
      var cut = Date.now() - seconds * 1000;
      samples = samples.filter(function (s) { return s.t >= cut - 60000; });
      var ops = [], br = [], bh = [], bw = [], lat = [];
      for (var i = 1; i < samples.length; i += 1) {
        var a = samples[i - 1], b = samples[i], dt = (b.t - a.t) / 1000;
        if (dt <= 0) { continue; }
        var d = function (k) { return Math.max(0, b[k] - a[k]); };
        ops.push([b.t, d("ops") / dt]);
        br.push([b.t, d("br") / dt]);
        bh.push([b.t, d("bh") / dt]);
        bw.push([b.t, d("bw") / dt]);
        var n = d("lc");
        lat.push([b.t, n ? d("ls") / n / 1000 : 0]);
      }
      var span = seconds * 1000;
      window.Charts.line(document.getElementById("chart-ops"), [{ name: "ops/s", points: ops }],
        { span: span });
      window.Charts.line(document.getElementById("chart-bytes"),
        [{ name: "read (data)", points: br }, { name: "written", points: bw },
          { name: "read as holes", points: bh }],
        { format: "bytes", suffix: "/s", span: span });
      window.Charts.line(document.getElementById("chart-latency"),
        [{ name: "mean latency", points: lat }], { span: span, suffix: " ms" });
    }

    function loadHistory() {
      return getJSON(historyUrl + "?seconds=" + select.value).then(function (rows) {
        samples = rows.map(function (r) {
          return { t: Date.parse(r.at), ops: r.ops, br: r.bytes_read, bw: r.bytes_written, bh: r.hole_bytes,
            ls: r.latency_sum_us, lc: r.latency_count };
        });
        draw();
      });
    }

    select.addEventListener("change", loadHistory);
    loadHistory().catch(function (e) { console.warn(e); draw(); }).then(function () {
      every(2000, function () {
        return getJSON(liveUrl).then(function (live) {
          if (live.serving && live.at) {
            add({ t: live.at * 1000, ops: sumOf(live.ops), br: live.bytes_read || 0,
              bw: live.bytes_written || 0, bh: live.hole_bytes || 0, ls: live.latency_sum_us || 0,
              lc: sumOf(live.latency_counts) });
          }
          draw();
        });
      });
    });
  }

  /* ---- feature adoption chart */
  function featureChart() {
    var box = document.getElementById("feature-chart");
    var data = document.getElementById("feature-data");
    if (box && data) { window.Charts.bars(box, JSON.parse(data.textContent)); }
    var period = document.getElementById("period");
    if (period) {
      period.addEventListener("change", function () {
        var range = document.querySelector(".custom-range");
        if (period.value === "custom") { range.classList.remove("hidden"); }
        else { range.classList.add("hidden"); period.form.submit(); }
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    pollPanels();
    copyButtons();
    downloadButtons();
    autoSubmit();
    overviewChart();
    exportCharts();
    featureChart();
  });
})();
