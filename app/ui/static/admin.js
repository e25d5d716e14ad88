// Keys (admin keys only: the API answers 403 to member keys) and the team's quotas.

import { ApiError, all, api } from "./api.js";
import { bytes, clear, errorBox, h, table, when } from "./dom.js";

export async function keysPage(ctx) {
  ctx.root.append(h("h1", {}, "API keys"));
  if (!ctx.who.admin) {
    ctx.root.append(h("p", { class: "error" }, "Managing keys takes an admin key; this one is a member key."));
    return;
  }
  const list = h("div", { id: "keys" });
  const created = h("div", { id: "key-created" });
  const name = h("input", { id: "key-name", value: "default", maxlength: 64, required: true });
  const role = h("select", { id: "key-role" }, ["member", "admin"].map((r) => h("option", { value: r }, r)));
  const form = h("form", { class: "card", id: "new-key" }, h("h2", {}, "Create a key"),
    h("div", { class: "grid" }, h("label", {}, "Name", name), h("label", {}, "Role", role)),
    h("button", { type: "submit" }, "Create"), created);
  const draw = async () => {
    const keys = await all("/keys", { signal: ctx.signal });
    clear(list, table(["key", "name", "role", "prefix", "created", "revoked", ""], keys.map((k) => h("tr", { "data-key": k.id },
      h("td", {}, h("code", {}, k.id)), h("td", {}, k.name), h("td", {}, k.role), h("td", {}, h("code", {}, k.redacted_value)),
      h("td", {}, when(k.created_at)), h("td", {}, when(k.revoked_at)),
      h("td", {}, k.revoked_at ? "" : h("button", { type: "button", onclick: () => revoke(k) }, "Revoke"))))));
  };
  const revoke = async (k) => {
    if (!confirm(`Revoke key ${k.name} (${k.redacted_value})? Clients using it stop working at once.`)) return;
    try { await api(`/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" }); } catch (err) { clear(created, errorBox(err)); }
    await draw();
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const key = await api("/keys", { method: "POST", json: { name: name.value, role: role.value } });
      // Shown once, as the API shows it once; it is not kept anywhere by this page.
      clear(created, h("p", { class: "ok" }, "The new key (copy it now; it is not shown again): ", h("code", { id: "new-key-value" }, key.key)));
    } catch (err) {
      clear(created, errorBox(err));
    }
    await draw();
  });
  ctx.root.append(form, list);
  await draw();
}

export async function quotasPage(ctx) {
  let q;
  try {
    q = await api("/quotas", { signal: ctx.signal });
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    ctx.root.append(h("h1", {}, "Quotas"), errorBox(err));
    return;
  }
  const used = (item, fmt = String) => h("span", {}, h("meter", { min: 0, max: item.limit || 1, value: item.usage }),
    ` ${fmt(item.usage)} of ${fmt(item.limit)}`);
  ctx.root.append(h("h1", {}, "Quotas"), h("dl", { class: "facts card", id: "quotas" },
    [["running jobs", used(q.running_jobs)], ["queued jobs", used(q.queued_jobs)],
     ["storage", used(q.storage_bytes, bytes)], ["files", used(q.files)],
     ["rate limit", `${q.rate_limit_per_second}/s, bursts of ${q.rate_limit_burst}`],
     ["trained tokens per job", q.trained_tokens_per_job], ["wall time per job", `${q.job_wall_seconds} s`],
     ["wall time per evaluation", `${q.evaluation_wall_seconds} s`]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
}
