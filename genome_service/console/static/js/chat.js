// A persona's chat: tokens as they stream, Stop (or Esc) cancels the generation on the server
// (aborting the fetch closes the stream, which the server treats as a cancel), the sources and
// the stack of each answer, and the conversation history.
import { call, events, getJson } from "./api.js";
import { Page, attempt, field, h, score, short, when } from "./dom.js";

function sources(generation, titles) {
  if (!generation.citations.length) return h("p", {}, "No knowledge was retrieved for this answer.");
  return h("ul", { class: "sources", "aria-label": "Sources" }, generation.citations.map((c) =>
    h("li", {}, h("span", { class: "source-title" }, titles.get(c.chunk_id.split(":")[0]) || c.chunk_id), " ",
      h("span", { class: "score" }, score(c.score)))));
}

function stackOf(generation, layers) {
  const parts = [`model ${generation.model}`];
  if (generation.stack_hash) parts.push(`stack ${short(generation.stack_hash)}`);
  if (layers) parts.push(layers.length ? `layers ${layers.join(", ")}` : "no layers");
  return h("p", { class: "stack" }, `Stack: ${parts.join("; ")}. `,
    `${generation.usage.completion_tokens} tokens, finished: ${generation.finish_reason}.`);
}

class Chat extends Page {
  heading = "Chat";

  connectedCallback() {
    this.onEscape = (event) => { if (event.key === "Escape") this.stop(); };
    document.addEventListener("keydown", this.onEscape);
    super.connectedCallback();
  }

  disconnectedCallback() {
    document.removeEventListener("keydown", this.onEscape);
    this.stop();
  }

  async render() {
    const id = this.getAttribute("persona");
    const [persona, knowledge, conversations, layers] = await Promise.all([
      getJson(`/personas/${id}`), getJson(`/personas/${id}/knowledge?limit=200`),
      getJson(`/personas/${id}/conversations?limit=200`), getJson("/layers/?limit=200")]);
    this.persona = persona;
    this.titles = new Map(knowledge.items.map((k) => [k.id, k.title || "untitled"]));
    this.layerNames = new Map(layers.items.map((l) => [l.id, l.name]));
    this.conversation = null;
    this.log = h("div", { class: "transcript", role: "log", "aria-live": "polite", "aria-label": "Conversation", tabindex: 0 });
    this.status = h("p", { class: "visually-hidden", role: "status" });
    this.input = h("textarea", { rows: 3, placeholder: "Enter sends, Shift+Enter adds a line, Esc stops" });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    this.sendButton = h("button", { type: "submit" }, "Send");
    this.stopButton = h("button", { type: "button", disabled: true, onclick: () => this.stop() }, "Stop");
    this.settings = {
      max_tokens: h("input", { type: "number", min: 1, value: "256" }),
      temperature: h("input", { type: "number", min: 0, step: "0.1", value: "0.7" }),
      seed: h("input", { type: "number" }),
      context_k: h("input", { type: "number", min: 0, value: "4" }),
    };
    const history = h("ul", { class: "history" }, conversations.items.map((c) => h("li", {},
      h("button", { type: "button", onclick: () => this.open(c.id) }, `${when(c.created_at)} (${c.message_count} messages)`))));
    return [
      h("h1", {}, `Chat with ${persona.name}`),
      h("p", {}, persona.genome_id ? h("a", { href: `#/genomes/${persona.genome_id}` }, "Genome") : "No genome", " · ",
        h("a", { href: `#/personas/${id}/knowledge` }, "Knowledge")),
      this.alert,
      h("div", { class: "chat" },
        h("section", { "aria-labelledby": "history-title", class: "side" },
          h("h2", { id: "history-title" }, "History"),
          h("button", { type: "button", onclick: () => this.startOver() }, "New conversation"),
          conversations.items.length ? history : h("p", {}, "No conversations yet.")),
        h("section", { "aria-label": "Current conversation", class: "grow" },
          this.log, this.status,
          h("form", { class: "composer", onsubmit: (event) => { event.preventDefault(); this.send(); } },
            field("Message", this.input),
            h("div", { class: "actions" }, this.sendButton, this.stopButton),
            h("details", {}, h("summary", {}, "Generation settings"),
              field("Max tokens", this.settings.max_tokens), field("Temperature", this.settings.temperature),
              field("Seed (optional)", this.settings.seed), field("Knowledge chunks (k)", this.settings.context_k))))),
    ];
  }

  message(role, text, generation) {
    const body = h("p", { class: "text" }, text);
    const article = h("article", { class: `message ${role}` },
      h("p", { class: "who" }, role === "user" ? "You" : this.persona.name), body);
    if (generation) article.append(sources(generation, this.titles), stackOf(generation));
    this.log.append(article);
    return { article, body };
  }

  startOver() {
    this.conversation = null;
    this.log.replaceChildren();
    this.input.focus();
  }

  async open(conversationId) {
    await attempt(this.alert, async () => {
      const conversation = await getJson(`/conversations/${conversationId}`);
      this.log.replaceChildren();
      for (const m of conversation.messages) this.message(m.role, m.content, m.generation);
      this.conversation = conversationId;
    });
  }

  stop() {
    this.controller?.abort();
  }

  ask(text) {
    const ask = { messages: [{ role: "user", content: text }], stream: true };
    for (const [name, input] of Object.entries(this.settings)) {
      if (input.value !== "") ask[name] = Number(input.value);
    }
    if (this.conversation) ask.conversation_id = this.conversation;
    return ask;
  }

  async send() {
    const text = this.input.value.trim();
    if (!text || this.controller) return;
    this.input.value = "";
    this.message("user", text);
    const { article, body } = this.message("assistant", "");
    const controller = (this.controller = new AbortController());
    this.busy(true);
    let tokens = 0;
    try {
      const genome = this.persona.genome_id ? await getJson(`/genomes/${this.persona.genome_id}`) : null;
      const response = await call(`/personas/${this.persona.id}/chat`, { method: "POST", json: this.ask(text), signal: controller.signal });
      for await (const event of events(response)) {
        if (controller.signal.aborted) break;  // Stop wins over tokens already received
        if (event.event === "token") {
          body.append(event.data.text);
          article.dataset.tokens = String(++tokens);
        } else if (event.event === "done") {
          this.conversation = event.data.conversation_id;
          const names = genome?.layers.map((l) => `${this.layerNames.get(l.layer_id) || short(l.layer_id)} ×${l.weight.toFixed(2)}`);
          article.append(sources(event.data.generation, this.titles), stackOf(event.data.generation, names));
          article.dataset.state = "done";
        } else if (event.event === "error") {
          article.append(h("p", { class: "alert" }, `Generation failed: ${event.data.detail}`));
          article.dataset.state = "failed";
        }
      }
      if (controller.signal.aborted) throw new DOMException("stopped", "AbortError");
    } catch (error) {
      if (error.name !== "AbortError") {
        article.dataset.state = "failed";
        this.alert.show(error);
      } else {
        article.dataset.state = "stopped";
        article.append(h("p", { class: "note" }, "Stopped: this answer was not saved."));
      }
    } finally {
      this.controller = null;
      this.busy(false);
    }
  }

  // While tokens stream the log is busy and silent; the finished answer is announced once.
  busy(streaming) {
    this.log.setAttribute("aria-busy", String(streaming));
    this.log.setAttribute("aria-live", streaming ? "off" : "polite");
    this.sendButton.disabled = streaming;
    this.stopButton.disabled = !streaming;
    this.status.textContent = streaming ? "Answering…" : "Answer finished.";
    if (!streaming) this.input.focus();
  }
}
customElements.define("gs-chat", Chat);
