// layerbank dashboard: polls the REST API and renders feature sets, jobs, probes and projections.
// Every request carries the API key from sessionStorage as "Authorization: Bearer <key>".
"use strict";

const KEY_STORAGE = "layerbank.apiKey";
const JOBS_STORAGE = "layerbank.jobs";
const POLL_MS = 2000;

let selectedProbe = null;
let shownCurve = null;
let projectionsAvailable = true;
// From GET /dashboard/probe-pairs: the pair to preselect, and the test candidates of each
// train set read so far. Both are read again when the list of complete feature sets changes.
let defaultPair = null;
let candidatesByTrain = new Map();
let probePairsFor = null;  // the complete feature set ids that the two above were read for
let probePairsGeneration = 0;  // counts those reads, so that a late response is dropped
let shownFeaturesets = [];

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, message) {
    super(`HTTP ${status}: ${message}`);
    this.status = status;
  }
}

// Send a request to the API and return the response; raise ApiError with the API's
// detail.message for 4xx and 5xx responses.
async function request(method, path, body) {
  const options = { method, headers: authHeaders() };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = response.statusText;
    try {
      const detail = (await response.json()).detail;
      if (detail && detail.message) message = detail.message;
      else if (Array.isArray(detail)) {
        message = detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`)
          .join("; ");
      } else if (detail) message = String(detail);
    } catch (_) { /* the body was not JSON: keep the status text */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function getJson(path) {
  return (await request("GET", path)).json();
}

function setApiStatus(text, isError) {
  const status = document.getElementById("api-status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "-" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fraction(value) {
  return typeof value === "number" ? value.toFixed(4) : "-";
}

// Format a [low, high] pair of fractions (test_accuracy_ci95) as "low-high", as the CLI does.
function interval(value) {
  if (!Array.isArray(value) || value.length !== 2) return "-";
  return `${fraction(value[0])}-${fraction(value[1])}`;
}

function yesNo(value) {
  if (typeof value !== "boolean") return "-";
  return value ? "yes" : "no";
}

// Format chosen hyper-parameters as "name=value" pairs, with objects and lists as JSON.
function paramsText(params) {
  return Object.entries(params || {})
    .map(([name, value]) => `${name}=${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(", ");
}

function progressCell(row, done, total, label) {
  const td = document.createElement("td");
  const bar = document.createElement("progress");
  bar.max = total || 1;
  bar.value = done || 0;
  td.appendChild(bar);
  td.appendChild(document.createTextNode(` ${done}/${total} ${label}`));
  row.appendChild(td);
}

// -- feature sets ---------------------------------------------------------------------------

// Show the status of a feature set and, when it failed or was canceled, why (the error of its
// job), its job id and the next step (the hint), as GET /v1/featuresets returns them.
function statusCell(row, fs) {
  const td = document.createElement("td");
  const label = document.createElement("span");
  label.className = `status status-${fs.status}`;
  label.textContent = fs.status;
  td.appendChild(label);
  if (fs.status === "failed" || fs.status === "canceled") {
    const lines = [];
    if (fs.error && fs.error.message) lines.push(["error", fs.error.message]);
    if (fs.job_id) lines.push(["job", `job ${fs.job_id}`]);
    if (fs.hint) lines.push(["hint", fs.hint]);
    for (const [name, text] of lines) {
      const line = document.createElement("div");
      line.className = `status-detail detail-${name}`;
      line.textContent = text;
      td.appendChild(line);
    }
  }
  row.appendChild(td);
}

function renderFeaturesets(featuresets) {
  const tbody = document.querySelector("#featuresets tbody");
  tbody.replaceChildren();
  for (const fs of featuresets) {
    const row = document.createElement("tr");
    row.dataset.id = fs.featureset_id;
    cell(row, fs.featureset_id, "id");
    statusCell(row, fs);
    cell(row, fs.spec.model);
    cell(row, `${fs.spec.dataset} / ${fs.spec.split}`);
    cell(row, fs.shape[0]);
    cell(row, fs.spec.pooling);
    cell(row, fs.n_items);
    progressCell(row, fs.progress.items_done, fs.progress.items_total, "items");
    tbody.appendChild(row);
  }
  document.getElementById("featuresets-empty").hidden = featuresets.length > 0;
  shownFeaturesets = featuresets;
  const preferredTrain = defaultPair ? defaultPair.train : null;
  fillTrainSelect(document.getElementById("probe-train"), featuresets, preferredTrain);
  fillTestSelect();
}

// A complete feature set never changes, so the probe pairs are read again only when the list
// of complete feature sets changes. The route lists the candidates of one train set: the
// selected one while it is still complete, else the default pair's.
async function refreshProbePairs(featuresets) {
  const complete = featuresets.filter((fs) => fs.status === "complete").map((fs) => fs.featureset_id);
  const completeIds = complete.join(",");
  if (completeIds === probePairsFor) return;
  probePairsGeneration += 1;
  candidatesByTrain = new Map();
  const selected = document.getElementById("probe-train").value;
  await loadTestCandidates(complete.includes(selected) ? selected : null);
  probePairsFor = completeIds;
}

// Read the test candidates of train set `train` (of the default pair's train set when null)
// and the default pair. A response to a read from before the last change of the list is
// dropped.
async function loadTestCandidates(train) {
  const generation = probePairsGeneration;
  const query = train ? `?train=${encodeURIComponent(train)}` : "";
  const pairs = await getJson(`/dashboard/probe-pairs${query}`);
  if (generation !== probePairsGeneration) return;
  defaultPair = pairs.default;
  if (pairs.train) candidatesByTrain.set(pairs.train, pairs.tests);
}

// Show the test candidates of the selected train set, reading them first if needed.
async function showTestCandidates() {
  const train = document.getElementById("probe-train").value;
  if (train && !candidatesByTrain.has(train)) await loadTestCandidates(train);
  fillTestSelect();
}

function featuresetOption(fs) {
  const option = document.createElement("option");
  option.value = fs.featureset_id;
  option.textContent = `${fs.featureset_id} (${fs.spec.dataset}/${fs.spec.split}, ${fs.n_items} items)`;
  return option;
}

// Offer complete feature sets only (the API rejects probes on unfinished ones) and keep the
// user's selection across refreshes.
function fillTrainSelect(select, featuresets, preferredId) {
  const previous = select.value;
  const complete = featuresets.filter((fs) => fs.status === "complete");
  select.replaceChildren(...complete.map(featuresetOption));
  if (complete.some((fs) => fs.featureset_id === previous)) {
    select.value = previous;
  } else if (complete.some((fs) => fs.featureset_id === preferredId)) {
    select.value = preferredId;
  }
}

// List the test candidates of the selected train set in the server's order, with the ones
// that POST /v1/probes would reject disabled and their reason shown. A compatible selection
// is kept, and otherwise the first compatible set is selected (none when there is none).
function fillTestSelect() {
  const select = document.getElementById("probe-test");
  const previous = select.value;
  const train = document.getElementById("probe-train").value;
  const byId = new Map(shownFeaturesets.map((fs) => [fs.featureset_id, fs]));
  const candidates = candidatesByTrain.get(train);
  const entries = (candidates || []).filter((entry) => byId.has(entry.featureset_id));
  const options = entries.map((entry) => {
    const option = featuresetOption(byId.get(entry.featureset_id));
    if (!entry.compatible) {
      option.disabled = true;
      option.textContent += `: not compatible, ${entry.reason}`;
      option.title = entry.reason;
    }
    return option;
  });
  select.replaceChildren(...options);
  const compatible = entries.filter((entry) => entry.compatible).map((entry) => entry.featureset_id);
  if (compatible.includes(previous)) {
    select.value = previous;
  } else {
    select.value = compatible.length > 0 ? compatible[0] : "";
  }
  // The train set whose candidates are shown, or "" while they are being read.
  select.dataset.train = candidates ? train : "";
}

// -- jobs -----------------------------------------------------------------------------------

function launchedJobs() {
  return JSON.parse(sessionStorage.getItem(JOBS_STORAGE) || "[]");
}

function rememberJob(jobId) {
  const jobs = launchedJobs().filter((id) => id !== jobId);
  jobs.unshift(jobId);
  sessionStorage.setItem(JOBS_STORAGE, JSON.stringify(jobs.slice(0, 20)));
}

async function refreshJobs() {
  const states = await Promise.all(launchedJobs().map(async (jobId) => {
    try {
      return await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      return { job_id: jobId, kind: "-", target_id: "-", status: "unknown",
               progress: { done: 0, total: 0 }, error: { message: error.message } };
    }
  }));
  const tbody = document.querySelector("#jobs tbody");
  tbody.replaceChildren();
  for (const state of states) {
    const row = document.createElement("tr");
    row.dataset.jobId = state.job_id;
    row.dataset.status = state.status;
    cell(row, state.job_id, "id");
    cell(row, state.kind);
    cell(row, state.target_id, "id");
    cell(row, state.status, `status-${state.status}`);
    const p = state.progress;
    if (p.items_total) progressCell(row, p.items_done, p.items_total, "items");
    else progressCell(row, p.done, p.total, "steps");
    cell(row, state.error ? state.error.message : "");
    tbody.appendChild(row);
  }
}

// -- probes ---------------------------------------------------------------------------------

function renderProbes(probes) {
  const tbody = document.querySelector("#probes tbody");
  tbody.replaceChildren();
  if (selectedProbe === null) {
    const firstComplete = probes.find((p) => p.status === "complete");
    if (firstComplete) selectedProbe = firstComplete.probe_id;
  }
  for (const probe of probes) {
    const row = document.createElement("tr");
    row.dataset.id = probe.probe_id;
    if (probe.probe_id === selectedProbe) row.className = "selected";
    cell(row, probe.probe_id, "id");
    cell(row, probe.status, `status-${probe.status}`);
    cell(row, (probe.spec.kinds || []).join(", "));
    cell(row, probe.spec.train_featureset, "id");
    cell(row, probe.spec.test_featureset, "id");
    const best = Object.entries(probe.best || {})
      .map(([kind, b]) => `${kind}: layer ${b.layer} (${fraction(b.test_accuracy)})`).join("; ");
    cell(row, best || "-");
    row.addEventListener("click", () => {
      selectedProbe = probe.probe_id;
      shownCurve = null;
      renderProbes(probes);
    });
    tbody.appendChild(row);
  }
  const probe = probes.find((p) => p.probe_id === selectedProbe);
  if (probe) renderProbeDetail(probe);
}

function renderProbeDetail(probe) {
  document.getElementById("probe-detail").hidden = false;
  document.getElementById("probe-title").textContent = `probe ${probe.probe_id} (${probe.status})`;
  const tbody = document.querySelector("#probe-rows tbody");
  tbody.replaceChildren();
  for (const r of probe.rows) {
    const row = document.createElement("tr");
    const best = probe.best[r.kind];
    if (best && best.layer === r.layer) row.className = "selected";
    cell(row, r.kind);
    cell(row, r.layer);
    cell(row, fraction(r.train_accuracy));
    cell(row, fraction(r.val_accuracy));
    cell(row, fraction(r.test_accuracy));
    cell(row, interval(r.test_accuracy_ci95));
    cell(row, paramsText(r.params) || "-");
    cell(row, yesNo(r.converged));
    tbody.appendChild(row);
  }
  if (probe.status === "complete" && shownCurve !== probe.probe_id) {
    shownCurve = probe.probe_id;
    loadCurve(probe.probe_id);
  }
}

// An <img src> cannot send the Authorization header, so the PNG is fetched and shown as a blob.
async function loadCurve(probeId) {
  const img = document.getElementById("curve");
  try {
    const blob = await (await request("GET", `/v1/probes/${encodeURIComponent(probeId)}/curve.png`)).blob();
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
  } catch (error) {
    shownCurve = null;
    img.removeAttribute("src");
    img.alt = `curve not available: ${error.message}`;
  }
}

// -- projections ----------------------------------------------------------------------------

// Scatter plots already shown, by projection id, so that each PNG is downloaded once.
const projectionFigures = new Map();

async function refreshProjections() {
  if (!projectionsAvailable) return;
  let listing;
  try {
    listing = await getJson("/v1/projections");
  } catch (error) {
    if (error.status === 404) {
      // This API build has no projections endpoint: hide the section for the session.
      projectionsAvailable = false;
      document.getElementById("projections-section").hidden = true;
      return;
    }
    throw error;
  }
  const container = document.getElementById("projections");
  const figures = [];
  for (const projection of listing.data) {
    let figure = projectionFigures.get(projection.projection_id);
    if (!figure || figure.dataset.status !== projection.status) {
      figure = await projectionFigure(projection);
      projectionFigures.set(projection.projection_id, figure);
    }
    figures.push(figure);
  }
  container.replaceChildren(...figures);
  document.getElementById("projections-section").hidden = figures.length === 0;
}

async function projectionFigure(projection) {
  const spec = projection.spec;
  const figure = document.createElement("figure");
  figure.dataset.id = projection.projection_id;
  figure.dataset.status = projection.status;
  const caption = document.createElement("figcaption");
  caption.textContent = `${spec.method} of layer ${spec.layer} of ${spec.featureset} ` +
    `(${projection.n_points ?? spec.n_points} points, ${projection.status})`;
  if (projection.status === "complete") {
    const img = document.createElement("img");
    img.alt = caption.textContent;
    try {
      const path = `/v1/projections/${encodeURIComponent(projection.projection_id)}.png`;
      img.src = URL.createObjectURL(await (await request("GET", path)).blob());
    } catch (error) {
      // A status other than the listed one makes the next refresh fetch the plot again.
      figure.dataset.status = "error";
      img.alt = `scatter plot not available: ${error.message}`;
    }
    figure.appendChild(img);
  }
  figure.appendChild(caption);
  return figure;
}

// -- forms ----------------------------------------------------------------------------------

function parseLayers(text) {
  const value = text.trim();
  if (value === "" || value.toLowerCase() === "all") return "all";
  return value.split(",").filter((part) => part.trim() !== "").map((part) => {
    const layer = Number(part.trim());
    if (!Number.isInteger(layer)) throw new Error(`layers: ${JSON.stringify(part.trim())} is not an integer`);
    return layer;
  });
}

function formMessage(form, text, isError) {
  const message = form.querySelector(".form-message");
  message.textContent = text;
  message.className = isError ? "form-message error" : "form-message";
}

async function submitExtraction(event) {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  try {
    const body = { model: data.get("model"), dataset: data.get("dataset"), split: data.get("split"),
                   layers: parseLayers(data.get("layers")), pooling: data.get("pooling") };
    const answer = await (await request("POST", "/v1/extractions", body)).json();
    if (answer.job_id) rememberJob(answer.job_id);
    formMessage(form, `feature set ${answer.featureset_id}: ${answer.status}`, false);
    await refresh();
  } catch (error) {
    formMessage(form, error.message, true);
  }
}

async function submitProbe(event) {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  const kinds = data.getAll("kind");
  try {
    if (kinds.length === 0) throw new Error("kind: tick at least one probe kind");
    const body = { train_featureset: data.get("train"), test_featureset: data.get("test"),
                   kind: kinds.length === 1 ? kinds[0] : kinds, layers: parseLayers(data.get("layers")) };
    const answer = await (await request("POST", "/v1/probes", body)).json();
    if (answer.job_id) rememberJob(answer.job_id);
    selectedProbe = answer.probe_id;
    shownCurve = null;
    formMessage(form, `probe ${answer.probe_id}: ${answer.status}`, false);
    await refresh();
  } catch (error) {
    formMessage(form, error.message, true);
  }
}

// -- polling --------------------------------------------------------------------------------

async function refresh() {
  try {
    const [featuresets, probes] = await Promise.all([getJson("/v1/featuresets"), getJson("/v1/probes")]);
    await refreshProbePairs(featuresets.data);
    renderFeaturesets(featuresets.data);
    await showTestCandidates();
    renderProbes(probes.data);
    await refreshJobs();
    await refreshProjections();
    setApiStatus(`updated ${new Date().toLocaleTimeString()}`, false);
  } catch (error) {
    setApiStatus(error.message, true);
  }
}

function setUp() {
  const keyInput = document.getElementById("api-key");
  keyInput.value = apiKey();
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    shownCurve = null;
    refresh();
  });
  document.getElementById("key-clear").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    keyInput.value = "";
    refresh();
  });
  document.getElementById("extract-form").addEventListener("submit", submitExtraction);
  document.getElementById("probe-form").addEventListener("submit", submitProbe);
  document.getElementById("probe-train").addEventListener("change", () => {
    showTestCandidates().catch((error) => setApiStatus(error.message, true));
  });
  refresh();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", setUp);
