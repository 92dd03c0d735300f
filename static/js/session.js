// On every page of a signed-in user: logging out first forgets the files this browser kept for
// them (store.js), so the next person on the computer never finds them. The log-out goes ahead
// even when the browser's storage does not answer within a moment.

import { forgetAll } from "./store.js";

const PATIENCE_MS = 2000;

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-logout") || form.dataset.forgotten) return;
  event.preventDefault();
  const waited = new Promise((resolve) => { window.setTimeout(resolve, PATIENCE_MS); });
  Promise.race([forgetAll(), waited]).finally(() => {
    form.dataset.forgotten = "yes";
    form.submit();
  });
});
