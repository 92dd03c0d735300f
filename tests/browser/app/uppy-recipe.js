// The README's Uppy recipe, as an app's page would run it: each file gets a one-time upload URL
// from the broker (with the app's OpenID Connect token), Uppy's XHR upload sends it straight to
// that URL, and a post-processor tells the broker and waits until the upload is ready.
import { Uppy, XHRUpload } from "./vendor/uppy-xhr.min.mjs";

export function brokerUppy({ broker, token }) {
  const api = async (method, path, body) => {
    const response = await fetch(new URL(path, broker), {
      method,
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok && response.status !== 202) throw new Error(data.error.message);
    return data;
  };
  const uppy = new Uppy({ autoProceed: false });
  // No shared endpoint: each file gets its own one-time URL below, and only the file is sent.
  uppy.use(XHRUpload, { endpoint: "", fieldName: "file", formData: true, allowedMetaFields: [], limit: 3 });
  uppy.addPreProcessor(async (fileIDs) => {
    await Promise.all(fileIDs.map(async (id) => {
      const upload = await api("POST", "/api/v1/uploads", {});
      uppy.setFileMeta(id, { brokerId: upload.id });
      uppy.setFileState(id, { xhrUpload: { endpoint: upload.upload_url } });
    }));
  });
  uppy.addPostProcessor(async (fileIDs) => {
    await Promise.all(fileIDs.map(async (id) => {
      const brokerId = uppy.getFile(id).meta.brokerId;
      let upload = await api("POST", `/api/v1/uploads/${brokerId}/complete`);
      for (let wait = 250; upload.status === "pending"; wait = Math.min(wait * 2, 2000)) {
        await new Promise((resolve) => setTimeout(resolve, wait));
        upload = await api("GET", `/api/v1/uploads/${brokerId}`);
      }
      uppy.setFileMeta(id, { brokerStatus: upload.status });
    }));
  });
  return uppy;
}
