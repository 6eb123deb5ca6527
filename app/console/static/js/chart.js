// Training curves as plain SVG (no chart library, nothing inline for the CSP to refuse): one chart per metric,
// one polyline per step, x = epoch.

import {h} from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const W = 360;
const H = 170;
const PAD = {left: 46, right: 10, top: 10, bottom: 24};

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function tick(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(1) : Number(v.toPrecision(3)).toString();
}

/**
 * A chart of `series` = [{label, points: [[x, y], ...]}] titled `name`. The figure carries data-metric and
 * data-points (how many points it draws), which the browser tests read.
 */
export function lineChart(name, series) {
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => PAD.left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img"}, svg("title", {}, name),
    svg("line", {x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis"}),
    svg("line", {x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis"}),
    svg("text", {x: PAD.left - 4, y: PAD.top + 8, class: "tick end"}, tick(y1)),
    svg("text", {x: PAD.left - 4, y: H - PAD.bottom, class: "tick end"}, tick(y0)),
    svg("text", {x: PAD.left, y: H - 6, class: "tick"}, `epoch ${x0}`),
    svg("text", {x: W - PAD.right, y: H - 6, class: "tick end"}, String(x1)));
  series.forEach((s, i) => {
    const points = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", {points, class: `line c${i % 6}`}));
    if (s.points.length === 1) {
      const [x, y] = s.points[0];
      chart.append(svg("circle", {cx: sx(x), cy: sy(y), r: 2.5, class: `dot c${i % 6}`}));
    }
  });
  const last = series.at(-1)?.points.at(-1);
  return h("figure", {class: "curve", dataset: {metric: name, points: String(all.length)}},
    h("figcaption", {}, name, last ? h("span", {class: "muted"}, ` · last ${tick(last[1])}`) : null),
    chart,
    series.length > 1 ? h("div", {class: "legend"}, series.map((s, i) => h("span", {class: `key c${i % 6}`}, s.label)))
      : null);
}

/** Metric points [{step, epoch, name, value}] -> one chart per name (in first-seen order). */
export function curves(points) {
  const byName = new Map();
  for (const p of points) {
    if (!byName.has(p.name)) byName.set(p.name, new Map());
    const bySeries = byName.get(p.name);
    if (!bySeries.has(p.step)) bySeries.set(p.step, []);
    bySeries.get(p.step).push([p.epoch, p.value]);
  }
  return Array.from(byName, ([name, bySeries]) => lineChart(name,
    Array.from(bySeries, ([step, pts]) => ({label: `step ${step}`, points: pts.sort((a, b) => a[0] - b[0])}))));
}
