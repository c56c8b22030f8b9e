// netota's dashboard: the rack's devices, live from the daemon's event stream (GET /v1/events), a
// job history, batches, and the control API's start / cancel / resume. No library, no network beyond this
// daemon. A refused request shows the API's own error message.
"use strict";

const TOKEN_KEY = "netota-token";
const HISTORY_LIMIT = 25;
const BATCHES_LIMIT = 10;
const PHASE_LABELS = { detect: "detect", phase1: "phase 1", reboot: "reboot", phase2: "phase 2",
  upload: "upload", verify: "verify", done: "done" };

const page = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  tiles: new Map(),   // device name -> {element, device, job}
  tokenWaiters: [],
  batchesTimer: null,
};

class Refusal extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function headers(extra) {
  const h = Object.assign({ "Accept": "application/json" }, extra || {});
  if (page.token) h["Authorization"] = "Bearer " + page.token;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Refusal(0, "unreachable", "the daemon can't be reached: " + e.message);
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401) askForToken();
  if (!response.ok) {
    const error = data && data.error ? data.error : null;
    throw new Refusal(response.status, error ? error.code : "", error ? error.message : `${response.status} ${response.statusText}`);
  }
  return data;
}

// ----- what a person sees

function $(selector, root) { return (root || document).querySelector(selector); }

function showError(lines) {
  const box = $("#error");
  const text = Array.isArray(lines) ? lines.join("\n") : String(lines);
  box.textContent = text;
  box.hidden = !text;
}

function phaseLabel(phase) { return phase ? (PHASE_LABELS[phase] || phase) : "—"; }

function bytes(n) {
  if (n === null || n === undefined) return "?";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  const two = (x) => String(x).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(s)}` : `${m}:${two(s)}`;
}

function when(unix) { return unix ? new Date(unix * 1000).toLocaleString() : ""; }

function setLive(on, text) {
  const live = $("#live");
  live.classList.toggle("off", !on);
  live.textContent = text || (on ? "live" : "reconnecting…");
}

// ----- tiles

function tileFor(device) {
  let tile = page.tiles.get(device.name);
  if (!tile) {
    const element = $("#tile-template").content.firstElementChild.cloneNode(true);
    element.dataset.device = device.name;
    $(".cancel", element).addEventListener("click", () => cancel(device.name));
    $("#tiles").appendChild(element);
    tile = { element, device: {}, job: null };
    page.tiles.set(device.name, tile);
  }
  Object.assign(tile.device, device);
  return tile;
}

function drawTile(tile) {
  const { element, device, job } = tile;
  const active = job && ["queued", "running", "cancelling"].includes(job.state);
  $(".name", element).textContent = device.name;
  $(".interface", element).textContent = device.interface || "";
  let state = active ? job.state : "idle";
  if (active && job.state === "queued" && job.position) state += ` (position ${job.position})`;
  $(".state", element).textContent = state;
  $(".phase", element).textContent = active ? phaseLabel(job.phase) : "—";
  $(".version", element).textContent = device.firmware_version || "unknown";
  const outcome = $(".outcome", element);
  outcome.textContent = device.last_outcome ? device.last_outcome.replace("_", " ") : "—";
  outcome.className = "outcome " + (device.last_outcome || "");
  const progress = active ? job.progress : null;
  const noReturn = Boolean(active && (job.point_of_no_return || (progress && progress.point_of_no_return)));
  $(".no-return", element).hidden = !noReturn;
  element.classList.toggle("past-no-return", noReturn);
  const bar = $(".bar", element);
  const percent = progress ? Math.min(100, Math.max(0, progress.percent || 0)) : 0;
  $(".fill", element).style.width = `${percent}%`;
  bar.setAttribute("aria-valuenow", percent.toFixed(1));
  const working = Boolean(progress && progress.state === "device_working");
  bar.classList.toggle("working", working);
  bar.classList.toggle("done", Boolean(progress && progress.state === "done"));
  let text = "";
  if (progress) {
    text = `${percent.toFixed(1)} %`;
    if (progress.total_bytes) text += ` · ${bytes(progress.done_bytes)} of ${bytes(progress.total_bytes)}`;
    if (progress.rate && !working) text += ` · ${bytes(Math.round(progress.rate))}/s`;
    if (progress.eta !== null && progress.eta !== undefined && progress.state === "transferring") text += ` · ETA ${duration(progress.eta)}`;
    if (progress.bytes_served !== undefined) text += ` · served ${bytes(progress.bytes_served)}`;
  }
  $(".progress-text", element).textContent = text;
  const activity = $(".activity", element);
  let what = "";
  if (active && job.waiting) {
    const w = job.waiting;
    what = `waiting: ${w.message}` + (w.attempt ? ` (attempt ${w.attempt}` + (w.last_error ? `, last: ${w.last_error})` : ")") : "");
  } else if (working) {
    what = "the device is working" + (progress.activity ? `: ${progress.activity}` : "") + " (no ETA while it works)";
  } else if (active && job.state === "cancelling") {
    what = "cancelling: STOP sent, waiting for the job to end";
  }
  activity.textContent = what;
  activity.classList.toggle("working", working || noReturn);
  const cancelButton = $(".cancel", element);
  cancelButton.hidden = !active || job.state === "cancelling";
  cancelButton.dataset.job = active ? job.id : "";
}

function setJob(device, job) {
  const tile = page.tiles.get(device);
  if (!tile) return;
  tile.job = job;
  drawTile(tile);
}

function jobOf(device, jobId) {
  const tile = page.tiles.get(device);
  if (!tile) return null;
  if (!tile.job || tile.job.id !== jobId) tile.job = { id: jobId, state: "running", phase: "detect", progress: null, waiting: null };
  return tile;
}

// ----- the event stream

function handleEvent(type, data) {
  if (type === "snapshot") {
    for (const device of data.devices || []) drawTile(tileFor(device));
    for (const job of data.jobs || []) setJob(job.device, Object.assign({}, job));
    return;
  }
  if (type === "shutdown") { setLive(false, "the daemon is shutting down"); return; }
  if (!data.device || !data.job) return;
  const tile = jobOf(data.device, data.job);
  if (!tile) return;
  const job = tile.job;
  if (type === "state") {
    job.state = data.state; job.phase = data.phase; job.position = data.position;
  } else if (type === "phase") {
    job.phase = data.phase; job.progress = null; job.waiting = null;
  } else if (type === "progress") {
    job.phase = data.phase; job.progress = data; job.waiting = null;
    if (data.point_of_no_return) job.point_of_no_return = true;
  } else if (type === "waiting") {
    job.waiting = data;
  } else if (type === "outcome") {
    const outcome = data.outcome;
    tile.device.last_outcome = data.state === "interrupted" ? "interrupted" : (outcome ? outcome.kind : "");
    if (outcome && outcome.firmware_version_after) tile.device.firmware_version = outcome.firmware_version_after;
    tile.job = null;
    loadHistory();
    loadBatches();
  }
  drawTile(tile);
}

function parseBlock(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;  // keep-alive
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  try { handleEvent(type, JSON.parse(data.join("\n"))); } catch (e) { console.error("event", type, e); }
}

async function follow() {
  let backoff = 500;
  for (;;) {
    try {
      // fetch, not EventSource: an EventSource can't send the Authorization header.
      const response = await fetch("/v1/events", { headers: headers({ "Accept": "text/event-stream" }) });
      if (response.status === 401) {
        setLive(false, "token needed");
        askForToken();
        await new Promise((resolve) => page.tokenWaiters.push(resolve));
        continue;
      }
      if (!response.ok) throw new Error(`${response.status}`);
      setLive(true);
      backoff = 500;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (e) {
      console.warn("event stream:", e);
    }
    if ($("#live").textContent !== "the daemon is shutting down") setLive(false);
    await new Promise((resolve) => setTimeout(resolve, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

// ----- the catalogue, the history, the actions

async function loadStatus() {
  try {
    const status = await api("GET", "/v1/status");
    $("#daemon-version").textContent = `netota ${status.version}`;
  } catch (e) { /* shown by the other requests */ }
}

async function loadFirmware() {
  const select = $("#firmware-select");
  try {
    const data = await api("GET", "/v1/firmware");
    select.replaceChildren();
    for (const item of data.firmware) {
      const option = document.createElement("option");
      option.value = item.name;
      const kind = item.kind && item.kind !== "unknown" ? `, ${item.kind.replace("_", " ")}` : "";
      const version = item.version ? `, version ${item.version}` : "";
      option.textContent = `${item.name} (${bytes(item.size)}${kind}${version})`;
      select.appendChild(option);
    }
    $("#firmware-info").textContent = data.firmware.length ? "" : "firmware_dir is empty: add an image with `netota firmware add FILE`";
  } catch (e) {
    $("#firmware-info").textContent = `the catalogue can't be read: ${e.message}`;
  }
}

async function loadHistory() {
  try {
    const data = await api("GET", `/v1/jobs?limit=${HISTORY_LIMIT}`);
    const body = $("#history tbody");
    body.replaceChildren();
    for (const job of data.jobs) {
      const row = document.createElement("tr");
      row.dataset.job = job.id;
      const outcome = job.outcome ? job.outcome.kind : job.state;
      const took = job.started && job.finished ? duration(job.finished - job.started) : (job.started ? "running" : "");
      for (const [cls, text] of [["id", job.id], ["device", job.device], ["firmware", job.firmware],
        ["outcome " + outcome, outcome.replace("_", " ")], ["started", when(job.started)], ["duration", took],
        ["advice", job.advice || job.message || ""]]) {
        const cell = document.createElement("td");
        cell.className = cls;
        cell.textContent = text;
        row.appendChild(cell);
      }
      const actions = document.createElement("td");
      if (job.resumable) {
        actions.appendChild(actionButton("resume", "Resume", () => resume(job.id)));
      }
      row.appendChild(actions);
      body.appendChild(row);
    }
  } catch (e) {
    showError(`the job history can't be read: ${e.message}`);
  }
}

// A table row's action: a button of class `cls` that calls `onClick`.
function actionButton(cls, text, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = cls;
  button.textContent = text;
  button.addEventListener("click", onClick);
  return button;
}

function countsText(counts) {
  const order = ["succeeded", "failed", "cancelled", "skipped", "refused", "running", "starting", "ready", "pending"];
  return order.filter((k) => counts && counts[k]).map((k) => `${counts[k]} ${k}`).join(", ") || "—";
}

async function loadBatches() {
  clearTimeout(page.batchesTimer);
  try {
    const data = await api("GET", `/v1/batches?limit=${BATCHES_LIMIT}`);
    // While one runs, look again every 2 s: a batch changes without job events too (pre-flight, skips).
    if (data.batches.some((b) => !["finished", "cancelled"].includes(b.state))) {
      page.batchesTimer = setTimeout(loadBatches, 2000);
    }
    const body = $("#batches tbody");
    body.replaceChildren();
    for (const batch of data.batches) {
      const row = document.createElement("tr");
      row.dataset.batch = batch.id;
      const result = batch.result || "";
      for (const [cls, text] of [["id", batch.id], ["firmware", batch.firmware], ["state", batch.state],
        ["result " + result, result], ["members", countsText(batch.counts)], ["stopped", batch.stop_message || ""]]) {
        const cell = document.createElement("td");
        cell.className = cls;
        cell.textContent = text;
        row.appendChild(cell);
      }
      const actions = document.createElement("td");
      if (!["finished", "cancelled", "cancelling"].includes(batch.state)) {
        actions.appendChild(actionButton("cancel-batch", "Cancel", () => cancelBatch(batch.id)));
      }
      row.appendChild(actions);
      body.appendChild(row);
    }
  } catch (e) {
    showError(`the batches can't be read: ${e.message}`);
  }
}

function selectedDevices() {
  return [...page.tiles.entries()].filter(([, t]) => $(".select", t.element).checked).map(([name]) => name);
}

async function startBatch() {
  const firmware = $("#firmware-select").value;
  const devices = selectedDevices();
  if (!devices.length) { showError("tick at least one device for the batch"); return; }
  if (!firmware) { showError("choose a firmware"); return; }
  const policy = {};
  const canary = $("#batch-canary").value;
  const failures = $("#batch-max-failures").value;
  if (canary !== "") policy.canary = Number(canary);
  if (failures !== "") policy.max_failures = Number(failures);
  if ($("#batch-skip-current").checked) policy.skip_current = true;
  try {
    await api("POST", "/v1/batches", { firmware, devices, policy });
    for (const device of devices) $(".select", page.tiles.get(device).element).checked = false;
    showError([]);
  } catch (e) {
    showError(`batch: ${e.message}`);
  }
  loadBatches();
}

async function cancelBatch(batchId) {
  try {
    await api("POST", `/v1/batches/${encodeURIComponent(batchId)}/cancel`, { reason: "cancelled from the dashboard" });
    showError([]);
  } catch (e) {
    showError(`batch ${batchId}: ${e.message}`);
  }
  loadBatches();
}

async function startUpgrade(event) {
  event.preventDefault();
  const firmware = $("#firmware-select").value;
  const devices = [...page.tiles.entries()].filter(([, t]) => $(".select", t.element).checked).map(([name]) => name);
  if (!devices.length) { showError("tick at least one device to upgrade"); return; }
  if (!firmware) { showError("choose a firmware"); return; }
  const problems = [];
  for (const device of devices) {
    try {
      const data = await api("POST", "/v1/jobs", { device, firmware });
      const tile = page.tiles.get(device);
      if (tile && (!tile.job || tile.job.id !== data.job.id)) setJob(device, data.job);
      $(".select", tile.element).checked = false;
    } catch (e) {
      problems.push(`${device}: ${e.message}`);
    }
  }
  showError(problems);
  loadHistory();
}

async function cancel(device) {
  const tile = page.tiles.get(device);
  const jobId = tile && tile.job ? tile.job.id : null;
  if (!jobId) return;
  try {
    await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { reason: "cancelled from the dashboard" });
    showError([]);
  } catch (e) {
    showError(`${device}: ${e.message}`);
  }
}

async function resume(jobId) {
  try {
    await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/resume`);
    showError([]);
  } catch (e) {
    showError(`resume ${jobId}: ${e.message}`);
  }
  loadHistory();
}

// ----- the token

function askForToken() {
  $("#token-form").hidden = false;
  $("#token-input").focus();
}

function useToken(event) {
  event.preventDefault();
  page.token = $("#token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, page.token);
  $("#token-form").hidden = true;
  showError([]);
  const waiters = page.tokenWaiters.splice(0);
  for (const resolve of waiters) resolve();
  loadAll();
}

function loadAll() {
  loadStatus();
  loadFirmware();
  loadHistory();
  loadBatches();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#upgrade-form").addEventListener("submit", startUpgrade);
  $("#batch-button").addEventListener("click", startBatch);
  $("#token-form").addEventListener("submit", useToken);
  $("#token-button").addEventListener("click", askForToken);
  loadAll();
  follow();
});
