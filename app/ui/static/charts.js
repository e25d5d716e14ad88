// Small SVG charts drawn here, so the dashboard needs no chart library: a line chart (loss,
// learning rate) and a bar chart (pass@1). Every plotted point is a <circle class="point">.

const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 260, PAD = { left: 56, right: 16, top: 16, bottom: 36 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ticks(lo, hi, n = 5) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const step = (hi - lo) / (n - 1);
  return Array.from({ length: n }, (_, i) => lo + i * step);
}

function label(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

// series: [{name, label, points: [[x, y], ...]}]. Redraws `svg` in place.
export function lineChart(svg, series, { xLabel = "step", yLabel = "" } = {}) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  const all = series.flatMap((one) => one.points).filter(([x, y]) => isFinite(x) && isFinite(y));
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "No points yet"));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const py = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

  const axes = s("g", { class: "axes" });
  for (const t of ticks(y0, y1)) {
    axes.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: py(t), y2: py(t), class: "grid" }));
    axes.append(s("text", { x: PAD.left - 6, y: py(t) + 4, "text-anchor": "end" }, label(t)));
  }
  // Steps are whole numbers: label whole steps, where they are.
  const xTicks = [...new Set(ticks(x0, x1).map(Math.round))].filter((t) => t >= x0 && t <= x1);
  for (const t of xTicks) {
    axes.append(s("text", { x: px(t), y: H - PAD.bottom + 16, "text-anchor": "middle" }, label(t)));
  }
  axes.append(s("text", { x: W / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, xLabel));
  if (yLabel) {
    axes.append(s("text", { x: 12, y: H / 2, "text-anchor": "middle", class: "axis-label",
                            transform: `rotate(-90 12 ${H / 2})` }, yLabel));
  }
  svg.append(axes);

  series.forEach((one, i) => {
    const pts = one.points.filter(([x, y]) => isFinite(x) && isFinite(y)).sort((a, b) => a[0] - b[0]);
    const g = s("g", { class: `series series-${i}`, "data-series": one.name });
    if (pts.length > 1) {
      g.append(s("polyline", { points: pts.map(([x, y]) => `${px(x)},${py(y)}`).join(" ") }));
    }
    for (const [x, y] of pts) {
      const c = s("circle", { cx: px(x), cy: py(y), r: 3, class: "point" });
      c.append(s("title", {}, `${one.label || one.name} at ${xLabel} ${x}: ${label(y)}`));
      g.append(c);
    }
    svg.append(g);
  });

  const legend = s("g", { class: "legend" });
  series.forEach((one, i) => {
    const x = PAD.left + 8 + i * 150;
    legend.append(s("rect", { x, y: PAD.top - 10, width: 10, height: 10, class: `swatch series-${i}` }));
    legend.append(s("text", { x: x + 14, y: PAD.top - 1 }, `${one.label || one.name} (${one.points.length})`));
  });
  svg.append(legend);
}

// bars: [{name, label, value}] with values in [0, 1] (a pass rate).
export function barChart(svg, bars, { yLabel = "" } = {}) {
  svg.replaceChildren();
  const w = 420;
  svg.setAttribute("viewBox", `0 0 ${w} ${H}`);
  svg.setAttribute("role", "img");
  const inner = H - PAD.top - PAD.bottom;
  const axes = s("g", { class: "axes" });
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    const y = H - PAD.bottom - t * inner;
    axes.append(s("line", { x1: PAD.left, x2: w - PAD.right, y1: y, y2: y, class: "grid" }));
    axes.append(s("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, `${t * 100}%`));
  }
  if (yLabel) {
    axes.append(s("text", { x: 12, y: H / 2, "text-anchor": "middle", class: "axis-label",
                            transform: `rotate(-90 12 ${H / 2})` }, yLabel));
  }
  svg.append(axes);
  const slot = (w - PAD.left - PAD.right) / Math.max(bars.length, 1);
  bars.forEach((bar, i) => {
    const value = Math.max(0, Math.min(1, bar.value || 0));
    const height = value * inner;
    const x = PAD.left + i * slot + slot * 0.2;
    const g = s("g", { class: `bar bar-${bar.name}`, "data-value": bar.value });
    g.append(s("rect", { x, y: H - PAD.bottom - height, width: slot * 0.6, height: Math.max(height, 0.5),
                         class: `series-${i}` }));
    g.append(s("text", { x: x + slot * 0.3, y: H - PAD.bottom - height - 6, "text-anchor": "middle" },
               `${(value * 100).toFixed(1)}%`));
    g.append(s("text", { x: x + slot * 0.3, y: H - PAD.bottom + 16, "text-anchor": "middle" }, bar.label));
    svg.append(g);
  });
}
