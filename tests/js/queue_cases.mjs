// Cases for static/js/queue.js, shared by node's test runner (queue.test.mjs) and the browser
// (tests/browser/test_queue_module.py runs the same cases in Chromium). Each case is an async
// function that throws on failure; `check` is a minimal assert so no runner-specific API is used.

import { UploadQueue } from "../../static/js/queue.js";

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function equal(actual, expected, message) {
  const a = JSON.stringify(actual);
  const b = JSON.stringify(expected);
  if (a !== b) throw new Error(`${message}: expected ${b}, got ${a}`);
}

// A run() whose attempts the test settles by hand, recording every start.
function manualRunner() {
  const started = [];
  const pending = new Map();
  const run = (entry, attempt) => new Promise((resolve, reject) => {
    started.push(entry.file.name);
    pending.set(entry.key, { resolve, reject, attempt, entry });
    attempt.signal.addEventListener("abort", () => reject(new DOMException("cancelled", "AbortError")));
  });
  const settle = (name, outcome = { state: "ready" }) => {
    for (const [key, p] of pending) {
      if (p.entry.file.name === name) {
        pending.delete(key);
        p.resolve(outcome);
        return p;
      }
    }
    throw new Error(`no running attempt for ${name}`);
  };
  return { run, started, pending, settle };
}

const files = (n, size = 100) => Array.from({ length: n }, (_, i) => ({ name: `f${i + 1}.png`, size }));
const tick = () => new Promise((r) => setTimeout(r, 0));

export const cases = {
  async "eight files start exactly once each, never more than three at a time"() {
    const runner = manualRunner();
    let peak = 0;
    const queue = new UploadQueue({ limit: 3, run: runner.run, onChange: () => { peak = Math.max(peak, queue.running); } });
    queue.add(files(8));
    equal(runner.started, ["f1.png", "f2.png", "f3.png"], "first three start");
    for (let i = 1; i <= 8; i++) {
      runner.settle(`f${i}.png`);
      await tick();
      check(queue.running <= 3, "at most three running");
    }
    equal(runner.started, files(8).map((f) => f.name), "each started once, in order");
    check(queue.entries.every((e) => e.state === "ready" && e.attempt === 1), "all ready after one attempt");
    equal(peak, 3, "the peak is the limit");
  },

  async "adding files from inside onChange (re-entrant) starts nothing twice"() {
    const runner = manualRunner();
    let added = false;
    const queue = new UploadQueue({
      limit: 3,
      run: runner.run,
      onChange: (entry) => {
        // A page that renders on every change and adds more files mid-render must not double-start.
        if (!added && entry.state === "active") { added = true; queue.add(files(4).map((f) => ({ ...f, name: `late-${f.name}` }))); }
      },
    });
    queue.add(files(2));
    equal(new Set(runner.started).size, runner.started.length, "no file started twice");
    equal(runner.started.length, 3, "three slots used");
  },

  async "cancel aborts the running attempt and gives its slot to the next file"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 3, run: runner.run });
    const [first] = queue.add(files(4));
    const { attempt } = runner.pending.get(first.key);
    check(queue.cancel(first.key), "cancel succeeds");
    check(attempt.signal.aborted, "its signal is aborted");
    equal(first.state, "cancelled", "state");
    equal(runner.started, ["f1.png", "f2.png", "f3.png", "f4.png"], "the fourth takes the slot");
    equal(queue.running, 3, "still three running");
    attempt.progress(50); // a late report from the cancelled attempt
    await tick();
    equal(first.state, "cancelled", "late reports are ignored");
    equal(first.loaded, 0, "late progress is ignored");
    check(!queue.cancel(first.key), "a second cancel does nothing");
  },

  async "cancel of a waiting file never starts it"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 1, run: runner.run });
    const [, second] = queue.add(files(2));
    queue.cancel(second.key);
    runner.settle("f1.png");
    await tick();
    equal(runner.started, ["f1.png"], "the cancelled file never started");
  },

  async "retry starts a new attempt; the old one's result is ignored"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 3, run: runner.run });
    const [entry] = queue.add(files(1));
    runner.settle("f1.png", { state: "failed", error: "boom" });
    await tick();
    equal([entry.state, entry.error], ["failed", "boom"], "failed with its reason");
    check(queue.retry(entry.key), "retry accepted");
    equal(entry.attempt, 2, "second attempt");
    equal(runner.started, ["f1.png", "f1.png"], "started again once");
    runner.settle("f1.png");
    await tick();
    equal(entry.state, "ready", "ready after retry");
    check(!queue.retry(entry.key), "a ready file cannot be retried");
  },

  async "a throwing or rejecting run fails that file only"() {
    let calls = 0;
    const queue = new UploadQueue({
      limit: 3,
      run: (entry) => {
        calls += 1;
        if (entry.file.name === "f1.png") throw new Error("sync throw");
        if (entry.file.name === "f2.png") return Promise.reject(new Error("async reject"));
        return Promise.resolve({ state: "refused", error: "not an image" });
      },
    });
    const [a, b, c] = queue.add(files(3));
    await tick();
    equal([a.state, a.error], ["failed", "sync throw"], "sync throw");
    equal([b.state, b.error], ["failed", "async reject"], "async reject");
    equal([c.state, c.error], ["refused", "not an image"], "refused");
    equal(calls, 3, "each ran once");
    equal(queue.running, 0, "no slot held");
  },

  async "overall progress counts files and bytes, ignoring refused and cancelled files"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 3, run: runner.run });
    const [a, b, c] = queue.add([{ name: "a", size: 1000 }, { name: "b", size: 3000 }, { name: "c", size: 500 }]);
    runner.pending.get(a.key).attempt.progress(500);
    const { total, counts, ...partial } = queue.progress();
    equal(partial, { files: 3, done: 0, settled: 0, bytes: 4500, sent: 500, percent: 11 }, "partial");
    equal([total, counts.active], [3, 3], "all three running");
    runner.settle("c", { state: "refused", error: "bad" });
    await tick();
    runner.settle("a");
    runner.pending.get(b.key).attempt.progress(3000);
    await tick();
    const { total: all, counts: _, ...sentAll } = queue.progress();
    equal(sentAll, { files: 2, done: 1, settled: 1, bytes: 4000, sent: 4000, percent: 100 }, "bytes all sent");
    equal(all, 3, "the refused file is still one of the files");
    runner.settle("b");
    await tick();
    equal(queue.progress().done, 2, "all done");
    equal(c.state, "refused", "c refused");
  },

  async "clearFinished removes settled entries and keeps running ones"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 2, run: runner.run });
    queue.add(files(3));
    runner.settle("f1.png");
    await tick();
    const removed = queue.clearFinished();
    equal(removed.map((e) => e.file.name), ["f1.png"], "the ready one");
    equal(queue.entries.map((e) => e.file.name), ["f2.png", "f3.png"], "the rest stay");
  },

  async "totals count every file by state and add up (7 picked: 3 refused, 1 cancelled)"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 3, run: runner.run });
    const picked = queue.add(files(7));
    for (const name of ["f1.png", "f2.png", "f3.png"]) runner.settle(name, { state: "refused", error: "no" });
    await tick();
    queue.cancel(picked[3].key);
    runner.settle("f5.png");
    runner.settle("f6.png", { state: "failed", error: "boom" });
    await tick();
    const { total, counts } = queue.progress();
    equal(counts, { waiting: 0, active: 1, ready: 1, refused: 3, failed: 1, expired: 0, cancelled: 1 }, "by state");
    equal(Object.values(counts).reduce((a, b) => a + b, 0), total, "they add up");
    equal(total, 7, "every file");
  },

  async "remove drops one settled entry and refuses a running one"() {
    const runner = manualRunner();
    const queue = new UploadQueue({ limit: 1, run: runner.run });
    const [a, b] = queue.add(files(2));
    equal(queue.remove(a.key), undefined, "a running entry stays");
    runner.settle("f1.png", { state: "refused", error: "no" });
    await tick();
    equal(queue.remove(a.key)?.file.name, "f1.png", "removed");
    equal(queue.entries.map((e) => e.key), [b.key], "only b left");
  },

  async "the limit is validated"() {
    let threw = false;
    try { new UploadQueue({ limit: 0, run: () => {} }); } catch (e) { threw = e instanceof RangeError; }
    check(threw, "limit 0 refused");
  },
};
