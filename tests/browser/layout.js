// What overlaps on the page as shown now: every visible image against every visible text run,
// text runs of different elements against each other, a header that takes more than one line,
// and a page wider than the screen. Returns a list of readable problems (empty when none).
() => {
  const problems = [];
  const MIN = 2; // px of overlap, both ways, that count (sub-pixel touching does not)
  const shown = (el) => {
    for (let e = el; e && e !== document.documentElement; e = e.parentElement) {
      const style = getComputedStyle(e);
      if (style.display === "none" || style.visibility === "hidden" || style.opacity === "0") return false;
      if (style.clip === "rect(0px, 0px, 0px, 0px)") return false;
      if (e.tagName === "DIALOG" && !e.open) return false;
    }
    const box = el.getBoundingClientRect();
    return box.width > 1 && box.height > 1;
  };
  const label = (el) => {
    const id = el.id ? `#${el.id}` : "";
    const cls = typeof el.className === "string" && el.className ? `.${el.className.trim().split(/\s+/).join(".")}` : "";
    return `${el.tagName.toLowerCase()}${id}${cls}`;
  };
  const scroll = { x: window.scrollX, y: window.scrollY };
  const abs = (r) => ({ left: r.left + scroll.x, top: r.top + scroll.y, right: r.right + scroll.x, bottom: r.bottom + scroll.y });
  const overlap = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) >= MIN
    && Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) >= MIN;

  // Pictures, and the boxes that stand for one (a preview's frame, a placeholder): text of
  // their own (a preview's "PNG" label) may sit on them, nothing else.
  const PICTURES = "img, svg, video, canvas, .preview, .placeholder, .tile-image";
  const images = [...document.querySelectorAll(PICTURES)]
    .filter((el) => !el.parentElement.closest("svg"))
    .filter(shown).map((el) => ({ el, box: abs(el.getBoundingClientRect()) }));
  const runs = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent.trim();
    const parent = node.parentElement;
    if (!text || !parent || ["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT", "OPTION"].includes(parent.tagName) || !shown(parent)) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const rect of range.getClientRects()) {
      if (rect.width > 1 && rect.height > 1) runs.push({ node, parent, text, box: abs(rect) });
    }
  }
  for (const image of images) {
    for (const run of runs) {
      if (!image.el.contains(run.parent) && overlap(image.box, run.box)) problems.push(`${label(image.el)} covers "${run.text.slice(0, 30)}" (${label(run.parent)})`);
    }
  }
  for (let i = 0; i < runs.length; i++) {
    for (let j = i + 1; j < runs.length; j++) {
      if (runs[i].node !== runs[j].node && overlap(runs[i].box, runs[j].box)) {
        problems.push(`"${runs[i].text.slice(0, 30)}" (${label(runs[i].parent)}) overlaps "${runs[j].text.slice(0, 30)}" (${label(runs[j].parent)})`);
      }
    }
  }
  // The header's items sit on one line.
  const items = [...document.querySelectorAll(".site-header nav > *")].filter(shown);
  // An inline form's own box is not where its button is drawn: measure the button.
  const tops = items.map((el) => (el.tagName === "FORM" ? el.querySelector("button") ?? el : el).getBoundingClientRect());
  if (tops.length && Math.max(...tops.map((r) => r.top)) >= Math.min(...tops.map((r) => r.bottom))) {
    problems.push(`the header wraps: ${items.map((el, i) => `${label(el)}@${Math.round(tops[i].top)}`).join(", ")}`);
  }
  const { scrollWidth, clientWidth } = document.documentElement;
  if (scrollWidth > clientWidth) {
    // Name what sticks out, deepest first, so the failure says where to look.
    const out = [...document.body.querySelectorAll("*")].filter(shown)
      .filter((el) => abs(el.getBoundingClientRect()).right > clientWidth + 0.5)
      .filter((el, _, all) => !all.some((other) => other !== el && el.contains(other)))
      .slice(0, 5).map(label);
    problems.push(`the page is ${scrollWidth} px wide on a ${clientWidth} px screen (${out.join(", ")})`);
  }
  return problems;
}
