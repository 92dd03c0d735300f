// What the upload page and the image detail page share: calls to the broker with the session's
// CSRF token, copying a signed link, and times said in one zone (UTC, labelled).

const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

/** Call the broker with the session cookie; resolve with the JSON answer (null for 204). */
export async function api(method, path, body) {
  const headers = { Accept: "application/json", "X-CSRFToken": csrfToken };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, credentials: "same-origin", headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new Error(data?.error?.message ?? `The broker answered ${response.status}.`);
  return data;
}

/** "2026-12-06 14:08 UTC": the zone the server's pages use too. */
export function utcText(iso) {
  return `${new Date(iso).toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

/**
 * Get a link to one variant and put it on the clipboard; resolve with {url, message}. Without
 * clipboard permission the message carries the link to copy by hand.
 */
export async function copyLink(uploadId, variant) {
  const data = await api("GET", `/api/v1/images/${encodeURIComponent(uploadId)}/url?variant=${encodeURIComponent(variant)}`);
  const until = data.expires_at ? `; it works until ${utcText(data.expires_at)}` : "";
  try {
    await navigator.clipboard.writeText(data.url);
    return { url: data.url, message: `Link to ${variant} copied${until}.` };
  } catch {
    return { url: data.url, message: `Copy this link${until}: ${data.url}` };
  }
}
