// node --test tests/js: the speed and time-left estimate, time driven by hand.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RateMeter, humanDuration } from "../../static/js/rate.js";

test("no estimate until half a second of progress", () => {
  const meter = new RateMeter();
  meter.sample(0, 0);
  assert.equal(meter.bytesPerSecond(), null);
  meter.sample(400, 1000);
  assert.equal(meter.secondsLeft(5000), null);
});

test("speed over the window and time left rounded up", () => {
  const meter = new RateMeter({ windowMs: 2000 });
  meter.sample(0, 0);
  meter.sample(1000, 1_000_000);
  assert.equal(meter.bytesPerSecond(), 1_000_000);
  assert.equal(meter.secondsLeft(2_500_000), 3);
  // Old samples leave the window: the speed follows the recent rate.
  meter.sample(3000, 1_000_000);
  meter.sample(4000, 1_500_000);
  assert.equal(meter.bytesPerSecond(), 500_000);
});

test("bytes taken back (a cancel) restart the estimate", () => {
  const meter = new RateMeter();
  meter.sample(0, 0);
  meter.sample(1000, 5000);
  meter.sample(1100, 100);
  assert.equal(meter.bytesPerSecond(), null);
});

test("durations read as people say them", () => {
  assert.equal(humanDuration(8), "8 s");
  assert.equal(humanDuration(120), "2 min");
  assert.equal(humanDuration(125), "2 min 5 s");
});
