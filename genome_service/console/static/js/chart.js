// The loss curve drawn as SVG: raw points and an exponentially smoothed line, redrawn as each
// progress event arrives. The summary and a table of the values are its text alternative.
import { h } from "./dom.js";

const W = 600, H = 240, PAD = 36, SMOOTHING = 0.6;

export function smooth(values) {
  let last = values[0];
  return values.map((v) => (last = last * SMOOTHING + v * (1 - SMOOTHING)));
}

class LossChart extends HTMLElement {
  points = [];

  connectedCallback() {
    this.summary = h("p", { id: "loss-summary" }, "No training steps yet.");
    this.svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "loss-title loss-summary", class: "chart" });
    this.rows = h("tbody");
    this.replaceChildren(h("h2", { id: "loss-title" }, "Loss"), this.svg, this.summary,
      h("details", {}, h("summary", {}, "Loss values"),
        h("table", {}, h("caption", {}, "Loss at each checkpoint"),
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Step"), h("th", { scope: "col" }, "Loss"),
            h("th", { scope: "col" }, "Smoothed"))), this.rows)));
    this.draw();
  }

  add(step, loss) {
    this.points.push({ step, loss });
    this.draw();
  }

  draw() {
    const points = this.points;
    if (!this.svg) return;
    const smoothed = smooth(points.map((p) => p.loss));
    const steps = points.map((p) => p.step), losses = points.map((p) => p.loss);
    const [x0, x1] = [Math.min(0, ...steps), Math.max(1, ...steps)];
    const [y0, y1] = [Math.min(...losses, ...smoothed), Math.max(...losses, ...smoothed)];
    const x = (s) => PAD + ((s - x0) / (x1 - x0 || 1)) * (W - 2 * PAD);
    const y = (l) => H - PAD - ((l - y0) / (y1 - y0 || 1)) * (H - 2 * PAD);
    const line = (values, cls) => h("svg:polyline", { class: cls, points: values.map((v, i) => `${x(steps[i])},${y(v)}`).join(" ") });
    const label = (tx, ty, text, anchor) => h("svg:text", { x: tx, y: ty, "text-anchor": anchor }, text);
    this.svg.replaceChildren(...[
      h("svg:line", { class: "axis", x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD }),
      h("svg:line", { class: "axis", x1: PAD, y1: PAD, x2: PAD, y2: H - PAD }),
      points.length ? [
        label(PAD - 4, y(y1) + 4, y1.toFixed(2), "end"), label(PAD - 4, y(y0) + 4, y0.toFixed(2), "end"),
        label(W - PAD, H - PAD + 16, `step ${x1}`, "end"),
        line(losses, "raw"), line(smoothed, "smoothed"),
        points.map((p) => h("svg:circle", { class: "point", cx: x(p.step), cy: y(p.loss), r: 3, "data-step": p.step })),
      ] : []].flat(Infinity));
    const last = points[points.length - 1];
    this.summary.textContent = last
      ? `${points.length} checkpoints: loss ${points[0].loss.toFixed(3)} at step ${points[0].step}, now ${last.loss.toFixed(3)} at step ${last.step} (smoothed ${smoothed[smoothed.length - 1].toFixed(3)}). Raw loss: points and thin line; smoothed: thick line.`
      : "No training steps yet.";
    this.rows.replaceChildren(...points.map((p, i) => h("tr", {}, h("td", {}, String(p.step)), h("td", {}, p.loss.toFixed(4)),
      h("td", {}, smoothed[i].toFixed(4)))));
  }
}
customElements.define("gs-loss-chart", LossChart);
