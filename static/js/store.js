// The upload queue kept in the browser's IndexedDB, so that files not yet sent survive a reload
// or a closed tab: each record holds the file itself (a Blob is stored as is) and how far it got
// (its Idempotency-Key, the upload id and URL once created, whether the transfer finished).
// Records belong to one signed-in user (`owner`); a record goes when its file is ready, refused,
// cancelled or removed, and every record goes when its user logs out (session.js). A browser
// keeps one user's queue at a time: loading one user's records forgets any other user's (left
// by a session that ended without a log-out), so nobody's files are kept for, or shown to, the
// next person on a shared computer. Where IndexedDB is unavailable (a private window may refuse
// it) every call resolves quietly and the queue simply lives as long as the page.

const DB_NAME = "upload-broker";
const STORE = "queue";

let opened = null;
// Set by forgetAll: this page is logging out, so nothing it still does is kept.
let closed = false;

function open() {
  opened ??= new Promise((resolve) => {
    try {
      const request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => resolve(null);
      request.onblocked = () => resolve(null);
    } catch {
      resolve(null);
    }
  });
  return opened;
}

async function run(mode, work) {
  const db = await open();
  if (!db) return undefined;
  return new Promise((resolve) => {
    const tx = db.transaction(STORE, mode);
    const request = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request?.result);
    tx.onerror = () => resolve(undefined);
    tx.onabort = () => resolve(undefined);
  });
}

/** Keep (add or replace) one record: {id, owner, file, added, …progress}. */
export function save(record) {
  if (closed) return Promise.resolve(undefined);
  return run("readwrite", (store) => store.put(record));
}

/** Change some fields of a kept record (nothing happens when it is gone). */
export async function update(id, changes) {
  const record = await run("readonly", (store) => store.get(id));
  if (record) await save({ ...record, ...changes });
}

/** Forget one record. */
export function drop(id) {
  return run("readwrite", (store) => store.delete(id));
}

/** Return `owner`'s records, oldest first; any other user's records are forgotten. */
export async function load(owner) {
  const all = (await run("readonly", (store) => store.getAll())) ?? [];
  const others = all.filter((r) => r.owner !== owner);
  if (others.length) await run("readwrite", (store) => others.forEach((r) => store.delete(r.id)));
  return all.filter((r) => r.owner === owner).sort((a, b) => a.added - b.added);
}

/** Forget every record, and keep nothing this page writes afterwards (its user logs out). */
export function forgetAll() {
  closed = true;
  return run("readwrite", (store) => store.clear());
}
