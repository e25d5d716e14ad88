// The playground: chat with a base or fine-tuned model through this API's /v1/chat/completions,
// the answer streamed token by token.

import { api, raw, serverSentEvents } from "./api.js";
import { clear, errorBox, h } from "./dom.js";

export async function playgroundPage(ctx) {
  const models = (await api("/models", { signal: ctx.signal })).data;
  const model = h("select", { id: "chat-model" }, models.map((m) =>
    h("option", { value: m.id }, `${m.id} (${m.kind}${m.serving ? ", serving" : ", not serving now"})`)));
  const system = h("input", { id: "chat-system", placeholder: "System message (optional)", size: 60 });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, value: 64 });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const thread = h("div", { id: "chat-thread", class: "thread" });
  const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Ask something…", required: true });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", disabled: true }, "Stop");
  const status = h("div", { id: "chat-status" });
  const form = h("form", { id: "chat", class: "card" }, thread, input, h("div", { class: "actions" }, send, stop), status);
  const messages = [];
  let running = null;

  stop.addEventListener("click", () => running && running.abort());
  model.addEventListener("change", () => { messages.length = 0; clear(thread); });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || running) return;
    clear(status);
    messages.push({ role: "user", content: text });
    thread.append(bubble("user", text));
    input.value = "";
    const answer = h("div", { class: "text" });
    const answerBubble = h("div", { class: "msg role-assistant streaming" }, h("b", {}, "assistant"), answer);
    thread.append(answerBubble);
    running = new AbortController();
    ctx.signal.addEventListener("abort", () => running && running.abort(), { once: true });
    send.disabled = true;
    stop.disabled = false;
    const body = {
      model: model.value, stream: true, max_tokens: Number(maxTokens.value) || 64,
      temperature: Number(temperature.value),
      messages: [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...messages],
    };
    let content = "";
    try {
      const response = await raw("/chat/completions", { method: "POST", json: body, signal: running.signal });
      for await (const message of serverSentEvents(response)) {
        if (message.data === "[DONE]") break;
        const chunk = JSON.parse(message.data);
        if (chunk.error) throw Object.assign(new Error(chunk.error.message), chunk.error);
        for (const choice of chunk.choices || []) {
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            content += delta;
            answer.textContent = content;
          }
        }
      }
      messages.push({ role: "assistant", content });
    } catch (err) {
      if (err.name !== "AbortError") status.append(errorBox(err));
      messages.pop(); // the question went unanswered: leave it out of the next turn's context
    } finally {
      answerBubble.classList.remove("streaming");
      answerBubble.dataset.done = "1";
      running = null;
      send.disabled = false;
      stop.disabled = true;
    }
  });

  ctx.root.append(h("h1", {}, "Playground"),
    h("div", { class: "card grid" }, h("label", {}, "Model", model), h("label", {}, "Max tokens", maxTokens),
      h("label", {}, "Temperature", temperature), h("label", { class: "wide" }, "System", system)),
    form);
}

function bubble(role, text) {
  return h("div", { class: `msg role-${role}` }, h("b", {}, role), h("div", { class: "text" }, text));
}
