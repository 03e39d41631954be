// Layers: browse and filter, upload an adapter (the API's validation error shown in place),
// and discovery by text or by similarity to a layer, with cosine scores.
import { call, getJson, query } from "./api.js";
import { Page, alertBox, attempt, field, h, score, select, table } from "./dom.js";

export const TRAITS = ["general_reasoning", "tone_and_voice", "ethical_reasoning", "domain_expertise",
  "cultural_knowledge", "memory_integration"];

class Layers extends Page {
  heading = "Layers";

  connectedCallback() {
    this.filters = { trait_type: "", tag: "", base_model: "" };
    super.connectedCallback();
  }

  async render() {
    const list = (await getJson(`/layers/${query({ ...this.filters, limit: 200 })}`)).items;
    this.found = h("div", { "aria-live": "polite" });
    const rows = list.map((l) => [l.name, l.trait_type, l.base_model, l.tags.join(", "), `${l.adapter_format}, rank ${l.rank}`,
      l.deprecated ? "deprecated" : "",
      h("button", { type: "button", onclick: () => this.search({ like_layer_id: l.id }, `Similar to ${l.name}`) },
        `Similar to ${l.name}`)]);
    const trait = select({ value: this.filters.trait_type }, [["", "any"], ...TRAITS.map((t) => [t, t])]);
    const tag = h("input", { value: this.filters.tag });
    const base = h("input", { value: this.filters.base_model });
    const filter = (event) => {
      event.preventDefault();
      this.filters = { trait_type: trait.value, tag: tag.value, base_model: base.value };
      this.refresh();
    };
    const text = h("input", { required: true });
    return [
      h("h1", {}, "Layers"),
      this.alert,
      h("form", { class: "filters", onsubmit: filter, "aria-label": "Filter layers" },
        field("Trait type", trait), field("Tag", tag), field("Base model", base), h("button", { type: "submit" }, "Filter")),
      list.length ? table("Layers you may use", ["Name", "Trait", "Base model", "Tags", "Adapter", "State", "Discovery"], rows)
        : h("p", {}, "No layers match."),
      h("section", { "aria-labelledby": "discover-title" }, h("h2", { id: "discover-title" }, "Discover"),
        h("form", { onsubmit: (event) => { event.preventDefault(); this.search({ text: text.value }, `Layers for “${text.value}”`); } },
          field("Describe what you need", text), h("button", { type: "submit" }, "Search")),
        this.found),
      this.uploadForm(),
    ];
  }

  async search(body, caption) {
    await attempt(this.alert, async () => {
      const { items } = await getJson("/layers/search", { method: "POST", json: { ...body, k: 10 } });
      this.found.replaceChildren(items.length
        ? table(caption, ["Layer", "Trait", "Score"], items.map((r) => [r.layer.name, r.layer.trait_type, score(r.score)]))
        : h("p", {}, `${caption}: nothing found.`));
    });
  }

  uploadForm() {
    const name = h("input", { required: true });
    const base = h("input", { required: true, value: this.filters.base_model });
    const trait = select({}, TRAITS.map((t) => [t, t]));
    const tags = h("input", { placeholder: "comma separated" });
    const description = h("input", {});
    const files = h("input", { type: "file", multiple: true, required: true });
    const problem = alertBox();
    const upload = async (event) => {
      event.preventDefault();
      const metadata = { name: name.value, base_model: base.value, trait_type: trait.value, description: description.value,
        tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean) };
      const form = new FormData();
      form.append("metadata", JSON.stringify(metadata));
      for (const file of files.files) form.append("files", file, file.name);
      const created = await attempt(problem, () => call("/layers/", { method: "POST", form }));
      if (created) await this.refresh();
    };
    return h("section", { "aria-labelledby": "upload-title" }, h("h2", { id: "upload-title" }, "Upload an adapter"),
      h("p", {}, "mlx-lm layout (adapters.safetensors + adapter_config.json) or PEFT (adapter_model.safetensors + adapter_config.json)."),
      h("form", { onsubmit: upload }, field("Name", name), field("Base model", base), field("Trait type", trait),
        field("Tags", tags), field("Description", description), field("Adapter files", files), problem,
        h("button", { type: "submit" }, "Upload")));
  }
}
customElements.define("gs-layers", Layers);

// One layer: its metadata, training metrics and provenance.
class Layer extends Page {
  heading = "Layer";

  async render() {
    const layer = await getJson(`/layers/${this.getAttribute("layer")}`);
    const rows = Object.entries(layer).map(([key, value]) => [key,
      value !== null && typeof value === "object" ? JSON.stringify(value) : String(value)]);
    return [h("h1", {}, `Layer ${layer.name}`), this.alert, table("Fields", ["Field", "Value"], rows),
      h("p", {}, h("a", { href: "#/layers" }, "All layers"))];
  }
}
customElements.define("gs-layer", Layer);
