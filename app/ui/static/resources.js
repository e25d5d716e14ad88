// Datasets (upload with line errors, preview), adapters, and evaluations.

import { all, api, pause, raw } from "./api.js";
import { badge, bytes, clear, errorBox, h, table, when } from "./dom.js";
import { results, resultsTable, summary } from "./evals.js";
import { adapterLink } from "./jobs.js";

const PREVIEW_RECORDS = 20;

// ---- datasets --------------------------------------------------------------------------------

export async function datasetsPage(ctx) {
  const list = h("div", { id: "files" });
  const status = h("div", { id: "upload-status" });
  const file = h("input", { type: "file", id: "upload-file", name: "file", accept: ".jsonl,.json,.txt", required: true });
  const purpose = h("select", { id: "upload-purpose", name: "purpose" },
    ["fine-tune", "evals", "user_data"].map((p) => h("option", { value: p }, p)));
  const form = h("form", { id: "upload", class: "card" }, h("h2", {}, "Upload a dataset (JSONL)"),
    h("div", { class: "grid" }, h("label", {}, "File", file), h("label", {}, "Purpose", purpose)),
    h("button", { type: "submit" }, "Upload"), status);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!file.files.length) return;
    clear(status, h("p", { class: "muted" }, "Uploading and validating…"));
    const data = new FormData();
    data.append("purpose", purpose.value);
    data.append("file", file.files[0]);
    try {
      const created = await api("/files", { method: "POST", body: data });
      clear(status, h("p", { class: "ok" }, "Uploaded ", h("a", { href: `#/datasets/${created.id}` }, created.id),
        `: ${created.examples} records, format ${created.format}.`));
      await drawFiles(list, ctx.signal);
    } catch (err) {
      clear(status, errorBox(err), err.errors && err.errors.length ? lineErrors(err.errors) : null);
    }
  });
  ctx.root.append(h("h1", {}, "Datasets"), form, list);
  await drawFiles(list, ctx.signal);
}

function lineErrors(errors) {
  return table(["line", "problem"], errors.map((e) => h("tr", { class: "line-error", "data-line": e.line ?? "" },
    h("td", {}, e.line ?? "—"), h("td", {}, e.message))), { id: "upload-errors" });
}

async function drawFiles(el, signal) {
  const files = await all("/files", { signal });
  clear(el, files.length ? table(["file", "name", "purpose", "format", "records", "size", "created"],
    files.map((f) => h("tr", { "data-file": f.id },
      h("td", {}, h("a", { href: `#/datasets/${f.id}` }, f.id)), h("td", {}, f.filename), h("td", {}, f.purpose),
      h("td", {}, f.format), h("td", {}, f.examples), h("td", {}, bytes(f.bytes)), h("td", {}, when(f.created_at)))))
    : h("p", { class: "muted" }, "No files yet."));
}

export async function datasetPage(ctx, id) {
  const file = await api(`/files/${encodeURIComponent(id)}`, { signal: ctx.signal });
  const preview = h("div", { id: "preview" });
  ctx.root.append(h("h1", {}, file.filename, " ", h("code", {}, file.id)),
    h("dl", { class: "facts card" }, [["purpose", file.purpose], ["format", file.format], ["records", file.examples],
      ["size", bytes(file.bytes)], ["sha256", file.sha256], ["created", when(file.created_at)],
      ["expires", when(file.expires_at)]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
    h("section", { class: "card" }, h("h2", {}, `The first ${PREVIEW_RECORDS} records`), preview));
  const lines = await firstLines(`/files/${encodeURIComponent(id)}/content`, PREVIEW_RECORDS, ctx.signal);
  clear(preview, lines.map((line, i) => h("div", { class: "record" }, h("span", { class: "muted" }, `line ${i + 1}`),
    record(line))));
}

// The first n non-empty lines of a download, reading no more of it than they need.
async function firstLines(path, n, signal) {
  const response = await raw(path, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) text += value;
    if (done || text.split("\n").filter((l) => l.trim()).length > n) break;
  }
  reader.cancel();
  return text.split("\n").filter((l) => l.trim()).slice(0, n);
}

function record(line) {
  let value;
  try { value = JSON.parse(line); } catch { return h("pre", {}, line); }
  if (value && Array.isArray(value.messages)) {
    return h("div", { class: "chat" }, value.messages.map((m) => h("div", { class: `msg role-${m.role}` },
      h("b", {}, m.role), " ", typeof m.content === "string" ? m.content : JSON.stringify(m.content))));
  }
  return h("pre", {}, JSON.stringify(value, null, 2));
}

// ---- adapters --------------------------------------------------------------------------------

export async function adaptersPage(ctx) {
  const adapters = await all("/adapters", { signal: ctx.signal });
  ctx.root.append(h("h1", {}, "Adapters"), adapters.length ? table(["adapter", "name", "base model", "job", "size", "created", ""],
    adapters.map((a) => h("tr", { "data-adapter": a.id }, h("td", {}, h("code", {}, a.id)), h("td", {}, a.name),
      h("td", {}, a.base_model), h("td", {}, a.job_id ? h("a", { href: `#/jobs/${a.job_id}` }, a.job_id) : "—"),
      h("td", {}, bytes(a.bytes)), h("td", {}, when(a.created_at)), h("td", {}, adapterLink(a.id, `${a.name}.tar.gz`)))))
    : h("p", { class: "muted" }, "No adapters yet: a succeeded job stores one."));
}

// ---- evaluations -----------------------------------------------------------------------------

export async function evaluationsPage(ctx) {
  const evaluations = await all("/evaluations", { signal: ctx.signal });
  ctx.root.append(h("h1", {}, "Evaluations"), evaluations.length
    ? table(["evaluation", "model", "tasks", "job", "role", "status", "pass@1", "created"],
      evaluations.map((e) => h("tr", { "data-evaluation": e.id },
        h("td", {}, h("a", { href: `#/evaluations/${e.id}` }, e.id)), h("td", {}, e.model || e.completions_file || "—"),
        h("td", {}, e.tasks), h("td", {}, e.job_id ? h("a", { href: `#/jobs/${e.job_id}/evaluation` }, e.job_id) : "—"),
        h("td", {}, e.role || "—"), h("td", {}, badge(e.status)),
        h("td", {}, e.result && e.result.pass_at_k && e.result.pass_at_k["1"] !== undefined
          ? `${(e.result.pass_at_k["1"] * 100).toFixed(1)}%` : "—"),
        h("td", {}, when(e.created_at)))))
    : h("p", { class: "muted" }, "No evaluations yet."));
}

export async function evaluationPage(ctx, id) {
  const body = h("div");
  ctx.root.append(h("h1", {}, "Evaluation ", h("code", {}, id)), body);
  for (;;) {
    const e = await api(`/evaluations/${encodeURIComponent(id)}`, { signal: ctx.signal });
    clear(body, h("dl", { class: "facts card" },
      [["status", badge(e.status)], ["model", e.model || "—"], ["base model", e.base_model || "—"], ["tasks", e.tasks],
       ["job", e.job_id ? h("a", { href: `#/jobs/${e.job_id}/evaluation` }, e.job_id) : "—"], ["role", e.role || "—"],
       ["created", when(e.created_at)], ["finished", when(e.finished_at)],
       ["error", e.error ? `${e.error.code}: ${e.error.message}` : "—"]]
        .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("section", { class: "card" }, h("h2", {}, "Result"), summary(e.result)));
    if (e.status === "succeeded") {
      body.append(h("section", { class: "card" }, h("h2", {}, "Per task"), resultsTable(await results(id, ctx.signal))));
      return;
    }
    if (["failed", "cancelled"].includes(e.status)) return;
    await pause(3000, ctx.signal);
    if (ctx.signal.aborted) return;
  }
}
