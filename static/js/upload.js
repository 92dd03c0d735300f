// The upload page: files picked, dropped or pasted join a queue (queue.js: each file once, at
// most three at a time); each is checked here first, gets a one-time upload URL from the broker,
// is sent straight to the image service with real progress and completed (client.js), then shown
// through /i/<id>/thumb. Everything here is DOM: rendering, focus and announcements.

import { BrokerError, connect, newIdempotencyKey } from "./client.js";
import * as store from "./store.js";
import { UploadQueue, FINAL, RETRYABLE } from "./queue.js";
import { check, humanSize, inspect } from "./checks.js";
import { prepare } from "./prepare.js";
import { chooseCrop, needsCrop } from "./crop.js";
import { RateMeter, humanDuration } from "./rate.js";
import { api, copyLink } from "./links.js";

const CONCURRENCY = 3;
const ACTIVE_LABELS = {
  starting: "Waiting", checking: "Checking", requesting: "Getting an upload link",
  processing: "Processing", cropping: "Waiting for your crop", resuming: "Resuming after the page was closed",
  renewing: "The upload link expired: getting a new one", offline: "Offline: waiting for the network",
};

const broker = connect({ csrfToken: document.querySelector('meta[name="csrf-token"]')?.content ?? "" });
const queueEl = document.getElementById("queue");
const liveEl = document.getElementById("live");
const dropEl = document.getElementById("dropzone");
const pickerEl = document.getElementById("file-input");
const template = document.getElementById("item-template");
const overallEl = document.getElementById("overall");
const overallBar = document.getElementById("overall-bar");
const overallText = document.getElementById("overall-text");
const clearButton = document.getElementById("clear-finished");
const speedText = document.getElementById("overall-speed");
const cameraEl = document.getElementById("camera-input");
const draftsNotice = document.getElementById("drafts-notice");
const variant = queueEl.dataset.variant || "public";
// The upload profile's rules (checks.js lists them; prepare.js reads max_dimension, keep_metadata).
const rules = JSON.parse(queueEl.dataset.rules || "{}");
// How many files one pick, drop or paste may add (a replace-mode profile: one).
const perPick = Number(queueEl.dataset.filesPerPick) || Infinity;
const meter = new RateMeter();
// The order totals are said in, and the word for each state.
const TOTALS = [["ready", "ready"], ["active", "uploading"], ["waiting", "waiting"], ["refused", "refused"],
  ["failed", "failed"], ["expired", "expired"], ["cancelled", "cancelled"]];

// The tile's data-state for each phase of a running file (the others are "checking").
const ACTIVE_STATES = { uploading: "uploading", processing: "processing", offline: "paused", retrying: "paused" };
const owner = queueEl.dataset.owner;
const rows = new Map(); // entry key → {el, preview URL, upload id, record}
const incoming = new Map(); // file → its stored record, until the queue makes its row

let announceTimer = null;
function announce(message) {
  // Replace the text so screen readers read each change once.
  liveEl.textContent = "";
  window.clearTimeout(announceTimer);
  announceTimer = window.setTimeout(() => { liveEl.textContent = message; }, 50);
}

function label(entry) {
  const percent = entry.file.size ? Math.min(100, Math.round((entry.loaded / entry.file.size) * 100)) : 100;
  switch (entry.state) {
    case "waiting": return "Waiting";
    case "active":
      if (entry.phase === "uploading") return percent < 100 ? `Uploading ${percent} %` : "Uploading 100 %: waiting for the image service";
      if (entry.phase === "retrying") return `Connection lost: trying again in ${entry.retryIn} s`;
      return ACTIVE_LABELS[entry.phase] ?? "Working";
    case "ready": return "Ready";
    case "failed": return `Failed: ${entry.error}`;
    case "refused": return `Refused: ${entry.error}`;
    case "expired": return "Expired: the upload link ran out";
    case "cancelled": return "Cancelled";
    default: return entry.state;
  }
}

function visibleButton(el) {
  return [...el.querySelectorAll("button, a.button")].find((b) => !b.hidden) ?? null;
}

function render(entry) {
  const row = rows.get(entry.key);
  if (!row) return;
  const { el } = row;
  const focused = el.contains(document.activeElement) && document.activeElement !== el ? document.activeElement : null;
  el.dataset.state = entry.state === "active" ? (ACTIVE_STATES[entry.phase] ?? "checking") : entry.state;
  if (row.uploadId) el.dataset.uploadId = row.uploadId; else delete el.dataset.uploadId;
  el.querySelector(".state").textContent = label(entry);
  const bar = el.querySelector("progress");
  const percent = entry.file.size ? Math.min(100, Math.round((entry.loaded / entry.file.size) * 100)) : 0;
  bar.value = percent;
  bar.hidden = !(entry.state === "active" && entry.phase === "uploading");
  bar.setAttribute("aria-valuetext", `${percent} %`);
  const ready = entry.state === "ready" && Boolean(row.uploadId);
  el.querySelector(".view").hidden = !ready;
  el.querySelector(".copy").hidden = !ready;
  if (ready) el.querySelector(".view").href = `/gallery/${encodeURIComponent(row.uploadId)}`;
  el.querySelector(".cancel").hidden = FINAL.includes(entry.state);
  el.querySelector(".retry").hidden = !RETRYABLE.includes(entry.state);
  el.querySelector(".remove").hidden = !FINAL.includes(entry.state) || entry.state === "ready";
  if (entry.state === "ready" && row.uploadId && !row.served) {
    // The image service's own thumbnail replaces the local preview.
    row.served = true;
    showPreview(row, `/i/${encodeURIComponent(row.uploadId)}/thumb`, `Thumbnail of ${entry.file.name}`);
  }
  // A focused button that just disappeared must not leave keyboard focus on nothing visible:
  // it moves to the row's other button, else to the row itself.
  if (focused?.hidden) (visibleButton(el) ?? el).focus();
}

function showPreview(row, src, alt) {
  const img = row.el.querySelector("img.thumb");
  img.onload = () => { img.hidden = false; row.el.querySelector(".preview-label").hidden = true; };
  img.onerror = () => { img.hidden = true; row.el.querySelector(".preview-label").hidden = false; };
  img.alt = alt;
  img.src = src;
  if (row.previewUrl && !src.startsWith("blob:")) {
    const old = row.previewUrl;
    row.previewUrl = null;
    img.addEventListener("load", () => URL.revokeObjectURL(old), { once: true });
  }
}

function renderOverall() {
  const p = queue.progress();
  overallEl.hidden = queue.entries.length === 0;
  clearButton.hidden = !queue.entries.some((e) => FINAL.includes(e.state));
  overallBar.value = p.percent;
  overallBar.setAttribute("aria-valuetext", `${p.percent} %`);
  // Every file is counted, each under its state, so the parts add up to the whole.
  const parts = TOTALS.filter(([state]) => p.counts[state]).map(([state, word]) => `${p.counts[state]} ${word}`);
  overallText.textContent = `${p.total} file${p.total === 1 ? "" : "s"}: ${parts.join(" · ")}`;
  overallEl.dataset.percent = String(p.percent);
  const sending = p.counts.active + p.counts.waiting > 0;
  if (sending) meter.sample(performance.now(), p.sent);
  const speed = sending ? meter.bytesPerSecond() : null;
  const left = sending ? meter.secondsLeft(p.bytes - p.sent) : null;
  speedText.textContent = [
    `${humanSize(p.sent)} of ${humanSize(p.bytes)} sent (${p.percent} %)`,
    speed ? `${humanSize(Math.round(speed))}/s` : null,
    left !== null ? `about ${humanDuration(left)} left` : null,
  ].filter(Boolean).join(" · ");
}

const SPOKEN = {
  ready: () => "is ready", refused: (e) => `was refused: ${e.error}`, failed: (e) => `failed: ${e.error}`,
  expired: () => "expired", cancelled: () => "was cancelled",
};

function onChange(entry) {
  if (!rows.has(entry.key)) addRow(entry);
  const row = rows.get(entry.key);
  if (row && row.spoken !== `${entry.attempt}:${entry.state}:${entry.phase}`) {
    row.spoken = `${entry.attempt}:${entry.state}:${entry.phase}`;
    if (SPOKEN[entry.state]) announce(`${entry.file.name} ${SPOKEN[entry.state](entry)}`);
    else if (entry.phase === "uploading" && entry.loaded === 0) announce(`${entry.file.name} is uploading`);
  }
  // A file that is done with (or given up on by the user) leaves the browser's storage.
  if (row && ["ready", "refused", "cancelled"].includes(entry.state)) store.drop(row.record.id);
  render(entry);
  renderOverall();
}

function discard(row) {
  // Give an unused upload slot back (it counts against the pending limit); best effort.
  if (!row.uploadId || row.discarded === row.uploadId) return;
  row.discarded = row.uploadId;
  broker.deleteUpload(row.uploadId).catch(() => {});
}

// Pauses (ms) before sending a file again after the connection broke, while the browser says it
// is online; offline, the page waits for the `online` event instead.
const SEND_RETRIES = [1000, 2000, 4000, 8000, 15000, 30000];
// Expired upload links replaced in one attempt before the page gives up and says so.
const RENEWALS = 3;

function wait(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = window.setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { window.clearTimeout(timer); reject(new DOMException("cancelled", "AbortError")); }, { once: true });
  });
}

function online(signal) {
  return new Promise((resolve, reject) => {
    if (navigator.onLine) { resolve(); return; }
    window.addEventListener("online", resolve, { once: true });
    signal.addEventListener("abort", () => reject(new DOMException("cancelled", "AbortError")), { once: true });
  });
}

function keep(row, changes) {
  // The record of this file in the browser's storage follows the page's progress.
  Object.assign(row.record, changes);
  store.update(row.record.id, changes);
}

let cropping = Promise.resolve(); // one crop dialog at a time, in the order the files came

async function cropFor(entry, row, attempt) {
  // A profile with an aspect ratio (an avatar): a picture of another shape is cropped and
  // turned in a dialog first, as the <upload-broker> component does (crop.js's needsCrop).
  // Returns {rotate, crop}, undefined (nothing to crop) or null (the person cancelled).
  if (!await needsCrop(entry.file, rules, await row.info)) return undefined;
  attempt.report("cropping");
  cropping = cropping.then(() => chooseCrop(entry.file, rules.aspect_ratio).catch(() => undefined));
  return cropping;
}

async function makeFit(entry, row, attempt) {
  // Made to fit the rules on this device (cropped, smaller, upright, without location) before it
  // goes; the queue counts the bytes really sent. Once per file, kept across reloads. Returns
  // the outcome when the person cancelled the crop, else null.
  if (row.record.prepared) return null;
  const edit = await cropFor(entry, row, attempt);
  if (edit === null) return { state: "cancelled" };
  attempt.signal.throwIfAborted();
  attempt.report("checking");
  const prepared = await prepare(entry.file, rules, edit).catch(() => null);
  if (prepared && prepared.file !== entry.file) {
    row.note = [prepared.note, prepared.stripped ? "location and camera details removed" : null].filter(Boolean).join(", ");
    entry.file = prepared.file;
    learn(entry, row);
    showFacts(entry, row);
  }
  keep(row, { prepared: true, file: entry.file, note: row.note ?? null });
  return null;
}

async function createFor(entry, row, attempt) {
  // Not aborted midway: a slot the broker did create must be known, to be given back.
  // What the page learnt about the file rides along as metadata, for the detail page to show.
  // The record's key makes a create repeated after a reload replay the first answer.
  try {
    const profile = queueEl.dataset.profile;
    const body = { metadata: { file: await row.facts }, ...(profile ? { profile } : {}) };
    const upload = await patiently(attempt, "requesting", () => broker.createUpload({ body, idempotencyKey: row.record.key }));
    row.limitHit = false;
    row.uploadId = upload.id;
    row.served = false;
    keep(row, { uploadId: upload.id, uploadUrl: upload.upload_url, sent: false });
    return null;
  } catch (error) {
    if (error.code === "too_many_pending_uploads") {
      // The API's wording speaks to apps; a browser user is offered the one action that helps.
      row.limitHit = true;
      showDraftsNotice();
      return { state: "failed", error: "too many drafts are waiting for a file" };
    }
    if (error.retryAfter) error.message = `${error.message} Try again in ${error.retryAfter} s.`;
    throw error;
  }
}

async function patiently(attempt, phase, work) {
  // A call that got no answer (offline, a broken connection) is tried again: at once when the
  // browser is back online, else after a growing pause; the tile says which.
  for (let tries = 0; ; tries++) {
    if (!navigator.onLine) {
      attempt.report("offline");
      await online(attempt.signal);
    }
    attempt.report(phase, phase === "uploading" ? { loaded: 0 } : {});
    try {
      return await work();
    } catch (error) {
      const noAnswer = error instanceof TypeError || (error instanceof BrokerError && error.status === 0);
      // The same create still running (its page was reloaded meanwhile): its answer comes soon.
      const running = error.code === "idempotency_in_progress";
      if (!(noAnswer || running) || tries >= SEND_RETRIES.length) throw error;
      if (running) await wait(SEND_RETRIES[0], attempt.signal);
      else if (navigator.onLine) {
        attempt.report("retrying", { retryIn: SEND_RETRIES[tries] / 1000 });
        await wait(SEND_RETRIES[tries], attempt.signal);
      }
    }
  }
}

function send(entry, row, attempt) {
  return patiently(attempt, "uploading", () => broker.sendFile(
    row.record.uploadUrl, entry.file, { signal: attempt.signal, onProgress: (sent) => attempt.progress(sent) },
  ));
}

function outcome(upload) {
  if (upload.status === "ready") return { state: "ready" };
  if (upload.status === "expired") return { state: "expired" };
  return { state: "failed", error: upload.reject_reason ?? `the upload ended ${upload.status}` };
}

async function resumed(row, attempt) {
  // An upload made before a reload: its file may have arrived (then no byte is sent again).
  try {
    const { upload } = await patiently(attempt, "resuming", () => broker.complete(row.uploadId, { signal: attempt.signal }));
    return upload && upload.status !== "pending" ? upload : null;
  } catch (error) {
    if (error.status === 404) { keep(row, { uploadId: null, uploadUrl: null }); row.uploadId = null; return null; }
    throw error;
  }
}

function renew(row, attempt) {
  // The upload link expired before its file arrived: a new upload replaces it (a new key, or
  // the broker would replay the old answer); the old draft's slot is given back.
  attempt.report("renewing");
  discard(row);
  row.uploadId = null;
  keep(row, { uploadId: null, uploadUrl: null, sent: false, key: newIdempotencyKey() });
}

async function run(entry, attempt) {
  const row = rows.get(entry.key);
  const { signal } = attempt;
  attempt.report("checking");
  // More files than one pick may hold: this one was left out (and nothing is created for it).
  if (row.record.leftOut) return { state: "refused", error: row.record.leftOut };
  const cancelled = await makeFit(entry, row, attempt);
  if (cancelled) return cancelled;
  signal.throwIfAborted();
  const problem = await check(entry.file, rules);
  if (problem) return { state: "refused", error: problem };
  signal.throwIfAborted();
  if (row.uploadId && !row.record.sent) {
    const earlier = await resumed(row, attempt);
    // Ready or refused: that is the file's outcome. Expired, or gone (a draft past its time is
    // removed): a new upload replaces it.
    if (earlier?.status === "ready" || earlier?.status === "rejected") return outcome(earlier);
    if (earlier) renew(row, attempt);
  }
  for (let renewals = 0; !row.record.sent; renewals++) {
    if (!row.uploadId) {
      const refused = await createFor(entry, row, attempt);
      if (refused) return refused;
      if (signal.aborted) { discard(row); signal.throwIfAborted(); }
    }
    try {
      await send(entry, row, attempt);
    } catch (error) {
      // 409: the link already has its file (sent before a reload); 410: it expired meanwhile,
      // so a new upload replaces it, without the user doing anything.
      if (error.status === 410 && renewals < RENEWALS) {
        renew(row, attempt);
        continue;
      }
      if (error.status !== 409) throw error;
    }
    keep(row, { sent: true });
  }
  attempt.report("processing", { loaded: entry.file.size });
  const settled = await patiently(attempt, "processing", () => broker.waitUntilSettled(row.uploadId, { signal }));
  return outcome(settled);
}

const queue = new UploadQueue({ limit: CONCURRENCY, run, onChange });

function addRow(entry) {
  const el = template.content.firstElementChild.cloneNode(true);
  const record = incoming.get(entry.file);
  incoming.delete(entry.file);
  const row = {
    el, previewUrl: null, uploadId: record.uploadId ?? null, served: false, spoken: null, limitHit: false, record, note: record.note ?? null,
  };
  rows.set(entry.key, row);
  el.dataset.key = String(entry.key);
  el.querySelector(".name").textContent = entry.file.name;
  el.querySelector(".cancel").setAttribute("aria-label", `Cancel ${entry.file.name}`);
  el.querySelector(".retry").setAttribute("aria-label", `Retry ${entry.file.name}`);
  el.querySelector(".remove").setAttribute("aria-label", `Remove ${entry.file.name}`);
  el.querySelector(".view").setAttribute("aria-label", `View ${entry.file.name}`);
  el.querySelector(".copy").setAttribute("aria-label", `Copy a link to ${entry.file.name}`);
  el.querySelector(".copy").addEventListener("click", async () => {
    try {
      const { url, message } = await copyLink(row.uploadId, variant);
      el.dataset.url = url;
      el.querySelector(".state").textContent = message.startsWith("Copy this link") ? message : "Ready · link copied";
      announce(`${entry.file.name}: ${message}`);
    } catch (error) {
      el.querySelector(".state").textContent = `Could not make a link: ${error.message}`;
    }
  });
  el.querySelector(".remove").addEventListener("click", () => {
    const removed = queue.remove(entry.key);
    if (!removed) return;
    // A failed file may still hold a draft (the transfer broke): give its slot back.
    if (removed.state === "failed") discard(row);
    const next = el.nextElementSibling ?? el.previousElementSibling;
    forget(entry);
    renderOverall();
    announce(`${entry.file.name} removed`);
    (next ? visibleButton(next) ?? next : dropEl).focus();
  });
  el.querySelector(".cancel").addEventListener("click", () => {
    queue.cancel(entry.key);
    discard(row);
    el.querySelector(".retry").focus();
  });
  el.querySelector(".retry").addEventListener("click", () => {
    // Upload links are single-use: a retry asks for a fresh one and frees the old slot.
    if (entry.state !== "expired") discard(row);
    row.uploadId = null;
    keep(row, { uploadId: null, uploadUrl: null, sent: false, key: newIdempotencyKey() });
    queue.retry(entry.key);
    (visibleButton(el) ?? el).focus();
  });
  learn(entry, row);
  queueEl.append(el);
  preview(entry, row);
}

function learn(entry, row) {
  // What the page knows about the file it sends, for the tile and the detail page's facts.
  const file = entry.file;
  row.info = inspect(file).catch(() => ({}));
  row.facts = row.info.then(({ format, width, height, animated }) => ({
    name: file.name.slice(0, 100), type: format?.label ?? null, bytes: file.size, width: width ?? null, height: height ?? null,
    animated: Boolean(animated),
  }));
}

async function showFacts(entry, row) {
  // The facts a tile shows: type, size, dimensions, and what this device changed.
  const file = entry.file;
  const { format, width, height, animated } = await row.info;
  if (file !== entry.file) return format; // prepared meanwhile: the newer facts are shown instead
  row.el.querySelector(".preview-label").textContent = format ? format.label : "?";
  row.el.querySelector(".facts").textContent = [
    format ? `${format.label}${animated ? " (animated)" : ""}` : "Unknown type",
    humanSize(file.size),
    width && height ? `${width}×${height}` : null,
    row.note || null,
  ].filter(Boolean).join(" · ");
  return format;
}

async function preview(entry, row) {
  // A local preview at once where the browser can show the format (not HEIC in most browsers).
  const format = await showFacts(entry, row);
  if (!format?.browserCanShow || row.served) return;
  row.previewUrl = URL.createObjectURL(entry.file);
  showPreview(row, row.previewUrl, `Preview of ${entry.file.name}`);
}

function addAll(fileList) {
  const files = Array.from(fileList ?? []);
  if (!files.length) return;
  // A profile that takes one file (or n) per pick: the first are taken, the others are shown
  // refused, never stored or sent.
  const taken = files.slice(0, perPick).length;
  const leftOut = perPick === 1 ? "this page takes one file at a time: add it on its own"
    : `this page takes ${perPick} files at a time: add it with fewer others`;
  for (const [at, file] of files.entries()) {
    const id = newIdempotencyKey();
    const record = { id, owner, file, key: id, added: Date.now() + at / 1000, prepared: false, uploadId: null, uploadUrl: null, sent: false };
    if (at >= taken) record.leftOut = leftOut;
    // Kept in the browser until it is done with, so a reload or a closed tab loses nothing.
    else store.save(record);
    incoming.set(file, record);
  }
  queue.add(files); // onChange builds each row before the queue starts any of them
  const extra = files.length - taken;
  announce(`${taken} file${taken > 1 ? "s" : ""} added${extra ? `; ${extra} left out: ${leftOut.split(":")[0]}` : ""}`);
}

async function resumeKept() {
  // Files a previous visit did not finish come back in the queue and carry on by themselves.
  const records = await store.load(owner);
  if (!records.length) return;
  for (const record of records) incoming.set(record.file, record);
  queue.add(records.map((r) => r.file));
  announce(`${records.length} file${records.length > 1 ? "s" : ""} from your last visit resumed`);
}

function forget(entry) {
  const row = rows.get(entry.key);
  if (row?.previewUrl) URL.revokeObjectURL(row.previewUrl);
  row?.el.remove();
  rows.delete(entry.key);
  if (row) store.drop(row.record.id);
}

function showDraftsNotice() {
  document.getElementById("drafts-text").textContent =
    "You have reached the limit of uploads waiting for a file: earlier uploads that never got " +
    "their file (an interrupted page, a closed tab) still hold their places.";
  draftsNotice.hidden = false;
}

async function discardDrafts() {
  // Drafts this page is still sending files to are kept; the others are discarded in one go,
  // and the files refused for the limit are tried again.
  const keep = [...rows.values()].filter((r) => r.uploadId && !r.limitHit).map((r) => r.uploadId);
  const button = document.getElementById("discard-drafts");
  button.disabled = true;
  try {
    const { discarded } = await api("POST", "/gallery/drafts/discard", { keep });
    draftsNotice.hidden = true;
    announce(`${discarded} waiting draft${discarded === 1 ? "" : "s"} discarded`);
    for (const entry of queue.entries) {
      if (rows.get(entry.key)?.limitHit && entry.state === "failed") queue.retry(entry.key);
    }
  } catch (error) {
    document.getElementById("drafts-text").textContent = `Could not discard the drafts: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

function clearFinished() {
  const removed = queue.clearFinished();
  for (const entry of removed) forget(entry);
  renderOverall();
  announce(`${removed.length} finished row${removed.length === 1 ? "" : "s"} cleared`);
  dropEl.focus();
}

for (const input of [pickerEl, cameraEl]) {
  input.addEventListener("change", () => { addAll(input.files); input.value = ""; });
}
document.getElementById("camera").addEventListener("click", () => cameraEl.click());
document.getElementById("discard-drafts").addEventListener("click", discardDrafts);
for (const type of ["dragenter", "dragover"]) {
  dropEl.addEventListener(type, (event) => { event.preventDefault(); dropEl.classList.add("dragging"); });
}
for (const type of ["dragleave", "drop"]) {
  dropEl.addEventListener(type, (event) => { event.preventDefault(); dropEl.classList.remove("dragging"); });
}
dropEl.addEventListener("drop", (event) => addAll(event.dataTransfer.files));
dropEl.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); pickerEl.click(); }
});
dropEl.addEventListener("click", () => pickerEl.click());
document.addEventListener("paste", (event) => {
  // Images pasted anywhere on the page (a screenshot, a copied image) join the queue; text
  // pasted into a field is left alone.
  const files = [...(event.clipboardData?.files ?? [])];
  if (!files.length) return;
  event.preventDefault();
  addAll(files);
});
clearButton.addEventListener("click", clearFinished);
resumeKept();
