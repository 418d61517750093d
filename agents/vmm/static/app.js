// Copyright: dstack.tee contributors
// GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
//
// The VMM web UI: lists the VMs (refreshed every 2 s), starts, stops and removes them, shows
// their logs, and deploys an app: app-compose.json is built here exactly as the Python does,
// the app's env public key is checked against the pinned KMS k256 key, and the env values are
// encrypted in this browser before CreateVm. Nothing secret is written to the console, to
// localStorage or to the URL; the admin token lives in sessionStorage (this tab only).

import * as lib from "./dstack.js";

const TOKEN_KEY = "dstack-vmm-token";
const KMS_KEY_KEY = "dstack-vmm-kms-k256-pubkey";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

// ---- API ------------------------------------------------------------------------------------------

class ApiError extends Error {}

let tokenPromise = null;
let tokenResolve = null;

function waitForToken(why) {
  if (!tokenPromise) {
    tokenPromise = new Promise((resolve) => { tokenResolve = resolve; });
    $("token-why").textContent = why;
    $("token-panel").hidden = false;
    $("main").classList.add("locked");
    $("token-input").focus();
  }
  return tokenPromise;
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token-input").value.trim();
  $("token-input").value = "";
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-panel").hidden = true;
  $("main").classList.remove("locked");
  $("forget-token").hidden = false;
  const resolve = tokenResolve;
  tokenPromise = null;
  tokenResolve = null;
  resolve();
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  $("forget-token").hidden = true;
  refreshVms();
});

/** fetch with the admin token; on 401 ask for a token and try again. */
async function authedFetch(url, init = {}) {
  for (;;) {
    const used = sessionStorage.getItem(TOKEN_KEY) || "";
    const headers = new Headers(init.headers || {});
    if (used) headers.set("Authorization", `Bearer ${used}`);
    const res = await fetch(url, { ...init, headers, cache: "no-store", credentials: "same-origin", redirect: "error" });
    if (res.status !== 401) return res;
    if ((sessionStorage.getItem(TOKEN_KEY) || "") === used) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("forget-token").hidden = true;
      await waitForToken(used
        ? "The VMM refused that token. Enter a valid admin token."
        : "This VMM needs an admin token. It is kept in this tab only (sessionStorage) and sent as Authorization: Bearer.");
    }
  }
}

async function errorOf(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
  } catch {
    // not JSON: fall through
  }
  return `HTTP ${res.status}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

// One VMM call at a time from this page: a stop can take the VMM a minute, and its process
// backend does not take concurrent calls well (see the report of the UI test). The list simply
// waits; logs are read beside it.
let queue = Promise.resolve();

function api(method, params = {}) {
  const run = queue.then(() => apiNow(method, params));
  queue = run.catch(() => {});
  return run;
}

/** POST /prpc/Vmm.<method> with a JSON body; the answer's JSON, or an ApiError with the VMM's message. */
async function apiNow(method, params) {
  const res = await authedFetch(`prpc/Vmm.${method}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(params),
  });
  if (!res.ok) throw new ApiError(`${method}: ${await errorOf(res)}`);
  try {
    return await res.json();
  } catch {
    throw new ApiError(`${method}: the answer is not JSON`);
  }
}

// ---- banner -------------------------------------------------------------------------------------

let bannerSource = "";

function showError(message, source = "action") {
  $("banner-text").textContent = message;
  $("banner").hidden = false;
  bannerSource = source;
}

function clearError(source) {
  if (!source || bannerSource === source) {
    $("banner").hidden = true;
    bannerSource = "";
  }
}

$("banner-close").addEventListener("click", () => clearError());

function messageOf(err) {
  return err instanceof Error ? err.message : String(err);
}

// ---- the VM list --------------------------------------------------------------------------------

const rows = new Map();
let refreshing = false;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function makeRow(vm) {
  const cells = {};
  const tr = el("tr", { "data-vm-id": vm.id });
  for (const name of ["name", "status", "boot", "app-id", "instance-id", "ports", "uptime"]) {
    cells[name] = el("td", { class: `vm-${name}` });
    tr.append(cells[name]);
  }
  const row = { tr, cells, vm, busy: false, removeTimer: null };
  const start = el("button", { type: "button", class: "vm-start", textContent: "Start" });
  const stop = el("button", { type: "button", class: "vm-stop", textContent: "Stop" });
  const logs = el("button", { type: "button", class: "vm-logs", textContent: "Logs" });
  const remove = el("button", { type: "button", class: "vm-remove", textContent: "Remove" });
  start.addEventListener("click", () => act(row, "StartVm", "started"));
  stop.addEventListener("click", () => act(row, "StopVm", "stopped"));
  logs.addEventListener("click", () => openLogs(row.vm));
  remove.addEventListener("click", () => {
    if (!row.removeTimer) {
      remove.textContent = "Confirm remove";
      remove.classList.add("danger");
      row.removeTimer = setTimeout(() => resetRemove(row), 5000);
      return;
    }
    resetRemove(row);
    act(row, "RemoveVm", "removed");
  });
  row.buttons = { start, stop, logs, remove };
  tr.append(el("td", { class: "vm-actions" }, start, stop, logs, remove));
  return row;
}

function resetRemove(row) {
  clearTimeout(row.removeTimer);
  row.removeTimer = null;
  row.buttons.remove.textContent = "Remove";
  row.buttons.remove.classList.remove("danger");
}

function fillRow(row, vm) {
  row.vm = vm;
  const { cells } = row;
  cells.name.textContent = vm.name;
  cells.name.title = `VM id ${vm.id}`;
  cells.status.textContent = vm.status;
  cells.status.className = `vm-status status-${vm.status}`;
  row.tr.dataset.status = vm.status;
  const live = vm.status === "running";
  cells.boot.textContent = vm.boot_error || (vm.boot_progress && !live ? `last: ${vm.boot_progress}` : vm.boot_progress || "");
  cells.boot.classList.toggle("error", Boolean(vm.boot_error));
  cells.boot.classList.toggle("muted", !live && !vm.boot_error);
  cells["app-id"].replaceChildren(el("code", { textContent: vm.app_id || "" }));
  cells["instance-id"].replaceChildren(el("code", { textContent: vm.instance_id || "" }));
  const ports = (vm.configuration && vm.configuration.ports) || [];
  const text = ports.map((p) => `${p.host_address}:${p.host_port}\u2192${p.vm_port}/${p.protocol}`).join(" ");
  if (/^https?:\/\//.test(vm.app_url || "")) {
    cells.ports.replaceChildren(el("a", { href: vm.app_url, target: "_blank", rel: "noopener noreferrer", textContent: text || vm.app_url }));
  } else {
    cells.ports.textContent = text;
  }
  cells.uptime.textContent = vm.uptime || (vm.exited_at ? `exited ${vm.exited_at}` : "");
  const running = vm.status === "running" || vm.status === "stopping";
  row.buttons.start.disabled = row.busy || running;
  row.buttons.stop.disabled = row.busy || !running;
  row.buttons.remove.disabled = row.busy;
}

function renderVms(vms) {
  const seen = new Set();
  for (const vm of vms) {
    seen.add(vm.id);
    let row = rows.get(vm.id);
    if (!row) {
      row = makeRow(vm);
      rows.set(vm.id, row);
      $("vm-rows").append(row.tr);
    }
    fillRow(row, vm);
  }
  for (const [id, row] of rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      rows.delete(id);
      if (logsVm && logsVm.id === id) closeLogs();
    }
  }
  $("vm-empty").hidden = vms.length > 0;
  $("vm-table").hidden = vms.length === 0;
  $("vm-count").textContent = `(${vms.length})`;
}

async function refreshVms() {
  if (refreshing) return;
  refreshing = true;
  try {
    const answer = await api("Status", {});
    renderVms(answer.vms || []);
    clearError("status");
    $("refresh-state").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "1";
  } catch (err) {
    showError(`Cannot list the VMs: ${messageOf(err)}`, "status");
    $("refresh-state").textContent = "not updated";
  } finally {
    refreshing = false;
  }
}

async function act(row, method, done) {
  row.busy = true;
  fillRow(row, row.vm);
  $("refresh-state").textContent = `${method} ${row.vm.name}: waiting for the VMM`;
  try {
    await api(method, { id: row.vm.id });
    clearError("action");
    $("refresh-state").textContent = `${row.vm.name} ${done}`;
  } catch (err) {
    showError(messageOf(err));
  } finally {
    row.busy = false;
    if (rows.has(row.vm.id)) fillRow(row, row.vm);
    await refreshVms();
  }
}

// ---- logs ---------------------------------------------------------------------------------------

let logsVm = null;
let logsLoading = false;

function openLogs(vm) {
  logsVm = vm;
  $("logs-name").textContent = vm.name;
  $("logs-text").textContent = "";
  // The compose's services (GetInfo/Status `services`): the containers' lines of one of them.
  const service = $("logs-service");
  service.replaceChildren(el("option", { value: "", textContent: "all" }),
    ...(vm.services || []).map((name) => el("option", { value: name, textContent: name })));
  service.disabled = $("logs-channel").value !== "stdout";
  $("logs-panel").hidden = false;
  loadLogs();
  $("logs-panel").scrollIntoView({ block: "nearest" });
}

function closeLogs() {
  logsVm = null;
  $("logs-panel").hidden = true;
  $("logs-text").textContent = "";
}

async function loadLogs() {
  if (!logsVm || logsLoading) return;
  logsLoading = true;
  const vm = logsVm;
  const pre = $("logs-text");
  try {
    const lines = Math.min(Math.max(parseInt($("logs-lines").value, 10) || 200, 1), 10000);
    const ch = $("logs-channel").value;  // the containers' lines (and so a service's) are on stdout
    // POST with a JSON body, as every VMM call: the VMM answers no GET a cross-site page could forge.
    const res = await authedFetch("logs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: vm.id, ch, lines, service: ch === "stdout" && $("logs-service").value || undefined }),
    });
    if (!res.ok) throw new ApiError(`logs: ${await errorOf(res)}`);
    const text = await res.text();
    if (logsVm !== vm) return;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = text || "(empty)";
    pre.dataset.loaded = String(Date.now());
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  } catch (err) {
    if (logsVm === vm) pre.textContent = `Cannot read the logs: ${messageOf(err)}`;
  } finally {
    logsLoading = false;
  }
}

$("logs-form").addEventListener("submit", (event) => {
  event.preventDefault();
  loadLogs();
});
$("logs-channel").addEventListener("change", () => {
  $("logs-service").disabled = $("logs-channel").value !== "stdout";
  loadLogs();
});
$("logs-service").addEventListener("change", loadLogs);
$("logs-close").addEventListener("click", closeLogs);

// ---- deploy -------------------------------------------------------------------------------------

let uploaded = null; // {text, shown}: an uploaded file's exact text (CRLF kept) while unedited

$("compose-upload").addEventListener("change", async () => {
  const file = $("compose-upload").files[0];
  if (!file) return;
  try {
    const text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(await file.arrayBuffer());
    $("compose-text").value = text;
    uploaded = { text, shown: $("compose-text").value };
    $("compose-upload-note").textContent = `${file.name}: ${file.size} bytes${text.includes("\r") ? " (its CR line ends are kept)" : ""}`;
  } catch {
    uploaded = null;
    $("compose-upload-note").textContent = `${file.name} is not UTF-8 text`;
  }
});

function composeText() {
  const shown = $("compose-text").value;
  return uploaded && uploaded.shown === shown ? uploaded.text : shown;
}

function intField(id, field) {
  const value = Number($(id).value);
  if (!Number.isSafeInteger(value) || value < 1) throw new lib.DstackError(field, "must be a positive whole number");
  return value;
}

/** The deployment the form describes: app-compose.json bytes, compose_hash, app_id and the VM config. */
async function prepareFromForm() {
  const name = $("app-name").value.trim();
  const options = {
    allowed_envs: lib.parseNames($("allowed-envs").value),
    key_provider: $("key-provider").value,
  };
  for (const field of ["gateway_enabled", "public_logs", "public_sysinfo", "public_tcbinfo", "no_instance_id", "secure_time"]) {
    options[field] = $(`opt-${field}`).checked;
  }
  const app = lib.buildAppCompose(composeText(), name, options);
  const bytes = lib.renderAppCompose(app);
  const composeHash = await lib.sha256Hex(bytes);
  const givenAppId = $("app-id").value.trim();
  const appId = lib.appIdFor(composeHash, givenAppId);
  const vm = {
    name: $("vm-name").value.trim() || name,
    compose_file: new TextDecoder().decode(bytes),
    ports: lib.parsePorts($("ports").value),
    vcpu: intField("vcpu", "vcpu"), memory: intField("memory", "memory"), disk_size: intField("disk-size", "disk_size"),
  };
  if (givenAppId) vm.app_id = appId;
  if ($("image").value.trim()) vm.image = $("image").value.trim();
  return { app, bytes, composeHash, appId, vm };
}

function showPrepared(prepared) {
  $("compose-hash").textContent = prepared.composeHash;
  $("app-id-out").textContent = prepared.appId;
  $("compose-size").textContent = `${prepared.bytes.length} bytes`;
  $("compose-json").textContent = prepared.vm.compose_file;
  $("deploy-result").hidden = false;
}

function step(text, state = "ok") {
  const item = el("li", { class: `step ${state}`, textContent: text });
  $("deploy-steps").append(item);
  return item;
}

$("preview-button").addEventListener("click", async () => {
  $("deploy-steps").replaceChildren();
  try {
    showPrepared(await prepareFromForm());
    $("compose-details").open = true;
  } catch (err) {
    $("deploy-result").hidden = false;
    step(messageOf(err), "failed");
  }
});

$("kms-pubkey").addEventListener("change", () => {
  const value = $("kms-pubkey").value.trim();
  try {
    lib.compressK256(value);
    $("kms-pubkey-note").textContent = value === localStorage.getItem(KMS_KEY_KEY)
      ? "pinned in this browser" : "a secp256k1 public key; pinned in this browser once a KMS signature verifies with it";
  } catch (err) {
    $("kms-pubkey-note").textContent = value ? messageOf(err) : "";
  }
});

let deploying = false;

$("deploy-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (deploying) return;
  deploying = true;
  $("deploy-button").disabled = true;
  $("deploy-steps").replaceChildren();
  $("deploy-result").hidden = false;
  const current = step("Building app-compose.json", "running");
  let encrypted = null;
  try {
    if (!window.isSecureContext || !crypto.subtle) {
      throw new lib.DstackError("page", "is not a secure context: open the VMM over https or http://127.0.0.1 (an SSH tunnel)");
    }
    const prepared = await prepareFromForm();
    showPrepared(prepared);
    current.textContent = `app-compose.json: ${prepared.bytes.length} bytes, compose_hash ${prepared.composeHash}, app_id ${prepared.appId}`;
    current.className = "step ok";

    const [kept, dropped] = lib.filterAllowed(lib.parseDotenv($("env-text").value), prepared.app.allowed_envs);
    if (dropped.length) step(`Not in allowed envs, so not encrypted: ${dropped.join(", ")}`, "warn");
    let encryptedHex = "";
    if (kept.length) {
      const pinned = $("kms-pubkey").value.trim();
      if (!pinned) throw new lib.DstackError("kms_k256_pubkey", "is required to check the KMS signature over the app's env key");
      lib.compressK256(pinned);
      const answer = await api("GetAppEnvEncryptPubKey", { app_id: prepared.appId });
      step(`Env public key for app ${prepared.appId} fetched from the KMS (through the VMM)`);
      const checked = lib.verifyEnvPubkey(answer, prepared.appId, pinned);
      step(`KMS signature checked: signature_v1 by the pinned key ${checked.signer.slice(0, 18)}..., made ${checked.age} s ago`);
      localStorage.setItem(KMS_KEY_KEY, pinned);
      $("kms-pubkey-note").textContent = "pinned in this browser";
      encrypted = await lib.encryptEnv(kept, checked.publicKey);
      encryptedHex = lib.toHex(encrypted);
      step(`Env encrypted in this browser: ${kept.length} variable(s) (${kept.map(([k]) => k).join(", ")}), ${encrypted.length} bytes`);
    } else {
      step("No env values to encrypt", "warn");
    }
    const answer = await api("CreateVm", { ...prepared.vm, encrypted_env: encryptedHex });
    step(`CreateVm: VM ${answer.id} created`);
    $("env-text").value = "";
    await refreshVms();
  } catch (err) {
    if (current.classList.contains("running")) current.remove();
    step(messageOf(err), "failed");
  } finally {
    if (encrypted) encrypted.fill(0);
    deploying = false;
    $("deploy-button").disabled = false;
  }
});

// ---- start --------------------------------------------------------------------------------------

async function loadMeta() {
  try {
    const [version, meta] = await Promise.all([api("Version"), api("GetMeta")]);
    const kms = (meta.kms && (meta.kms.urls || []).join(", ")) || "no KMS";
    $("meta-line").textContent = `${version.version} \u00b7 KMS ${kms}`;
    const offered = (meta.kms && meta.kms.k256_pubkey) || meta.kms_k256_pubkey || "";
    const pinned = localStorage.getItem(KMS_KEY_KEY) || "";
    const input = $("kms-pubkey");
    if (pinned) {
      input.value = pinned;
      $("kms-pubkey-note").textContent = "pinned in this browser";
      if (offered && offered.toLowerCase().replace(/^0x/, "") !== pinned.toLowerCase().replace(/^0x/, "")) {
        $("kms-pubkey-note").textContent = "pinned in this browser; WARNING: this VMM names a different KMS key";
      }
    } else if (offered) {
      input.value = offered;
      $("kms-pubkey-note").textContent = "filled from this VMM's GetMeta: check it against your KMS (dstack-kms meta)";
    }
  } catch (err) {
    showError(`Cannot read the VMM's meta: ${messageOf(err)}`, "meta");
  }
}

// For tests and the curious: the format functions this page uses (nothing secret).
window.dstackVmmUi = Object.freeze({ ...lib, prepareFromForm });

if (sessionStorage.getItem(TOKEN_KEY)) $("forget-token").hidden = false;
if (!window.isSecureContext || !window.crypto || !crypto.subtle) {
  showError("This page is not a secure context (https, or http on 127.0.0.1/localhost): the browser's WebCrypto is off, so "
    + "nothing can be encrypted here. Reach the VMM through an SSH tunnel to 127.0.0.1 or over https.", "secure");
}
refreshVms().then(loadMeta);
setInterval(refreshVms, REFRESH_MS);
setInterval(() => {
  if (logsVm && $("logs-follow").checked && !document.hidden) loadLogs();
}, REFRESH_MS);
