const BROKER = "{{ base }}";
const RETRY = [409, 429, 502, 503, 504]; // worth another try; other errors need a fix first
const pause = (seconds) => new Promise((done) => setTimeout(done, seconds * 1000));

// Call the broker with the token; retry what may pass later, after Retry-After when given.
async function call(token, path, init = {}) {
  for (let attempt = 1; ; attempt++) {
    const response = await fetch(BROKER + path, {
      ...init,
      headers: { Authorization: `Bearer ${token}`, ...init.headers },
    });
    if (!RETRY.includes(response.status) || attempt === 5) return response;
    await pause(Number(response.headers.get("Retry-After")) || 2 ** attempt);
  }
}

async function uploadImage(token, file) {
  // 1. An upload URL. The same Idempotency-Key on every retry: never a second upload.
  const created = await (await call(token, "/api/v1/uploads", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
    body: JSON.stringify({ metadata: { album: "summer" } }),
  })).json();

  // 2. The file, straight to Cloudflare: multipart, field "file", no token.
  const form = new FormData();
  form.append("file", file);
  await fetch(created.upload_url, { method: "POST", body: form });

  // 3. Done: 200 once ready, 202 while the broker checks (ask again after Retry-After).
  let response;
  for (let attempt = 0; attempt < 30; attempt++) {
    response = await call(token, `/api/v1/uploads/${created.id}/complete`, { method: "POST" });
    if (response.status !== 202) break;
    await pause(Number(response.headers.get("Retry-After")) || 1);
  }
  const upload = await response.json();

  // 4. A signed URL to show it.
  const { url } = await (await call(token, `/api/v1/images/${upload.id}/url?variant={{ variant }}`)).json();
  return url;
}
