// The cohort page: a page of slides at a time with thumbnail, labels and the stored predictions; sorting,
// filtering and paging are done by the server in SQL (/api/slides), so a cohort of any size loads as fast.
"use strict";
(async function () {
  const view = window.HISTCODE.view;
  const status = document.getElementById("status");
  const headRow = document.getElementById("slides-head");
  const body = document.querySelector("#slides tbody");
  const filter = document.getElementById("filter");
  const state = {sort: "slide_id", order: "asc", q: "", offset: 0, limit: 50};
  let cols = null, seq = 0;

  function columns(outputs) {
    const probs = outputs.filter(c => c.startsWith("p_") && c !== "p_tumor");
    const calls = outputs.filter(c => c.startsWith("de_"));
    return [
      ["thumb", ""], ["slide_id", "slide"], ["patient_id", "patient"], ["cohort", "cohort"], ["status", "status"],
      ["mpp", "µm/px"], ["n_tiles", "tiles"], ["tumor", "tumour (label)"], ["subtype", "subtype (label)"],
      ...(outputs.includes("p_tumor") ? [["p_tumor", "p tumour"]] : []),
      ...probs.map(c => [c, "p " + c.slice(2).toUpperCase()]), ...calls.map(c => [c, c.slice(3)]),
    ];
  }
  function header() {
    headRow.replaceChildren(...cols.map(([key, label]) => {
      const th = hc.el("th", {"data-key": key, text: label});
      if (key !== "thumb") th.addEventListener("click", () => {
        state.order = state.sort === key && state.order === "asc" ? "desc" : "asc";
        state.sort = key; state.offset = 0; load();
      });
      th.className = key === state.sort ? (state.order === "asc" ? "asc" : "desc") : "";
      return th;
    }));
  }
  function cell(s, key) {
    if (key === "thumb") {
      return hc.el("td", {}, hc.el("img", {src: "/api/thumbnail?" + hc.q({id: s.slide_id}), loading: "lazy", alt: "", class: "thumb"}));
    }
    if (key === "slide_id") return hc.el("td", {}, hc.el("a", {href: hc.slideUrl(s.slide_id, view), text: s.slide_id}));
    const td = hc.el("td", {text: hc.fmt(s[key], key === "mpp" ? 3 : 2)});
    if (typeof s[key] === "number") td.className = "num";
    if (key.startsWith("de_")) td.className = "call call-" + s[key];
    if (s.stale && (key.startsWith("p_") || key.startsWith("de_"))) { td.classList.add("stale"); td.title = "stale: a newer head version is @best (histcode predict --refresh)"; }
    return td;
  }
  async function load() {
    const mine = ++seq;
    let data;
    try { data = await hc.json("/api/slides?" + hc.q({view, ...state})); }
    catch (e) { status.textContent = "could not load the cohort: " + e.message; return; }
    if (mine !== seq) return;  // a newer request (typing, a click) answers instead
    if (!cols || cols.length !== columns(data.outputs).length) cols = columns(data.outputs);
    header();
    body.replaceChildren(...data.slides.map(s => {
      const tr = hc.el("tr", {"data-slide": s.slide_id});
      for (const [key] of cols) tr.append(cell(s, key));
      return tr;
    }));
    const first = data.matched ? data.offset + 1 : 0, last = data.offset + data.slides.length;
    document.getElementById("count").textContent =
      `${first}–${last} of ${data.matched} slides` + (data.matched !== data.total ? ` (${data.total} in all)` : "") + (data.view ? ` · view ${data.view}` : ` · tiling ${data.spec_id}`);
    document.getElementById("prev").disabled = data.offset === 0;
    document.getElementById("next").disabled = last >= data.matched;
    const heads = data.heads.map(h => `${h.task} v${h.version} (${h.aggregator}, ${h.source === "cv" ? "out of fold" : "predicted"}` +
      `${h.stale ? ", stale" : ""}): ${h.slides}`).join("; ");
    document.getElementById("heads").textContent = heads ? "stored predictions: " + heads
      : "no stored predictions: run `histcode heads` (out-of-fold predictions of the training slides) or `histcode predict`";
    status.textContent = "";
    window.HISTCODE.page = data;
    window.HISTCODE.loads = (window.HISTCODE.loads || 0) + 1;
    window.HISTCODE.ready = true;
  }
  let timer = null;
  filter.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = filter.value.trim(); state.offset = 0; load(); }, 80);
  });
  document.getElementById("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); load(); });
  document.getElementById("next").addEventListener("click", () => { state.offset += state.limit; load(); });
  await load();
})();
