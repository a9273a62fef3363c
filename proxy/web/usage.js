// The usage view: images and cost per day by model, route, key or project, from the proxy's usage and costs API
// (GET /v1/organization/usage/images and /v1/organization/costs; an admin key when the proxy has keys).

import { apiFetch, errorFrom } from "./api.js";
import { $, clearError, el, setStatus, showError } from "./dom.js";

const DAY = 86400;
const COLOURS = 8; // .seg.c0 ... .seg.c7 in style.css

async function get(path, params) {
  const response = await apiFetch(`${path}?${params}`, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

function label(result, groups) {
  return groups.map((g) => result[g] ?? "-").join(" · ") || "all";
}

/** Rows {day, group, requests, images, cost, gpu, hits} from the two pages (one bucket a day). */
export function mergePages(usage, costs, groups) {
  const rows = new Map();
  const row = (day, group) => {
    const key = `${day}\u0000${group}`;
    if (!rows.has(key)) rows.set(key, { day, group, requests: 0, images: 0, cost: 0, gpu: 0, hits: 0 });
    return rows.get(key);
  };
  for (const bucket of usage.data || []) {
    for (const r of bucket.results || []) {
      const x = row(bucket.start_time, label(r, groups));
      x.requests += r.num_model_requests || 0;
      x.images += r.images || 0;
      x.gpu += r.gpu_seconds || 0;
      x.hits += r.cache_hits || 0;
    }
  }
  for (const bucket of costs.data || []) {
    for (const r of bucket.results || []) row(bucket.start_time, label(r, groups)).cost += r.amount?.value || 0;
  }
  return [...rows.values()].sort((a, b) => a.day - b.day || a.group.localeCompare(b.group));
}

function date(day) {
  return new Date(day * 1000).toISOString().slice(0, 10);
}

function draw(rows, days) {
  const groups = [...new Set(rows.map((r) => r.group))];
  const colour = (g) => `c${groups.indexOf(g) % COLOURS}`;
  const perDay = new Map(days.map((d) => [d, rows.filter((r) => r.day === d)]));
  const most = Math.max(1, ...[...perDay.values()].map((rs) => rs.reduce((s, r) => s + r.images, 0)));
  const chart = $("usage-chart");
  chart.replaceChildren(
    el("ul", { class: "usage-legend", "aria-label": "Legend" },
      groups.map((g) => el("li", {}, el("span", { class: `swatch seg ${colour(g)}`, "aria-hidden": "true" }), g))),
    ...days.map((d) => {
      const bar = el("div", { class: "usage-bar" });
      let total = 0;
      for (const r of perDay.get(d)) {
        if (!r.images) continue;
        total += r.images;
        const seg = el("span", { class: `seg ${colour(r.group)}`, title: `${r.group}: ${r.images} images` });
        seg.style.width = `${(100 * r.images) / most}%`; // CSSOM: allowed by the page's style-src 'self'
        bar.append(seg);
      }
      return el("div", { class: "usage-day" }, el("span", { class: "usage-date", text: date(d) }), bar,
        el("span", { class: "usage-total", text: `${total} image${total === 1 ? "" : "s"}` }));
    }),
  );
  $("usage-rows").replaceChildren(...rows.map((r) => el("tr", {},
    el("td", { text: date(r.day) }), el("td", { text: r.group }), el("td", { text: String(r.requests) }),
    el("td", { text: String(r.images) }), el("td", { text: `$${r.cost.toFixed(4)}` }),
    el("td", { text: r.gpu.toFixed(1) }), el("td", { text: String(r.hits) }))));
  $("usage-table").hidden = !rows.length;
}

async function load(e) {
  e.preventDefault();
  clearError();
  const days = Number($("usage-days").value) || 7;
  const groups = $("usage-group").value.split(",").filter(Boolean);
  const today = Math.floor(Date.now() / 1000 / DAY) * DAY;
  const start = today - (days - 1) * DAY;
  const params = new URLSearchParams({ start_time: String(start), bucket_width: "1d", limit: String(days) });
  for (const g of groups) params.append("group_by[]", g);
  setStatus("Loading usage…");
  try {
    const [usage, costs] = await Promise.all([get("/v1/organization/usage/images", params),
      get("/v1/organization/costs", params)]);
    const rows = mergePages(usage, costs, groups);
    draw(rows, Array.from({ length: days }, (_, i) => start + i * DAY));
    setStatus(rows.length ? `Usage of the last ${days} days.` : `No usage in the last ${days} days.`);
  } catch (err) {
    showError(err);
    setStatus("");
  }
}

export function initUsage() {
  $("usage-form").addEventListener("submit", load);
}
