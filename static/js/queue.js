// The upload queue's logic, with no DOM and no network: which file runs next, how many run at
// once, what Cancel and Retry do, and the overall progress. The page supplies `run`, the work of
// one attempt; this module only guarantees the rules below, so they can be tested in node and in
// the browser alike.
//
// - Every file added is started once per attempt: a second start of the same attempt is
//   impossible (an entry leaves "waiting" before its work begins, synchronously).
// - At most `limit` attempts run at once. A slot is held from the start of an attempt until its
//   work settles, or until it is cancelled: Cancel aborts the attempt's AbortSignal and gives the
//   slot back at once.
// - Whatever a cancelled or superseded attempt reports later is ignored.
//
// States: waiting → (active phases reported by `run`, e.g. checking, uploading) → one of the
// final states ready, refused, failed, expired, cancelled. Retry puts failed, expired and
// cancelled entries back to waiting, as a new attempt.

export const FINAL = Object.freeze(["ready", "refused", "failed", "expired", "cancelled"]);
export const RETRYABLE = Object.freeze(["failed", "expired", "cancelled"]);

export class UploadQueue {
  /**
   * @param {object} options
   * @param {number} [options.limit=3] attempts running at once
   * @param {(entry, attempt) => Promise<{state: string, error?: string}>} options.run
   *   the work of one attempt; `attempt` has `signal` (AbortSignal), `report(phase, extra)`
   *   and `progress(loaded)`; it resolves with the final state (or throws: "failed").
   * @param {(entry) => void} [options.onChange] called after every change of an entry
   */
  constructor({ limit = 3, run, onChange = () => {} }) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError("limit must be a positive integer");
    if (typeof run !== "function") throw new TypeError("run must be a function");
    this.limit = limit;
    this.entries = [];
    this._run = run;
    this._onChange = onChange;
    this._nextKey = 1;
    this._running = new Map(); // key → {controller, id} of the attempt holding a slot
    this._attempts = 0;
  }

  /** Add files (anything with `size` and `name`); return their new entries, all waiting. */
  add(files) {
    const added = Array.from(files, (file) => ({
      key: this._nextKey++, file, state: "waiting", phase: null, loaded: 0, error: null, attempt: 0, data: {},
    }));
    this.entries.push(...added);
    for (const entry of added) this._onChange(entry);
    this._pump();
    return added;
  }

  /** Return the entry with this key, or undefined. */
  get(key) {
    return this.entries.find((e) => e.key === key);
  }

  /** How many attempts hold a slot now. */
  get running() {
    return this._running.size;
  }

  /** Cancel a waiting or running entry; return whether it was cancelled. */
  cancel(key) {
    const entry = this.get(key);
    if (!entry || FINAL.includes(entry.state)) return false;
    const held = this._running.get(key);
    this._running.delete(key);
    this._set(entry, { state: "cancelled", phase: null, error: null });
    held?.controller.abort();
    this._pump();
    return true;
  }

  /** Put a failed, expired or cancelled entry back in the queue; return whether it was. */
  retry(key) {
    const entry = this.get(key);
    if (!entry || !RETRYABLE.includes(entry.state)) return false;
    this._set(entry, { state: "waiting", phase: null, loaded: 0, error: null });
    this._pump();
    return true;
  }

  /** Remove one entry in a final state; return it, or undefined when it is not final. */
  remove(key) {
    const entry = this.get(key);
    if (!entry || !FINAL.includes(entry.state)) return undefined;
    this.entries = this.entries.filter((e) => e !== entry);
    return entry;
  }

  /** Remove every entry in a final state; return the removed entries. */
  clearFinished() {
    const removed = this.entries.filter((e) => FINAL.includes(e.state));
    this.entries = this.entries.filter((e) => !FINAL.includes(e.state));
    return removed;
  }

  /**
   * The overall progress: files settled and bytes sent, over the files that are still to be,
   * or were, uploaded (refused and cancelled files count for neither side). `total` and
   * `counts` cover every entry, by state ("active" for every phase of a running attempt), so
   * a page can show totals that add up.
   */
  progress() {
    const counts = Object.fromEntries(["waiting", "active", ...FINAL].map((s) => [s, 0]));
    for (const e of this.entries) counts[e.state] += 1;
    const counted = this.entries.filter((e) => e.state !== "refused" && e.state !== "cancelled");
    const total = counted.reduce((sum, e) => sum + e.file.size, 0);
    const sent = counted.reduce((sum, e) => sum + (e.state === "ready" ? e.file.size : Math.min(e.loaded, e.file.size)), 0);
    return {
      files: counted.length,
      done: counted.filter((e) => e.state === "ready").length,
      settled: counted.filter((e) => FINAL.includes(e.state)).length,
      bytes: total,
      sent,
      percent: total === 0 ? (counted.length ? 100 : 0) : Math.floor((sent / total) * 100),
      total: this.entries.length,
      counts,
    };
  }

  _set(entry, changes) {
    Object.assign(entry, changes);
    this._onChange(entry);
  }

  _pump() {
    // One entry at a time, re-reading the state after each start: a start may change it.
    while (this._running.size < this.limit) {
      const next = this.entries.find((e) => e.state === "waiting");
      if (!next) return;
      this._start(next);
    }
  }

  _start(entry) {
    const controller = new AbortController();
    const id = ++this._attempts;
    this._running.set(entry.key, { controller, id });
    const current = () => this._running.get(entry.key)?.id === id;
    entry.attempt += 1;
    this._set(entry, { state: "active", phase: "starting", loaded: 0, error: null });
    const attempt = {
      signal: controller.signal,
      report: (phase, extra = {}) => { if (current()) this._set(entry, { phase, ...extra }); },
      progress: (loaded) => { if (current()) this._set(entry, { loaded }); },
    };
    let work;
    try {
      work = Promise.resolve(this._run(entry, attempt));
    } catch (error) {
      work = Promise.reject(error);
    }
    work.then(
      (outcome) => this._finish(entry, id, outcome ?? { state: "ready" }),
      (error) => this._finish(entry, id, { state: "failed", error: error?.message ?? String(error) }),
    );
  }

  _finish(entry, id, outcome) {
    if (this._running.get(entry.key)?.id !== id) return; // cancelled or superseded: ignore
    this._running.delete(entry.key);
    const state = FINAL.includes(outcome.state) ? outcome.state : "failed";
    this._set(entry, { state, phase: null, error: outcome.error ?? null, ...(state === "ready" ? { loaded: entry.file.size } : {}) });
    this._pump();
  }
}
