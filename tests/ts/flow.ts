// The upload flow as a TypeScript app writes it against types generated from the broker's
// OpenAPI document by openapi-typescript at its default options: a token, an upload created
// with only the fields it needs, the file sent to Cloudflare, /complete until settled, then a
// signed URL fetched. Type-checked with tsc and run with node by
// tests/api/test_typescript_client.py; prints one JSON line of what it saw.
import { readFileSync } from "node:fs";
import type { paths } from "./api.js";

type Op<P extends keyof paths, M extends "get" | "post"> = NonNullable<paths[P][M]>;
type TokenRequest = NonNullable<Op<"/api/v1/auth/tokens", "post">["requestBody"]>["content"]["application/json"];
type TokenCreated = Op<"/api/v1/auth/tokens", "post">["responses"][201]["content"]["application/json"];
type UploadRequest = NonNullable<Op<"/api/v1/uploads", "post">["requestBody"]>["content"]["application/json"];
type UploadCreated = Op<"/api/v1/uploads", "post">["responses"][201]["content"]["application/json"];
type Completed = Op<"/api/v1/uploads/{upload_id}/complete", "post">["responses"][200]["content"]["application/json"];
type SignedUrl = Op<"/api/v1/images/{upload_id}/url", "get">["responses"][200]["content"]["application/json"];

const base = process.env.BROKER_URL ?? "";
const say = (data: unknown) => console.log(JSON.stringify(data));

async function call<T>(path: string, init: RequestInit & { token?: string }): Promise<[number, T, Headers]> {
  const headers = new Headers(init.headers);
  if (init.token) headers.set("Authorization", `Bearer ${init.token}`);
  if (init.body) headers.set("Content-Type", "application/json");
  const response = await fetch(base + path, { ...init, headers });
  return [response.status, (await response.json()) as T, response.headers];
}

async function main(): Promise<void> {
  const login: TokenRequest = {
    username: process.env.BROKER_USERNAME ?? "",
    password: process.env.BROKER_PASSWORD ?? "",
    device_name: "typescript",
  };
  const [, created] = await call<TokenCreated>("/api/v1/auth/tokens", {
    method: "POST",
    body: JSON.stringify(login),
  });
  const token = created.token;

  // Only what this app needs: every other field is optional in the generated type.
  const wanted: UploadRequest = { metadata: { album: "summer" } };
  const [createdStatus, upload] = await call<UploadCreated>("/api/v1/uploads", {
    method: "POST",
    body: JSON.stringify(wanted),
    token,
    headers: { "Idempotency-Key": "ts-photo-1" },
  });

  const form = new FormData();
  const image = readFileSync(process.env.IMAGE_PATH ?? "");
  form.append("file", new Blob([image], { type: "image/png" }), "photo.png");
  const sent = await fetch(upload.upload_url, { method: "POST", body: form });

  const [status, done] = await call<Completed>(
    `/api/v1/uploads/${upload.id}/complete`,
    { method: "POST", token },
  );
  const fileState: string | null | undefined = done.file_state;

  const [, signed] = await call<SignedUrl>(
    `/api/v1/images/${upload.id}/url?variant=thumb&ttl=600`,
    { method: "GET", token },
  );
  const shown = await fetch(signed.url);
  say({
    created: createdStatus,
    sent: sent.status,
    complete: status,
    status: done.status,
    file_state: fileState,
    image: shown.status,
    image_type: shown.headers.get("content-type"),
  });
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
