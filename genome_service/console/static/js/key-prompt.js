// Asks for an API key when the API answers 401; the key stays in this tab's sessionStorage.
import { field, h } from "./dom.js";

class KeyPrompt extends HTMLElement {
  ask(reason) {
    return new Promise((resolve) => {
      const input = h("input", { type: "password", autocomplete: "off", required: true });
      const dialog = h("dialog", { "aria-labelledby": "key-title" },
        h("form", { method: "dialog" },
          h("h2", { id: "key-title" }, "API key"),
          h("p", {}, reason),
          field("Key (gsk_...)", input),
          h("button", { type: "submit" }, "Use this key")));
      dialog.addEventListener("close", () => {
        if (!input.value) return dialog.showModal();
        dialog.remove();
        return resolve(input.value.trim());
      });
      this.replaceChildren(dialog);
      dialog.showModal();
    });
  }
}
customElements.define("gs-key-prompt", KeyPrompt);
