(function () {
  "use strict";
  var root = document.documentElement;
  try {
    var D = JSON.parse(document.getElementById("opf-data").textContent);
    var T = D.timeline, bars = T.bars, lanes = T.lanes, F = {};
    T.fields.forEach(function (f, i) { F[f] = i; });
    var AXIS = 22, GROUP = 20, LANE = 22, BAR = 14, PAD = 10;
    var scroll = document.getElementById("tl-scroll");
    var labels = document.getElementById("tl-labels");
    var tip = document.getElementById("tip");

    function esc(s) {
      return String(s).replace(/[&<>"]/g, function (c) {
        return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c];
      });
    }
    function dur(s) {
      if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
      if (s < 10) return s.toFixed(2) + " s";
      if (s < 60) return s.toFixed(1) + " s";
      var m = Math.floor(Math.round(s) / 60), r = Math.round(s) % 60;
      if (m < 60) return m + " min " + r + " s";
      return Math.floor(m / 60) + " h " + (m % 60) + " min";
    }
    function bytes(n) {
      var u = ["B", "KiB", "MiB", "GiB", "TiB"], v = n, i = 0;
      while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
      return i === 0 ? n + " B" : v.toFixed(1) + " " + u[i];
    }

    function shorten(m) {  // "host:/a/long/scratch/path" → "host:…/scratch/path"
      if (m.length <= 30) return m;
      var host = m.split(":")[0];
      return host.slice(0, 12) + ":…" + m.slice(-(26 - Math.min(12, host.length)));
    }

    // lanes: a header row per machine, then its engines
    var y = AXIS, laneY = [], lab = [], last = null;
    lanes.forEach(function (ln, i) {
      if (ln.machine !== last) {
        lab.push('<div class="m" style="top:' + (y + 3) + 'px" title="' + esc(ln.machine) +
                 '">' + esc(shorten(ln.machine)) + "</div>");
        y += GROUP; last = ln.machine;
      }
      laneY.push(y);
      lab.push('<div class="e" style="top:' + (y + 3) + 'px">engine ' + esc(ln.engine) + "</div>");
      y += LANE;
    });
    var height = y + 6;
    labels.style.height = height + "px";
    labels.innerHTML = lab.join("");

    // a bar's label names its task by id, or by its job where the job has one task
    var perJob = {}, label = T.tasks.map(function (t) {
      var job = t.slice(0, t.indexOf("/"));
      perJob[job] = (perJob[job] || 0) + 1;
      return job;
    });
    label = T.tasks.map(function (t, i) {
      return perJob[label[i]] === 1 ? t : t.slice(t.indexOf("/") + 1);
    });

    var scale = 0, byTask = {}, current = -1;
    function fitScale() {
      return Math.max(1e-9, (scroll.clientWidth - 2 * PAD - 2) / Math.max(T.wall, 1e-3));
    }
    function step(pxPerSec) {
      var target = 90 / pxPerSec, p = Math.pow(10, Math.floor(Math.log10(target)));
      var m = [1, 2, 5, 10].find(function (k) { return k * p >= target; });
      return m * p;
    }
    function draw() {
      var width = Math.max(scroll.clientWidth - 2, Math.ceil(T.wall * scale + 2 * PAD));
      var out = ['<svg xmlns="http://www.w3.org/2000/svg" width="' + width + '" height="' +
                 height + '">'];
      var gy = AXIS, lastM = null;
      lanes.forEach(function (ln, i) {
        if (ln.machine !== lastM) {
          out.push('<rect class="grp" x="0" y="' + gy + '" width="' + width + '" height="' +
                   GROUP + '"/>');
          gy += GROUP; lastM = ln.machine;
        }
        out.push('<rect class="lane' + (i % 2 ? " odd" : "") + '" x="0" y="' + laneY[i] +
                 '" width="' + width + '" height="' + LANE + '"/>');
        gy += LANE;
      });
      var st = step(scale);
      for (var t = 0; t <= T.wall + 1e-9; t += st) {
        var x = (PAD + t * scale).toFixed(1);
        out.push('<line class="tick" x1="' + x + '" x2="' + x + '" y1="' + (AXIS - 4) +
                 '" y2="' + height + '"/>');
        out.push('<text class="tickl" x="' + x + '" y="' + (AXIS - 8) +
                 '" text-anchor="middle">' + (t === 0 ? "0" : dur(t)) + "</text>");
      }
      var nth = {};  // exec bars of a task so far in this attempt: alternate their shade
      for (var i = 0; i < bars.length; i++) {
        var b = bars[i];
        var bx = PAD + b[F.start] * scale, bw = Math.max(1, b[F.dur] * scale);
        var by = laneY[b[F.lane]] + (LANE - BAR) / 2;
        if (b[F.phase] === 1) nth[b[F.task]] = 0;
        var alt = b[F.phase] === 2 && (nth[b[F.task]] = (nth[b[F.task]] || 0) + 1) % 2 === 0;
        var cls = "b p" + b[F.phase] + (alt ? " alt" : "") +
                  (b[F.status] === "failed" ? " failed" : "") +
                  (b[F.status] === "timeout" ? " failed timeout" : "") +
                  (b[F.status] === "cached" ? " cached" : "");
        out.push('<rect class="' + cls + '" data-i="' + i + '" x="' + bx.toFixed(2) + '" y="' +
                 by + '" width="' + bw.toFixed(2) + '" height="' + BAR + '"/>');
        if (b[F.attempt] > 0) {
          out.push('<rect class="rt" x="' + bx.toFixed(2) + '" y="' + by + '" width="' +
                   bw.toFixed(2) + '" height="4"/>');
        }
        if (b[F.phase] === 2 && bw > 40) {  // name the step where it fits
          var name = label[b[F.task]] + " " + b[F.step], fit = Math.floor((bw - 6) / 6.2);
          if (name.length > fit) name = fit > 2 ? name.slice(0, fit - 1) + "…" : "";
          if (name) {
            out.push('<text class="bl" x="' + (bx + 3).toFixed(2) + '" y="' + (by + BAR - 4) +
                     '">' + esc(name) + "</text>");
          }
        }
      }
      out.push("</svg>");
      scroll.innerHTML = out.join("");
      byTask = {};
      var rects = scroll.querySelectorAll("rect.b");
      for (var j = 0; j < rects.length; j++) {
        var k = bars[+rects[j].getAttribute("data-i")][F.task];
        if (k >= 0) (byTask[k] = byTask[k] || []).push(rects[j]);
      }
      current = -1;
      return rects.length;
    }

    function mark(i, on) {
      if (i < 0) return;
      var b = bars[i], k = b[F.task];
      (k >= 0 ? byTask[k] : []).forEach(function (r) { r.classList.toggle("hl", on); });
      var el = scroll.querySelector('rect.b[data-i="' + i + '"]');
      if (el) el.classList.toggle("cur", on);
    }
    function show(i, ev) {
      var b = bars[i], rows = [];
      var task = b[F.task] >= 0 ? T.tasks[b[F.task]] : b[F.job] + " (every task of the job)";
      var what = T.phases[b[F.phase]] + (b[F.status] === "cached" ? " (found ready)" : "");
      function row(k, v) { rows.push('<div><span class="k">' + k + "</span>" + v + "</div>"); }
      rows.push('<div class="node">' + esc(b[F.node]) + "</div>");
      row("kind", esc(what));
      row("task", esc(task));
      if (b[F.step]) row("step", esc(b[F.step]));
      row("engine", esc(lanes[b[F.lane]].engine) + " on " + esc(lanes[b[F.lane]].machine));
      row("took", dur(b[F.dur]));
      row("started", dur(b[F.start]) + " into the run");
      row("bytes", bytes(b[F.bytes]) + (b[F.phase] === 2 ? " written" :
          b[F.phase] === 3 ? " copied back" : " staged"));
      var status = b[F.status] === "failed" ? "<b style=\"color:#ff8a80\">failed</b>" :
                   b[F.status] === "timeout" ? "<b style=\"color:#ff8a80\">timed out</b>" :
                   esc(b[F.status]);
      if (b[F.exit] !== null && b[F.exit] !== undefined) {
        status += ", exit status " + esc(b[F.exit]);
      }
      row("status", status);
      if (b[F.attempt] > 0) row("attempt", (b[F.attempt] + 1) + " (a retry)");
      tip.innerHTML = rows.join("");
      tip.hidden = false;
      move(ev);
    }
    function move(ev) {
      var w = tip.offsetWidth, h = tip.offsetHeight;
      var x = ev.clientX + 14, yy = ev.clientY + 14;
      if (x + w > window.innerWidth - 4) x = Math.max(4, ev.clientX - w - 14);
      if (yy + h > window.innerHeight - 4) yy = Math.max(4, ev.clientY - h - 14);
      tip.style.left = x + "px"; tip.style.top = yy + "px";
    }
    scroll.addEventListener("mousemove", function (ev) {
      var a = ev.target.getAttribute && ev.target.getAttribute("data-i");
      var i = a === null || a === undefined ? -1 : +a;
      if (i !== current) {
        mark(current, false); current = i; mark(i, true);
        if (i < 0) tip.hidden = true; else show(i, ev);
      } else if (i >= 0) move(ev);
    });
    scroll.addEventListener("mouseleave", function () {
      mark(current, false); current = -1; tip.hidden = true;
    });
    document.querySelectorAll(".zoom button").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var z = +btn.getAttribute("data-z");
        var centre = (scroll.scrollLeft + scroll.clientWidth / 2 - PAD) / scale;
        scale = z === 0 ? fitScale() : Math.max(fitScale(), scale * z);
        fitted = scale === fitScale();
        draw();
        scroll.scrollLeft = Math.max(0, centre * scale + PAD - scroll.clientWidth / 2);
      });
    });
    var fitted = true;
    window.addEventListener("resize", function () {
      if (fitted) { scale = fitScale(); draw(); }
    });

    scale = fitScale();
    var drawn = draw();
    root.setAttribute("data-opf-ready", String(drawn));
  } catch (err) {
    root.setAttribute("data-opf-error", String(err && err.stack || err));
    throw err;
  }
})();
