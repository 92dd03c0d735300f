// Make a file right before it leaves the device, to an upload's rules (the same rules object
// checks.js takes): inside `max_width` × `max_height` px (either may be absent) and at most
// `max_dimension` px on the largest side, shrunk in proportion, at most `max_bytes` (quality
// lowered until it fits), the camera's orientation applied, and location and device metadata
// (EXIF, XMP, IPTC, comments) removed unless `keep_metadata` is true. With `keep_metadata`, a file
// sent as it is keeps all of it; a JPEG that must be re-encoded (resized, cropped, made smaller)
// keeps all of it too, made true of the new picture (orientation upright, the new pixel size, the
// embedded preview thumbnail removed: it shows the picture as it was); a PNG, WebP or HEIC that
// must be re-encoded loses it (the canvas writes none), and `stripped` says so. Animated images
// and SVG are sent as they are; so is HEIC when the browser cannot decode it (the image service
// reads it).
//
//   import { prepare } from "/static/js/prepare.js";
//   const { file, resized, stripped } = await prepare(picked, { max_dimension: 2048 });
//
// Canvas code of our own rather than a vendored compressor: a browser's canvas re-encode already
// drops every metadata block and applies orientation, and the lossless path (a small JPEG, a PNG)
// is a walk over segments that no library we could vendor without a build step does better.

import { formatOf } from "./checks.js";

// The image service's own limit, the byte target when the rules name none.
export const SERVICE_MAX_BYTES = 10 * 1024 * 1024;
const QUALITY_START = 0.85;
const QUALITY_FLOOR = 0.5;

const u32 = (b, at) => ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
const le32 = (b, at) => (b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)) >>> 0;

/** JPEG: the EXIF orientation (1..8, 1 when absent) and the bytes without metadata segments. */
export function jpegWithoutMetadata(bytes) {
  const kept = [bytes.subarray(0, 2)];
  const metadata = [];
  let orientation = 1;
  let removed = 0;
  let at = 2;
  while (at + 4 <= bytes.length && bytes[at] === 0xff) {
    const marker = bytes[at + 1];
    if (marker === 0xda) break; // start of scan: the rest is image data
    const length = (bytes[at + 2] << 8) | bytes[at + 3];
    const segment = bytes.subarray(at, at + 2 + length);
    // APP1 (EXIF, XMP), APP13 (IPTC, Photoshop), COM: where positions, devices and names live.
    // APP0 (JFIF), APP2 (ICC colour profile) and APP14 (Adobe colour transform) are kept.
    if (marker === 0xe1 || marker === 0xed || marker === 0xfe) {
      if (marker === 0xe1) orientation = exifOrientation(segment.subarray(4)) ?? orientation;
      removed += segment.length;
      metadata.push(segment);
    } else {
      kept.push(segment);
    }
    at += 2 + length;
  }
  kept.push(bytes.subarray(at));
  return { orientation, removed, parts: kept, metadata };
}

const XMP_HEADER = "http://ns.adobe.com/xap/1.0/\0";

/**
 * JPEG metadata segments (jpegWithoutMetadata's `metadata`) made true of a re-encoded picture of
 * `width`×`height`, drawn upright: the EXIF orientation (and XMP's) set to 1, the EXIF pixel
 * dimensions set to the new size, the embedded preview thumbnail removed (it shows the picture
 * as it was: uncropped, unturned). Everything else is kept byte for byte. Null when an EXIF block
 * cannot be read safely (then nothing is carried).
 */
export function metadataFor(segments, width, height) {
  const out = [];
  for (const original of segments) {
    const segment = original.slice();
    const head = String.fromCharCode(...segment.subarray(4, 4 + XMP_HEADER.length));
    if (segment[1] === 0xe1 && head.startsWith("Exif\0\0")) {
      if (!fixExif(segment.subarray(10), width, height)) return null;
    } else if (segment[1] === 0xe1 && head === XMP_HEADER) {
      // tiff:Orientation="6" or <tiff:Orientation>6</tiff:Orientation>: one digit, changed in place.
      const text = Array.from(segment, (b) => String.fromCharCode(b)).join("");
      for (const match of text.matchAll(/tiff:Orientation(?:="|>)([1-8])/g)) {
        segment[match.index + match[0].length - 1] = 0x31;
      }
    }
    out.push(segment);
  }
  return out;
}

function fixExif(tiff, width, height) {
  // Changes `tiff` (the TIFF structure of an EXIF block) in place; false when it is malformed.
  if (tiff.length < 8) return false;
  const little = tiff[0] === 0x49;
  const get16 = (i) => (little ? tiff[i] | (tiff[i + 1] << 8) : (tiff[i] << 8) | tiff[i + 1]);
  const get32 = (i) => (little ? le32(tiff, i) : u32(tiff, i));
  const put = (i, value, bytes) => {
    for (let k = 0; k < bytes; k++) tiff[i + (little ? k : bytes - 1 - k)] = (value >>> (8 * k)) & 0xff;
  };
  const entries = (ifd) => {
    if (ifd < 8 || ifd + 2 > tiff.length) return null;
    const count = get16(ifd);
    if (ifd + 2 + count * 12 + 4 > tiff.length) return null;
    return Array.from({ length: count }, (_, i) => ifd + 2 + i * 12);
  };
  const ifd0 = entries(get32(4));
  if (!ifd0) return false;
  let exifIfd = null;
  for (const entry of ifd0) {
    const tag = get16(entry);
    if (tag === 0x0112) put(entry + 8, 1, 2);
    if (tag === 0x8769) exifIfd = get32(entry + 8);
  }
  if (exifIfd !== null) {
    const exif = entries(exifIfd);
    if (!exif) return false;
    for (const entry of exif) {
      const tag = get16(entry);
      const type = get16(entry + 2);
      if ((tag === 0xa002 || tag === 0xa003) && (type === 3 || type === 4)) {
        put(entry + 8, 0, 4);
        put(entry + 8, tag === 0xa002 ? width : height, type === 3 ? 2 : 4);
      }
    }
  }
  const next = get32(get32(4) + 2 + ifd0.length * 12);
  if (next) {
    // The thumbnail's directory (IFD1): its picture bytes zeroed, the directory unlinked.
    const ifd1 = entries(next);
    if (!ifd1) return false;
    let at = null;
    let length = null;
    for (const entry of ifd1) {
      if (get16(entry) === 0x0201) at = get32(entry + 8);
      if (get16(entry) === 0x0202) length = get32(entry + 8);
    }
    if (at !== null && length !== null) {
      if (at + length > tiff.length) return false;
      tiff.fill(0, at, at + length);
    }
    tiff.fill(0, next, next + 2 + ifd1.length * 12 + 4);
    put(get32(4) + 2 + ifd0.length * 12, 0, 4);
  }
  return true;
}

/** The JPEG `bytes` with `segments` put in after its JFIF header (or its start). */
function withSegments(bytes, segments) {
  let at = 2;
  if (bytes[2] === 0xff && bytes[3] === 0xe0) at = 4 + ((bytes[4] << 8) | bytes[5]);
  return [bytes.subarray(0, at), ...segments, bytes.subarray(at)];
}

function exifOrientation(body) {
  // "Exif\0\0", then a TIFF header; the orientation is tag 0x0112 of the first IFD.
  if (String.fromCharCode(...body.subarray(0, 4)) !== "Exif") return null;
  const tiff = body.subarray(6);
  const little = tiff[0] === 0x49;
  const u16 = (i) => (little ? tiff[i] | (tiff[i + 1] << 8) : (tiff[i] << 8) | tiff[i + 1]);
  const ifd = little ? le32(tiff, 4) : u32(tiff, 4);
  if (ifd + 2 > tiff.length) return null;
  const count = u16(ifd);
  for (let i = 0; i < count; i++) {
    const entry = ifd + 2 + i * 12;
    if (entry + 12 > tiff.length) return null;
    if (u16(entry) === 0x0112) return u16(entry + 8);
  }
  return null;
}

/** PNG: the bytes without text, time and EXIF chunks; `animated` for APNG. */
export function pngWithoutMetadata(bytes) {
  const drop = new Set(["eXIf", "tEXt", "zTXt", "iTXt", "tIME"]);
  const parts = [bytes.subarray(0, 8)];
  let removed = 0;
  let animated = false;
  for (let at = 8; at + 12 <= bytes.length;) {
    const length = u32(bytes, at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const chunk = bytes.subarray(at, at + 12 + length);
    if (type === "acTL") animated = true;
    if (drop.has(type)) removed += chunk.length; else parts.push(chunk);
    at += 12 + length;
  }
  return { removed, parts, animated };
}

/** WebP: the bytes without EXIF and XMP chunks (flags and sizes fixed); `animated` too. */
export function webpWithoutMetadata(bytes) {
  const chunks = [];
  let removed = 0;
  let animated = false;
  for (let at = 12; at + 8 <= bytes.length;) {
    const length = le32(bytes, at + 4);
    const type = String.fromCharCode(...bytes.subarray(at, at + 4));
    const chunk = bytes.slice(at, at + 8 + length + (length & 1));
    if (type === "VP8X" && chunk[8] & 0x02) animated = true;
    if (type === "EXIF" || type === "XMP ") removed += chunk.length; else chunks.push(chunk);
    at += 8 + length + (length & 1);
  }
  for (const chunk of chunks) {
    if (String.fromCharCode(...chunk.subarray(0, 4)) === "VP8X") chunk[8] &= ~0x0c; // EXIF, XMP flags
  }
  const size = 4 + chunks.reduce((sum, c) => sum + c.length, 0);
  const head = bytes.slice(0, 12);
  new DataView(head.buffer).setUint32(4, size, true);
  return { removed, parts: [head, ...chunks], animated };
}

/** Return a canvas with `bitmap` drawn `rotate` degrees (a multiple of 90) clockwise. */
export function turned(bitmap, rotate) {
  const canvas = document.createElement("canvas");
  const sideways = rotate % 180 !== 0;
  canvas.width = sideways ? bitmap.height : bitmap.width;
  canvas.height = sideways ? bitmap.width : bitmap.height;
  const context = canvas.getContext("2d");
  context.translate(canvas.width / 2, canvas.height / 2);
  context.rotate((rotate * Math.PI) / 180);
  context.drawImage(bitmap, -bitmap.width / 2, -bitmap.height / 2);
  return canvas;
}

function edited(bitmap, { rotate = 0, crop }) {
  // The turned picture cut to the crop (fractions of the turned picture).
  const whole = turned(bitmap, rotate);
  const canvas = document.createElement("canvas");
  const sx = Math.round(crop.x * whole.width);
  const sy = Math.round(crop.y * whole.height);
  canvas.width = Math.max(1, Math.round(crop.width * whole.width));
  canvas.height = Math.max(1, Math.round(crop.height * whole.height));
  canvas.getContext("2d").drawImage(whole, sx, sy, canvas.width, canvas.height, 0, 0, canvas.width, canvas.height);
  return canvas;
}

function canvasBlob(canvas, type, quality) {
  return new Promise((resolve) => canvas.toBlob(resolve, type, quality));
}

async function decode(file) {
  try {
    return await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    return null; // HEIC in most browsers, or a file the service will judge itself
  }
}

/** The largest scale (at most 1) at which a `width`×`height` picture fits `box`. */
export function fitScale(width, height, { maxWidth = Infinity, maxHeight = Infinity, maxSide = Infinity }) {
  return Math.min(1, maxWidth / width, maxHeight / height, maxSide / Math.max(width, height));
}

/** Draw `bitmap` inside `box` (fitScale's) and encode it as `type` within `maxBytes`. */
async function encode(bitmap, type, box, maxBytes) {
  let scale = fitScale(bitmap.width, bitmap.height, box);
  const lossy = type !== "image/png";
  // A lossless PNG is never made smaller than the rules' side to meet the byte target (text in a
  // screenshot would blur): one try, and the checks refuse it if it is still too large.
  for (let round = 0; round < (lossy ? 6 : 1); round++, scale *= 0.8) {
    const canvas = document.createElement("canvas");
    // Rounding keeps a side within its (whole-pixel) limit: a side at most N rounds to at most N.
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    if (type === "image/jpeg") { context.fillStyle = "#fff"; context.fillRect(0, 0, canvas.width, canvas.height); }
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    let blob = await canvasBlob(canvas, type, QUALITY_START);
    if (lossy && blob && blob.size > maxBytes) {
      // The highest quality that fits, by bisection (five more encodes at most).
      let low = QUALITY_FLOOR;
      let high = QUALITY_START;
      let best = null;
      for (let i = 0; i < 5; i++) {
        const quality = (low + high) / 2;
        const attempt = await canvasBlob(canvas, type, quality);
        if (attempt && attempt.size <= maxBytes) { best = attempt; low = quality; } else high = quality;
      }
      blob = best ?? await canvasBlob(canvas, type, QUALITY_FLOOR);
    }
    if (blob && blob.size <= maxBytes) return { blob, width: canvas.width, height: canvas.height };
  }
  return null;
}

const EXTENSIONS = { "image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp" };

function renamed(name, type) {
  const ext = EXTENSIONS[type];
  return !ext || name.toLowerCase().endsWith(ext) || (ext === ".jpg" && /\.jpe?g$/i.test(name))
    ? name : `${name.replace(/\.[^./]*$/, "")}${ext}`;
}

/**
 * Return {file, resized, stripped, note} for `file` under `rules` ({allowed_formats, max_bytes,
 * max_width, max_height, max_dimension, keep_metadata}, all optional). `file` is the input itself
 * when nothing changed. `stripped` is true whenever the file made has lost the original's
 * metadata, `keep_metadata` or not (see the module comment for when that happens).
 * `edit` ({rotate, crop}, from crop.js) turns and cuts the picture first.
 */
export async function prepare(file, rules = {}, edit = null) {
  const unchanged = { file, resized: false, stripped: false, note: null };
  const bytes = new Uint8Array(await file.arrayBuffer());
  const format = formatOf(bytes.subarray(0, 512));
  if (!format || format.mime === "image/svg+xml" || format.mime === "image/gif") return unchanged;
  const keep = rules.keep_metadata === true;
  const maxBytes = Math.min(rules.max_bytes || SERVICE_MAX_BYTES, SERVICE_MAX_BYTES);
  const box = {
    maxWidth: rules.max_width || Infinity, maxHeight: rules.max_height || Infinity, maxSide: rules.max_dimension || Infinity,
  };

  let lossless = null;
  if (format.mime === "image/jpeg") lossless = jpegWithoutMetadata(bytes);
  else if (format.mime === "image/png") lossless = pngWithoutMetadata(bytes);
  else if (format.mime === "image/webp") lossless = webpWithoutMetadata(bytes);
  if (lossless?.animated) return unchanged;

  const decoded = await decode(file);
  if (!decoded) return unchanged; // HEIC the browser cannot read: sent as is
  const bitmap = edit?.crop ? edited(decoded, edit) : decoded;
  try {
    const tooBig = fitScale(bitmap.width, bitmap.height, box) < 1;
    // A JPEG turned by its EXIF orientation loses the turn with the EXIF: drawn upright instead.
    const sideways = !keep && (lossless?.orientation ?? 1) !== 1;
    const heic = format.mime === "image/heic";
    const lossy = format.mime !== "image/png";
    if (edit?.crop || tooBig || sideways || heic || (lossy && file.size > maxBytes)) {
      const type = heic ? "image/jpeg" : format.mime;
      // keep_metadata: a JPEG's metadata goes into the re-encoded JPEG, made true of it (its
      // bytes count against the size limit); other formats' re-encodes carry none.
      const carry = keep && type === "image/jpeg" && lossless?.metadata.length ? lossless.metadata : [];
      const carriedBytes = carry.reduce((sum, segment) => sum + segment.length, 0);
      const out = await encode(bitmap, type, box, maxBytes - carriedBytes);
      if (!out) return unchanged; // the checks that follow say why it cannot go
      const resized = out.width !== bitmap.width || out.height !== bitmap.height;
      const carried = carry.length ? metadataFor(carry, out.width, out.height) : null;
      const parts = carried ? withSegments(new Uint8Array(await out.blob.arrayBuffer()), carried) : [out.blob];
      return {
        file: new File(parts, renamed(file.name, type), { type, lastModified: file.lastModified }),
        resized,
        stripped: !carried,
        note: [edit?.crop ? "cropped" : null, resized ? `resized from ${bitmap.width}×${bitmap.height}` : null].filter(Boolean).join(", ") || "re-encoded",
      };
    }
  } finally {
    decoded.close();
  }
  if (keep || !lossless?.removed) return unchanged;
  return {
    file: new File(lossless.parts, file.name, { type: format.mime, lastModified: file.lastModified }),
    resized: false,
    stripped: true,
    note: null,
  };
}
