// node --test tests/js: what the upload page learns from a file's bytes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { fitsAspect, formatOf, formatProblem, gifIsAnimated, ratioInWords, sizeProblem } from "../../static/js/checks.js";

const GCE = [0x21, 0xf9, 0x04, 0x00, 0x0a, 0x00, 0x00, 0x00];
const gif = (frames) => new Uint8Array([0x47, 0x49, 0x46, 0x38, 0x39, 0x61, ...Array(frames).fill(GCE).flat()]);

test("a GIF with two frames is animated, with one it is not", () => {
  assert.equal(formatOf(gif(1)).label, "GIF");
  assert.equal(gifIsAnimated(gif(1)), false);
  assert.equal(gifIsAnimated(gif(2)), true);
});

// An avatar profile's rules as the page gets them (data-rules): JPEG or PNG, 200 to 512 px wide,
// at most 512 px high, 1:1 within the broker's default 1 %.
const AVATAR = { allowed_formats: ["JPEG", "PNG"], min_width: 200, max_width: 512, max_height: 512, aspect_ratio: 1 };

test("each size rule is said in words, and a picture within them all passes", () => {
  assert.equal(sizeProblem(400, 400, AVATAR), null);
  assert.equal(sizeProblem(500, 505, AVATAR), null); // within the 1 % tolerance
  assert.equal(sizeProblem(600, 600, AVATAR), "Too wide: 600 px (at most 512 px).");
  assert.equal(sizeProblem(300, 600, { max_height: 512 }), "Too tall: 600 px (at most 512 px).");
  assert.equal(sizeProblem(120, 120, AVATAR), "Too small: 120 px wide (at least 200 px).");
  assert.equal(sizeProblem(300, 90, { min_height: 100 }), "Too small: 90 px high (at least 100 px).");
  assert.equal(sizeProblem(1000, 1000, { min_pixels: 2_000_000 }), "Too small: 1000×1000 px is less than 2 megapixels.");
  assert.equal(sizeProblem(3000, 3000, { max_pixels: 8_000_000 }), "Too big: 3000×3000 px is more than 8 megapixels.");
  assert.equal(sizeProblem(512, 384, AVATAR), "Wrong shape: 512×384 px; the aspect ratio must be 1:1 (width:height).");
  assert.equal(sizeProblem(13000, 100), "Too big: 13000×100 px (at most 12,000 px a side).");
});

test("the aspect ratio holds within the profile's tolerance, and is said as people write it", () => {
  assert.equal(fitsAspect(1600, 900, { aspect_ratio: 16 / 9 }), true);
  assert.equal(fitsAspect(1600, 1000, { aspect_ratio: 16 / 9, aspect_tolerance: 0.05 }), false);
  assert.equal(fitsAspect(1600, 1000, { aspect_ratio: 16 / 9, aspect_tolerance: 0.12 }), true);
  assert.equal(fitsAspect(123, 45, {}), true);
  assert.equal(ratioInWords(16 / 9), "16:9");
  assert.equal(ratioInWords(3), "3:1");
});

test("a format outside the profile's list is named, with what to use instead", () => {
  assert.equal(formatProblem(formatOf(gif(1)), AVATAR), "GIF is not accepted here: use JPEG, PNG.");
  assert.equal(formatProblem(formatOf(gif(1)), {}), null);
  assert.equal(formatProblem({ label: "HEIC" }, { allowed_formats: ["HEIF"] }), null);
});

test("a profile as GET /api/v1/profiles lists it names its formats as `formats`", () => {
  assert.equal(formatProblem(formatOf(gif(1)), { formats: ["JPEG", "PNG"] }), "GIF is not accepted here: use JPEG, PNG.");
});
