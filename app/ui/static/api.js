// The API client of the dashboard: the team's key lives in this tab's sessionStorage only (never in
// a URL or a cookie), and every call goes to this server's own /v1 routes with it.

const KEY = "tuneforge.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.type = e.type;
    this.param = e.param;
    this.code = e.code;
    this.errors = e.errors || null; // a file's line errors: [{line, message}]
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  forget() { sessionStorage.removeItem(KEY); },
};

function headers(extra = {}, key = session.key) {
  return { Authorization: `Bearer ${key}`, ...extra };
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: the status says enough */ }
  return new ApiError(response.status, body);
}

// fetch() of /v1<path> with the key; returns the Response, throwing ApiError unless it is 2xx.
export async function raw(path, { method = "GET", body, json, signal, extraHeaders, key } = {}) {
  const init = { method, headers: headers(extraHeaders, key), signal, cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(`/v1${path}`, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function api(path, options = {}) {
  return (await raw(path, options)).json();
}

// Every item of a cursor-paginated list (after/has_more), up to `max`.
export async function all(path, { max = 1000, signal } = {}) {
  const out = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`, { signal });
    out.push(...page.data);
    if (!page.has_more || !page.data.length || out.length >= max) return out;
    after = page.data[page.data.length - 1].id;
  }
}

// The messages of a text/event-stream body: {id, data} for each, comments skipped.
export async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") id = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) yield { id, data: data.join("\n") };
    }
  }
}

// A job's events, oldest first, then each new one, until the job ends or `signal` aborts. Uses
// the live stream (?stream=true, resumed with Last-Event-ID after a dropped connection); where the
// server has no stream it polls the list instead. onMode tells which ("stream" or "poll").
export async function followEvents(jobId, { onEvent, onMode, isFinal, signal }) {
  const path = `/fine_tuning/jobs/${encodeURIComponent(jobId)}/events`;
  let last = null;
  let failures = 0;
  while (!signal.aborted) {
    let response;
    try {
      response = await raw(`${path}?stream=true`, { signal, extraHeaders: last ? { "Last-Event-ID": last } : {} });
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 400) break; // no stream on this server: poll
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) throw err;
      await pause(Math.min(5000, 500 * 2 ** failures++), signal);
      continue;
    }
    if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      // A server that ignores stream=true answers the list: poll it instead.
      response.body.cancel();
      break;
    }
    onMode && onMode("stream");
    try {
      for await (const message of serverSentEvents(response)) {
        const event = JSON.parse(message.data);
        last = message.id || event.id;
        failures = 0;
        onEvent(event);
      }
      return; // the server closes the stream once the job has ended
    } catch (err) {
      if (signal.aborted) return;
      await pause(Math.min(5000, 500 * 2 ** failures++), signal); // dropped: resume after `last`
    }
  }
  if (signal.aborted) return;
  onMode && onMode("poll");
  await pollEvents(path, { onEvent, isFinal, signal });
}

async function pollEvents(path, { onEvent, isFinal, signal }) {
  const seen = new Set();
  for (;;) {
    const fresh = [];
    let after = null;
    pages: for (;;) {
      const page = await api(`${path}?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`, { signal });
      for (const event of page.data) { // newest first: stop at the first one already shown
        if (seen.has(event.id)) break pages;
        fresh.push(event);
      }
      if (!page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    for (const event of fresh.reverse()) {
      seen.add(event.id);
      onEvent(event);
    }
    if (await isFinal()) return;
    await pause(1500, signal);
    if (signal.aborted) return;
  }
}

export function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal && signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
