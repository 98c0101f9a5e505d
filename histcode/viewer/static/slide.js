// The slide page: OpenSeadragon over the slide's Deep Zoom tiles, overlays at tile resolution (score layers,
// ground truth, tile grid, tissue), click a tile for its nearest tiles across the cohort, similar slides.
"use strict";
(async function () {
  const {slide: slideId, view} = window.HISTCODE;
  const state = window.HISTCODE;
  state.ready = false;
  const info = await hc.json("/api/slide?" + hc.q({id: slideId, view}));
  state.info = info;
  const ts = info.tile_source;
  const viewer = OpenSeadragon({
    id: "osd", prefixUrl: "/static/openseadragon/images/", drawer: "canvas", imageSmoothingEnabled: false,
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", maxZoomPixelRatio: 2, crossOriginPolicy: false,
    gestureSettingsMouse: {clickToZoom: false},
    tileSources: {
      width: ts.width, height: ts.height, tileSize: ts.tileSize, tileOverlap: ts.tileOverlap,
      minLevel: ts.minLevel, maxLevel: ts.maxLevel,
      getTileUrl: (level, x, y) => "/api/dz?" + hc.q({id: slideId, level, col: x, row: y}),
    },
  });
  state.viewer = viewer;
  const overlays = Object.fromEntries(info.overlays.map(o => [o.name, o]));
  const items = {};  // overlay name -> its TiledImage
  const opacity = document.getElementById("opacity");

  function addOverlay(name, itemOpacity) {
    const o = overlays[name];
    return new Promise(resolve => {
      viewer.addTiledImage({
        tileSource: {type: "image", url: "/api/overlay?" + hc.q({id: slideId, view, layer: name})},
        x: o.placement.x, y: o.placement.y, width: o.placement.width, opacity: itemOpacity,
        success: ev => { items[name] = ev.item; ev.item.addOnceHandler("fully-loaded-change", () => resolve(ev.item));
                         if (ev.item.getFullyLoaded()) resolve(ev.item); },
        error: () => resolve(null),
      });
    });
  }
  function removeOverlay(name) {
    if (items[name]) { viewer.world.removeItem(items[name]); delete items[name]; }
  }

  // -- predictions ------------------------------------------------------------------------------------------
  const pred = document.getElementById("predictions");
  const stored = info.predictions;
  const entries = Object.entries(stored.values);
  const rows = entries.filter(([k]) => !k.startsWith("de_")).map(([k, v]) => [k.replace(/^p_/, "p ").replace("p luad", "p LUAD").replace("p lusc", "p LUSC"), v]);
  rows.unshift(["tiles", `${info.n_tiles} × ${info.tile_size} px (level 0), ${hc.fmt(info.mpp)} µm/px`]);
  if (info.labels.tumor !== undefined && info.labels.tumor !== null)
    rows.push(["label", `${info.labels.tumor ? "tumour" : "benign"} ${info.labels.subtype || ""}`]);
  if (info.mask_auc !== null) rows.push(["attention vs mask AUC", info.mask_auc]);
  for (const b of stored.by) {
    const how = b.source === "cv" ? `out of fold (fold ${b.fold})` : "predicted";
    const where = b.in_distribution === false ? ", outside the training distribution" : "";
    rows.push([`${b.task} head`, `v${b.version} ${b.aggregator}, ${how}${b.stale ? ", stale" : ""}${where}`]);
  }
  pred.classList.remove("muted");
  pred.replaceChildren(hc.el("table", {class: "kv"}, ...rows.map(([k, v]) =>
    hc.el("tr", {}, hc.el("th", {text: k}), hc.el("td", {text: hc.fmt(v)})))));
  const calls = entries.filter(([k]) => k.startsWith("de_"));
  if (calls.length) {
    const arrow = {up: " ↑", down: " ↓", unchanged: " ="};
    pred.append(hc.el("div", {class: "small muted", text: "driver genes (DE head; ↑ up, ↓ down, = unchanged, grey: not called)"}),
      hc.el("div", {class: "chips"}, ...calls.map(([k, v]) => hc.el("span", {class: "chip call-" + v, title: `${k.slice(3)}: ${v}`,
        text: k.slice(3) + (arrow[v] || "")}))));
  }
  if (stored.note) pred.append(hc.el("p", {class: "note", id: "prediction-note", text: stored.note}));
  const patient = info.patient;
  if (patient && patient.by && patient.by.length) {
    // the patient's prediction, pooled from its slides (histcode.heads.patients)
    const shown = Object.entries(patient.values).filter(([k]) => !k.startsWith("de_"));
    const prow = shown.map(([k, v]) => [k.replace(/^p_/, "p ").replace("p luad", "p LUAD").replace("p lusc", "p LUSC"),
      patient.calls[k] && k !== "risk" ? `${hc.fmt(v)} (${patient.calls[k]})` : v]);
    for (const b of patient.by) {
      const how = b.source === "cv" ? "out of fold" : "predicted";
      prow.push([`${b.task}`, `v${b.version}, ${how}, ${b.pooling} of ${b.n_slides} slide${b.n_slides === 1 ? "" : "s"}${b.stale ? ", stale" : ""}`]);
    }
    pred.append(hc.el("h4", {text: `patient ${patient.patient_id}`, id: "patient-heading"}),
      hc.el("table", {class: "kv", id: "patient-predictions"}, ...prow.map(([k, v]) =>
        hc.el("tr", {}, hc.el("th", {text: k}), hc.el("td", {text: hc.fmt(v)})))));
  }

  // -- score layers -----------------------------------------------------------------------------------------
  const layerSelect = document.getElementById("layer");
  const scoreLayers = info.overlays.filter(o => o.legend);
  layerSelect.append(hc.el("option", {value: "", text: "none"}));
  for (const o of scoreLayers) layerSelect.append(hc.el("option", {value: o.name, text: o.label}));
  let current = "";
  async function showLayer(name) {
    if (current) removeOverlay(current);
    current = name;
    const legend = document.getElementById("legend");
    const source = document.getElementById("layer-source");
    legend.replaceChildren(); source.textContent = "";
    if (!name) return;
    const o = overlays[name];
    const bar = hc.el("div", {class: "bar"});
    bar.style.background = o.legend.gradient;
    legend.append(hc.el("div", {class: "legend-label", text: o.legend.label}), bar,
      hc.el("div", {class: "limits"}, hc.el("span", {text: hc.fmt(o.legend.low)}), hc.el("span", {text: hc.fmt(o.legend.high)})));
    source.textContent = o.source || "";
    await addOverlay(name, Number(opacity.value));
  }
  layerSelect.addEventListener("change", () => showLayer(layerSelect.value));
  opacity.addEventListener("input", () => { if (items[current]) items[current].setOpacity(Number(opacity.value)); });
  for (const [box, name] of [["show-grid", "grid"], ["show-tissue", "tissue"]]) {
    const el = document.getElementById(box);
    if (!overlays[name]) { el.disabled = true; continue; }
    el.addEventListener("change", () => el.checked ? addOverlay(name, 0.9) : removeOverlay(name));
  }

  // -- click a tile: its neighbours -----------------------------------------------------------------------------
  // the filter is structured (column, operator, value: /api/filters lists what this view allows), never SQL text
  const columnBox = document.getElementById("filter-column"), opBox = document.getElementById("filter-op");
  const valueBox = document.getElementById("filter-value"), kBox = document.getElementById("k");
  hc.json("/api/filters?" + hc.q({view})).then(allowed => {
    if (!allowed.tile) return;
    columnBox.append(...allowed.tile.columns.map(c => hc.el("option", {value: c.name, text: c.name})));
    opBox.append(...allowed.tile.operators.map(o => hc.el("option", {value: o.op, text: o.label})));
  }).catch(() => { columnBox.disabled = true; });
  function filterParams() {
    // one clause: <column>__<op>=<value> ("one of" and "none of" take comma-separated values)
    if (!columnBox.value || !opBox.value) return {};
    return {[`${columnBox.value}__${opBox.value}`]: opBox.value === "isnull" ? (valueBox.value || "true") : valueBox.value};
  }
  let marker = null, lastTile = null;
  function thumb(hit, label) {
    const href = hc.slideUrl(hit.slide_id, view, hit.x !== undefined ? {x: hit.x, y: hit.y, size: hit.size} : {});
    const img = hit.tile_id ? "/api/tile-image?" + hc.q({view, tile: hit.tile_id}) : "/api/thumbnail?" + hc.q({id: hit.slide_id});
    return hc.el("a", {href, class: "thumb-card", "data-slide": hit.slide_id},
      hc.el("img", {src: img, alt: ""}), hc.el("span", {text: hit.slide_id}), hc.el("span", {class: "muted small", text: label}));
  }
  async function neighbours(tile) {
    lastTile = tile;
    const box = document.getElementById("neighbours");
    document.getElementById("clicked").textContent = `tile at (${tile.x}, ${tile.y}) · ${tile.tile_id.slice(0, 12)}…`;
    try {
      const res = await hc.json("/api/neighbours?" + hc.q({view, tile: tile.tile_id, k: kBox.value, ...filterParams()}));
      box.replaceChildren(...res.hits.map(h => thumb(h, `#${h.rank} · d ${hc.fmt(h.distance)}`)));
      if (!res.hits.length) box.append(hc.el("p", {class: "muted", text: "no tiles match the filter"}));
    } catch (e) { box.replaceChildren(hc.el("p", {class: "error", text: e.message})); }
    state.neighbours = box.children.length;
  }
  for (const el of [columnBox, opBox, valueBox, kBox]) el.addEventListener("change", () => lastTile && neighbours(lastTile));
  viewer.addHandler("canvas-click", async ev => {
    if (!ev.quick) return;
    const p = viewer.world.getItemAt(0).viewerElementToImageCoordinates(ev.position);
    let tile;
    try { tile = await hc.json("/api/tile-at?" + hc.q({id: slideId, view, x: p.x, y: p.y})); }
    catch (e) { document.getElementById("clicked").textContent = "no tile there"; return; }
    const rect = viewer.world.getItemAt(0).imageToViewportRectangle(tile.x, tile.y, tile.size, tile.size);
    if (marker) viewer.removeOverlay(marker);
    marker = hc.el("div", {class: "tile-marker"});
    viewer.addOverlay({element: marker, location: rect});
    await neighbours(tile);
  });

  // -- similar slides ---------------------------------------------------------------------------------------------
  hc.json("/api/similar?" + hc.q({id: slideId, view, k: 5})).then(res => {
    document.getElementById("similar").replaceChildren(...res.hits.map(h => thumb(h, `#${h.rank} · d ${hc.fmt(h.distance)}`)));
  }).catch(e => { document.getElementById("similar").replaceChildren(hc.el("p", {class: "muted", text: e.message})); });

  // -- open: centre on a tile when asked (?x=&y=&size=), show the attention ------------------------------------
  viewer.addOnceHandler("open", async () => {
    const params = new URLSearchParams(window.location.search);
    if (params.has("x") && params.has("y")) {
      const size = Number(params.get("size") || info.tile_size || 256);
      const rect = viewer.world.getItemAt(0).imageToViewportRectangle(
        Number(params.get("x")) - size, Number(params.get("y")) - size, 3 * size, 3 * size);
      viewer.viewport.fitBounds(rect, true);
      marker = hc.el("div", {class: "tile-marker"});
      viewer.addOverlay({element: marker, location: viewer.world.getItemAt(0).imageToViewportRectangle(
        Number(params.get("x")), Number(params.get("y")), size, size)});
    }
    const first = overlays.attention ? "attention" : (scoreLayers[0] || {}).name || "";
    layerSelect.value = first;
    await showLayer(first);
    state.ready = true;
  });
})();
