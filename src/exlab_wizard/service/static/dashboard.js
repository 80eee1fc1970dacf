// The dashboard's live updates, hand-written, no dependencies.
//
// - /api/events (server-sent events): "progress" moves a transfer's bar, rate
//   and time left in place; "transition", "event" and "watcher" make the page
//   fetch the affected sections again as server-rendered fragments
//   (/partials/NAME) and swap them in; a transition to "verified" reloads the
//   chart (/charts/verified.svg).
// - Buttons post with the session cookie (same origin; the browser adds the
//   Origin header the server checks). No token is ever in this page.
// Data from the server reaches the page only as text (textContent) or inside
// fragments the server rendered with escaping; never through innerHTML.
"use strict";

(function () {
  const ALL = ["totals", "equipment", "running", "failed", "blocked"];
  const pending = new Set();
  let timer = null;

  // ------------------------------------------------------------------ formatting

  function bytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let size = Number(n);
    for (let i = 0; i < units.length; i++) {
      if (Math.abs(size) < 1024 || i === units.length - 1) {
        return i === 0 ? Math.floor(size) + " B" : size.toFixed(1) + " " + units[i];
      }
      size /= 1024;
    }
    return "–";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return "–";
    let s = Math.round(seconds);
    if (s < 60) return s + " s";
    let m = Math.floor(s / 60);
    s = s % 60;
    if (m < 60) return m < 10 && s ? m + " min " + s + " s" : m + " min";
    const h = Math.floor(m / 60);
    m = m % 60;
    if (h < 48) return m ? h + " h " + m + " min" : h + " h";
    return Math.floor(h / 24) + " days";
  }

  function say(text, bad) {
    const box = document.getElementById("message");
    box.textContent = text;
    box.classList.toggle("bad", Boolean(bad));
    box.hidden = false;
  }

  function setLive(state, text) {
    const el = document.getElementById("live-status");
    el.dataset.state = state;
    el.textContent = text;
  }

  // ------------------------------------------------------------------ fragments

  function busy(section) {
    // Someone typing in a form of this section: do not pull it away under them.
    const active = document.activeElement;
    if (active && section.contains(active) && active.matches("input, textarea, select")) return true;
    for (const field of section.querySelectorAll("textarea, input[type=datetime-local]")) {
      if (field.value) return true;
    }
    return false;
  }

  async function refresh(name) {
    const old = document.getElementById("part-" + name);
    if (!old) return;
    if (busy(old)) {
      old.dataset.stale = "1";
      return;
    }
    const reply = await fetch("/partials/" + encodeURIComponent(name), {cache: "no-store", credentials: "same-origin"});
    if (!reply.ok) return;
    const doc = new DOMParser().parseFromString(await reply.text(), "text/html");
    const fresh = doc.getElementById("part-" + name);
    const current = document.getElementById("part-" + name);
    if (fresh && current && !busy(current)) current.replaceWith(document.adoptNode(fresh));
  }

  function schedule(names) {
    for (const name of names) pending.add(name);
    if (timer !== null) return;
    timer = setTimeout(async function () {
      timer = null;
      const names = Array.from(pending);
      pending.clear();
      for (const name of names) {
        try {
          await refresh(name);
        } catch (err) {
          setLive("down", "Could not refresh the page's " + name + " section; retrying with the next event.");
        }
      }
    }, 200);
  }

  function reloadChart() {
    const img = document.getElementById("verified-chart");
    if (img) img.src = "/charts/verified.svg?at=" + Date.now();
  }

  // ------------------------------------------------------------------ live feed

  function onProgress(data) {
    const row = document.querySelector('#part-running tr[data-job-id="' + CSS.escape(String(data.job_id)) + '"]');
    if (!row) {
      schedule(["running"]);
      return;
    }
    const done = Number(data.bytes_done) || 0;
    const total = Number(data.bytes_total) || 0;
    const bar = row.querySelector('[data-field="bar"]');
    bar.max = total > 0 ? total : 1;
    bar.value = Math.min(done, bar.max);
    row.querySelector('[data-field="phase"]').textContent = data.phase === "verify" ? "checking" : "copying";
    row.querySelector('[data-field="bytes"]').textContent = total ? bytes(done) + " of " + bytes(total) : "starting…";
    const rate = Number(data.rate_bps);
    row.querySelector('[data-field="rate"]').textContent = rate > 0 ? bytes(rate) + "/s" : "–";
    row.querySelector('[data-field="eta"]').textContent = rate > 0 && total > done ? duration((total - done) / rate) : "–";
  }

  function parse(message) {
    try {
      return JSON.parse(message.data);
    } catch (err) {
      return {};
    }
  }

  function connect() {
    if (!window.EventSource) {
      setLive("down", "This browser cannot follow the live feed: reload to see changes.");
      return;
    }
    const source = new EventSource("/api/events");
    let opened = false;
    source.addEventListener("open", function () {
      if (opened) schedule(ALL); // back after a break: catch up with what was missed
      opened = true;
      setLive("up", "Live");
    });
    source.addEventListener("error", function () {
      setLive("down", "Live feed interrupted; reconnecting…");
    });
    source.addEventListener("progress", function (message) {
      onProgress(parse(message));
    });
    source.addEventListener("transition", function (message) {
      const data = parse(message);
      schedule(ALL);
      if (data.to_state === "verified") reloadChart();
    });
    source.addEventListener("event", function () {
      schedule(["equipment", "failed", "running"]);
    });
    source.addEventListener("watcher", function () {
      schedule(["blocked", "equipment", "totals"]);
    });
  }

  // ------------------------------------------------------------------ actions

  async function post(path, body) {
    const reply = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
    });
    let data = {};
    try {
      data = await reply.json();
    } catch (err) {
      data = {};
    }
    if (!reply.ok) {
      let text = data.detail || reply.statusText || "the server refused";
      if (reply.status === 401) text = "Not logged in (or the session ended): open a new login address from serve.";
      if (reply.status === 403) text = "Refused: this browser's session is not accepted here (" + text + ")";
      throw new Error(text);
    }
    return data;
  }

  async function retry(button) {
    const id = button.dataset.retry;
    button.disabled = true;
    try {
      const row = await post("/api/jobs/" + encodeURIComponent(id) + "/retry", {});
      say("Re-armed: " + row.run_path + " is queued again.");
    } catch (err) {
      say("Retry failed: " + err.message, true);
      button.disabled = false;
    }
    schedule(ALL);
  }

  function isoFromLocal(value) {
    if (!value) return null;
    const when = new Date(value);
    if (isNaN(when.getTime())) throw new Error("the expiry is not a date and time");
    return when.toISOString();
  }

  async function addOverride(form) {
    const runPath = form.dataset.runPath;
    const select = form.elements.namedItem("rule");
    const option = select.options[select.selectedIndex];
    const reason = form.elements.namedItem("reason").value.trim();
    if (!reason) {
      say("An override needs a reason.", true);
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const body = {
        run_path: runPath,
        rule: select.value,
        reason: reason,
        path: option ? option.dataset.path || null : null,
        expires_at: isoFromLocal(form.elements.namedItem("expires").value),
      };
      await post("/api/overrides", body);
      const handle = await post("/api/enqueue", {run_path: runPath});
      if (handle.state === "queued") {
        say("Override recorded; " + runPath + " is queued to sync.");
      } else {
        const rules = (handle.blocking_findings || []).map(function (f) { return f.rule; });
        say("Override recorded, but " + runPath + " is still blocked by: " + rules.join(", "), true);
      }
      form.reset();
      if (document.activeElement) document.activeElement.blur();
    } catch (err) {
      say("Override not recorded: " + err.message, true);
    } finally {
      button.disabled = false;
    }
    schedule(ALL);
  }

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-retry]");
    if (button && !button.disabled) retry(button);
  });

  document.addEventListener("submit", function (event) {
    const form = event.target.closest("form[data-override]");
    if (!form) return;
    event.preventDefault();
    addOverride(form);
  });

  document.addEventListener("focusout", function () {
    // A section left stale while someone typed in it is refreshed once they are done.
    setTimeout(function () {
      const stale = Array.from(document.querySelectorAll("[data-stale]")).map(function (el) {
        return el.id.replace(/^part-/, "");
      });
      if (stale.length) schedule(stale);
    }, 0);
  });

  // Facts without events (NAS reachability, the bandwidth window) are refreshed now and then.
  setInterval(function () { schedule(["equipment", "totals"]); }, 30000);

  connect();
})();
