// <upload-broker>: the broker's uploader as a web component any page can embed, whatever its
// framework. It is served from the broker's origin and talks to that broker with a bearer token
// the host page gives it (the user's OIDC token, or a short-lived token the app's backend minted).
//
//   <script type="module" src="https://broker.example.com/static/js/upload-broker.js"></script>
//   <upload-broker profile="avatar" max-dimension="2048"></upload-broker>
//   <script>document.querySelector("upload-broker").token = idToken;</script>
//
// Attributes: `broker` (base URL; default: where this module came from), `profile` (sent with
// each create), `max-dimension`, `max-bytes`, `accept`; the `rules` property takes a whole rules
// object (checks.js) instead, `token` the bearer token. With `aspect_ratio` in the rules (an
// avatar: 1) each picture of another shape is first cropped and turned in a dialog (crop.js,
// keyboard too); one already of that shape is not. Files are made to fit on the device
// (prepare.js: resized, upright, location removed), checked, and sent three at a time.
// Events (bubbling, composed): `upload-progress` {key, name, loaded, total}, `upload-result`
// {key, name, state: ready | refused | failed | cancelled, upload, error}.
// Styling: the custom properties below, and the parts dropzone, button, list, item, name,
// status, progress.

import { connect } from "./client.js";
import { UploadQueue, FINAL } from "./queue.js";
import { check, humanSize } from "./checks.js";
import { prepare } from "./prepare.js";
import { chooseCrop, needsCrop } from "./crop.js";

const STYLE = `
:host { display: block; font: var(--upload-broker-font, inherit); color: var(--upload-broker-text, inherit); }
[part~="dropzone"] { display: grid; gap: .5rem; justify-items: center; padding: 1.5rem 1rem; text-align: center;
  border: 2px dashed var(--upload-broker-border, #8a99ad); border-radius: var(--upload-broker-radius, 12px);
  background: var(--upload-broker-background, transparent); cursor: pointer; }
[part~="dropzone"]:focus-visible, [part~="dropzone"].dragging { outline: 3px solid var(--upload-broker-accent, #0b57d0); outline-offset: 2px; }
[part~="button"] { font: inherit; padding: .45rem 1rem; border: 0; border-radius: var(--upload-broker-radius, 12px);
  background: var(--upload-broker-accent, #0b57d0); color: var(--upload-broker-accent-text, #fff); }
[part~="list"] { list-style: none; padding: 0; margin: .75rem 0 0; display: grid; gap: .5rem; }
[part~="item"] { display: grid; grid-template-columns: minmax(0, 1fr) auto; gap: .25rem .75rem; align-items: center; }
[part~="name"] { overflow-wrap: anywhere; font-weight: 600; }
[part~="progress"] { grid-column: 1 / -1; width: 100%; accent-color: var(--upload-broker-accent, #0b57d0); }
.cancel { font: inherit; }
.hidden { display: none; }
.crop-dialog { border: 0; border-radius: var(--upload-broker-radius, 12px); padding: 1rem; max-width: min(34rem, calc(100vw - 2rem)); }
.crop-dialog h2 { font-size: 1.1rem; margin: 0 0 .25rem; overflow-wrap: anywhere; }
.crop-stage { position: relative; overflow: hidden; max-height: 60vh; margin: .5rem auto; }
.crop-picture { display: block; width: 100%; height: 100%; }
.crop-frame { position: absolute; box-shadow: 0 0 0 100vmax rgb(0 0 0 / .55); outline: 2px solid #fff; cursor: move; touch-action: none; }
.crop-frame:focus-visible { outline: 3px solid var(--upload-broker-accent, #0b57d0); }
.crop-corner { position: absolute; right: 2px; bottom: 2px; width: 20px; height: 20px; border-radius: 50%;
  background: #fff; border: 2px solid var(--upload-broker-accent, #0b57d0); cursor: nwse-resize; }
.crop-actions { display: flex; flex-wrap: wrap; gap: .5rem; }
.crop-actions button { font: inherit; padding: .4rem .8rem; }
.crop-actions .primary { background: var(--upload-broker-accent, #0b57d0); color: var(--upload-broker-accent-text, #fff); border: 0; border-radius: 8px; }
.muted { opacity: .8; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
`;

let sheet = null;
function styles() {
  // One constructed sheet for every instance: no inline <style>, so a host page's strict CSP holds.
  if (!sheet) { sheet = new CSSStyleSheet(); sheet.replaceSync(STYLE); }
  return sheet;
}

const LABELS = {
  waiting: () => "Waiting", checking: () => "Checking", requesting: () => "Getting an upload link",
  uploading: (e) => `Uploading ${e.file.size ? Math.round((100 * e.loaded) / e.file.size) : 0} %`,
  processing: () => "Processing", ready: () => "Ready", refused: (e) => `Refused: ${e.error}`,
  failed: (e) => `Failed: ${e.error}`, expired: () => "Expired: try again", cancelled: () => "Cancelled",
};

export class UploadBroker extends HTMLElement {
  static observedAttributes = ["accept"];

  constructor() {
    super();
    this.token = null;
    const root = this.attachShadow({ mode: "open" });
    root.adoptedStyleSheets = [styles()];
    root.innerHTML = `
      <div part="dropzone" role="button" tabindex="0" aria-describedby="limits">
        <span part="button">Choose images</span>
        <span id="limits">or drop them here · <span class="privacy"></span></span>
      </div>
      <input type="file" multiple class="hidden" tabindex="-1" aria-hidden="true">
      <div class="visually-hidden" aria-live="polite"></div>
      <ol part="list" aria-label="Uploads"></ol>`;
    this._zone = root.querySelector('[part~="dropzone"]');
    this._input = root.querySelector("input");
    this._list = root.querySelector("ol");
    this._live = root.querySelector("[aria-live]");
    this._privacy = root.querySelector(".privacy");
    this.rules = null;
    this._rows = new Map();
    this._queue = new UploadQueue({ limit: 3, run: (entry, attempt) => this._run(entry, attempt), onChange: (entry) => this._render(entry) });
    this._zone.addEventListener("click", () => this._input.click());
    this._zone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); this._input.click(); }
    });
    this._input.addEventListener("change", () => { this.add(this._input.files); this._input.value = ""; });
    for (const type of ["dragenter", "dragover"]) {
      this._zone.addEventListener(type, (event) => { event.preventDefault(); this._zone.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "drop"]) {
      this._zone.addEventListener(type, (event) => { event.preventDefault(); this._zone.classList.remove("dragging"); });
    }
    this._zone.addEventListener("drop", (event) => this.add(event.dataTransfer.files));
  }

  attributeChangedCallback(name, _old, value) {
    if (name === "accept") this._input.accept = value ?? "";
  }

  /** Add files (a FileList or an array of File) to the queue. */
  add(files) {
    const list = Array.from(files ?? []);
    if (list.length) this._queue.add(list);
  }

  /** The rules object (checks.js, prepare.js) in place of the attributes; null: the attributes. */
  get rules() {
    return this._rules;
  }

  set rules(value) {
    this._rules = value ?? null;
    // Said as it is: a PNG, WebP or HEIC re-encoded loses its details even when kept (prepare.js).
    this._privacy.textContent = this._rules?.keep_metadata === true
      ? "photo details are kept, except by a PNG, WebP or HEIC that must be resized"
      : "location and camera details are removed before sending";
  }

  /** The rules files are prepared and checked against: the `rules` property, else the attributes. */
  get effectiveRules() {
    const number = (name) => (this.hasAttribute(name) ? Number(this.getAttribute(name)) || null : null);
    return this.rules ?? { max_dimension: number("max-dimension"), max_bytes: number("max-bytes") };
  }

  get _broker() {
    const baseUrl = this.getAttribute("broker") || new URL(import.meta.url).origin;
    return connect({ baseUrl, token: this.token });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail, bubbles: true, composed: true }));
  }

  async _run(entry, attempt) {
    const { signal } = attempt;
    const rules = this.effectiveRules;
    attempt.report("checking");
    let edit = null;
    // Only a picture of another shape is offered the crop dialog (one already right goes as is).
    if (!this._rows.get(entry.key).edit && await needsCrop(entry.file, rules)) {
      // One crop dialog at a time, in the order the files came.
      this._cropping = (this._cropping ?? Promise.resolve()).then(() => chooseCrop(entry.file, rules.aspect_ratio, { parent: this.shadowRoot }).catch(() => ({})));
      edit = await this._cropping;
      if (edit === null) return { state: "cancelled" };
      this._rows.get(entry.key).edit = edit;
    }
    const prepared = await prepare(entry.file, rules, edit).catch(() => null);
    if (prepared) entry.file = prepared.file;
    const problem = await check(entry.file, rules);
    if (problem) return { state: "refused", error: problem };
    signal.throwIfAborted();
    attempt.report("requesting");
    const broker = this._broker;
    const profile = this.getAttribute("profile");
    const upload = await broker.createUpload({ body: profile ? { profile } : {} });
    this._rows.get(entry.key).upload = upload;
    if (signal.aborted) { broker.deleteUpload(upload.id).catch(() => {}); signal.throwIfAborted(); }
    attempt.report("uploading", { loaded: 0 });
    await broker.sendFile(upload.upload_url, entry.file, { signal, onProgress: (sent) => attempt.progress(sent) });
    attempt.report("processing", { loaded: entry.file.size });
    const done = await broker.waitUntilSettled(upload.id, { signal });
    this._rows.get(entry.key).upload = done;
    if (done.status === "ready") return { state: "ready" };
    return { state: done.status === "expired" ? "expired" : "failed", error: done.reject_reason ?? `the upload ended ${done.status}` };
  }

  _render(entry) {
    let row = this._rows.get(entry.key);
    if (!row) {
      const el = document.createElement("li");
      el.setAttribute("part", "item");
      el.innerHTML = `<span part="name"></span><button type="button" class="cancel">Cancel</button>
        <span part="status" role="status"></span><progress part="progress" max="100" value="0"></progress>`;
      el.querySelector('[part="name"]').textContent = entry.file.name;
      el.querySelector(".cancel").setAttribute("aria-label", `Cancel ${entry.file.name}`);
      el.querySelector(".cancel").addEventListener("click", () => {
        this._queue.cancel(entry.key);
        const upload = this._rows.get(entry.key)?.upload;
        if (upload?.id && upload.status !== "ready") this._broker.deleteUpload(upload.id).catch(() => {});
      });
      el.querySelector("progress").setAttribute("aria-label", `Progress of ${entry.file.name}`);
      this._list.append(el);
      row = { el, upload: null, reported: null };
      this._rows.set(entry.key, row);
    }
    const state = entry.state === "active" ? (entry.phase ?? "checking") : entry.state;
    const percent = entry.file.size ? Math.min(100, Math.round((100 * entry.loaded) / entry.file.size)) : 0;
    row.el.dataset.state = state;
    row.el.querySelector('[part~="status"]').textContent = `${(LABELS[state] ?? LABELS.checking)(entry)} · ${humanSize(entry.file.size)}`;
    row.el.querySelector("progress").value = entry.state === "ready" ? 100 : percent;
    row.el.querySelector(".cancel").hidden = FINAL.includes(entry.state);
    const detail = { key: entry.key, name: entry.file.name };
    if (state === "uploading") this._emit("upload-progress", { ...detail, loaded: entry.loaded, total: entry.file.size });
    if (FINAL.includes(entry.state) && row.reported !== entry.attempt) {
      row.reported = entry.attempt;
      this._live.textContent = `${entry.file.name}: ${LABELS[entry.state](entry)}`;
      this._emit("upload-result", { ...detail, state: entry.state, upload: row.upload, error: entry.error });
    }
  }
}

if (!customElements.get("upload-broker")) customElements.define("upload-broker", UploadBroker);
