// The upload page: files picked, dropped or pasted join a queue (queue.js: each file once, at
// most three at a time); each is checked here first, gets a one-time upload URL from the broker,
// is sent straight to the image service with real progress and completed (client.js), then shown
// through /i/<id>/thumb. Everything here is DOM: rendering, focus and announcements.

import { connect } from "./client.js";
import { UploadQueue, FINAL, RETRYABLE } from "./queue.js";
import { check, humanSize, inspect } from "./checks.js";
import { RateMeter, humanDuration } from "./rate.js";
import { api, copyLink } from "./links.js";

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
const speedText = document.getElementById("overall-speed");
const cameraEl = document.getElementById("camera-input");
const draftsNotice = document.getElementById("drafts-notice");
const variant = queueEl.dataset.variant || "public";
const meter = new RateMeter();
// The order totals are said in, and the word for each state.
const TOTALS = [["ready", "ready"], ["active", "uploading"], ["waiting", "waiting"], ["refused", "refused"],
  ["failed", "failed"], ["expired", "expired"], ["cancelled", "cancelled"]];

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
  return [...el.querySelectorAll("button, a.button")].find((b) => !b.hidden) ?? null;
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
    // What the page learnt about the file rides along as metadata, for the detail page to show.
    const profile = document.getElementById("queue").dataset.profile;
    const body = { metadata: { file: await row.facts } };
    upload = await broker.createUpload({ body: profile ? { ...body, profile } : body });
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
  row.limitHit = false;
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
  const row = { el, previewUrl: null, uploadId: null, served: false, spoken: null, limitHit: false };
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
    queue.retry(entry.key);
    (visibleButton(el) ?? el).focus();
  });
  row.info = inspect(entry.file).catch(() => ({}));
  row.facts = row.info.then(({ format, width, height, animated }) => ({
    name: entry.file.name.slice(0, 100), type: format?.label ?? null, bytes: entry.file.size, width: width ?? null, height: height ?? null,
    animated: Boolean(animated),
  }));
  queueEl.append(el);
  preview(entry, row);
}

async function preview(entry, row) {
  // A local preview at once where the browser can show the format (not HEIC in most browsers),
  // and the facts a tile shows: type, size, dimensions.
  const label = row.el.querySelector(".preview-label");
  const { format, width, height, animated } = await row.info;
  label.textContent = format ? format.label : "?";
  row.el.querySelector(".facts").textContent = [
    format ? `${format.label}${animated ? " (animated)" : ""}` : "Unknown type",
    humanSize(entry.file.size),
    width && height ? `${width}×${height}` : null,
  ].filter(Boolean).join(" · ");
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

function forget(entry) {
  const row = rows.get(entry.key);
  if (row?.previewUrl) URL.revokeObjectURL(row.previewUrl);
  row?.el.remove();
  rows.delete(entry.key);
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
