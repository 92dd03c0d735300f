// The image detail page: copy a signed link, delete after confirmation.
const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
const statusEl = document.getElementById("action-status");

async function api(method, path) {
  const response = await fetch(path, {
    method, credentials: "same-origin", headers: { Accept: "application/json", "X-CSRFToken": csrfToken },
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new Error(data?.error?.message ?? `The broker answered ${response.status}.`);
  return data;
}

const copyButton = document.getElementById("copy-link");
copyButton?.addEventListener("click", async () => {
  const { uploadId, variant } = copyButton.dataset;
  try {
    const data = await api("GET", `/api/v1/images/${encodeURIComponent(uploadId)}/url?variant=${encodeURIComponent(variant)}`);
    try {
      await navigator.clipboard.writeText(data.url);
      statusEl.textContent = `Link copied; it works until ${new Date(data.expires_at).toLocaleString()}.`;
    } catch {
      statusEl.textContent = `Copy this link: ${data.url}`;
    }
    statusEl.dataset.url = data.url;
  } catch (error) {
    statusEl.textContent = `Could not make a link: ${error.message}`;
  }
});

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
    window.location.assign(document.body.dataset.galleryUrl || "/gallery");
  } catch (error) {
    statusEl.textContent = `Could not delete: ${error.message}`;
  }
});
