// Personas: the list, creating one (with a base model, so it has a genome), archiving.
import { call, getJson, post } from "./api.js";
import { Page, attempt, field, h, table } from "./dom.js";

export async function personas() {
  return (await getJson("/personas/?limit=200")).items;
}

// Base models named by the genomes and layers the caller can see: suggestions, not a limit.
async function knownModels() {
  const [genomes, layers] = await Promise.all([getJson("/genomes/?limit=200"), getJson("/layers/?limit=200")]);
  return [...new Set([...genomes.items, ...layers.items].map((x) => x.base_model))];
}

class Personas extends Page {
  heading = "Personas";

  async render() {
    const [list, models] = await Promise.all([personas(), knownModels()]);
    const name = h("input", { required: true, maxlength: 200 });
    const prompt = h("textarea", { rows: 3 });
    const description = h("input", {});
    const model = h("input", { list: "base-models", value: models[0] || "smollm2-135m-instruct" });
    const create = async (event) => {
      event.preventDefault();
      await attempt(this.alert, async () => {
        await post("/personas/", { name: name.value, system_prompt: prompt.value, description: description.value,
          base_model: model.value || null });
        await this.refresh();
      });
    };
    const archive = (persona) => attempt(this.alert, async () => {
      await call(`/personas/${persona.id}`, { method: "DELETE", headers: { "If-Match": `"${persona.version}"` } });
      await this.refresh();
    });
    const rows = list.map((p) => [
      h("a", { href: `#/personas/${p.id}/chat` }, p.name),
      p.description,
      p.genome_id ? h("a", { href: `#/genomes/${p.genome_id}` }, "genome") : "none",
      h("a", { href: `#/personas/${p.id}/knowledge` }, "knowledge"),
      h("button", { type: "button", onclick: () => archive(p), "aria-label": `Archive ${p.name}` }, "Archive"),
    ]);
    return [
      h("h1", {}, "Personas"),
      this.alert,
      list.length ? table("Your personas", ["Name (chat)", "Description", "Genome", "Knowledge", ""], rows)
        : h("p", {}, "No personas yet."),
      h("section", { "aria-labelledby": "new-persona" },
        h("h2", { id: "new-persona" }, "New persona"),
        h("form", { onsubmit: create },
          field("Name", name), field("System prompt", prompt), field("Description", description),
          field("Base model (gets an empty genome)", model),
          h("datalist", { id: "base-models" }, models.map((m) => h("option", { value: m }))),
          h("button", { type: "submit" }, "Create persona"))),
    ];
  }
}
customElements.define("gs-personas", Personas);
