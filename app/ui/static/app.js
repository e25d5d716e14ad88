// The dashboard's shell: sign-in, navigation and the hash router. Each page is a function
// (ctx) => void that draws into ctx.root and stops its streams and timers when ctx.signal aborts
// (on leaving the page or signing out), so nothing of one key outlives it.

import { ApiError, api, session } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import { jobPage, jobsPage, jobEvaluationPage } from "./jobs.js";
import { adaptersPage, datasetPage, datasetsPage, evaluationPage, evaluationsPage } from "./resources.js";
import { playgroundPage } from "./playground.js";
import { keysPage, quotasPage } from "./admin.js";

const view = document.getElementById("view");
let current = null; // the AbortController of the page on screen
const who = { team: null, admin: false };

const routes = [
  [/^jobs$/, jobsPage],
  [/^jobs\/([^/]+)$/, jobPage],
  [/^jobs\/([^/]+)\/evaluation$/, jobEvaluationPage],
  [/^datasets$/, datasetsPage],
  [/^datasets\/([^/]+)$/, datasetPage],
  [/^adapters$/, adaptersPage],
  [/^evaluations$/, evaluationsPage],
  [/^evaluations\/([^/]+)$/, evaluationPage],
  [/^playground$/, playgroundPage],
  [/^quotas$/, quotasPage],
  [/^keys$/, keysPage],
];

function route() {
  if (current) current.abort();
  current = new AbortController();
  const path = decodeURIComponent(location.hash.replace(/^#\/?/, "")) || "jobs";
  document.querySelectorAll("[data-nav]").forEach((a) => {
    a.classList.toggle("active", path.split("/")[0] === a.dataset.nav);
  });
  if (!session.key) return signInPage();
  for (const [pattern, page] of routes) {
    const match = path.match(pattern);
    if (match) {
      const ctx = { root: clear(view), signal: current.signal, params: match.slice(1), who };
      Promise.resolve(page(ctx, ...ctx.params)).catch((err) => {
        if (ctx.signal.aborted) return;
        if (err instanceof ApiError && err.status === 401) return signOut();
        ctx.root.append(errorBox(err));
      });
      return;
    }
  }
  clear(view, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
}

function signInPage() {
  showNav(false);
  const input = h("input", { id: "api-key", type: "password", name: "api-key", autocomplete: "off",
                             placeholder: "tf_…", required: true, size: 48 });
  const status = h("div", { id: "sign-in-status" });
  const form = h("form", { id: "sign-in", class: "card narrow" },
    h("h1", {}, "Sign in"),
    h("p", {}, "Paste your team's API key. It stays in this browser tab only, and is forgotten when the tab closes."),
    h("label", { for: "api-key" }, "API key"), input,
    h("button", { type: "submit" }, "Sign in"), status);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clear(status);
    const key = input.value.trim();
    try {
      await api("/models", { key }); // any /v1 route checks the key; this one every key may read
    } catch (err) {
      clear(status, errorBox(err));
      return;
    }
    session.set(key);
    await identify();
    if (!location.hash || location.hash === "#/" || location.hash === "#/signin") location.hash = "#/jobs";
    else route();
  });
  clear(view, form);
  input.focus();
}

// Whether the key is an admin key: GET /v1/keys answers 403 to member keys.
async function identify() {
  try {
    await api("/keys?limit=1");
    who.admin = true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) { signOut(); return; }
    who.admin = false;
  }
  document.querySelectorAll("[data-admin]").forEach((el) => { el.hidden = !who.admin; });
  document.getElementById("who").textContent = who.admin ? "admin key" : "member key";
  showNav(true);
}

function showNav(on) {
  document.getElementById("nav").hidden = !on;
  document.getElementById("sign-out").hidden = !on;
  if (!on) document.getElementById("who").textContent = "";
}

function signOut() {
  session.forget();
  who.admin = false;
  if (current) current.abort();
  location.hash = "#/signin";
  route();
}

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
(async () => {
  if (session.key) await identify();
  route();
})();
