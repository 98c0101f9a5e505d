// Shared by the viewer's pages: query strings, number formatting, the feature-view selector.
"use strict";
const hc = {
  q(params) {
    return Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== "")
      .map(([k, v]) => encodeURIComponent(k) + "=" + encodeURIComponent(v)).join("&");
  },
  fmt(v, digits = 3) {
    if (v === null || v === undefined) return "";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
    if (typeof v === "boolean") return v ? "yes" : "no";
    return String(v);
  },
  el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  },
  async json(url) {
    const r = await fetch(url);
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  },
  slideUrl(id, view, extra = {}) { return "/slide?" + hc.q({id, view, ...extra}); },
};
document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("view-select");
  if (select) select.addEventListener("change", () => {
    const url = new URL(window.location.href);
    url.searchParams.set("view", select.value);
    window.location.href = url.toString();
  });
});
