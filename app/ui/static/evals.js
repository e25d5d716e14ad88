// An evaluation's numbers and its per-task rows: shared by the job's evaluation page and the
// evaluations pages.

import { raw } from "./api.js";
import { badge, h, num, percent, table } from "./dom.js";

export async function results(evaluationId, signal) {
  const response = await raw(`/evaluations/${encodeURIComponent(evaluationId)}/results`, { signal });
  const text = await response.text();
  return text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
}

// The result object of one evaluation (pass@k, outcomes, held-out loss, time) as a definition list.
export function summary(result) {
  if (!result) return h("p", { class: "muted" }, "No result yet.");
  const passAtK = Object.entries(result.pass_at_k || {}).map(([k, v]) => `pass@${k} ${percent(v)}`).join(", ");
  const outcomes = Object.entries(result.outcomes || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  const items = [
    ["pass@k", passAtK || "—"],
    ["tasks / samples", `${result.tasks ?? "—"} / ${result.samples ?? "—"}`],
    ["passed", result.passed ?? "—"],
    ["outcomes", outcomes || "—"],
    ["held-out loss (general)", num(result.heldout_loss)],
    ["sandbox", result.sandbox_mode || "—"],
    ["generation / execution", `${num(result.generation_seconds, 1)} s / ${num(result.execution_seconds, 1)} s`],
  ];
  return h("dl", { class: "facts" }, items.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
}

// One row per sample: the task, the outcome, and (folded) the program that ran and the raw answer.
export function resultsTable(rows, { role } = {}) {
  return table(role ? ["role", "task", "outcome", "time", "program that ran"] : ["task", "outcome", "time", "program that ran"],
    rows.map((r) => h("tr", { class: `result outcome-${r.outcome}`, "data-task": r.task_id },
      role ? h("td", {}, role) : null,
      h("td", {}, String(r.task_id)),
      h("td", {}, badge(r.outcome), r.detail ? h("div", { class: "muted small" }, String(r.detail).slice(0, 300)) : null),
      h("td", {}, r.wall_s !== undefined ? `${num(r.wall_s, 2)} s` : "—"),
      h("td", {},
        h("details", {}, h("summary", {}, firstLine(r.program)),
          h("pre", { class: "program" }, r.program || ""),
          r.completion !== undefined && r.completion !== r.program
            ? [h("div", { class: "muted small" }, "The model's answer:"), h("pre", {}, r.completion)] : null)))),
    { class: "results" });
}

function firstLine(text) {
  const line = (text || "").split("\n").find((l) => l.trim()) || "(empty program)";
  return line.length > 80 ? `${line.slice(0, 80)}…` : line;
}
