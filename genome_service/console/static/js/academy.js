// The Academy: sessions, starting one, and a session's live view (plan, challenges and scores,
// loss curve, events, Cancel, the layer it produced), read from its event stream: the history
// then live events. Events are applied once each, by version, so a reload draws no point twice.
import "./chart.js";
import { call, events, getJson, post } from "./api.js";
import { Page, attempt, field, h, select, short, table, when } from "./dom.js";
import { personas } from "./personas.js";

class Academy extends Page {
  heading = "Academy";

  async render() {
    const [sessions, people] = await Promise.all([getJson("/academy/sessions/?limit=200"), personas()]);
    const names = new Map(people.map((p) => [p.id, p.name]));
    const persona = select({}, people.filter((p) => p.genome_id).map((p) => [p.id, p.name]));
    const goal = h("textarea", { rows: 2, required: true });
    const steps = h("input", { type: "number", min: 1, max: 100000, value: "100" });
    const seconds = h("input", { type: "number", min: 1, value: "3600" });
    const start = async (event) => {
      event.preventDefault();
      const session = await attempt(this.alert, () => post("/academy/sessions/", {
        persona_id: persona.value, goal: goal.value, budget_steps: Number(steps.value), budget_seconds: Number(seconds.value) }));
      if (session) location.hash = `#/academy/${session.id}`;
    };
    return [
      h("h1", {}, "Academy"),
      this.alert,
      sessions.items.length ? table("Sessions", ["Goal", "Persona", "Status", "Step", "Started"], sessions.items.map((s) => [
        h("a", { href: `#/academy/${s.id}` }, s.goal), names.get(s.persona_id) || short(s.persona_id), s.status,
        `${s.step} / ${s.budget_steps}`, when(s.created_at)])) : h("p", {}, "No sessions yet."),
      h("section", { "aria-labelledby": "start-title" }, h("h2", { id: "start-title" }, "Start a session"),
        h("form", { onsubmit: start }, field("Persona (with a genome)", persona), field("Goal", goal),
          field("Step budget", steps), field("Time budget (seconds)", seconds), h("button", { type: "submit" }, "Start"))),
    ];
  }
}

const FINISHED = new Set(["completed", "cancelled", "failed"]);

class Session extends Page {
  heading = "Academy session";

  disconnectedCallback() {
    this.controller?.abort();
  }

  async render() {
    const id = this.getAttribute("session");
    const session = await getJson(`/academy/sessions/${id}`);
    this.seen = new Set();
    this.challenges = new Map();
    this.state = h("p", { class: "state" });
    this.cancelButton = h("button", { type: "button", onclick: () => this.cancel(id) }, "Cancel session");
    this.plan = h("div");
    this.challengeRows = h("tbody");
    this.layers = h("ul", { class: "produced", "aria-label": "Produced layers" });
    this.evaluations = h("ul", { class: "evaluations", "aria-label": "Held-out evaluations" });
    // A scrolling list: focusable, so a keyboard can scroll it too.
    this.log = h("ol", { class: "events", "aria-label": "Events", tabindex: "0" });
    this.chart = h("gs-loss-chart");
    this.show(session);
    queueMicrotask(() => this.follow(id));
    return [
      h("h1", {}, `Session: ${session.goal}`),
      this.alert, this.state, this.cancelButton, this.layers, this.evaluations, this.chart,
      h("section", { "aria-labelledby": "plan-title" }, h("h2", { id: "plan-title" }, "Plan"), this.plan),
      h("section", { "aria-labelledby": "challenges-title" }, h("h2", { id: "challenges-title" }, "Challenges"),
        h("table", {}, h("caption", {}, "Challenges and the judge's scores"),
          h("thead", {}, h("tr", {}, ["Challenge", "Level", "Prompt", "Score", "Judge"].map((t) => h("th", { scope: "col" }, t)))),
          this.challengeRows)),
      h("section", { "aria-labelledby": "events-title" }, h("h2", { id: "events-title" }, "Events"), this.log),
    ];
  }

  show(session) {
    this.session = session;
    const loss = session.loss === null ? "" : `, loss ${session.loss.toFixed(4)}`;
    this.state.textContent = `Status: ${session.status}${session.reason ? ` (${session.reason})` : ""}, step ${session.step} of ${session.budget_steps}${loss}.`;
    this.state.dataset.status = session.status;
    this.cancelButton.disabled = FINISHED.has(session.status);
  }

  async follow(id) {
    this.controller = new AbortController();
    try {
      const response = await call(`/academy/sessions/${id}/events`, { headers: { Accept: "text/event-stream" }, signal: this.controller.signal });
      for await (const { data: event } of events(response)) this.apply(event);
      this.show(await getJson(`/academy/sessions/${id}`));
      this.dataset.stream = "ended";  // the session is over and every one of its events is shown
    } catch (error) {
      if (error.name !== "AbortError") this.alert.show(error);
    }
  }

  apply(event) {
    if (this.seen.has(event.version)) return;
    this.seen.add(event.version);
    const d = event.data;
    this.log.append(h("li", {}, `v${event.version} ${when(event.recorded_at)} ${event.type}`));
    switch (event.type) {
      case "PlanMade":
        this.plan.replaceChildren(table("Tasks", ["Need", "Action", "Trait", "Nearest layer"], d.tasks.map((t) => [
          t.need, t.action, t.trait_type, t.layer_id ? `${short(t.layer_id)} (${t.similarity.toFixed(3)})` : "none"])));
        break;
      case "ChallengeGenerated": {
        const score = h("td", {}, "…"), judge = h("td", {});
        this.challenges.set(d.challenge_id, { score, judge });
        this.challengeRows.append(h("tr", {}, h("td", {}, d.challenge_id), h("td", {}, d.difficulty), h("td", {}, d.prompt), score, judge));
        break;
      }
      case "ResponseScored": {
        const row = this.challenges.get(d.challenge_id);
        if (row) { row.score.textContent = d.score.toFixed(1); row.judge.textContent = d.judge; }
        break;
      }
      case "TrainingProgressed":
        this.chart.add(d.step, d.loss);
        this.show({ ...this.session, step: d.step, loss: d.loss });
        break;
      case "LayerProduced":
        this.layers.append(h("li", {}, h("a", { href: `#/layers/${d.layer_id}` }, `Produced layer ${short(d.layer_id)}`)));
        break;
      case "Evaluated": {
        const score = d.task_score === undefined ? "" : `, task score ${d.task_score.toFixed(3)}`;
        const item = h("li", {}, `Held-out at step ${d.step} (${d.phase}): loss ${d.valid_loss.toFixed(4)}, `
          + `token accuracy ${d.valid_token_accuracy.toFixed(3)}${score}`);
        // Before, the latest checkpoint and after: a long session does not grow the page.
        if (d.phase === "checkpoint" && this.checkpointItem) this.checkpointItem.replaceWith(item);
        else this.evaluations.append(item);
        if (d.phase === "checkpoint") this.checkpointItem = item;
        break;
      }
      case "AttachDecided":
        this.layers.append(h("li", {}, d.reason));
        break;
      case "SessionStatusChanged":
        this.show({ ...this.session, status: d.status, reason: d.reason });
        break;
      default:
    }
  }

  async cancel(id) {
    await attempt(this.alert, async () => this.show(await post(`/academy/sessions/${id}/cancel`)));
  }
}

customElements.define("gs-academy", Academy);
customElements.define("gs-session", Session);
