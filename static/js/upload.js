// The upload page: a queue of files sent straight to Cloudflare (or the emulator), at most three
// at a time. Each file is checked here first, then gets a one-time upload URL from the broker,
// is POSTed with real progress, completed, followed until ready and shown through /i/<id>/thumb.

const MAX_BYTES = 10 * 1024 * 1024;
const MAX_SIDE = 12000;
const MAX_PIXELS = 100_000_000;
const CONCURRENCY = 3;
const FORMATS = {
  "image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/webp": "WebP", "image/svg+xml": "SVG",
};

const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
const queueEl = document.getElementById("queue");
const liveEl = document.getElementById("live");
const dropEl = document.getElementById("dropzone");
const pickerEl = document.getElementById("file-input");
const template = document.getElementById("item-template");

const items = [];
let nextKey = 1;

function announce(message) {
  // Replace the text so screen readers read each change once.
  liveEl.textContent = "";
  window.setTimeout(() => { liveEl.textContent = message; }, 50);
}

function humanSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

async function sniffFormat(file) {
  // Trust the bytes, not the name or the browser's guess from the extension.
  const head = new Uint8Array(await file.slice(0, 512).arrayBuffer());
  const starts = (...bytes) => bytes.every((b, i) => head[i] === b);
  if (starts(0xff, 0xd8, 0xff)) return "image/jpeg";
  if (starts(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a)) return "image/png";
  if (starts(0x47, 0x49, 0x46, 0x38)) return "image/gif";
  if (starts(0x52, 0x49, 0x46, 0x46) && head[8] === 0x57 && head[9] === 0x45 && head[10] === 0x42 && head[11] === 0x50) return "image/webp";
  const text = new TextDecoder("utf-8", { fatal: false }).decode(head).trimStart().toLowerCase();
  if (text.startsWith("<svg") || (text.startsWith("<?xml") && text.includes("<svg"))) return "image/svg+xml";
  return null;
}

function readDimensions(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => { URL.revokeObjectURL(url); resolve({ width: img.naturalWidth, height: img.naturalHeight, url: null }); };
    img.onerror = () => { URL.revokeObjectURL(url); resolve(null); };
    img.src = url;
  });
}

async function check(file) {
  if (file.size === 0) return "The file is empty.";
  if (file.size > MAX_BYTES) return `Too large: ${humanSize(file.size)} (the limit is 10 MB).`;
  const format = await sniffFormat(file);
  if (!format) return "Not a supported image: use JPEG, PNG, GIF, WebP or SVG.";
  const size = await readDimensions(file);
  if (!size || (format !== "image/svg+xml" && (!size.width || !size.height))) {
    return `The ${FORMATS[format]} file could not be read as an image.`;
  }
  if (size.width > MAX_SIDE || size.height > MAX_SIDE) return `Too big: ${size.width}×${size.height} px (at most 12,000 px a side).`;
  if (size.width * size.height > MAX_PIXELS) return "Too big: more than 100 megapixels.";
  return null;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken, Accept: "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok && response.status !== 202) {
    const message = data?.error?.message ?? `The broker answered ${response.status}.`;
    const retryAfter = response.headers.get("Retry-After");
    throw new Error(retryAfter ? `${message} Try again in ${retryAfter} s.` : message);
  }
  return { status: response.status, data };
}

function render(item) {
  const el = item.el;
  el.dataset.state = item.state;
  if (item.uploadId) el.dataset.uploadId = item.uploadId; else delete el.dataset.uploadId;
  el.querySelector(".name").textContent = item.file.name;
  el.querySelector(".size").textContent = humanSize(item.file.size);
  const labels = {
    waiting: "Waiting", checking: "Checking", requesting: "Getting an upload link",
    uploading: item.progress < 100 ? `Uploading ${item.progress} %` : "Uploading 100 %: waiting for the image service",
    processing: "Processing", ready: "Ready",
    failed: `Failed: ${item.error}`, refused: `Refused: ${item.error}`, expired: "Expired: the upload link ran out",
    cancelled: "Cancelled",
  };
  el.querySelector(".state").textContent = labels[item.state];
  const bar = el.querySelector("progress");
  bar.value = item.progress;
  bar.hidden = item.state !== "uploading";
  bar.setAttribute("aria-valuetext", `${item.progress} %`);
  el.querySelector(".cancel").hidden = !["waiting", "checking", "requesting", "uploading", "processing"].includes(item.state);
  el.querySelector(".retry").hidden = !["failed", "expired", "cancelled"].includes(item.state);
  const thumb = el.querySelector("img.thumb");
  if (item.state === "ready" && item.uploadId && !thumb.src) {
    thumb.src = `/i/${encodeURIComponent(item.uploadId)}/thumb`;
    thumb.alt = `Thumbnail of ${item.file.name}`;
    thumb.hidden = false;
  }
}

function setState(item, state, extra = {}) {
  Object.assign(item, { state }, extra);
  render(item);
  const spoken = { ready: "is ready", refused: `was refused: ${item.error}`, failed: `failed: ${item.error}`, expired: "expired", cancelled: "was cancelled", uploading: "is uploading", processing: "is processing" };
  if (spoken[state] && !(state === "uploading" && item.progress > 0)) announce(`${item.file.name} ${spoken[state]}`);
  pump();
}

function sendFile(item, uploadUrl) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    item.xhr = xhr;
    xhr.open("POST", uploadUrl);
    xhr.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      item.progress = Math.min(100, Math.round((event.loaded / event.total) * 100));
      render(item);
    };
    xhr.onload = () => {
      item.xhr = null;
      if (xhr.status >= 200 && xhr.status < 300) return resolve();
      let message = `upload answered ${xhr.status}`;
      try { message = JSON.parse(xhr.responseText).errors?.[0]?.message ?? message; } catch { /* keep the status */ }
      reject(new Error(xhr.status === 410 ? "the upload link expired" : message));
    };
    xhr.onerror = () => { item.xhr = null; reject(new Error("the connection to the upload server failed")); };
    xhr.onabort = () => { item.xhr = null; reject(new DOMException("cancelled", "AbortError")); };
    const form = new FormData();
    form.append("file", item.file, item.file.name);
    xhr.send(form);
  });
}

async function follow(item) {
  // Ask the broker to verify now; then follow the state with a gentle backoff.
  let { status, data } = await api("POST", `/api/v1/uploads/${encodeURIComponent(item.uploadId)}/complete`);
  let delay = 500;
  while (status === 202 || data?.status === "pending") {
    if (item.state === "cancelled") return;
    await new Promise((r) => window.setTimeout(r, delay));
    delay = Math.min(delay * 2, 5000);
    ({ status, data } = await api("GET", `/api/v1/uploads/${encodeURIComponent(item.uploadId)}`));
  }
  if (data.status === "ready") setState(item, "ready");
  else if (data.status === "expired") setState(item, "expired");
  else setState(item, "failed", { error: data.reject_reason ?? `the upload ended ${data.status}` });
}

async function start(item) {
  item.running = true;
  try {
    setState(item, "checking");
    const problem = await check(item.file);
    if (problem) { setState(item, "refused", { error: problem }); return; }
    if (item.state === "cancelled") return;
    setState(item, "requesting");
    const { data } = await api("POST", "/api/v1/uploads", {});
    item.uploadId = data.id;
    if (item.state === "cancelled") { discard(item); return; }
    setState(item, "uploading", { progress: 0 });
    await sendFile(item, data.upload_url);
    setState(item, "processing", { progress: 100 });
    await follow(item);
  } catch (error) {
    if (error.name === "AbortError" || item.state === "cancelled") setState(item, "cancelled");
    else setState(item, "failed", { error: error.message });
  } finally {
    item.running = false;
    pump();
  }
}

function pump() {
  const running = items.filter((i) => i.running).length;
  const waiting = items.filter((i) => i.state === "waiting" && !i.running);
  for (const item of waiting.slice(0, Math.max(0, CONCURRENCY - running))) start(item);
}

function discard(item) {
  // Give the unused upload slot back (it counts against the pending limit); best effort.
  if (!item.uploadId || item.discarded === item.uploadId) return;
  item.discarded = item.uploadId;
  api("DELETE", `/api/v1/uploads/${encodeURIComponent(item.uploadId)}`).catch(() => {});
}

function add(file) {
  const el = template.content.firstElementChild.cloneNode(true);
  const item = { key: nextKey++, file, el, state: "waiting", progress: 0, uploadId: null, xhr: null, running: false, error: null };
  el.dataset.key = String(item.key);
  el.querySelector(".cancel").addEventListener("click", () => {
    if (item.xhr) item.xhr.abort();
    setState(item, "cancelled");
    discard(item);
  });
  el.querySelector(".retry").addEventListener("click", () => {
    // Upload links are single-use: a retry asks for a fresh one and frees the old slot.
    if (item.state !== "expired") discard(item);
    Object.assign(item, { uploadId: null, error: null, progress: 0 });
    el.querySelector("img.thumb").removeAttribute("src");
    setState(item, "waiting");
  });
  items.push(item);
  queueEl.append(el);
  render(item);
}

function addAll(fileList) {
  const files = Array.from(fileList);
  files.forEach(add);
  if (files.length) announce(`${files.length} file${files.length > 1 ? "s" : ""} added`);
  pump();
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
dropEl.addEventListener("click", (event) => { if (event.target === dropEl) pickerEl.click(); });
