// Every call to the REST API goes through here: the key (kept for this tab in sessionStorage)
// rides on each request as a Bearer token, streams included, since EventSource cannot send it.
const KEY = "genome-service-key";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.rule = problem.rule || "";
  }
}

let asking = null;

// Open loopback mode answers without a key, so the page asks only once the API says 401.
function askForKey(reason) {
  asking ??= document.querySelector("gs-key-prompt").ask(reason).finally(() => { asking = null; });
  return asking;
}

export async function call(path, { method = "GET", json, form, headers = {}, signal } = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY);
    const sent = { ...headers };
    if (key) sent.Authorization = `Bearer ${key}`;
    let body = form;
    if (json !== undefined) {
      sent["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    const response = await fetch(path, { method, headers: sent, body, signal });
    if (response.status === 401) {
      const problem = await response.json().catch(() => ({}));
      sessionStorage.removeItem(KEY);
      sessionStorage.setItem(KEY, await askForKey(problem.detail || "An API key is required."));
      continue;
    }
    if (!response.ok) {
      const problem = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
      throw new ApiError(response.status, problem);
    }
    return response;
  }
}

export async function getJson(path, options) {
  const response = await call(path, options);
  return response.status === 204 ? null : response.json();
}

export const post = (path, json) => getJson(path, { method: "POST", json });

// Server-sent events read from a fetch body: yields {event, data, id} as each one completes.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let current = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (current.data.length) yield { event: current.event, id: current.id, data: JSON.parse(current.data.join("\n")) };
        current = { event: "message", data: [], id: null };
      } else if (!line.startsWith(":")) {
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const text = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "event") current.event = text;
        else if (field === "data") current.data.push(text);
        else if (field === "id") current.id = text;
      }
    }
  }
}

export const query = (params) => {
  const found = Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined);
  return found.length ? `?${new URLSearchParams(found)}` : "";
};
