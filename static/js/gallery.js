// The image detail page: copy a signed link to any variant, delete after confirmation.
import { api, copyLink } from "./links.js";

const statusEl = document.getElementById("action-status");

for (const button of document.querySelectorAll("button[data-copy-variant]")) {
  button.addEventListener("click", async () => {
    try {
      const { url, message } = await copyLink(button.dataset.uploadId, button.dataset.copyVariant);
      statusEl.textContent = message;
      statusEl.dataset.url = url;
    } catch (error) {
      statusEl.textContent = `Could not make a link: ${error.message}`;
    }
  });
}

const deleteButton = document.getElementById("delete");
const dialog = document.getElementById("confirm-delete");
deleteButton?.addEventListener("click", () => dialog.showModal());
document.getElementById("confirm-cancel")?.addEventListener("click", () => dialog.close());
document.getElementById("confirm-ok")?.addEventListener("click", async () => {
  dialog.close();
  statusEl.textContent = "Deleting…";
  try {
    await api("DELETE", `/api/v1/uploads/${encodeURIComponent(deleteButton.dataset.uploadId)}`);
    statusEl.textContent = "Deleted.";
    window.location.assign(deleteButton.dataset.next || "/gallery");
  } catch (error) {
    statusEl.textContent = `Could not delete: ${error.message}`;
  }
});
