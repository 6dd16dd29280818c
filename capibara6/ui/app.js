// capibara6's built-in page: chat playground, consensus experts side by side, model pool, live
// metrics. Plain JS, no build step, no third-party code. It talks only to the server it came from.
//
// Safety rule for the whole file: text from a model (or a user) becomes DOM nodes through
// createTextNode/textContent only. Nothing here parses a string as HTML, so markup in an answer is shown
// as the characters it is, never parsed or run.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "capibara6.apiKey"; // sessionStorage: this tab only, gone when it closes
  const POLL_MS = 1000;
  const HISTORY = 180; // points kept per chart (3 minutes at 1 s)
  const WINDOW_S = 30; // percentile window for latency charts

  // ---------------------------------------------------------------------------------------------
  // DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  function fmtBytes(n) {
    if (!n) return "0";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
  }

  // ---------------------------------------------------------------------------------------------
  // Markdown, safely: a small subset (fenced code, headings, lists, quotes, paragraphs, inline
  // code, bold, italic) rendered into DOM nodes. Links stay text: a model's URL is not clickable.

  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*\n]+?)\*\*|__([^_\n]+?)__|\*([^*\s][^*\n]*?)\*|_([^_\s][^_\n]*?)_(?![A-Za-z0-9])/g;

  function inline(text, parent) {
    let last = 0;
    INLINE.lastIndex = 0;
    for (let m = INLINE.exec(text); m; m = INLINE.exec(text)) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      if (m[2] !== undefined) parent.append(el("code", { text: m[2] }));
      else if (m[3] !== undefined || m[4] !== undefined) parent.append(el("strong", { text: m[3] ?? m[4] }));
      else parent.append(el("em", { text: m[5] ?? m[6] }));
      last = INLINE.lastIndex;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
    return parent;
  }

  function lines(texts, parent) {
    texts.forEach((t, i) => {
      if (i) parent.append(el("br"));
      inline(t, parent);
    });
    return parent;
  }

  function codeBlock(lang, body) {
    const code = el("code", { text: body });
    const copy = el("button", { type: "button", class: "copy quiet", text: "copy" });
    copy.addEventListener("click", () => {
      if (navigator.clipboard) navigator.clipboard.writeText(body).catch(() => {});
    });
    return el("div", { class: "codeblock" }, el("div", { class: "code-head" }, el("span", { text: lang || "code" }), copy), el("pre", {}, code));
  }

  function renderMarkdown(text) {
    const out = document.createDocumentFragment();
    const src = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const flush = () => {
      if (para.length) out.append(lines(para, el("p")));
      para = [];
    };
    while (i < src.length) {
      const line = src[i];
      const fence = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/.exec(line);
      if (fence) {
        flush();
        const body = [];
        i += 1;
        while (i < src.length && !src[i].trim().startsWith(fence[1])) { body.push(src[i]); i += 1; }
        i += 1; // the closing fence (or past the end while it still streams)
        out.append(codeBlock(fence[2], body.join("\n")));
        continue;
      }
      const head = /^(#{1,6})\s+(.*)$/.exec(line);
      if (head) {
        flush();
        out.append(inline(head[2], el(`h${Math.min(6, head[1].length + 2)}`)));
        i += 1;
        continue;
      }
      const item = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/.exec(line);
      if (item) {
        flush();
        const ordered = /\d/.test(item[1]);
        const list = el(ordered ? "ol" : "ul");
        while (i < src.length) {
          const m = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/.exec(src[i]);
          if (!m || /\d/.test(m[1]) !== ordered) break;
          list.append(inline(m[2], el("li")));
          i += 1;
        }
        out.append(list);
        continue;
      }
      if (/^\s*>/.test(line)) {
        flush();
        const quoted = [];
        while (i < src.length && /^\s*>/.test(src[i])) { quoted.push(src[i].replace(/^\s*>\s?/, "")); i += 1; }
        out.append(lines(quoted, el("blockquote")));
        continue;
      }
      if (!line.trim()) flush();
      else para.push(line);
      i += 1;
    }
    flush();
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // HTTP: same origin, Bearer key when the server wants one (asked for once, on the first 401)

  let apiKey = sessionStorage.getItem(KEY_STORE) || "";
  let keyPrompt = null;

  function askKey() {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      const input = $("key-input");
      input.value = apiKey;
      const done = (value) => {
        dialog.close();
        keyPrompt = null;
        resolve(value);
      };
      $("key-ok").onclick = (e) => { e.preventDefault(); done(input.value.trim()); };
      $("key-forget").onclick = (e) => { e.preventDefault(); done(""); };
      dialog.oncancel = (e) => { e.preventDefault(); done(apiKey); };
      dialog.showModal();
      input.focus();
    }).then((value) => {
      apiKey = value;
      if (value) sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
      return value;
    });
    return keyPrompt;
  }

  async function api(path, options = {}, retried = false) {
    const headers = { ...(options.headers || {}) };
    if (options.json !== undefined) headers["Content-Type"] = "application/json";
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const init = { method: options.method || (options.json !== undefined ? "POST" : "GET"), headers, signal: options.signal, cache: "no-store" };
    if (options.json !== undefined) init.body = JSON.stringify(options.json);
    const res = await fetch(path, init);
    if (res.status === 401 && !retried) {
      const key = await askKey();
      if (key) return api(path, options, true);
    }
    return res;
  }

  async function errorText(res) {
    try {
      const body = await res.json();
      return body && body.error ? `${res.status} ${body.error.code || body.error.type || ""}: ${body.error.message}` : `HTTP ${res.status}`;
    } catch (_) {
      return `HTTP ${res.status}`;
    }
  }

  // Server-sent events from a fetch body: `data:` lines, comments (`: ping`) skipped.
  async function readSSE(res, onData) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(`${obj.error.code || obj.error.type}: ${obj.error.message}`);
        onData(obj);
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Shared state: the summary (metrics + pool) is polled once a second for every view

  const state = { role: "", models: [], ensembles: [], summary: null, history: [], consensusPort: null };

  async function loadModels() {
    const res = await api("/v1/models");
    if (!res.ok) throw new Error(await errorText(res));
    const body = await res.json();
    state.models = body.data.filter((m) => !m.ensemble);
    state.ensembles = body.data.filter((m) => m.ensemble);
    fillModelSelect();
    fillEnsembleSelect();
  }

  function fillModelSelect() {
    const select = $("model");
    const current = select.value;
    select.replaceChildren();
    const models = el("optgroup", { label: "models" });
    for (const m of state.models) models.append(el("option", { value: m.id, text: `${m.id} (${m.status})` }));
    select.append(models);
    if (state.ensembles.length) {
      const ens = el("optgroup", { label: "ensembles (consensus)" });
      for (const m of state.ensembles) ens.append(el("option", { value: m.id, text: m.id }));
      select.append(ens);
    }
    if ([...select.options].some((o) => o.value === current)) select.value = current;
  }

  function fillEnsembleSelect() {
    const select = $("ensemble");
    const current = select.value;
    select.replaceChildren(...state.ensembles.map((e) => el("option", { value: e.id, text: `${e.id} (${e.ensemble.strategy})` })));
    if ([...select.options].some((o) => o.value === current)) select.value = current;
    showEnsembleHint();
  }

  function showEnsembleHint() {
    const card = state.ensembles.find((e) => e.id === $("ensemble").value);
    const experts = card && Array.isArray(card.ensemble.experts) ? card.ensemble.experts.join(", ") : card ? "chosen by task tag" : "";
    $("ensemble-hint").textContent = card ? `experts: ${experts} · strategy ${card.ensemble.strategy} · quorum ${card.ensemble.min_responses ?? 1}` : "";
  }

  // ---------------------------------------------------------------------------------------------
  // Chat playground

  const chat = { messages: [], controller: null };

  function numberField(id) {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  }

  function stopList() {
    return $("stop").value.split("\n").filter((s) => s.length).map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
  }

  function mode() {
    return document.querySelector("input[name=mode]:checked").value;
  }

  function messageNode(role, text, label) {
    const body = el("div", { class: "body md" });
    body.append(renderMarkdown(text));
    const node = el("div", { class: `msg ${role}`, dataset: { state: "done" } }, el("div", { class: "who", text: label || role }), body, el("div", { class: "stats" }));
    $("messages").append(node);
    node.scrollIntoView({ block: "end" });
    return node;
  }

  function sampling() {
    const body = { temperature: numberField("temperature"), top_p: numberField("top_p"), max_tokens: numberField("max_tokens"), seed: numberField("seed") };
    const stop = stopList();
    if (stop.length) body.stop = stop;
    for (const k of Object.keys(body)) if (body[k] === undefined || Number.isNaN(body[k])) delete body[k];
    return body;
  }

  async function send(event) {
    event.preventDefault();
    if (chat.controller) return;
    const text = $("prompt").value;
    if (!text.trim()) return;
    $("prompt").value = "";
    const model = $("model").value;
    const isChat = mode() === "chat";
    const body = { model, stream: true, stream_options: { include_usage: true }, ...sampling() };
    if (isChat) {
      chat.messages.push({ role: "user", content: text });
      messageNode("user", text);
      const system = $("system").value.trim();
      body.messages = [...(system ? [{ role: "system", content: system }] : []), ...chat.messages];
    } else {
      messageNode("user", text, "prompt");
      body.prompt = text;
      if ($("echo").checked) body.echo = true;
    }
    const node = messageNode("assistant", "", isChat ? model : `${model} (completion)`);
    const out = node.querySelector(".body");
    const stats = node.querySelector(".stats");
    node.dataset.state = "streaming";
    let answer = "";
    let finish = null;
    let usage = null;
    let consensus = null;
    let stopped = false;
    let chunks = 0;
    let tFirst = null;
    let tLast = null;
    let pending = false;
    const t0 = performance.now();
    const paint = () => {
      pending = false;
      out.replaceChildren(renderMarkdown(answer));
      node.scrollIntoView({ block: "end" });
    };
    const showStats = () => {
      const parts = [];
      if (tFirst !== null) parts.push(`TTFT ${fmtSeconds((tFirst - t0) / 1000)}`);
      const n = usage ? usage.completion_tokens : chunks;
      if (tFirst !== null && tLast > tFirst && n > 1) parts.push(`${((n - 1) / ((tLast - tFirst) / 1000)).toFixed(1)} tok/s`);
      parts.push(`${n} tokens`);
      if (finish) parts.push(`finish: ${finish}`);
      if (stopped) parts.push("stopped");
      if (consensus) parts.push(`merged by ${consensus.strategy} from ${consensus.experts.length} experts`);
      stats.textContent = parts.join(" · ");
    };
    chat.controller = new AbortController();
    $("stop-button").disabled = false;
    $("send").disabled = true;
    try {
      const res = await api(isChat ? "/v1/chat/completions" : "/v1/completions", { json: body, signal: chat.controller.signal });
      if (!res.ok) throw new Error(await errorText(res));
      await readSSE(res, (obj) => {
        if (obj.usage) usage = obj.usage;
        if (obj.consensus) consensus = obj.consensus;
        const choice = obj.choices && obj.choices[0];
        if (!choice) return;
        const piece = isChat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (choice.finish_reason) finish = choice.finish_reason;
        if (!piece) return;
        const now = performance.now();
        if (tFirst === null) tFirst = now;
        tLast = now;
        chunks += 1;
        answer += piece;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
        showStats();
      });
      node.dataset.state = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        node.dataset.state = "stopped";
        stopped = true;
      } else {
        node.dataset.state = "error";
        node.append(el("div", { class: "error", text: String(err.message || err) }));
      }
    } finally {
      chat.controller = null;
      $("stop-button").disabled = true;
      $("send").disabled = false;
      paint();
      showStats();
      if (isChat && answer) chat.messages.push({ role: "assistant", content: answer });
      setTimeout(poll, 300); // the header's running/waiting soon after the server let go, not a second later
    }
  }

  function stopChat() {
    if (chat.controller) chat.controller.abort();
  }

  function clearChat() {
    stopChat();
    chat.messages = [];
    $("messages").replaceChildren();
  }

  function showMode() {
    document.body.dataset.mode = mode();
  }

  // ---------------------------------------------------------------------------------------------
  // Consensus: one panel per expert, the merged answer below

  const cons = { controller: null, timer: null };

  function expertPanel(index, model) {
    return el("div", { class: "expert-panel", dataset: { index: String(index), status: "running" } },
      el("div", { class: "panel-head" }, el("strong", { text: model || `expert ${index + 1}` }), el("span", { class: "badge status s-running", text: "running" })),
      el("div", { class: "meta", text: "waiting…" }),
      el("div", { class: "body md" }));
  }

  function fillExperts(report) {
    const box = $("experts");
    report.experts.forEach((x, i) => {
      let panel = box.querySelector(`.expert-panel[data-index="${i}"]`);
      if (!panel) { panel = expertPanel(i, x.model); box.append(panel); }
      panel.querySelector("strong").textContent = x.model;
      panel.dataset.status = x.status;
      const badge = panel.querySelector(".status");
      badge.textContent = x.status;
      badge.className = `badge status s-${x.status}`;
      const chosen = report.chosen && report.chosen.index === i && report.chosen.expert === x.model;
      panel.classList.toggle("chosen", Boolean(chosen));
      const meta = [`${fmtSeconds(x.latency_s)}`, `${x.completion_tokens} tokens`, `${x.threads} thread${x.threads === 1 ? "" : "s"}`];
      if (x.extracted !== null && x.extracted !== undefined && x.extracted !== x.answer) meta.push(`vote key: ${String(x.extracted).slice(0, 40)}`);
      if (chosen) meta.push("chosen");
      panel.querySelector(".meta").textContent = meta.join(" · ");
      const body = panel.querySelector(".body");
      body.replaceChildren(x.answer !== null && x.answer !== undefined ? renderMarkdown(x.answer) : el("em", { text: x.error || "no answer" }));
    });
    const merged = [`strategy ${report.strategy}`];
    if (report.agreement !== null && report.agreement !== undefined) merged.push(`agreement ${(report.agreement * 100).toFixed(0)}%`);
    if (report.chosen && report.chosen.aggregator) merged.push(`written by ${report.chosen.aggregator}`);
    if (report.route) merged.push(`route ${JSON.stringify(report.route)}`);
    $("merged-meta").textContent = merged.join(" · ");
  }

  async function runConsensus(event) {
    event.preventDefault();
    if (cons.controller) return;
    const question = $("c-prompt").value;
    const name = $("ensemble").value;
    if (!question.trim() || !name) return;
    const card = state.ensembles.find((e) => e.id === name);
    const box = $("experts");
    box.replaceChildren();
    if (card && Array.isArray(card.ensemble.experts)) card.ensemble.experts.forEach((m, i) => box.append(expertPanel(i, m)));
    const t0 = performance.now();
    cons.timer = setInterval(() => {
      for (const p of box.querySelectorAll('.expert-panel[data-status="running"] .meta')) p.textContent = `running ${((performance.now() - t0) / 1000).toFixed(1)} s`;
    }, 200);
    $("merged").hidden = false;
    $("merged").dataset.state = "streaming";
    $("merged-meta").textContent = "experts running…";
    const mergedBody = $("merged-body");
    mergedBody.replaceChildren();
    let text = "";
    cons.controller = new AbortController();
    $("c-stop").disabled = false;
    $("c-run").disabled = true;
    const body = { model: name, stream: true, messages: [{ role: "user", content: question }],
      temperature: Number($("c-temperature").value), max_tokens: Number($("c-max-tokens").value) };
    try {
      const res = await api("/v1/chat/completions", { json: body, signal: cons.controller.signal });
      if (!res.ok) throw new Error(await errorText(res));
      await readSSE(res, (obj) => {
        const choice = obj.choices && obj.choices[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (piece) { text += piece; mergedBody.replaceChildren(renderMarkdown(text)); }
        if (obj.consensus) fillExperts(obj.consensus);
      });
      $("merged").dataset.state = "done";
    } catch (err) {
      $("merged").dataset.state = err.name === "AbortError" ? "stopped" : "error";
      $("merged-meta").textContent = err.name === "AbortError" ? "stopped" : String(err.message || err);
      for (const p of box.querySelectorAll('.expert-panel[data-status="running"]')) {
        p.dataset.status = "stopped";
        p.querySelector(".status").textContent = "stopped";
      }
    } finally {
      clearInterval(cons.timer);
      cons.controller = null;
      $("c-stop").disabled = true;
      $("c-run").disabled = false;
      setTimeout(poll, 300);
    }
  }

  function showConsensusPlace() {
    const here = state.role === "consensus";
    $("consensus-form").hidden = !here;
    const notice = $("consensus-elsewhere");
    notice.hidden = here;
    if (!here) {
      notice.replaceChildren();
      if (state.consensusPort) {
        const url = `${location.protocol}//${location.hostname}:${state.consensusPort}/#consensus`;
        notice.append("Consensus runs on the consensus port. Open ", el("a", { href: url, text: url }), " (the page is the same on every port).");
      } else {
        notice.append("This process serves no consensus port.");
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Pool

  async function poolAction(id, action, button) {
    button.disabled = true;
    const msg = $("pool-message");
    msg.textContent = `${action} ${id}…`;
    try {
      const res = await api(`/admin/models/${encodeURIComponent(id)}/${action}`, { method: "POST" });
      msg.textContent = res.ok ? `${id}: ${action} done` : `${id}: ${await errorText(res)}`;
      msg.className = res.ok ? "message" : "message error";
    } catch (err) {
      msg.textContent = `${id}: ${err.message || err}`;
      msg.className = "message error";
    } finally {
      button.disabled = false;
      poll();
    }
  }

  function renderPool(pool) {
    const tbody = $("pool-rows");
    const rows = new Map([...tbody.children].map((r) => [r.dataset.model, r]));
    for (const m of pool) {
      let row = rows.get(m.id);
      if (!row) {
        const load = el("button", { type: "button", class: "load", text: "Load" });
        const unload = el("button", { type: "button", class: "unload quiet", text: "Unload" });
        load.addEventListener("click", () => poolAction(m.id, "load", load));
        unload.addEventListener("click", () => poolAction(m.id, "unload", unload));
        row = el("tr", { dataset: { model: m.id } },
          el("td", { class: "id", text: m.id }), el("td", { class: "backend" }), el("td", {}, el("span", { class: "badge state" })),
          el("td", { class: "memory" }), el("td", { class: "slots" }), el("td", { class: "queue" }), el("td", { class: "idle" }),
          el("td", { class: "actions" }, load, unload));
        tbody.append(row);
      }
      rows.delete(m.id);
      row.dataset.state = m.status;
      const badge = row.querySelector(".state");
      badge.textContent = m.status;
      badge.className = `badge state s-${m.status}`;
      row.querySelector(".backend").textContent = m.backend;
      row.querySelector(".memory").textContent = fmtBytes(m.memory_bytes);
      row.querySelector(".slots").textContent = `${m.leases} / ${m.capacity || m.parallel}`;
      row.querySelector(".queue").textContent = String(m.waiting);
      row.querySelector(".idle").textContent = m.idle_s === null ? "–" : `${Math.round(m.idle_s)} s${m.idle_unload_s ? ` of ${m.idle_unload_s}` : ""}`;
      const loaded = m.status === "ready" || m.status === "busy";
      row.querySelector(".load").disabled = loaded || m.status === "loading";
      row.querySelector(".unload").disabled = !loaded;
    }
    for (const row of rows.values()) row.remove();
  }

  // ---------------------------------------------------------------------------------------------
  // Metrics: history of summaries, charts drawn on canvas

  function quantile(q, le, counts) {
    // Prometheus' histogram_quantile over cumulative buckets: linear inside the bucket.
    const total = counts.length ? counts[counts.length - 1] : 0;
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevLe = 0;
    let prevCount = 0;
    for (let i = 0; i < le.length; i += 1) {
      if (counts[i] >= rank) {
        const inBucket = counts[i] - prevCount;
        return inBucket > 0 ? prevLe + (le[i] - prevLe) * ((rank - prevCount) / inBucket) : le[i];
      }
      prevLe = le[i];
      prevCount = counts[i];
    }
    return le.length ? le[le.length - 1] : null; // above the last finite bucket
  }

  function windowed(key, now, before, q) {
    const a = now.histograms[key];
    if (!before) return null; // no window yet: the first sample holds everything since start-up
    const b = before.histograms[key];
    const counts = a.counts.map((c, i) => c - (b.counts.length === a.counts.length ? b.counts[i] : 0));
    return quantile(q, a.le, counts);
  }

  function addSample(s) {
    const h = state.history;
    const prev = h.length ? h[h.length - 1].raw : null;
    const before = [...h].reverse().find((x) => s.time - x.raw.time >= WINDOW_S)?.raw || (h.length ? h[0].raw : null);
    const dt = prev ? s.time - prev.time : 0;
    const point = {
      raw: s,
      t: s.time,
      running: s.running,
      waiting: s.waiting,
      tps: prev && dt > 0 ? Math.max(0, (s.generation_tokens - prev.generation_tokens) / dt) : null,
      ttft50: windowed("ttft", s, before, 0.5), ttft95: windowed("ttft", s, before, 0.95),
      itl50: windowed("itl", s, before, 0.5), itl95: windowed("itl", s, before, 0.95),
    };
    h.push(point);
    while (h.length > HISTORY) h.shift();
  }

  const COLORS = ["#2f7ed8", "#e4572e", "#29a36a", "#a05fd0"];

  function drawChart(canvas, series, opts = {}) {
    const ctx = canvas.getContext("2d");
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width;
    const hgt = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(hgt * ratio); }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, hgt);
    const pad = { l: 44, r: 10, t: 10, b: 20 };
    const pts = state.history;
    let max = opts.minMax || 1;
    for (const s of series) for (const p of pts) if (p[s.key] !== null && p[s.key] > max) max = p[s.key];
    max *= 1.1;
    const dark = matchMedia("(prefers-color-scheme: dark)").matches;
    ctx.strokeStyle = dark ? "#3a3f47" : "#e3e6ea";
    ctx.fillStyle = dark ? "#a0a7b0" : "#6b7280";
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (let g = 0; g <= 4; g += 1) {
      const y = pad.t + ((hgt - pad.t - pad.b) * g) / 4;
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
      const v = max * (1 - g / 4);
      ctx.fillText(opts.fmt ? opts.fmt(v) : v.toFixed(v < 10 ? 1 : 0), 4, y + 4);
    }
    ctx.fillText(`last ${Math.round((HISTORY * POLL_MS) / 60000)} min`, pad.l, hgt - 4);
    const x = (i) => pad.l + ((w - pad.l - pad.r) * (i + HISTORY - pts.length)) / (HISTORY - 1);
    const y = (v) => hgt - pad.b - ((hgt - pad.t - pad.b) * v) / max;
    series.forEach((s, si) => {
      ctx.strokeStyle = COLORS[si % COLORS.length];
      ctx.lineWidth = 2;
      ctx.beginPath();
      let pen = false;
      pts.forEach((p, i) => {
        const v = p[s.key];
        if (v === null || v === undefined) { pen = false; return; }
        if (pen) ctx.lineTo(x(i), y(v)); else ctx.moveTo(x(i), y(v));
        pen = true;
      });
      ctx.stroke();
      ctx.fillStyle = COLORS[si % COLORS.length];
      ctx.fillText(s.label, pad.l + 8 + si * 70, pad.t + 12);
    });
  }

  function renderMetrics() {
    const last = state.history[state.history.length - 1];
    if (!last) return;
    const s = last.raw;
    const allTtft = quantile(0.5, s.histograms.ttft.le, s.histograms.ttft.counts);
    const allItl = quantile(0.5, s.histograms.itl.le, s.histograms.itl.counts);
    const stat = (label, value, cls) => el("div", { class: `stat ${cls || ""}` }, el("div", { class: "value", text: value }), el("div", { class: "label", text: label }));
    $("stats").replaceChildren(
      stat("running", String(s.running), "running"),
      stat("waiting", String(s.waiting), "waiting"),
      stat("models loaded", String(s.models_loaded)),
      stat("tokens/s now", last.tps === null ? "–" : last.tps.toFixed(1)),
      stat("tokens generated", String(Math.round(s.generation_tokens))),
      stat("requests finished", String(Math.round(s.requests))),
      stat("TTFT p50 (all)", fmtSeconds(allTtft)),
      stat("ITL p50 (all)", fmtSeconds(allItl)),
    );
    if (currentView() !== "metrics") return;
    drawChart($("chart-requests"), [{ key: "running", label: "running" }, { key: "waiting", label: "waiting" }], { fmt: (v) => v.toFixed(1) });
    drawChart($("chart-tps"), [{ key: "tps", label: "tok/s" }]);
    drawChart($("chart-ttft"), [{ key: "ttft50", label: "p50" }, { key: "ttft95", label: "p95" }], { minMax: 0.1, fmt: (v) => v.toFixed(2) });
    drawChart($("chart-itl"), [{ key: "itl50", label: "p50" }, { key: "itl95", label: "p95" }], { minMax: 0.02, fmt: (v) => v.toFixed(3) });
  }

  let polling = false;
  async function poll() {
    if (polling) return;
    polling = true;
    try {
      const res = await api("/ui/api/summary");
      if (!res.ok) return;
      const s = await res.json();
      state.summary = s;
      if (s.role !== state.role || s.consensus_port !== state.consensusPort) {
        state.role = s.role;
        state.consensusPort = s.consensus_port;
        $("role-badge").textContent = `${s.role} · :${location.port || (location.protocol === "https:" ? 443 : 80)}`;
        showConsensusPlace();
      }
      const live = $("live");
      live.textContent = `${s.running} running · ${s.waiting} waiting`;
      live.dataset.running = String(s.running);
      addSample(s);
      renderPool(s.pool);
      renderMetrics();
      const statusOf = new Map(s.pool.map((m) => [m.id, m.status]));
      for (const o of $("model").options) if (statusOf.has(o.value)) o.textContent = `${o.value} (${statusOf.get(o.value)})`;
    } catch (_) {
      // the server may be restarting: the next tick tries again
    } finally {
      polling = false;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Views (the URL hash) and start-up

  function currentView() {
    const v = location.hash.replace(/^#/, "");
    return ["chat", "consensus", "pool", "metrics"].includes(v) ? v : "chat";
  }

  function showView() {
    const v = currentView();
    for (const s of document.querySelectorAll("section.view")) s.hidden = s.dataset.view !== v;
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === v);
    document.body.dataset.view = v;
    renderMetrics();
  }

  function start() {
    window.addEventListener("hashchange", showView);
    showView();
    showMode();
    $("composer").addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
    });
    $("stop-button").addEventListener("click", stopChat);
    $("clear").addEventListener("click", clearChat);
    for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", showMode);
    $("consensus-form").addEventListener("submit", runConsensus);
    $("c-stop").addEventListener("click", () => cons.controller && cons.controller.abort());
    $("ensemble").addEventListener("change", showEnsembleHint);
    $("key-form").addEventListener("submit", (e) => e.preventDefault());
    $("key-button").addEventListener("click", () => askKey().then(() => loadModels().catch(() => {})));
    $("model").addEventListener("change", () => {
      const ens = state.ensembles.find((e) => e.id === $("model").value);
      $("model-hint").textContent = ens ? `ensemble: the answer is merged by ${ens.ensemble.strategy}; the Consensus tab shows each expert.` : "";
    });
    loadModels().then(() => {
      document.body.dataset.ready = "1";
    }).catch((err) => {
      $("messages").append(el("div", { class: "error", text: `Cannot list models: ${err.message || err}` }));
    });
    poll();
    setInterval(poll, POLL_MS);
  }

  window.capibara6 = { renderMarkdown, quantile }; // for the browser tests and the console
  start();
})();
