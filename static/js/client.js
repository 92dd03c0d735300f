// The broker's browser client: ask for a one-time upload URL, send a file straight to the image
// service with real progress, tell the broker it is done. The broker's own upload page uses this
// module, and so may any app's page; no build step, no dependencies.
//
//   import { connect } from "/static/js/client.js";
//   const broker = connect({ token: "brk_…" });          // or { csrfToken } on the broker's pages
//   const upload = await broker.createUpload({ body: { metadata: { album: "summer" } } }); // + an Idempotency-Key
//   await broker.sendFile(upload.upload_url, file, { onProgress: (sent, total) => …, signal });
//   const done = await broker.waitUntilSettled(upload.id, { signal }); // done.status: "ready", …
//
// Every broker call takes the same options: `baseUrl` (default: this origin), `token` (an API
// bearer token; then no cookie is sent) or `csrfToken` (cookie sessions: the value of
// <meta name="csrf-token">), and `signal` (an AbortSignal). `connect(options)` binds them once.
// Failures throw BrokerError (`status`, `code`, `retryAfter` in seconds, `details`); an abort
// throws the DOMException "AbortError".

export class BrokerError extends Error {
  constructor(message, { status = 0, code = null, retryAfter = null, details = null } = {}) {
    super(message);
    this.name = "BrokerError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.details = details;
  }
}

function headersFor({ token, csrfToken }, hasBody) {
  const headers = { Accept: "application/json" };
  if (hasBody) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  else if (csrfToken) headers["X-CSRFToken"] = csrfToken;
  return headers;
}

async function call(method, path, options = {}, { body, headers = {} } = {}) {
  const { baseUrl = "", token, signal } = options;
  const response = await fetch(`${baseUrl}${path}`, {
    method,
    signal,
    // A bearer token is the only credential such a call needs; cookie sessions stay same-origin.
    credentials: token ? "omit" : "same-origin",
    headers: { ...headersFor(options, body !== undefined), ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) {
    const retry = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
    throw new BrokerError(data?.error?.message ?? `The broker answered ${response.status}.`, {
      status: response.status,
      code: data?.error?.code ?? null,
      retryAfter: Number.isFinite(retry) ? retry : null,
      details: data?.error?.details ?? null,
    });
  }
  return { status: response.status, data, retryAfter: response.headers.get("Retry-After") };
}

const uploadPath = (id) => `/api/v1/uploads/${encodeURIComponent(id)}`;

/** Return a fresh Idempotency-Key (a random UUID). */
export function newIdempotencyKey() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A create whose answer was lost to the network is sent again, with the same key, after these
// pauses (ms): the broker replays the first answer instead of making a second draft.
const CREATE_RETRIES = [500, 2000];

/**
 * Ask the broker for a one-time upload URL; resolve with the new upload ({id, upload_url, …}).
 * Every create carries an `Idempotency-Key` (a new one unless given: keep and pass the same key
 * to repeat the same create safely, e.g. after a reload).
 */
export async function createUpload({ body = {}, idempotencyKey = newIdempotencyKey(), ...options } = {}) {
  const headers = { "Idempotency-Key": idempotencyKey };
  for (let attempt = 0; ; attempt++) {
    try {
      return (await call("POST", "/api/v1/uploads", options, { body, headers })).data;
    } catch (error) {
      // fetch rejects with a TypeError only when no answer arrived at all.
      if (!(error instanceof TypeError) || attempt >= CREATE_RETRIES.length) throw error;
      await pause(CREATE_RETRIES[attempt], options.signal);
    }
  }
}

/**
 * POST `file` to a one-time upload URL (multipart field `file`, no credentials, no custom
 * headers, so no CORS preflight); resolve with the image service's answer.
 * `onProgress(sentBytes, totalBytes)` follows the transfer; aborting `signal` stops it.
 */
export function sendFile(url, file, { onProgress, signal, filename } = {}) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) { reject(new DOMException("cancelled", "AbortError")); return; }
    const xhr = new XMLHttpRequest();
    const abort = () => xhr.abort();
    signal?.addEventListener("abort", abort, { once: true });
    const done = () => signal?.removeEventListener("abort", abort);
    xhr.open("POST", url);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress?.(event.loaded, event.total);
    };
    xhr.onload = () => {
      done();
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) { resolve(data); return; }
      const first = data?.errors?.[0];
      const message = xhr.status === 410 ? "the upload link expired" : (first?.message ?? `the upload answered ${xhr.status}`);
      reject(new BrokerError(message, { status: xhr.status, code: first?.code ?? null }));
    };
    xhr.onerror = () => { done(); reject(new BrokerError("the connection to the upload server failed")); };
    xhr.onabort = () => { done(); reject(new DOMException("cancelled", "AbortError")); };
    const form = new FormData();
    form.append("file", file, filename ?? file.name ?? "file");
    xhr.send(form);
  });
}

/** Tell the broker the file was sent; resolve with {status: 200 | 202, upload}. */
export async function complete(id, options = {}) {
  const { status, data } = await call("POST", `${uploadPath(id)}/complete`, options);
  return { status, upload: data };
}

/** Fetch one upload. */
export async function getUpload(id, options = {}) {
  return (await call("GET", uploadPath(id), options)).data;
}

/** Delete an upload (an unused one gives its pending slot back). */
export async function deleteUpload(id, options = {}) {
  return (await call("DELETE", uploadPath(id), options)).data;
}

function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) { reject(new DOMException("cancelled", "AbortError")); return; }
    const timer = setTimeout(() => { signal?.removeEventListener("abort", stop); resolve(); }, ms);
    const stop = () => { clearTimeout(timer); reject(new DOMException("cancelled", "AbortError")); };
    signal?.addEventListener("abort", stop, { once: true });
  });
}

/**
 * Complete, then follow the upload until it is no longer pending (polling after 0.5 s, 1 s, 2 s,
 * then every 5 s); resolve with the upload (`status` ready, rejected, expired …).
 */
export async function waitUntilSettled(id, options = {}) {
  let { status, upload } = await complete(id, options);
  let delay = 500;
  while (status === 202 || upload?.status === "pending") {
    await pause(delay, options.signal);
    delay = Math.min(delay * 2, 5000);
    upload = await getUpload(id, options);
    status = 200;
  }
  return upload;
}

/** Bind options (baseUrl, token or csrfToken) once; every call may still override them. */
export function connect(defaults = {}) {
  const merged = (options) => ({ ...defaults, ...options });
  return {
    createUpload: (options = {}) => createUpload(merged(options)),
    newIdempotencyKey,
    sendFile,
    complete: (id, options = {}) => complete(id, merged(options)),
    getUpload: (id, options = {}) => getUpload(id, merged(options)),
    deleteUpload: (id, options = {}) => deleteUpload(id, merged(options)),
    waitUntilSettled: (id, options = {}) => waitUntilSettled(id, merged(options)),
  };
}
