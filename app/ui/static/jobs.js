// Jobs: the list (with a form to start one), a job's page with its live curves, and its evaluation.

import { ApiError, all, api, followEvents, pause, raw } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { badge, bytes, clear, duration, errorBox, h, num, percent, table, when } from "./dom.js";
import { results, resultsTable, summary } from "./evals.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const jobPath = (id) => `/fine_tuning/jobs/${encodeURIComponent(id)}`;

// ---- the list --------------------------------------------------------------------------------

export async function jobsPage(ctx) {
  const list = h("div", { id: "jobs" }, h("p", { class: "muted" }, "Loading…"));
  ctx.root.append(h("h1", {}, "Fine-tuning jobs"), await newJobForm(ctx), list);
  for (;;) {
    const page = await api("/fine_tuning/jobs?limit=50", { signal: ctx.signal });
    const progress = await Promise.all(page.data.map((job) => latestMetrics(job, ctx.signal)));
    clear(list, page.data.length ? table(["job", "model", "status", "progress", "ETA", "tokens", "created", "fine-tuned model"],
      page.data.map((job, i) => h("tr", { "data-job": job.id },
        h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
        h("td", {}, job.model),
        h("td", {}, badge(job.status)),
        h("td", {}, progressCell(job, progress[i])),
        h("td", {}, job.estimated_finish && !FINAL.has(job.status)
          ? duration(job.estimated_finish - Date.now() / 1000) : "—"),
        h("td", {}, job.trained_tokens ?? "—"),
        h("td", {}, when(job.created_at)),
        h("td", {}, job.fine_tuned_model || "—")))) : h("p", { class: "muted" }, "No jobs yet."));
    if (page.data.every((job) => FINAL.has(job.status))) return;
    await pause(3000, ctx.signal);
    if (ctx.signal.aborted) return;
  }
}

// The newest training metrics of a running (or paused) job, for its progress; null for others.
async function latestMetrics(job, signal) {
  if (!["running", "paused", "evaluating"].includes(job.status)) return null;
  const page = await api(`${jobPath(job.id)}/events?limit=20`, { signal });
  const event = page.data.find((e) => e.type === "metrics" && e.data && e.data.total_steps);
  return event ? event.data : null;
}

function progressCell(job, metrics) {
  if (job.status === "succeeded") return "100%";
  if (job.status === "queued" || job.status === "validating_files") {
    return `waiting ${duration(Date.now() / 1000 - job.created_at)}`;
  }
  if (!metrics) return "—";
  const fraction = metrics.step / metrics.total_steps;
  return h("span", {}, h("progress", { max: 1, value: fraction }), ` ${metrics.step}/${metrics.total_steps}`);
}

async function newJobForm(ctx) {
  const [models, files] = await Promise.all([api("/models", { signal: ctx.signal }),
                                             all("/files?purpose=fine-tune", { signal: ctx.signal })]);
  const options = (items, text) => items.map((item) => h("option", { value: item.id }, text(item)));
  const taskFiles = files.filter((f) => ["mbpp", "humaneval"].includes(f.format));
  const model = h("select", { name: "model", id: "job-model" },
    options(models.data.filter((m) => m.kind !== "checkpoint"), (m) => `${m.id} (${m.kind})`));
  const training = h("select", { name: "training_file", id: "job-training-file" },
    options(files, (f) => `${f.filename} — ${f.id} (${f.format}, ${f.examples} records)`));
  const validation = h("select", { name: "validation_file", id: "job-validation-file" },
    h("option", { value: "" }, "none"), options(files, (f) => `${f.filename} — ${f.id}`));
  const evalTasks = h("select", { name: "eval_tasks", id: "job-eval-tasks" },
    h("option", { value: "" }, "no evaluation"), options(taskFiles, (f) => `${f.filename} — ${f.id}`));
  const epochs = h("input", { name: "n_epochs", id: "job-epochs", type: "number", min: 1, max: 100, placeholder: "auto" });
  const evalLimit = h("input", { name: "eval_limit", id: "job-eval-limit", type: "number", min: 1, placeholder: "all tasks" });
  const suffix = h("input", { name: "suffix", id: "job-suffix", maxlength: 64, placeholder: "optional" });
  const checkpointEvery = h("input", { name: "checkpoint_every_steps", id: "job-checkpoint-every", type: "number", min: 1,
                                       placeholder: "the recipe's" });
  const status = h("div");
  const form = h("form", { id: "new-job", class: "card" },
    h("h2", {}, "Start a job"),
    h("div", { class: "grid" },
      h("label", {}, "Base model", model), h("label", {}, "Training file", training),
      h("label", {}, "Validation file", validation), h("label", {}, "Epochs", epochs),
      h("label", {}, "Suffix", suffix), h("label", {}, "Checkpoint every (steps)", checkpointEvery),
      h("label", {}, "Evaluate on", evalTasks),
      h("label", {}, "Evaluation tasks", evalLimit)),
    h("button", { type: "submit" }, "Start"), status);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clear(status);
    const body = { model: model.value, training_file: training.value };
    if (validation.value) body.validation_file = validation.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (epochs.value) body.hyperparameters = { n_epochs: Number(epochs.value) };
    if (checkpointEvery.value) body.training = { checkpoint_every_steps: Number(checkpointEvery.value) };
    if (evalTasks.value) {
      body.eval = { tasks: evalTasks.value };
      if (evalLimit.value) body.eval.limit = Number(evalLimit.value);
    }
    try {
      const job = await api("/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      clear(status, errorBox(err));
    }
  });
  if (!files.length) {
    return h("p", { class: "card" }, "Upload a training file on the ", h("a", { href: "#/datasets" }, "datasets"),
             " page to start a job.");
  }
  return form;
}

// ---- one job -----------------------------------------------------------------------------------

export async function jobPage(ctx, id) {
  let job = await api(jobPath(id), { signal: ctx.signal });
  const title = h("h1", {}, "Job ", h("code", {}, job.id), " ", h("span", { id: "job-status" }));
  const actions = h("div", { class: "actions" });
  const actionStatus = h("div");
  const facts = h("dl", { class: "facts", id: "job-facts" });
  const live = h("dl", { class: "facts", id: "job-live" });
  const mode = h("span", { id: "stream-mode", class: "muted" }, "connecting…");
  const lossChart = svgChart("loss-chart");
  const lrChart = svgChart("lr-chart");
  const checkpoints = h("div", { id: "checkpoints" });
  const events = h("tbody", { id: "events" });
  const links = h("div", { class: "links" });
  const spec = h("pre", { id: "job-spec" });
  ctx.root.append(title, actions, actionStatus,
    h("div", { class: "columns" }, h("section", { class: "card" }, h("h2", {}, "Job"), facts, links),
      h("section", { class: "card" }, h("h2", {}, "Training ", mode), live)),
    h("section", { class: "card" }, h("h2", {}, "Loss"), lossChart),
    h("section", { class: "card" }, h("h2", {}, "Learning rate"), lrChart),
    h("section", { class: "card" }, h("h2", {}, "Checkpoints"), checkpoints),
    h("section", { class: "card" }, h("h2", {}, "Events"),
      h("table", { class: "events" }, h("thead", {}, h("tr", {}, ["time", "level", "message"].map((t) => h("th", {}, t)))), events)),
    h("section", { class: "card" }, h("h2", {}, "Resolved spec"), spec));

  const series = { train: [], valid: [], lr: [] };
  let latest = null;
  let redraw = 0;
  const draw = () => {
    redraw = 0;
    lineChart(lossChart, [{ name: "train", label: "training loss", points: series.train },
                          { name: "valid", label: "validation loss", points: series.valid }], { yLabel: "loss" });
    lineChart(lrChart, [{ name: "lr", label: "learning rate", points: series.lr }], { yLabel: "learning rate" });
    drawLive(live, latest);
  };
  const onEvent = (event) => {
    const d = event.data || {};
    if (event.type === "metrics") {
      if (typeof d.step === "number" && typeof (d.train_loss ?? d.loss) === "number") {
        series.train.push([d.step, d.train_loss ?? d.loss]);
        if (typeof d.learning_rate === "number") series.lr.push([d.step, d.learning_rate]);
        latest = d;
      }
      if (typeof d.step === "number" && typeof d.valid_loss === "number") series.valid.push([d.step, d.valid_loss]);
    }
    events.prepend(h("tr", { class: `event level-${event.level}`, "data-type": event.type },
      h("td", {}, when(event.created_at)), h("td", {}, event.level), h("td", {}, event.message)));
    if (!redraw) redraw = requestAnimationFrame(draw); // one redraw per frame, however many events came
  };

  const render = async () => {
    clear(title.querySelector("#job-status"), badge(job.status));
    drawFacts(facts, job);
    drawActions(actions, actionStatus, job, async (verb) => {
      job = await api(`${jobPath(id)}/${verb}`, { method: "POST" });
      await render();
    });
    clear(links,
      job.spec && job.spec.evaluation ? h("a", { href: `#/jobs/${job.id}/evaluation`, id: "evaluation-link" }, "Evaluation: base vs tuned") : null,
      job.adapter_id ? [" ", adapterLink(job.adapter_id, `${job.fine_tuned_model || job.id}.tar.gz`)] : null);
    spec.textContent = JSON.stringify(job.spec, null, 2);
    const ckpts = await api(`${jobPath(id)}/checkpoints?limit=100`, { signal: ctx.signal });
    clear(checkpoints, ckpts.data.length ? table(["step", "training loss", "validation loss", "model", "created"],
      ckpts.data.map((c) => h("tr", { "data-checkpoint": c.id },
        h("td", {}, c.step_number), h("td", {}, num(c.metrics.train_loss)), h("td", {}, num(c.metrics.valid_loss)),
        h("td", {}, h("code", {}, c.fine_tuned_model_checkpoint)), h("td", {}, when(c.created_at)))))
      : h("p", { class: "muted" }, "No checkpoints stored yet."));
  };
  await render();
  draw();

  const isFinal = async () => FINAL.has(job.status);
  let streamEnded = false;
  const following = followEvents(id, { onEvent, isFinal, signal: ctx.signal,
                                       onMode: (m) => { mode.textContent = m === "stream" ? "live" : "polling"; mode.dataset.via = m; } })
    .then(() => { streamEnded = true; });
  // The job itself (status, ETA, checkpoints) is re-read while it runs, and at once when its events
  // end: "ended" is shown only once the page has drawn the job's final status.
  while (!ctx.signal.aborted && !FINAL.has(job.status)) {
    await (streamEnded ? pause(2000, ctx.signal) : Promise.race([pause(2000, ctx.signal), following]));
    if (ctx.signal.aborted) break;
    job = await api(jobPath(id), { signal: ctx.signal });
    await render();
  }
  await following;
  if (!ctx.signal.aborted) mode.textContent = "ended";
}

function svgChart(id) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.id = id;
  svg.classList.add("chart");
  return svg;
}

function drawFacts(el, job) {
  const items = [
    ["model", job.model], ["fine-tuned model", job.fine_tuned_model || "—"],
    ["training file", job.training_file], ["validation file", job.validation_file || "—"],
    ["epochs / batch", `${job.hyperparameters.n_epochs} / ${job.hyperparameters.batch_size}`],
    ["created", when(job.created_at)], ["finished", when(job.finished_at)],
    ["trained tokens", job.trained_tokens ?? "—"],
    ["ETA", job.estimated_finish && !FINAL.has(job.status) ? `${duration(job.estimated_finish - Date.now() / 1000)} (${when(job.estimated_finish)})` : "—"],
  ];
  if (job.error) items.push(["error", `${job.error.code}: ${job.error.message}`]);
  if (job.usage && job.usage.wall_seconds !== undefined) items.push(["wall time", duration(job.usage.wall_seconds)]);
  clear(el, items.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
}

function drawLive(el, d) {
  if (!d) { clear(el, h("dd", { class: "muted" }, "No training step yet.")); return; }
  const items = [["step", `${d.step} / ${d.total_steps}`], ["epoch", num(d.epoch, 2)],
    ["training loss", num(d.train_loss ?? d.loss)], ["learning rate", num(d.learning_rate)],
    ["tokens/s", num(d.tokens_per_second, 0)], ["ETA", duration(d.eta_seconds)]];
  clear(el, items.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-fact": k }, String(v))]));
}

function drawActions(el, status, job, act) {
  const button = (verb, label, allowed) => h("button", {
    type: "button", id: `job-${verb}`, disabled: !allowed,
    onclick: async (e) => {
      e.target.disabled = true;
      clear(status);
      try { await act(verb); } catch (err) { clear(status, errorBox(err)); e.target.disabled = false; }
    } }, label);
  clear(el,
    button("cancel", "Cancel", ["validating_files", "queued", "running", "paused"].includes(job.status)),
    button("pause", "Pause", job.status === "running"),
    button("resume", "Resume", job.status === "paused"));
}

// A download link for an adapter: the archive is fetched with the key (an <a href> could not send
// it), then offered as a blob URL.
export function adapterLink(adapterId, filename) {
  const status = h("span", { class: "muted" });
  const link = h("a", { href: "#", class: "download", "data-adapter": adapterId }, "Download adapter");
  link.addEventListener("click", async (e) => {
    if (link.dataset.ready) return; // the blob URL is set: let the browser follow it
    e.preventDefault();
    status.textContent = " fetching…";
    try {
      const blob = await (await raw(`/adapters/${encodeURIComponent(adapterId)}/content`)).blob();
      link.href = URL.createObjectURL(blob);
      link.download = filename;
      link.dataset.ready = "1";
      status.textContent = ` ${bytes(blob.size)}`;
      link.click();
    } catch (err) {
      status.textContent = ` ${err.message}`;
    }
  });
  return h("span", {}, link, status);
}

// ---- a job's evaluation ----------------------------------------------------------------------

export async function jobEvaluationPage(ctx, id) {
  ctx.root.append(h("h1", {}, "Evaluation of ", h("a", { href: `#/jobs/${id}` }, h("code", {}, id))));
  const body = h("div");
  ctx.root.append(body);
  for (;;) {
    const job = await api(jobPath(id), { signal: ctx.signal });
    if (!job.spec || !job.spec.evaluation) {
      clear(body, h("p", {}, "This job has no evaluation: start one with “Evaluate on”."));
      return;
    }
    const evaluations = (await all("/evaluations", { signal: ctx.signal })).filter((e) => e.job_id === id);
    const report = job.usage && job.usage.evaluation;
    await drawEvaluation(body, job, report, evaluations, ctx.signal);
    if (FINAL.has(job.status) && evaluations.every((e) => FINAL.has(e.status))) return;
    await pause(3000, ctx.signal);
    if (ctx.signal.aborted) return;
  }
}

async function drawEvaluation(el, job, report, evaluations, signal) {
  const byRole = Object.fromEntries(evaluations.map((e) => [e.role, e]));
  const sides = ["base", "tuned", "tuned_4bit"].filter((role) => (report && report[role] && report[role].pass_at_k) || byRole[role]);
  const resultOf = (role) => (report && report[role] && report[role].pass_at_k ? report[role] : byRole[role] && byRole[role].result);
  const bars = svgChart("pass-chart");
  barChart(bars, sides.filter((role) => resultOf(role)).map((role) => ({
    name: role, label: { base: "base", tuned: "tuned", tuned_4bit: "tuned, 4-bit base" }[role],
    value: resultOf(role).pass_at_k["1"] })), { yLabel: "pass@1" });
  const forgetting = report && report.forgetting;
  const cards = [
    h("div", { class: "columns" },
      h("section", { class: "card" }, h("h2", {}, "pass@1: base vs tuned"), bars,
        report && report.pass_at_k_delta ? h("p", { id: "pass-delta" },
          Object.entries(report.pass_at_k_delta).map(([k, v]) => `pass@${k} ${v >= 0 ? "+" : ""}${percent(v)}`).join(", ")) : null),
      h("section", { class: "card", id: "forgetting" }, h("h2", {}, "Forgetting (general held-out loss)"),
        forgetting ? h("dl", { class: "facts" },
          h("dt", {}, "base"), h("dd", {}, num(forgetting.base_heldout_loss)),
          h("dt", {}, "tuned"), h("dd", {}, num(forgetting.tuned_heldout_loss)),
          h("dt", {}, "increase"), h("dd", { class: forgetting.increase > 0 ? "worse" : "better" }, num(forgetting.increase)))
          : h("p", { class: "muted" }, "Measured once both models are evaluated."),
        report && report.overlap && report.overlap.contaminated
          ? h("p", { class: "warn" }, `${report.overlap.count} of the evaluation tasks are in the training data.`) : null,
        report && report.quantization ? h("p", {}, `4-bit cost within the paper's bound: ${report.quantization.within_paper_bound ? "yes" : "no"}`) : null)),
  ];
  for (const role of sides) {
    const evaluation = byRole[role];
    const section = h("section", { class: "card", "data-role": role },
      h("h2", {}, `${role} model `, evaluation ? badge(evaluation.status) : null,
        evaluation ? [" ", h("a", { href: `#/evaluations/${evaluation.id}` }, h("code", {}, evaluation.id))] : null),
      summary(resultOf(role)));
    if (evaluation && evaluation.status === "succeeded") {
      try {
        section.append(resultsTable(await results(evaluation.id, signal)));
      } catch (err) {
        if (!(err instanceof ApiError)) throw err;
        section.append(errorBox(err));
      }
    }
    cards.push(section);
  }
  clear(el, h("p", {}, "Job ", badge(job.status)), cards);
}
