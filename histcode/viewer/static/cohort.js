// The cohort page: every slide with thumbnail, labels and the registered heads' predictions; sortable, filterable.
"use strict";
(async function () {
  const view = window.HISTCODE.view;
  const status = document.getElementById("status");
  let data;
  try { data = await hc.json("/api/slides?" + hc.q({view})); }
  catch (e) { status.textContent = "could not load the cohort: " + e.message; return; }
  const slides = data.slides;
  const deCols = [...new Set(slides.flatMap(s => Object.keys(s).filter(k => k.startsWith("de_"))))].sort();
  const probCols = [...new Set(slides.flatMap(s => Object.keys(s).filter(k => k.startsWith("p_") && k !== "p_tumor")))].sort();
  const cols = [
    ["thumb", ""], ["slide_id", "slide"], ["patient_id", "patient"], ["cohort", "cohort"], ["status", "status"],
    ["mpp", "µm/px"], ["n_tiles", "tiles"], ["tumor", "tumour (label)"], ["subtype", "subtype (label)"],
    ["p_tumor", "p tumour"], ...probCols.map(c => [c, c.replace("p_", "p ").toUpperCase().replace("P ", "p ")]),
    ...deCols.map(c => [c, c.replace("de_", "")]),
  ];
  const heads = Object.entries(data.heads).map(([k, h]) => `${k} v${h.version} (${h.aggregator})`).join(", ");
  document.getElementById("heads").textContent = heads ? "heads: " + heads : "no registered heads: predictions are empty";
  const headRow = document.getElementById("slides-head");
  let sortKey = "slide_id", sortDir = 1;
  for (const [key, label] of cols) {
    const th = hc.el("th", {"data-key": key, text: label});
    if (key !== "thumb") th.addEventListener("click", () => {
      sortDir = sortKey === key ? -sortDir : 1; sortKey = key; render();
    });
    headRow.append(th);
  }
  const body = document.querySelector("#slides tbody");
  const filter = document.getElementById("filter");
  filter.addEventListener("input", render);
  function cell(s, key) {
    if (key === "thumb") {
      return hc.el("td", {}, hc.el("img", {src: "/api/thumbnail?" + hc.q({id: s.slide_id}), loading: "lazy", alt: "", class: "thumb"}));
    }
    if (key === "slide_id") return hc.el("td", {}, hc.el("a", {href: hc.slideUrl(s.slide_id, view), text: s.slide_id}));
    const td = hc.el("td", {text: hc.fmt(s[key], key === "mpp" ? 3 : 2)});
    if (typeof s[key] === "number") td.className = "num";
    if (key.startsWith("de_")) td.className = "call call-" + s[key];
    return td;
  }
  function render() {
    const needle = filter.value.trim().toLowerCase();
    const shown = slides.filter(s => !needle || cols.some(([k]) => hc.fmt(s[k]).toLowerCase().includes(needle)));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
    body.replaceChildren(...shown.map(s => {
      const tr = hc.el("tr", {"data-slide": s.slide_id});
      for (const [key] of cols) tr.append(cell(s, key));
      return tr;
    }));
    for (const th of headRow.children) th.className = th.dataset.key === sortKey ? (sortDir > 0 ? "asc" : "desc") : "";
    document.getElementById("count").textContent = `${shown.length} of ${slides.length} slides · view ${data.view}`;
  }
  render();
  status.textContent = "";
  window.HISTCODE.ready = true;
})();
