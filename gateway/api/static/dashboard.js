// The operator's dashboard: reads the admin API with the token kept in sessionStorage (never in a URL).
// The API writes money as exact JSON numbers; `exactNumbers` keeps each fractional number's source text
// (JSON.parse source access), so tables and tooltips show the API's digits. Charts plot Number(text) of the
// same values and the page does no arithmetic with money.
"use strict";

const TOKEN_KEY = "gateway.adminToken";
const REFRESH_MS = 15000;
const COLORS = ["#2e5bff", "#12b76a", "#f79009", "#7a5af8", "#ee46bc", "#06aed4", "#f04438", "#667085", "#98a2b3"];
const charts = {};
let timer = null;

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function exactNumbers(key, value, context) {
  if (typeof value === "number" && context && typeof context.source === "string" && /[.eE]/.test(context.source)) {
    return context.source;
  }
  return value;
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Authorization: "Bearer " + token, Accept: "application/json" };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method: options.method || "GET", headers, body: options.body, cache: "no-store" });
  let payload = null;
  try { payload = JSON.parse(await response.text(), exactNumbers); } catch (_) { payload = null; }
  if (!response.ok) {
    const message = payload && payload.error ? payload.error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return payload;
}

function cell(row, text, numeric) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (numeric) td.className = "num";
  row.appendChild(td);
}

function fillTable(id, emptyId, rows, columns) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  for (const item of rows) {
    const tr = document.createElement("tr");
    for (const [value, numeric] of columns(item)) cell(tr, value, numeric);
    body.appendChild(tr);
  }
  $(id).hidden = rows.length === 0;
  $(emptyId).hidden = rows.length !== 0;
}

function drawChart(id, config) {
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart($(id), config);
}

function moneyTooltip(context) {
  const raw = context.dataset.apiValues ? context.dataset.apiValues[context.dataIndex] : context.formattedValue;
  return `${context.dataset.label}: ${raw}`;
}

async function loadDaily() {
  const split = $("split").value;
  const daily = await api(`/admin/v1/usage/daily?days=30&split=${encodeURIComponent(split)}`);
  const empty = daily.series.length === 0;
  $("daily-empty").hidden = !empty;
  const datasets = daily.series.map((series, i) => ({
    type: "bar", label: `${series.key} cost (USD)`, stack: "cost", yAxisID: "cost",
    backgroundColor: COLORS[i % COLORS.length], data: series.total_cost.map(Number), apiValues: series.total_cost,
  }));
  datasets.push({
    type: "line", label: "requests", yAxisID: "requests", borderColor: "#1d2330", backgroundColor: "#1d2330",
    data: daily.totals.requests, apiValues: daily.totals.requests, tension: 0.2, pointRadius: 2,
  });
  drawChart("daily-chart", {
    data: { labels: daily.days, datasets },
    options: {
      animation: false, maintainAspectRatio: false,
      scales: {
        x: { stacked: true, title: { display: true, text: "day (UTC)" } },
        cost: { stacked: true, position: "left", beginAtZero: true, title: { display: true, text: "USD" } },
        requests: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: "requests" } },
      },
      plugins: { tooltip: { callbacks: { label: moneyTooltip } } },
    },
  });
  const lastDay = daily.days.length - 1;
  $("daily-totals").textContent = empty ? "" :
    `Today (${daily.days[lastDay]}): ${daily.totals.total_cost[lastDay]} USD over ${daily.totals.requests[lastDay]} requests (sums computed by the API).`;
}

async function loadBudgets() {
  const top = await api("/admin/v1/usage/top-users?limit=10");
  const rows = top.data;
  $("budget-empty").hidden = rows.length !== 0;
  drawChart("budget-chart", {
    type: "bar",
    data: {
      labels: rows.map((r) => r.user_id),
      datasets: [
        { label: "spent (USD)", backgroundColor: "#2e5bff", data: rows.map((r) => Number(r.spent)), apiValues: rows.map((r) => r.spent) },
        { label: "monthly budget (USD)", backgroundColor: "#d0d5dd",
          data: rows.map((r) => (r.monthly_budget_usd === null ? null : Number(r.monthly_budget_usd))),
          apiValues: rows.map((r) => (r.monthly_budget_usd === null ? "unlimited" : r.monthly_budget_usd)) },
      ],
    },
    options: { indexAxis: "y", animation: false, maintainAspectRatio: false, plugins: { tooltip: { callbacks: { label: moneyTooltip } } } },
  });
  fillTable("budget-table", "budget-empty", rows, (r) => [
    [r.user_id], [r.tier], [r.spent, true], [r.monthly_budget_usd === null ? "unlimited" : r.monthly_budget_usd, true],
    [r.used_fraction === null ? "–" : `${r.used_fraction} of budget`, true],
  ]);
}

async function loadModels() {
  const stats = await api("/admin/v1/usage/models?period=month");
  fillTable("models-table", "models-empty", stats.data, (m) => [
    [m.model], [m.requests, true], [m.total_cost, true],
    [`${m.latency_ms_p50 ?? "–"} / ${m.latency_ms_p95 ?? "–"}`, true], [`${m.ttfb_ms_p50 ?? "–"} / ${m.ttfb_ms_p95 ?? "–"}`, true],
  ]);
}

function showStop(stop) {
  $("stop-state").textContent = stop.enabled ? "ON: proxying answers 503" : "off";
  $("stop-reason").textContent = stop.enabled && stop.reason ? `(reason: ${stop.reason})` : "";
  $("stop-toggle").textContent = stop.enabled ? "Turn the emergency stop off…" : "Turn the emergency stop on…";
  $("stop-toggle").dataset.enabled = String(stop.enabled);
}

async function loadOverview() {
  const o = await api("/admin/v1/overview");
  $("streams-in-flight").textContent = o.streams_in_flight;
  $("settlements-pending").textContent = o.settlements_pending;
  $("usage-queue-depth").textContent = o.usage_queue_depth;
  $("low-line").textContent = o.low_balance_usd;
  showStop(o.emergency_stop);
  fillTable("low-credits-table", "low-credits-empty", o.low_credit_users, (u) => [[u.user_id], [u.balance, true], [u.synced_at]]);
  fillTable("refusals-table", "refusals-empty", o.recent_refusals, (e) => [[e.at], [e.kind], [e.status, true], [e.detail]]);
  fillTable("upstream-errors-table", "upstream-errors-empty", o.recent_upstream_errors, (e) => [[e.at], [e.kind], [e.detail]]);
  $("clock").textContent = `as of ${o.now} UTC`;
}

async function loadAlerts() {
  const alerts = await api("/admin/v1/alerts?limit=50");
  fillTable("alerts-table", "alerts-empty", alerts.data, (a) => [
    [a.created_at], [a.event], [a.user_id], [a.webhook], [a.state], [a.attempts, true], [a.last_error],
  ]);
}

async function refresh() {
  $("load-error").hidden = true;
  const results = await Promise.allSettled([loadOverview(), loadDaily(), loadBudgets(), loadModels(), loadAlerts()]);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason);
  if (failed.some((e) => e instanceof ApiError && e.status === 401)) {
    signOut("The admin token was refused (401): " + failed.find((e) => e.status === 401).message);
    return;
  }
  if (failed.length) {
    $("load-error").textContent = "Some panels could not load: " + failed.map((e) => e.message).join("; ");
    $("load-error").hidden = false;
  }
  document.body.dataset.loaded = String(Date.now());
}

function signedIn() {
  $("sign-in").hidden = true;
  $("main").hidden = false;
  $("sign-out").hidden = false;
  $("refresh").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(timer);
  $("main").hidden = true;
  $("sign-out").hidden = true;
  $("refresh").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("sign-in-error").hidden = !message;
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("/admin/v1/overview");
  } catch (error) {
    const reason = error instanceof ApiError && error.status === 401
      ? "That admin token was refused (401): " + error.message
      : "Could not reach the admin API: " + error.message;
    signOut(reason);
    return;
  }
  signedIn();
}

function askStop() {
  const enable = $("stop-toggle").dataset.enabled !== "true";
  $("stop-question").textContent = enable
    ? "Turn the emergency stop ON? Every proxied request will be refused with 503 until it is turned off."
    : "Turn the emergency stop OFF? Requests will be forwarded again.";
  $("stop-reason-input").hidden = !enable;
  $("stop-confirm").dataset.enable = String(enable);
  $("stop-confirm").hidden = false;
}

async function confirmStop() {
  const enable = $("stop-confirm").dataset.enable === "true";
  const body = { enabled: enable };
  const reason = $("stop-reason-input").value.trim();
  if (enable && reason) body.reason = reason;
  try {
    showStop(await api("/admin/v1/emergency-stop", { method: "PUT", body: JSON.stringify(body) }));
  } catch (error) {
    $("load-error").textContent = "The emergency stop was not changed: " + error.message;
    $("load-error").hidden = false;
  }
  $("stop-confirm").hidden = true;
  $("stop-reason-input").value = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  $("refresh").addEventListener("click", refresh);
  $("split").addEventListener("change", () => loadDaily().catch((e) => { $("load-error").textContent = e.message; $("load-error").hidden = false; }));
  $("stop-toggle").addEventListener("click", askStop);
  $("stop-yes").addEventListener("click", confirmStop);
  $("stop-no").addEventListener("click", () => { $("stop-confirm").hidden = true; });
  if (sessionStorage.getItem(TOKEN_KEY)) signedIn();
});
