// node --test tests/js: what the upload page learns from a file's bytes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { formatOf, gifIsAnimated } from "../../static/js/checks.js";

const GCE = [0x21, 0xf9, 0x04, 0x00, 0x0a, 0x00, 0x00, 0x00];
const gif = (frames) => new Uint8Array([0x47, 0x49, 0x46, 0x38, 0x39, 0x61, ...Array(frames).fill(GCE).flat()]);

test("a GIF with two frames is animated, with one it is not", () => {
  assert.equal(formatOf(gif(1)).label, "GIF");
  assert.equal(gifIsAnimated(gif(1)), false);
  assert.equal(gifIsAnimated(gif(2)), true);
});
