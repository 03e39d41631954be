// A persona's knowledge: its documents, adding text or files, and a retrieval playground
// showing the top-k chunks with their cosine scores.
import { call, getJson, post, query } from "./api.js";
import { Page, alertBox, attempt, field, h, score, select, table, when } from "./dom.js";
import { personas } from "./personas.js";

class Knowledge extends Page {
  heading = "Knowledge";

  async render() {
    const all = await personas();
    const id = this.getAttribute("persona") || all[0]?.id;
    const chooser = select({ value: id, onchange: (event) => { location.hash = `#/personas/${event.target.value}/knowledge`; } },
      all.map((p) => [p.id, p.name]));
    const head = [h("h1", {}, "Knowledge"), this.alert, field("Persona", chooser)];
    if (!id) return [...head, h("p", {}, "Create a persona first.")];
    const documents = (await getJson(`/personas/${id}/knowledge?limit=200`)).items;
    const remove = (doc) => attempt(this.alert, async () => {
      await call(`/personas/${id}/knowledge/${doc.id}`, { method: "DELETE" });
      await this.refresh();
    });
    const title = h("input", {});
    const text = h("textarea", { rows: 4, required: true });
    const files = h("input", { type: "file", multiple: true, accept: ".txt,.md,text/plain,text/markdown", required: true });
    const q = h("input", { required: true });
    const k = h("input", { type: "number", min: 1, value: "4" });
    const results = h("div", { "aria-live": "polite" });
    const added = alertBox();
    const addText = async (event) => {
      event.preventDefault();
      if (await attempt(added, () => post(`/personas/${id}/knowledge`, { title: title.value, text: text.value }))) await this.refresh();
    };
    const addFiles = async (event) => {
      event.preventDefault();
      const form = new FormData();
      for (const file of files.files) form.append("files", file, file.name);
      if (await attempt(added, () => call(`/personas/${id}/knowledge/documents`, { method: "POST", form }))) await this.refresh();
    };
    const search = (event) => {
      event.preventDefault();
      attempt(this.alert, async () => {
        const chunks = await getJson(`/personas/${id}/knowledge/search${query({ q: q.value, k: k.value })}`);
        const titles = new Map(documents.map((d) => [d.id, d.title || "untitled"]));
        results.replaceChildren(table(`Top ${chunks.length} chunks for “${q.value}”`, ["Document", "Chunk", "Score"],
          chunks.map((c) => [titles.get(c.knowledge_id) || c.knowledge_id, c.text, score(c.score)])));
      });
    };
    return [
      ...head,
      documents.length ? table("Documents", ["Title", "Type", "Chunks", "Added", ""], documents.map((d) => [
        d.title || "untitled", d.media_type, String(d.chunk_count), when(d.created_at),
        h("button", { type: "button", onclick: () => remove(d), "aria-label": `Remove ${d.title || "untitled"}` }, "Remove")]))
        : h("p", {}, "No documents yet."),
      h("section", { "aria-labelledby": "add-title" }, h("h2", { id: "add-title" }, "Add knowledge"), added,
        h("form", { onsubmit: addText }, field("Title", title), field("Text", text), h("button", { type: "submit" }, "Add text")),
        h("form", { onsubmit: addFiles }, field("Text or markdown files", files), h("button", { type: "submit" }, "Upload files"))),
      h("section", { "aria-labelledby": "retrieve-title" }, h("h2", { id: "retrieve-title" }, "Retrieval playground"),
        h("form", { onsubmit: search }, field("Query", q), field("k", k), h("button", { type: "submit" }, "Retrieve")), results),
    ];
  }
}
customElements.define("gs-knowledge", Knowledge);
