// A genome: its ordered, weighted layers (position 0 is the bottom), edited as one stack
// under If-Match; attach, detach, fork; the history from its events and the stack at any version.
import { call, getJson, post } from "./api.js";
import { Page, attempt, field, h, select, short, table, when } from "./dom.js";

function describe(event, names) {
  const d = event.data;
  const name = (id) => names.get(id) || short(id);
  switch (event.type) {
    case "LayerAttached": return `attached ${name(d.layer_id)} at ${d.position} with weight ${d.weight}`;
    case "LayerDetached": return `detached ${name(d.layer_id)}`;
    case "LayerReweighted": return `weight of ${name(d.layer_id)} set to ${d.weight}`;
    case "LayersReordered": return `order set to ${d.layer_ids.map(name).join(", ")} (bottom first)`;
    case "LayerStackReplaced":
      return `stack set to ${d.layers.map((l) => `${name(l.layer_id)} ×${l.weight}`).join(", ") || "nothing"}`;
    default: return event.type.replace(/([a-z])([A-Z])/g, "$1 $2").toLowerCase();
  }
}

class Genome extends Page {
  heading = "Genome";

  async render() {
    let id = this.getAttribute("genome");
    if (!id) {
      id = (await getJson(`/personas/${this.getAttribute("persona")}`)).genome_id;
      if (!id) return [h("h1", {}, "Genome"), h("p", {}, "This persona has no genome.")];
    }
    const [genome, history, layers] = await Promise.all([
      getJson(`/genomes/${id}`), getJson(`/genomes/${id}/events`), getJson("/layers/?limit=200")]);
    this.genome = genome;
    this.names = new Map(layers.items.map((l) => [l.id, l.name]));
    const stack = genome.layers.map((l) => ({ layer_id: l.layer_id, weight: l.weight }));
    const rows = genome.layers.map((l, i) => {
      const name = this.names.get(l.layer_id) || short(l.layer_id);
      const weight = h("input", { type: "number", step: "0.05", value: String(l.weight), "aria-label": `Weight of ${name}` });
      return [String(l.position), name,
        h("form", { class: "inline", onsubmit: (event) => {
          event.preventDefault();
          this.save(stack.map((s, j) => (j === i ? { ...s, weight: Number(weight.value) } : s)));
        } }, weight, h("button", { type: "submit" }, "Set weight")),
        h("span", { class: "buttons" },
          h("button", { type: "button", disabled: i === genome.layers.length - 1, "aria-label": `Move ${name} up`,
            onclick: () => this.save(swap(stack, i, i + 1)) }, "Up"),
          h("button", { type: "button", disabled: i === 0, "aria-label": `Move ${name} down`,
            onclick: () => this.save(swap(stack, i, i - 1)) }, "Down"),
          h("button", { type: "button", "aria-label": `Detach ${name}`,
            onclick: () => this.change(() => call(`/genomes/${id}/layers/${l.layer_id}`,
              { method: "DELETE", headers: this.ifMatch() })) }, "Detach"))];
    });
    const usable = layers.items.filter((l) => l.base_model === genome.base_model
      && !genome.layers.some((g) => g.layer_id === l.id));
    const choice = select({}, usable.map((l) => [l.id, `${l.name} (${l.trait_type})`]));
    const weight = h("input", { type: "number", step: "0.05", value: "1" });
    const forkName = h("input", { required: true, value: `${genome.name} (fork)` });
    this.past = h("div", { "aria-live": "polite" });
    return [
      h("h1", {}, `Genome ${genome.name}`),
      h("p", {}, `Base model ${genome.base_model}, version ${genome.version}, generation ${genome.generation}. `,
        genome.persona_id ? h("a", { href: `#/personas/${genome.persona_id}/chat` }, "Chat with its persona") : ""),
      this.alert,
      rows.length ? table("Layers, bottom (position 0) to top", ["Position", "Layer", "Weight", "Change"], rows)
        : h("p", {}, "No layers attached."),
      h("section", { "aria-labelledby": "attach-title" }, h("h2", { id: "attach-title" }, "Attach a layer"),
        usable.length ? h("form", { onsubmit: (event) => {
          event.preventDefault();
          this.change(() => call(`/genomes/${id}/layers`, { method: "POST", headers: this.ifMatch(),
            json: { layer_id: choice.value, weight: Number(weight.value) } }));
        } }, field("Layer", choice), field("Weight", weight), h("button", { type: "submit" }, "Attach"))
          : h("p", {}, `No other layer on ${genome.base_model}: upload one on the Layers page.`)),
      h("section", { "aria-labelledby": "fork-title" }, h("h2", { id: "fork-title" }, "Fork"),
        h("form", { onsubmit: (event) => {
          event.preventDefault();
          attempt(this.alert, async () => {
            const fork = await post(`/genomes/${id}/fork`, { name: forkName.value });
            location.hash = `#/genomes/${fork.id}`;
          });
        } }, field("Name of the fork", forkName), h("button", { type: "submit" }, "Fork genome"))),
      h("section", { "aria-labelledby": "history-title" }, h("h2", { id: "history-title" }, "History"),
        h("ol", { class: "events" }, history.map((e) => h("li", {},
          h("span", {}, `v${e.version} ${when(e.recorded_at)}: ${describe(e, this.names)}`), " ",
          h("button", { type: "button", onclick: () => this.showVersion(id, e.version) }, `Stack at v${e.version}`)))),
        this.past),
    ];
  }

  ifMatch() {
    return { "If-Match": `"${this.genome.version}"` };
  }

  save(layers) {
    return this.change(() => call(`/genomes/${this.genome.id}/layers`, { method: "PUT", headers: this.ifMatch(), json: { layers } }));
  }

  async change(action) {
    await attempt(this.alert, async () => {
      await action();
      await this.refresh();
    });
  }

  async showVersion(id, version) {
    await attempt(this.alert, async () => {
      const then = await getJson(`/genomes/${id}?version=${version}`);
      this.past.replaceChildren(table(`Stack at version ${version}`, ["Position", "Layer", "Weight"],
        then.layers.map((l) => [String(l.position), this.names.get(l.layer_id) || short(l.layer_id), String(l.weight)])));
    });
  }
}

function swap(stack, i, j) {
  const copy = [...stack];
  [copy[i], copy[j]] = [copy[j], copy[i]];
  return copy;
}

customElements.define("gs-genome", Genome);
