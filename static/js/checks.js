// What an upload page checks before asking for an upload link: the file against an upload's
// rules and the image service's own limits. The format by its bytes (never the name or the
// browser's guess), at most 10 MB, readable dimensions within 12,000 px a side and 100 megapixels.
// HEIC/HEIF is recognised by its `ftyp` brands; browsers that cannot decode it leave its
// dimensions to the image service. An app that builds its own page imports it as the broker's
// page does:
//
//   import { check } from "https://broker.example.com/static/js/checks.js";
//   const rules = { allowed_formats: ["JPEG", "PNG"], max_bytes: 5_000_000, max_dimension: 4096 };
//   const problem = await check(file, rules); // null, or a sentence saying why it cannot go
//
// The rules are an upload profile's public rules (an item of `GET /api/v1/profiles`, or the
// page's data-rules): `allowed_formats` (or `formats`), `max_bytes`, `max_dimension` (the largest side), `min_width`,
// `max_width`, `min_height`, `max_height`, `min_pixels`, `max_pixels`, `aspect_ratio` (width /
// height) within `aspect_tolerance` (default 0.01, as the broker). Every rule is optional (null or
// absent: only the image service's limits apply). prepare.js makes a file fit the same rules
// first (crop, resize, re-encode, metadata removed), so check the prepared file; the broker
// measures the arrived original against the same rules whatever the page said.
export const MAX_BYTES = 10 * 1024 * 1024;
export const MAX_SIDE = 12000;
export const MAX_PIXELS = 100_000_000;

// ISO-BMFF brands of HEIC/HEIF stills and sequences; AVIF (`avif`, `avis`) shares the container
// but is not accepted by the image service outside Enterprise plans.
const HEIC_BRANDS = new Set(["heic", "heix", "hevc", "hevx", "heim", "heis", "hevm", "hevs"]);
const HEIF_GENERIC_BRANDS = new Set(["mif1", "msf1"]);
const AVIF_BRANDS = new Set(["avif", "avis"]);

const FORMATS = {
  "image/jpeg": { label: "JPEG", browserCanShow: true },
  "image/png": { label: "PNG", browserCanShow: true },
  "image/gif": { label: "GIF", browserCanShow: true },
  "image/webp": { label: "WebP", browserCanShow: true },
  "image/svg+xml": { label: "SVG", browserCanShow: true },
  "image/heic": { label: "HEIC", browserCanShow: false },
};

/** Return the ftyp brands (major first) of an ISO-BMFF file head, or null. */
export function ftypBrands(head) {
  const ascii = (from, to) => String.fromCharCode(...head.subarray(from, to));
  if (head.length < 16 || ascii(4, 8) !== "ftyp") return null;
  const boxSize = ((head[0] << 24) | (head[1] << 16) | (head[2] << 8) | head[3]) >>> 0;
  const end = Math.min(head.length, boxSize >= 16 ? boxSize : 16);
  const brands = [ascii(8, 12)];
  for (let at = 16; at + 4 <= end; at += 4) brands.push(ascii(at, at + 4));
  return brands;
}

/** Recognise the format from the first bytes; return {mime, label, browserCanShow} or null. */
export function formatOf(head) {
  const starts = (...bytes) => bytes.every((b, i) => head[i] === b);
  let mime = null;
  if (starts(0xff, 0xd8, 0xff)) mime = "image/jpeg";
  else if (starts(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a)) mime = "image/png";
  else if (starts(0x47, 0x49, 0x46, 0x38)) mime = "image/gif";
  else if (starts(0x52, 0x49, 0x46, 0x46) && head[8] === 0x57 && head[9] === 0x45 && head[10] === 0x42 && head[11] === 0x50) mime = "image/webp";
  else {
    const brands = ftypBrands(head);
    if (brands) {
      const heic = brands.some((b) => HEIC_BRANDS.has(b));
      const avif = brands.some((b) => AVIF_BRANDS.has(b));
      if (heic || (!avif && brands.some((b) => HEIF_GENERIC_BRANDS.has(b)))) mime = "image/heic";
    } else {
      const text = new TextDecoder("utf-8", { fatal: false }).decode(head).trimStart().toLowerCase();
      if (text.startsWith("<svg") || (text.startsWith("<?xml") && text.includes("<svg"))) mime = "image/svg+xml";
    }
  }
  return mime ? { mime, ...FORMATS[mime] } : null;
}

/** Read a file's head and recognise its format. */
export async function sniffFormat(file) {
  return formatOf(new Uint8Array(await file.slice(0, 512).arrayBuffer()));
}

export function humanSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function readDimensions(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => { URL.revokeObjectURL(url); resolve({ width: img.naturalWidth, height: img.naturalHeight }); };
    img.onerror = () => { URL.revokeObjectURL(url); resolve(null); };
    img.src = url;
  });
}

/** Whether GIF bytes hold more than one frame (two or more graphic control blocks). */
export function gifIsAnimated(bytes) {
  let frames = 0;
  for (let i = 0; i + 2 < bytes.length; i++) {
    if (bytes[i] === 0x21 && bytes[i + 1] === 0xf9 && bytes[i + 2] === 0x04 && ++frames > 1) return true;
  }
  return false;
}

/** What a tile says about a file: {format, width, height, animated}; unknowns are null. */
export async function inspect(file) {
  const format = await sniffFormat(file).catch(() => null);
  const size = format?.browserCanShow ? await readDimensions(file) : null;
  const animated = format?.mime === "image/gif" ? gifIsAnimated(new Uint8Array(await file.arrayBuffer())) : false;
  return { format, width: size?.width || null, height: size?.height || null, animated };
}

/** The rules an upload page shows and checks: the broker's, over the image service's limits. */
export function effectiveRules(rules = {}) {
  // `formats`: a profile as `GET /api/v1/profiles` lists it serves as it is.
  const formats = (rules.allowed_formats ?? rules.formats ?? []).map((f) => String(f).toUpperCase());
  if (formats.includes("JPG")) formats.push("JPEG");
  if (formats.includes("HEIF")) formats.push("HEIC");
  const ratio = Number(rules.aspect_ratio) > 0 ? Number(rules.aspect_ratio) : null;
  return {
    formats: formats.length ? formats : null,
    maxBytes: Math.min(rules.max_bytes || MAX_BYTES, MAX_BYTES),
    maxSide: Math.min(rules.max_dimension || MAX_SIDE, MAX_SIDE),
    minWidth: rules.min_width || null,
    maxWidth: rules.max_width || null,
    minHeight: rules.min_height || null,
    maxHeight: rules.max_height || null,
    minPixels: rules.min_pixels || null,
    maxPixels: Math.min(rules.max_pixels || MAX_PIXELS, MAX_PIXELS),
    aspectRatio: ratio,
    // The broker's default tolerance: within 1 % of the ratio.
    aspectTolerance: ratio ? (rules.aspect_tolerance ?? 0.01) : null,
  };
}

const grouped = (n) => n.toLocaleString("en-US");

/** Say a width/height ratio as people write it: 1:1, 16:9, 3:2 (else the number). */
export function ratioInWords(value) {
  for (let height = 1; height <= 32; height++) {
    const width = value * height;
    if (Math.abs(width - Math.round(width)) < 1e-6) return `${Math.round(width)}:${height}`;
  }
  return String(Number(value.toFixed(3)));
}

/** Whether a `width`×`height` picture has the rules' aspect ratio (true when they set none). */
export function fitsAspect(width, height, rules = {}) {
  const { aspectRatio, aspectTolerance } = effectiveRules(rules);
  return !aspectRatio || !height || Math.abs(width / height / aspectRatio - 1) <= aspectTolerance;
}

/** Say which rule a picture of `width`×`height` px breaks (see effectiveRules), or null. */
export function sizeProblem(width, height, rules = {}) {
  const r = effectiveRules(rules);
  const px = (n) => `${grouped(n)} px`;
  const size = `${width}×${height} px`;
  if (width > r.maxSide || height > r.maxSide) return `Too big: ${size} (at most ${px(r.maxSide)} a side).`;
  if (r.maxWidth && width > r.maxWidth) return `Too wide: ${px(width)} (at most ${px(r.maxWidth)}).`;
  if (r.maxHeight && height > r.maxHeight) return `Too tall: ${px(height)} (at most ${px(r.maxHeight)}).`;
  if (width * height > r.maxPixels) return `Too big: ${size} is more than ${grouped(r.maxPixels / 1e6)} megapixels.`;
  if (r.minWidth && width < r.minWidth) return `Too small: ${px(width)} wide (at least ${px(r.minWidth)}).`;
  if (r.minHeight && height < r.minHeight) return `Too small: ${px(height)} high (at least ${px(r.minHeight)}).`;
  if (r.minPixels && width * height < r.minPixels) return `Too small: ${size} is less than ${grouped(r.minPixels / 1e6)} megapixels.`;
  if (!fitsAspect(width, height, rules)) return `Wrong shape: ${size}; the aspect ratio must be ${ratioInWords(r.aspectRatio)} (width:height).`;
  return null;
}

/** Say why a file of `format` (formatOf's answer) is not accepted under `rules`, or null. */
export function formatProblem(format, rules = {}) {
  const { formats } = effectiveRules(rules);
  if (!formats || formats.includes(format.label.toUpperCase())) return null;
  return `${format.label} is not accepted here: use ${formats.filter((f) => f !== "JPG" && f !== "HEIF").join(", ")}.`;
}

/** Return why `file` would be refused under `rules` (see effectiveRules), or null when it looks acceptable. */
export async function check(file, rules = {}) {
  const { maxBytes } = effectiveRules(rules);
  if (file.size === 0) return "The file is empty.";
  if (file.size > maxBytes) return `Too large: ${humanSize(file.size)} (the limit is ${humanSize(maxBytes)}).`;
  const format = await sniffFormat(file);
  if (!format) return "Not a supported image: use JPEG, PNG, GIF, WebP, SVG or HEIC.";
  const wrongFormat = formatProblem(format, rules);
  if (wrongFormat) return wrongFormat;
  const size = await readDimensions(file);
  if (!size) {
    // HEIC: most browsers cannot decode it; the image service checks it on arrival.
    return format.browserCanShow ? `The ${format.label} file could not be read as an image.` : null;
  }
  if (format.mime === "image/svg+xml") {
    // A drawing has no pixels of its own: only the largest side and the service's limits apply
    // to its stated size (the broker measures no SVG against a profile's size rules either).
    return sizeProblem(size.width, size.height, { max_dimension: rules.max_dimension });
  }
  if (!size.width || !size.height) return `The ${format.label} file could not be read as an image.`;
  return sizeProblem(size.width, size.height, rules);
}
