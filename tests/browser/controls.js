// Mark every visible, enabled control outside closed dialogs with data-kbd; return "n:name" each.
() => {
  const all = [...document.querySelectorAll('a[href], button, [tabindex="0"], input:not([type=hidden])')]
    .filter((el) => el.checkVisibility() && !el.closest("dialog") && !el.disabled && el.getBoundingClientRect().width > 1);
  all.forEach((el, i) => { el.dataset.kbd = String(i); });
  return all.map((el) => `${el.dataset.kbd}:${(el.getAttribute("aria-label") || el.textContent).trim().slice(0, 40)}`);
}
