// Crop and rotate one image to an aspect ratio (an avatar's square, a banner's 3:1) before it is
// prepared, in a modal dialog that works by mouse, touch and keyboard: drag the frame (or its
// corner to resize); with the frame focused, the arrow keys move it (Shift: ten times as far)
// and + / − resize it; two buttons turn the picture a quarter turn. Resolves with
// {rotate: 0 | 90 | 180 | 270, crop: {x, y, width, height}} as fractions of the turned picture,
// or null when the person cancels. prepare.js applies it.

import { turned } from "./prepare.js";
import { fitsAspect, formatProblem, inspect } from "./checks.js";

const STEP = 0.01;

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

/**
 * Whether a picture must be cropped to `rules.aspect_ratio` first: only one of another shape, and
 * not one refused anyway (its format) or sent as it is (animated GIF, SVG, undecodable HEIC).
 * `info` is checks.js's inspect(file) answer; it is read from `file` when not given.
 */
export async function needsCrop(file, rules = {}, info = null) {
  if (!rules.aspect_ratio) return false;
  const { format, width, height } = info ?? await inspect(file).catch(() => ({}));
  const croppable = format?.browserCanShow && !["image/gif", "image/svg+xml"].includes(format.mime);
  return Boolean(croppable && width && !fitsAspect(width, height, rules) && !formatProblem(format, rules));
}

/** Ask the person where to crop `file` to `aspect` (width / height); see the module comment. */
export async function chooseCrop(file, aspect, { parent = document.body, name = file.name } = {}) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const dialog = document.createElement("dialog");
  dialog.className = "crop-dialog";
  dialog.setAttribute("aria-labelledby", "crop-title");
  dialog.innerHTML = `
    <h2 id="crop-title"></h2>
    <p id="crop-help" class="muted">Drag the frame or its corner, or use the arrow keys to move it and + or − to resize it.</p>
    <div class="crop-stage"><div class="crop-frame" tabindex="0" role="group" aria-describedby="crop-help"><span class="crop-corner" aria-hidden="true"></span></div></div>
    <p class="crop-actions">
      <button type="button" data-turn="-90">Turn left</button>
      <button type="button" data-turn="90">Turn right</button>
      <button type="button" class="primary" data-done>Use this crop</button>
      <button type="button" data-cancel>Cancel</button>
    </p>`;
  dialog.querySelector("h2").textContent = `Crop ${name}`;
  parent.append(dialog);
  const stage = dialog.querySelector(".crop-stage");
  const frame = dialog.querySelector(".crop-frame");
  let rotate = 0;
  let canvas = null;
  let box = null; // fractions of the turned picture

  function centred() {
    // The largest frame of the aspect ratio, centred.
    const largest = fix({ x: 0, y: 0, width: 1 });
    return { ...largest, x: (1 - largest.width) / 2, y: (1 - largest.height) / 2 };
  }
  function fix({ x, y, width, height }) {
    const pictureAspect = canvas.width / canvas.height;
    width = clamp(width, 0.05, 1);
    height = (width * pictureAspect) / aspect;
    if (height > 1) { height = 1; width = (aspect / pictureAspect); }
    return { x: clamp(x, 0, 1 - width), y: clamp(y, 0, 1 - height), width, height };
  }
  function draw() {
    Object.assign(frame.style, {
      left: `${box.x * 100}%`, top: `${box.y * 100}%`, width: `${box.width * 100}%`, height: `${box.height * 100}%`,
    });
    frame.setAttribute("aria-label", `Crop frame: ${Math.round(box.width * 100)} % wide, ${Math.round(box.x * 100)} % from the left, ${Math.round(box.y * 100)} % from the top`);
  }
  function show() {
    canvas?.remove();
    canvas = turned(bitmap, rotate);
    canvas.className = "crop-picture";
    canvas.setAttribute("aria-hidden", "true");
    stage.prepend(canvas);
    stage.style.aspectRatio = `${canvas.width} / ${canvas.height}`;
    box = centred();
    draw();
  }
  show();

  frame.addEventListener("keydown", (event) => {
    const step = event.shiftKey ? STEP * 10 : STEP;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[event.key]) box = fix({ ...box, x: box.x + moves[event.key][0], y: box.y + moves[event.key][1] });
    else if (event.key === "+" || event.key === "=") box = fix({ ...box, width: box.width + step * 5 });
    else if (event.key === "-" || event.key === "−") box = fix({ ...box, width: box.width - step * 5 });
    else return;
    event.preventDefault();
    draw();
  });
  frame.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    frame.setPointerCapture(event.pointerId);
    const resizing = event.target.classList.contains("crop-corner");
    const area = stage.getBoundingClientRect();
    const start = { px: event.clientX, py: event.clientY, ...box };
    const move = (e) => {
      const dx = (e.clientX - start.px) / area.width;
      const dy = (e.clientY - start.py) / area.height;
      box = resizing ? fix({ ...start, width: start.width + dx }) : fix({ ...start, x: start.x + dx, y: start.y + dy });
      draw();
    };
    frame.addEventListener("pointermove", move);
    frame.addEventListener("pointerup", () => frame.removeEventListener("pointermove", move), { once: true });
  });

  return new Promise((resolve) => {
    const finish = (answer) => { dialog.close(); dialog.remove(); bitmap.close(); resolve(answer); };
    for (const button of dialog.querySelectorAll("[data-turn]")) {
      button.addEventListener("click", () => { rotate = (rotate + Number(button.dataset.turn) + 360) % 360; show(); });
    }
    dialog.querySelector("[data-done]").addEventListener("click", () => finish({ rotate, crop: { ...box } }));
    dialog.querySelector("[data-cancel]").addEventListener("click", () => finish(null));
    dialog.addEventListener("cancel", (event) => { event.preventDefault(); finish(null); });
    dialog.showModal();
    frame.focus();
  });
}
