// The account page: copy a new token (shown once), confirm before revoking one.
const copyButton = document.getElementById("copy-token");
const copyStatus = document.getElementById("copy-status");
copyButton?.addEventListener("click", async () => {
  const field = document.getElementById("new-token");
  try {
    await navigator.clipboard.writeText(field.value);
    copyStatus.textContent = "Copied. Keep it somewhere safe: it is not shown again.";
  } catch {
    // No clipboard permission: select it so the user can copy it by hand.
    field.select();
    copyStatus.textContent = "Press Ctrl+C (⌘C) to copy the selected token.";
  }
});

const dialog = document.getElementById("confirm-revoke");
let pending = null;
for (const form of document.querySelectorAll("form.revoke-form")) {
  form.addEventListener("submit", (event) => {
    if (form.dataset.confirmed === "yes") return;
    event.preventDefault();
    pending = form;
    dialog.querySelector(".token-name").textContent = form.dataset.tokenName;
    dialog.showModal();
  });
}
document.getElementById("revoke-cancel")?.addEventListener("click", () => { pending = null; dialog.close(); });
document.getElementById("revoke-ok")?.addEventListener("click", () => {
  if (!pending) return;
  pending.dataset.confirmed = "yes";
  dialog.close();
  pending.requestSubmit();
});
