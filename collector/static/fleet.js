// The fleet page: nodes x GPUs coloured by each GPU's worst firing alert, the alerts with their
// times, one GPU's recent telemetry (uPlot charts) and the jobs, refreshed every few seconds from
// the collector's API. Everything is built with DOM calls (never innerHTML): alert summaries and
// node names are data, not markup.
import uPlot from "./vendor/uplot/uPlot.esm.js";

const REFRESH_MS = 5000;
const ALERT_WINDOW_SECONDS = 3600; // resolved alerts stay listed this long
const CHART_SECONDS = 900; // the detail charts' span
const CHART_HEIGHT = 170;
const TOKEN_KEY = "fleetwatch.apiToken";
const SEVERITY_RANK = { ok: 0, info: 1, warning: 2, critical: 3 };
const HEALTH_LABEL = { ok: "OK", info: "info", warning: "warn", critical: "CRIT", silent: "silent" };
// GpuMetrics field names (collector/storage/blocks.py FIELD_NUMBERS["gpu"]).
const CHARTS = [
  { field: "gpu_util_percent", label: "Utilisation", unit: "%", scale: 1, digits: 0 },
  { field: "power_watts", label: "Power", unit: "W", scale: 1, digits: 0 },
  { field: "temp_gpu_celsius", label: "Temperature", unit: "°C", scale: 1, digits: 0 },
  { field: "sm_clock_mhz", label: "SM clock", unit: "MHz", scale: 1, digits: 0 },
  { field: "mem_used_bytes", label: "Memory used", unit: "GiB", scale: 1 / 2 ** 30, digits: 1 },
];

const $ = (id) => document.getElementById(id);

const state = {
  status: null,
  alerts: [],
  selected: null, // {node, gpu}
  plots: new Map(), // field -> uPlot
  refreshes: 0,
  clockSkew: 0, // the collector's clock minus the browser's, in seconds
  memoryToken: "", // where localStorage is unavailable
};

// ---- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function readToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || state.memoryToken;
  } catch {
    return state.memoryToken;
  }
}

function saveToken(token) {
  state.memoryToken = token;
  try {
    localStorage.setItem(TOKEN_KEY, token);
  } catch {
    // private mode or storage off: the token lasts as long as the page
  }
}

// #token=... in the address: kept, then removed from the address bar (and so from bookmarks).
function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token === null) return;
  saveToken(token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
}

async function api(path) {
  const headers = { Accept: "application/json" };
  const token = readToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { headers, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, `collector unreachable (${err.message})`);
  }
  // Times on the page are the collector's: its Date header gives its clock to the second, and a
  // skew under 2 s is rounding, not worth correcting.
  const served = Date.parse(response.headers.get("Date") || "");
  if (!Number.isNaN(served)) {
    const skew = served / 1000 - Date.now() / 1000;
    state.clockSkew = Math.abs(skew) > 2 ? skew : 0;
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `HTTP ${response.status}`);
  }
  return body;
}

const serverNow = () => Date.now() / 1000 + state.clockSkew;

// ---- formatting -----------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

function clockTime(t) {
  const d = new Date(t * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function formatTime(t) {
  if (t === null || t === undefined) return "";
  const d = new Date(t * 1000);
  const time = clockTime(t);
  const today = new Date(serverNow() * 1000);
  if (d.toDateString() === today.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function formatNumber(value, digits = 0) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function timeEl(t) {
  if (t === null || t === undefined) return "";
  return el("time", { datetime: new Date(t * 1000).toISOString() }, formatTime(t));
}

function badge(health, text) {
  return el("span", { className: "badge", dataset: { health } }, text ?? health);
}

const gpuKey = (node, gpu) => `${node}/${gpu}`;

function alertDuration(alert) {
  return (alert.ends_at ?? serverNow()) - alert.starts_at;
}

// ---- the grid -------------------------------------------------------------------------------

function firingByGpu(alerts) {
  const byGpu = new Map();
  for (const alert of alerts) {
    if (alert.status !== "firing" || alert.gpu === null) continue;
    const key = gpuKey(alert.node, alert.gpu);
    if (!byGpu.has(key)) byGpu.set(key, []);
    byGpu.get(key).push(alert);
  }
  for (const list of byGpu.values()) {
    list.sort((a, b) => SEVERITY_RANK[b.severity] - SEVERITY_RANK[a.severity] || a.starts_at - b.starts_at);
  }
  return byGpu;
}

// A GPU's colour is its worst firing alert (the status's health); one without any on a node whose
// agent is not connected is "silent": its green would be a guess.
function gpuHealth(node, gpu) {
  if (gpu.health === "ok" && !node.connected) return "silent";
  return gpu.health in SEVERITY_RANK ? gpu.health : "silent";
}

function cellTitle(node, gpu, health, alerts) {
  const lines = [`${node.node} GPU ${gpu.gpu}${gpu.name ? ` (${gpu.name})` : ""}: ${health}`];
  if (alerts.length) {
    for (const a of alerts) {
      lines.push(`${a.severity} ${a.detector}: ${a.summary} (since ${formatTime(a.starts_at)}, ${formatDuration(alertDuration(a))})`);
    }
  } else if (gpu.alerts && gpu.alerts.length) {
    lines.push(`firing: ${gpu.alerts.join(", ")}`);
  } else {
    lines.push(node.connected ? "no open alert" : "agent not connected: no recent data");
  }
  const m = gpu.metrics || {};
  const facts = [];
  if (m.gpu_util_percent !== undefined) facts.push(`${formatNumber(m.gpu_util_percent)}% util`);
  if (m.power_watts !== undefined) facts.push(`${formatNumber(m.power_watts)} W`);
  if (m.temp_gpu_celsius !== undefined) facts.push(`${formatNumber(m.temp_gpu_celsius)} °C`);
  if (m.sm_clock_mhz !== undefined) facts.push(`${formatNumber(m.sm_clock_mhz)} MHz`);
  if (facts.length) lines.push(`latest: ${facts.join(", ")}`);
  return lines.join("\n");
}

function renderGrid() {
  const { status } = state;
  const grid = $("grid");
  const focused = document.activeElement && document.activeElement.matches("#grid .cell")
    ? gpuKey(document.activeElement.dataset.node, document.activeElement.dataset.gpu)
    : null;
  const width = Math.max(0, ...status.nodes.flatMap((n) => n.gpus.map((g) => g.gpu + 1)));
  const head = el("tr", {}, el("th", { scope: "col" }, "Node"));
  for (let i = 0; i < width; i++) head.append(el("th", { scope: "col" }, `GPU ${i}`));
  const firing = firingByGpu(state.alerts);
  const body = document.createDocumentFragment();
  for (const node of status.nodes) {
    const nodeState = node.connected
      ? el("span", { className: "node-state" }, "connected")
      : el("span", { className: "node-state lost" }, "not connected");
    // Alerts on the node itself (no GPU: node_silent, host, InfiniBand) show beside its name.
    const nodeAlerts = state.alerts.filter((a) => a.status === "firing" && a.node === node.node && a.gpu === null);
    const nodeBadge = nodeAlerts.length
      ? el(
          "span",
          {
            className: "badge node-alert",
            title: nodeAlerts.map((a) => `${a.severity} ${a.detector}: ${a.summary}`).join("\n"),
            dataset: { health: nodeAlerts.reduce((w, a) => (SEVERITY_RANK[a.severity] > SEVERITY_RANK[w] ? a.severity : w), "info") },
          },
          `${nodeAlerts.length} node alert${nodeAlerts.length === 1 ? "" : "s"}`,
        )
      : null;
    const row = el("tr", {}, el("th", { scope: "row" }, node.node, nodeState, nodeBadge));
    const byIndex = new Map(node.gpus.map((g) => [g.gpu, g]));
    for (let i = 0; i < width; i++) {
      const gpu = byIndex.get(i);
      if (!gpu) {
        row.append(el("td"));
        continue;
      }
      const health = gpuHealth(node, gpu);
      const alerts = firing.get(gpuKey(node.node, gpu.gpu)) || [];
      const title = cellTitle(node, gpu, health, alerts);
      const selected = state.selected && state.selected.node === node.node && state.selected.gpu === gpu.gpu;
      const cell = el(
        "button",
        {
          type: "button",
          className: "cell",
          title,
          "aria-label": title,
          "aria-pressed": selected ? "true" : "false",
          dataset: { node: node.node, gpu: String(gpu.gpu), health },
        },
        el("span", { className: "gpu" }, gpu.gpu),
        el("span", {}, HEALTH_LABEL[health]),
      );
      row.append(el("td", {}, cell));
    }
    body.append(row);
  }
  grid.tHead.replaceChildren(head);
  grid.tBodies[0].replaceChildren(body);
  if (focused) {
    const [node, gpu] = focused.split("/");
    const again = grid.querySelector(`.cell[data-node="${CSS.escape(node)}"][data-gpu="${CSS.escape(gpu)}"]`);
    if (again) again.focus();
  }
}

function renderSummary() {
  const { status } = state;
  const gpus = status.nodes.reduce((n, node) => n + node.gpus.length, 0);
  const firing = state.alerts.filter((a) => a.status === "firing");
  const bySeverity = ["critical", "warning", "info"]
    .map((s) => [s, firing.filter((a) => a.severity === s).length])
    .filter(([, n]) => n)
    .map(([s, n]) => `${n} ${s}`);
  const disconnected = status.nodes.filter((n) => !n.connected).length;
  const parts = [
    `${status.nodes.length} node${status.nodes.length === 1 ? "" : "s"}`,
    `${gpus} GPU${gpus === 1 ? "" : "s"}`,
    `${status.alerts_firing} alert${status.alerts_firing === 1 ? "" : "s"} firing${bySeverity.length ? ` (${bySeverity.join(", ")})` : ""}`,
  ];
  if (disconnected) parts.push(`${disconnected} agent${disconnected === 1 ? "" : "s"} not connected`);
  parts.push(`updated ${formatTime(serverNow())}`);
  $("summary").textContent = parts.join(" · ");
}

// ---- the alerts -----------------------------------------------------------------------------

function sortedAlerts(alerts) {
  return [...alerts].sort((a, b) => {
    if ((a.status === "firing") !== (b.status === "firing")) return a.status === "firing" ? -1 : 1;
    if (a.status === "firing") {
      return SEVERITY_RANK[b.severity] - SEVERITY_RANK[a.severity] || b.starts_at - a.starts_at;
    }
    return (b.ends_at ?? 0) - (a.ends_at ?? 0);
  });
}

function gpuLink(node, gpu) {
  if (gpu === null || gpu === undefined) return "–";
  return el("button", { type: "button", className: "link", dataset: { open: gpuKey(node, gpu) } }, `GPU ${gpu}`);
}

function renderAlerts() {
  const rows = sortedAlerts(state.alerts).map((a) =>
    el(
      "tr",
      { className: a.status === "firing" ? "firing" : "resolved", dataset: { alertId: String(a.id) } },
      el("td", {}, a.status, a.silenced_by ? el("span", { className: "hint" }, ` (silenced by #${a.silenced_by})`) : null),
      el("td", {}, badge(a.severity)),
      el("td", {}, a.detector),
      el("td", {}, a.node ?? "–"),
      el("td", {}, gpuLink(a.node, a.gpu)),
      el("td", {}, a.summary),
      el("td", {}, timeEl(a.starts_at)),
      el("td", {}, a.ends_at === null ? "firing" : timeEl(a.ends_at)),
      el("td", {}, formatDuration(alertDuration(a))),
    ),
  );
  $("alerts-body").replaceChildren(...rows);
  $("alerts-empty").hidden = rows.length > 0;
}

// ---- the jobs -------------------------------------------------------------------------------

function nodeList(nodes) {
  if (!nodes || !nodes.length) return "–";
  return nodes.length <= 4 ? nodes.join(", ") : `${nodes.slice(0, 3).join(", ")} … ${nodes[nodes.length - 1]} (${nodes.length})`;
}

function renderJobs(result) {
  const section = $("jobs");
  const empty = $("jobs-empty");
  if (result.status === "rejected") {
    // No jobs endpoint (an older collector) or no answer: the panel says so, the page goes on.
    section.dataset.state = "unavailable";
    $("jobs-body").replaceChildren();
    empty.textContent =
      result.reason.status === 404
        ? "No job data: this collector does not serve /api/v1/jobs."
        : `No job data (${result.reason.message}).`;
    empty.hidden = false;
    return;
  }
  const jobs = (result.value && result.value.jobs) || [];
  const rows = jobs.map((job) =>
    el(
      "tr",
      { dataset: { job: job.job } },
      el("td", {}, job.job),
      el("td", {}, job.state),
      el("td", { title: (job.nodes || []).join(", ") }, nodeList(job.nodes)),
      el("td", { className: "num" }, job.gpu_count ?? (job.gpus || []).length),
      el("td", {}, formatDuration(job.duration_seconds)),
      el("td", { className: "num" }, formatNumber(job.energy_kwh, 3)),
      el("td", { className: "num" }, formatNumber(job.joules_per_step, 1)),
      el("td", { className: "num" }, job.mean_utilization_percent == null ? "–" : `${formatNumber(job.mean_utilization_percent, 1)}%`),
      el("td", { className: "num" }, job.mean_power_watts == null ? "–" : `${formatNumber(job.mean_power_watts)} W`),
      el("td", { className: "num" }, (job.stragglers || []).length),
      el("td", { className: "num" }, (job.alerts || []).length),
    ),
  );
  $("jobs-body").replaceChildren(...rows);
  section.dataset.state = rows.length ? "ready" : "empty";
  empty.textContent = "No job data: no GPU sample carried a job in this window.";
  empty.hidden = rows.length > 0;
}

// ---- one GPU's detail -----------------------------------------------------------------------

function findGpu(node, gpu) {
  const n = state.status && state.status.nodes.find((x) => x.node === node);
  return n ? [n, n.gpus.find((g) => g.gpu === gpu)] : [null, null];
}

function cssColour(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(`--${name}`).trim() || "#888";
}

function selectedAlerts() {
  const { node, gpu } = state.selected;
  return state.alerts.filter((a) => a.node === node && (a.gpu === gpu || a.gpu === null));
}

// Alert spans as bands behind the lines, in their severity's colour.
function alertBands(u) {
  if (!state.selected) return;
  const { ctx, bbox } = u;
  const [min, max] = [u.scales.x.min, u.scales.x.max];
  if (min === null || max === null || min === undefined) return;
  ctx.save();
  ctx.globalAlpha = 0.15;
  for (const a of selectedAlerts()) {
    const start = Math.max(a.starts_at, min);
    const end = Math.min(a.ends_at ?? max, max);
    if (end <= start) continue;
    const x0 = u.valToPos(start, "x", true);
    const x1 = u.valToPos(end, "x", true);
    ctx.fillStyle = cssColour(a.severity);
    ctx.fillRect(x0, bbox.top, Math.max(2, x1 - x0), bbox.height);
  }
  ctx.restore();
}

function makePlot(spec, container) {
  const width = Math.max(300, container.clientWidth - 10);
  const opts = {
    width,
    height: CHART_HEIGHT,
    title: `${spec.label} (${spec.unit})`,
    scales: { x: { time: true } },
    series: [
      { value: (u, v) => (v === null || v === undefined ? "–" : formatTime(v)) },
      {
        label: spec.label,
        stroke: "#2f6fd0",
        width: 1.5,
        value: (u, v) => (v === null || v === undefined ? "–" : `${formatNumber(v, spec.digits)} ${spec.unit}`),
      },
    ],
    // 24-hour clock times on the time axis (uPlot's default adds a date row that crowds at midnight).
    axes: [{ values: (u, splits) => splits.map(clockTime), space: 70 }, { size: 56 }],
    cursor: { drag: { x: false, y: false } },
    hooks: { drawClear: [alertBands] },
  };
  return new uPlot(opts, [[], []], container);
}

function renderDetailHead() {
  const { node, gpu } = state.selected;
  const [n, g] = findGpu(node, gpu);
  $("detail-title").textContent = `${node} GPU ${gpu}`;
  const facts = [];
  if (g) {
    facts.push(`health: ${gpuHealth(n, g)}`);
    if (g.name) facts.push(g.name);
    if (g.uuid) facts.push(g.uuid);
    if (g.pci_bus_id) facts.push(`PCI ${g.pci_bus_id}`);
  } else {
    facts.push("not in the collector's status");
  }
  facts.push(`the last ${CHART_SECONDS / 60} minutes`);
  $("detail-meta").textContent = facts.join(" · ");
  const items = sortedAlerts(selectedAlerts()).map((a) =>
    el(
      "li",
      { dataset: { alertId: String(a.id) } },
      badge(a.severity),
      ` ${a.detector}${a.gpu === null ? " (node)" : ""}: ${a.summary} — started `,
      timeEl(a.starts_at),
      a.ends_at === null ? ", firing" : el("span", {}, ", ended ", timeEl(a.ends_at)),
      ` (${formatDuration(alertDuration(a))})`,
    ),
  );
  $("detail-alerts").replaceChildren(...(items.length ? items : [el("li", { className: "empty" }, "No alerts on this GPU in the last hour.")]));
}

async function refreshCharts() {
  const { node, gpu } = state.selected;
  const params = new URLSearchParams({
    node,
    gpu: String(gpu),
    field: CHARTS.map((c) => c.field).join(","),
    start: String(Math.floor(serverNow() - CHART_SECONDS)),
  });
  const answer = await api(`api/v1/series?${params}`);
  if (!state.selected || state.selected.node !== node || state.selected.gpu !== gpu) return; // moved on
  const byField = new Map((answer.series || []).map((s) => [s.field, s.points]));
  for (const spec of CHARTS) {
    const points = byField.get(spec.field) || [];
    const box = $("charts").querySelector(`[data-field="${spec.field}"]`);
    const plot = state.plots.get(spec.field);
    if (!box || !plot) continue;
    plot.setData([points.map((p) => p[0]), points.map((p) => p[1] * spec.scale)]);
    box.dataset.points = String(points.length);
    box.querySelector(".no-data").hidden = points.length > 0;
  }
}

function openDetail(node, gpu) {
  state.selected = { node, gpu };
  for (const plot of state.plots.values()) plot.destroy();
  state.plots.clear();
  const section = $("detail");
  section.hidden = false;
  const boxes = CHARTS.map((spec) =>
    el("figure", { className: "chart", dataset: { field: spec.field, points: "0" } }, el("p", { className: "no-data" }, "no data yet")),
  );
  $("charts").replaceChildren(...boxes);
  CHARTS.forEach((spec, i) => state.plots.set(spec.field, makePlot(spec, boxes[i])));
  renderDetailHead();
  for (const cell of document.querySelectorAll("#grid .cell")) {
    cell.setAttribute("aria-pressed", cell.dataset.node === node && Number(cell.dataset.gpu) === gpu ? "true" : "false");
  }
  section.scrollIntoView({ block: "nearest" });
  refreshCharts().catch(showError);
}

function closeDetail() {
  state.selected = null;
  for (const plot of state.plots.values()) plot.destroy();
  state.plots.clear();
  $("charts").replaceChildren();
  $("detail").hidden = true;
  for (const cell of document.querySelectorAll("#grid .cell[aria-pressed=true]")) cell.setAttribute("aria-pressed", "false");
}

// ---- refreshing -----------------------------------------------------------------------------

function showError(err) {
  const banner = $("banner");
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
    banner.textContent = `The API refused this page: ${err.message}`;
    $("token-form").hidden = false;
  } else {
    banner.textContent = `Could not refresh: ${err.message}`;
  }
  banner.hidden = false;
}

function clearError() {
  $("banner").hidden = true;
  $("token-form").hidden = true;
}

// One refresh at a time; a token entered meanwhile waits for the one in flight to reschedule.
let timer = null;
let inFlight = false;

async function refresh() {
  if (inFlight) return;
  inFlight = true;
  clearTimeout(timer);
  try {
    const [status, alerts, jobs] = await Promise.allSettled([
      api("api/v1/status"),
      api(`api/v1/alerts?status=all&since=${ALERT_WINDOW_SECONDS}`),
      api("api/v1/jobs"),
    ]);
    if (status.status === "rejected") throw status.reason;
    if (alerts.status === "rejected") throw alerts.reason;
    state.status = status.value;
    state.alerts = alerts.value.alerts || [];
    renderGrid();
    renderSummary();
    renderAlerts();
    renderJobs(jobs);
    if (state.selected) {
      renderDetailHead();
      await refreshCharts();
    }
    clearError();
  } catch (err) {
    showError(err);
  } finally {
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
    inFlight = false;
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

function start() {
  takeTokenFromFragment();
  $("grid").addEventListener("click", (event) => {
    const cell = event.target.closest(".cell");
    if (cell) openDetail(cell.dataset.node, Number(cell.dataset.gpu));
  });
  $("alerts").addEventListener("click", (event) => {
    const link = event.target.closest("[data-open]");
    if (!link) return;
    const at = link.dataset.open.lastIndexOf("/");
    openDetail(link.dataset.open.slice(0, at), Number(link.dataset.open.slice(at + 1)));
  });
  $("detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.selected) closeDetail();
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveToken($("token-input").value.trim());
    $("token-input").value = "";
    clearError();
    refresh();
  });
  window.addEventListener("resize", () => {
    for (const [field, plot] of state.plots) {
      const box = $("charts").querySelector(`[data-field="${field}"]`);
      if (box) plot.setSize({ width: Math.max(300, box.clientWidth - 10), height: CHART_HEIGHT });
    }
  });
  refresh();
}

start();
