// The upload page: files picked, dropped or pasted join a queue (queue.js: each file once, at
// most three at a time); each is checked here first, gets a one-time upload URL from the broker,
// is sent straight to the image service with real progress and completed (client.js), then shown
// through /i/<id>/thumb. Everything here is DOM: rendering, focus and announcements.

import { connect } from "./client.js";
import { UploadQueue, FINAL, RETRYABLE } from "./queue.js";
import { check, humanSize, sniffFormat } from "./checks.js";

const CONCURRENCY = 3;
const ACTIVE_LABELS = {
  starting: "Waiting", checking: "Checking", requesting: "Getting an upload link",
  processing: "Processing",
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

const rows = new Map(); // entry key → {el, preview URL, upload id}

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
  return [...el.querySelectorAll("button")].find((b) => !b.hidden) ?? null;
}

function render(entry) {
  const row = rows.get(entry.key);
  if (!row) return;
  const { el } = row;
  const focused = el.contains(document.activeElement) && document.activeElement !== el ? document.activeElement : null;
  el.dataset.state = entry.state === "active" ? (entry.phase === "uploading" ? "uploading" : entry.phase === "processing" ? "processing" : "checking") : entry.state;
  if (row.uploadId) el.dataset.uploadId = row.uploadId; else delete el.dataset.uploadId;
  el.querySelector(".state").textContent = label(entry);
  const bar = el.querySelector("progress");
  const percent = entry.file.size ? Math.min(100, Math.round((entry.loaded / entry.file.size) * 100)) : 0;
  bar.value = percent;
  bar.hidden = !(entry.state === "active" && entry.phase === "uploading");
  bar.setAttribute("aria-valuetext", `${percent} %`);
  el.querySelector(".cancel").hidden = FINAL.includes(entry.state);
  el.querySelector(".retry").hidden = !RETRYABLE.includes(entry.state);
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
  overallText.textContent = `${p.done} of ${p.files} file${p.files === 1 ? "" : "s"} uploaded · ${humanSize(p.sent)} of ${humanSize(p.bytes)} (${p.percent} %)`;
  overallEl.dataset.percent = String(p.percent);
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
  render(entry);
  renderOverall();
}

function discard(row) {
  // Give an unused upload slot back (it counts against the pending limit); best effort.
  if (!row.uploadId || row.discarded === row.uploadId) return;
  row.discarded = row.uploadId;
  broker.deleteUpload(row.uploadId).catch(() => {});
}

async function run(entry, attempt) {
  const row = rows.get(entry.key);
  const { signal } = attempt;
  attempt.report("checking");
  const problem = await check(entry.file);
  if (problem) return { state: "refused", error: problem };
  signal.throwIfAborted();
  attempt.report("requesting");
  let upload;
  try {
    // Not aborted midway: a slot the broker did create must be known, to be given back.
    upload = await broker.createUpload();
  } catch (error) {
    if (error.retryAfter) error.message = `${error.message} Try again in ${error.retryAfter} s.`;
    throw error;
  }
  row.uploadId = upload.id;
  row.served = false;
  if (signal.aborted) { discard(row); signal.throwIfAborted(); }
  attempt.report("uploading", { loaded: 0 });
  await broker.sendFile(upload.upload_url, entry.file, { signal, onProgress: (sent) => attempt.progress(sent) });
  attempt.report("processing", { loaded: entry.file.size });
  const done = await broker.waitUntilSettled(upload.id, { signal });
  if (done.status === "ready") return { state: "ready" };
  if (done.status === "expired") return { state: "expired" };
  return { state: "failed", error: done.reject_reason ?? `the upload ended ${done.status}` };
}

const queue = new UploadQueue({ limit: CONCURRENCY, run, onChange });

function addRow(entry) {
  const el = template.content.firstElementChild.cloneNode(true);
  const row = { el, previewUrl: null, uploadId: null, served: false, spoken: null };
  rows.set(entry.key, row);
  el.dataset.key = String(entry.key);
  el.querySelector(".name").textContent = entry.file.name;
  el.querySelector(".size").textContent = humanSize(entry.file.size);
  el.querySelector(".cancel").setAttribute("aria-label", `Cancel ${entry.file.name}`);
  el.querySelector(".retry").setAttribute("aria-label", `Retry ${entry.file.name}`);
  el.querySelector(".cancel").addEventListener("click", () => {
    queue.cancel(entry.key);
    discard(row);
    el.querySelector(".retry").focus();
  });
  el.querySelector(".retry").addEventListener("click", () => {
    // Upload links are single-use: a retry asks for a fresh one and frees the old slot.
    if (entry.state !== "expired") discard(row);
    row.uploadId = null;
    queue.retry(entry.key);
    (visibleButton(el) ?? el).focus();
  });
  queueEl.append(el);
  preview(entry, row);
}

async function preview(entry, row) {
  // A local preview at once where the browser can show the format (not HEIC in most browsers).
  const label = row.el.querySelector(".preview-label");
  const format = await sniffFormat(entry.file).catch(() => null);
  label.textContent = format ? format.label : "?";
  if (!format?.browserCanShow || row.served) return;
  row.previewUrl = URL.createObjectURL(entry.file);
  showPreview(row, row.previewUrl, `Preview of ${entry.file.name}`);
}

function addAll(fileList) {
  const files = Array.from(fileList ?? []);
  if (!files.length) return;
  queue.add(files); // onChange builds each row before the queue starts any of them
  announce(`${files.length} file${files.length > 1 ? "s" : ""} added`);
}

function clearFinished() {
  const removed = queue.clearFinished();
  for (const entry of removed) {
    const row = rows.get(entry.key);
    if (row?.previewUrl) URL.revokeObjectURL(row.previewUrl);
    row?.el.remove();
    rows.delete(entry.key);
  }
  renderOverall();
  announce(`${removed.length} finished row${removed.length === 1 ? "" : "s"} cleared`);
  dropEl.focus();
}

pickerEl.addEventListener("change", () => { addAll(pickerEl.files); pickerEl.value = ""; });
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
