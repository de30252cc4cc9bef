"use strict";
// "Verify in this browser": rebuild each event's canonical bytes from the event feed, hash them
// into Merkle leaves with WebCrypto, check each leaf's inclusion proof against the latest signed
// checkpoint (RFC 9162 §2.1.3.2), and the checkpoint's Ed25519 signature against the published
// verifier key. Nothing here trusts the page's own rendering of the events.

const enc = new TextEncoder();

function b64(text) { return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); }
function hex(bytes) { return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""); }
function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
function equal(a, b) { return a.length === b.length && a.every((x, i) => x === b[i]); }
async function sha256(bytes) { return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)); }
const leafHash = (data) => sha256(concat(new Uint8Array([0]), data));
const nodeHash = (left, right) => sha256(concat(new Uint8Array([1]), left, right));

function canonicalBytes(e) {
  const data = enc.encode(e.data), metadata = enc.encode(e.metadata);
  const header = `${e.position}|${e.stream_id}|${e.stream_version}|${e.type}|${e.schema_version}|` +
    `${e.recorded_at_us}|${data.length}|${metadata.length}|`;
  return concat(enc.encode(header), data, metadata);
}

async function includes(index, size, leaf, proof, root) {
  if (index >= size) return false;
  let fn = index, sn = size - 1, r = leaf;
  for (const p of proof) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  return sn === 0 && equal(r, root);
}

async function openCheckpoint(note, verifierKey) {
  const first = verifierKey.indexOf("+"), second = verifierKey.indexOf("+", first + 1);
  const name = verifierKey.slice(0, first), keyHash = verifierKey.slice(first + 1, second);
  const raw = b64(verifierKey.slice(second + 1));
  if (raw[0] !== 1 || raw.length !== 33) throw new Error("the published key is not an Ed25519 verifier key");
  const key = await crypto.subtle.importKey("raw", raw.slice(1), { name: "Ed25519" }, false, ["verify"]);
  const split = note.lastIndexOf("\n\n");
  const text = note.slice(0, split + 1);
  let signed = false;
  for (const line of note.slice(split + 2).split("\n")) {
    if (!line.startsWith("\u2014 ")) continue;
    const [signer, encoded] = line.slice(2).split(" ");
    const signature = b64(encoded);
    if (signer !== name || hex(signature.slice(0, 4)) !== keyHash) continue;  // a cosigner: not ours to judge
    if (!(await crypto.subtle.verify({ name: "Ed25519" }, key, signature.slice(4), enc.encode(text)))) {
      throw new Error("the checkpoint's signature does not verify with the published key");
    }
    signed = true;
  }
  if (!signed) throw new Error("the checkpoint is not signed by the published key");
  const lines = text.split("\n");
  return { origin: lines[0], size: Number(lines[1]), root: b64(lines[2]) };
}

async function fetchOk(url, as) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  return as === "text" ? response.text() : response.json();
}

async function verify(button, verdict) {
  verdict.className = "";
  verdict.textContent = "Checking…";
  button.disabled = true;
  try {
    const [events, note, key] = await Promise.all([
      fetchOk(`/ui/prediction/${button.dataset.prediction}/events.json`),
      fetchOk("/checkpoint", "text"),
      fetchOk("/checkpoint/key", "text"),
    ]);
    const checkpoint = await openCheckpoint(note, key.trim());
    for (const e of events) {
      if (e.position > checkpoint.size) {
        throw new Error(`the event at position ${e.position} is not in a signed checkpoint yet (${checkpoint.size} leaves); try again in a second`);
      }
      const proof = await fetchOk(`/events/${e.position}/inclusion?tree_size=${checkpoint.size}`);
      const leaf = await leafHash(canonicalBytes(e));
      if (!(await includes(e.position - 1, checkpoint.size, leaf, proof.proof.map(b64), checkpoint.root))) {
        throw new Error(`the event at position ${e.position} (${e.type}) does not match the signed checkpoint of ${checkpoint.size} leaves`);
      }
    }
    verdict.className = "ok";
    verdict.textContent = `✓ All ${events.length} events are in the signed checkpoint of ${checkpoint.size} leaves ` +
      `(${checkpoint.origin}); its signature verifies with the published key.`;
  } catch (error) {
    verdict.className = "bad";
    verdict.textContent = `✗ ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

// Upload: each dropped or chosen image is sent on its own (a few at a time) and its result is
// shown as it returns. Everything the server sent back is put in as text, never as markup.
const UPLOADS_AT_ONCE = 4;

function resultItem(list, name) {
  const item = document.createElement("li");
  item.textContent = `${name}: uploading…`;
  list.prepend(item);
  return item;
}

function showPrediction(item, name, answer) {
  item.textContent = "";
  const link = document.createElement("a");
  link.href = `/ui/prediction/${answer.prediction_id}`;
  const picture = document.createElement("img");
  picture.className = "thumb";
  picture.alt = "";
  picture.src = `/ui/thumb/${answer.input_id}`;  // a small picture's thumbnail is the picture
  const confidence = Math.max(...answer.prediction);
  link.append(picture, ` class ${answer.likely_class} (${(confidence * 100).toFixed(1)}%)`);
  const label = document.createElement("span");
  label.textContent = ` ${name}`;
  item.append(link, label);
  item.className = "ok";
}

function showProblem(item, name, status, problem) {
  item.className = "bad";
  item.textContent = `✗ ${name}: ${problem.detail || problem.title || "refused"} (${status})`;
}

async function sendOne(form, list, file) {
  const item = resultItem(list, file.name);
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const response = await fetch(form.action, {
      method: "POST", body, credentials: "same-origin", headers: { "X-CSRF-Token": form.dataset.csrf },
    });
    const answer = await response.json().catch(() => ({ detail: response.statusText }));
    if (response.status === 201) showPrediction(item, file.name, answer);
    else showProblem(item, file.name, response.status, answer);
  } catch (error) {
    showProblem(item, file.name, "network", { detail: error.message });
  }
}

async function sendAll(form, list, files) {
  const queue = Array.from(files);
  const none = document.getElementById("no-results");
  if (none) none.hidden = true;
  const worker = async () => { for (let file; (file = queue.shift()); ) await sendOne(form, list, file); };
  await Promise.all(Array.from({ length: Math.min(UPLOADS_AT_ONCE, queue.length) }, worker));
}

function wireUpload(form) {
  const list = document.getElementById("results");
  const input = document.getElementById("files");
  const drop = document.getElementById("drop");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sendAll(form, list, input.files).then(() => { input.value = ""; });
  });
  input.addEventListener("change", () => { if (input.files.length) form.requestSubmit(); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    sendAll(form, list, event.dataTransfer.files);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const button = document.getElementById("verify");
  const verdict = document.getElementById("verdict");
  if (button && verdict) button.addEventListener("click", () => verify(button, verdict));
  const form = document.getElementById("upload");
  if (form) wireUpload(form);
});
