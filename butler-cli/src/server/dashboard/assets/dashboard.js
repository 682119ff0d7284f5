// Butler dashboard: shows times in the reader's zone, and keeps the live parts of the pages
// current through the JSON API (/api/...), polling only while the tab is visible.
(function () {
  "use strict";

  document.documentElement.classList.add("js");

  var FINISHED = { completed: true, error: true, cancelled: true };

  function $(selector, root) { return (root || document).querySelector(selector); }
  function $all(selector, root) { return Array.prototype.slice.call((root || document).querySelectorAll(selector)); }
  function pad(n, width) { return String(n).padStart(width || 2, "0"); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      if (attrs[name] !== null && attrs[name] !== undefined) node.setAttribute(name, attrs[name]);
    });
    (children || []).forEach(function (child) {
      node.append(child instanceof Node ? child : String(child));
    });
    return node;
  }

  // --- Times and durations, as the server writes them -------------------------------------

  function localText(date, precise) {
    var text = date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
      " " + pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
    return precise ? text + "." + pad(date.getMilliseconds(), 3) : text;
  }

  function localizeTimes(root) {
    $all("time[datetime]", root).forEach(function (node) {
      if (node.dataset.local) return;
      var date = new Date(node.getAttribute("datetime"));
      if (isNaN(date.getTime())) return;
      node.textContent = localText(date, /\.\d{3}$/.test(node.textContent.trim()));
      node.dataset.local = "1";
    });
  }

  function duration(ms) {
    var seconds = Math.max(0, ms) / 1000;
    if (seconds < 60) return seconds.toFixed(1) + "s";
    var whole = Math.floor(seconds);
    if (whole < 3600) return Math.floor(whole / 60) + "m" + pad(whole % 60) + "s";
    return Math.floor(whole / 3600) + "h" + pad(Math.floor((whole % 3600) / 60)) + "m";
  }

  function timeCell(iso) {
    if (!iso) return el("span", { "class": "none" }, ["—"]);
    var date = new Date(iso);
    return el("time", { datetime: iso, "data-local": "1", title: date.toISOString() }, [localText(date)]);
  }

  function badge(state, title) {
    return el("span", { "class": "badge s-" + state, title: title || null }, [state.replace(/_/g, " ")]);
  }

  // --- Polling that pauses while the tab is hidden ------------------------------------------

  function setLive(state) {
    $all("[data-live-indicator]").forEach(function (node) {
      node.classList.toggle("paused", state === "paused");
      node.classList.toggle("failing", state === "failing");
      node.textContent = state === "paused" ? "paused" : state === "failing" ? "reconnecting" : "live";
    });
  }

  // Calls `step` every `interval` ms while the page is visible, until it returns false.
  function poll(step, interval) {
    var timer = null, busy = false, stopped = false;
    function schedule() {
      if (!stopped && !timer && !busy) timer = setTimeout(tick, interval);
    }
    function tick() {
      timer = null;
      if (stopped || busy) return;
      if (document.hidden) { setLive("paused"); return; }
      busy = true;
      Promise.resolve().then(step).then(function (again) {
        setLive("live");
        if (again === false) stopped = true;
      }, function (error) {
        setLive("failing");
        if (window.console) console.warn("butler dashboard:", error);
      }).then(function () { busy = false; schedule(); });
    }
    document.addEventListener("visibilitychange", function () {
      if (document.hidden) { setLive("paused"); return; }
      if (stopped || busy) return;
      if (timer) { clearTimeout(timer); timer = null; }
      tick();
    });
    schedule();
    return { stop: function () { stopped = true; if (timer) clearTimeout(timer); } };
  }

  function toLogin() {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401) { toLogin(); throw new Error("logged out"); }
        if (!response.ok) throw new Error(url + " answered " + response.status);
        return response.json();
      });
  }

  function getPage(url) {
    return fetch(url, { credentials: "same-origin" }).then(function (response) {
      if (response.redirected && new URL(response.url).pathname === "/login") {
        toLogin();
        throw new Error("logged out");
      }
      if (!response.ok) throw new Error(url + " answered " + response.status);
      return response.text();
    }).then(function (html) {
      return new DOMParser().parseFromString(html, "text/html");
    });
  }

  // Replaces each element of `ids` with the same element of a fresh copy of this page.
  function refreshFrom(doc, ids) {
    ids.forEach(function (id) {
      var old = document.getElementById(id), fresh = doc.getElementById(id);
      if (old && fresh) {
        old.replaceWith(fresh);
        localizeTimes(fresh);
      }
    });
  }

  // --- The runs page --------------------------------------------------------------------------

  function runsPage(section) {
    var live = JSON.parse(section.dataset.liveRuns);
    var filters = new URLSearchParams();
    if (live.workflow !== null) filters.set("workflow", live.workflow);
    if (live.analysis !== null) filters.set("analysis", live.analysis);
    var countsUrl = "/api/runs/counts?" + filters;
    var query = new URLSearchParams(filters);
    if (live.status) query.set("status", live.status);
    if (live.after !== null) query.set("after", live.after);
    query.set("limit", live.limit);
    var runsUrl = "/api/runs?" + query;

    function updateCounts(counts) {
      $all(".chip[data-status]").forEach(function (chip) {
        var status = chip.dataset.status;
        var count = status === "all" ? counts.total : (counts[status] || 0);
        chip.querySelector(".chip-count").textContent = count;
        if (status !== "all") chip.classList.toggle("zero", !count);
      });
    }

    function row(run) {
      var workflow = live.workflows[run.workflow_id] || "workflow " + run.workflow_id;
      var analysis = live.analyses[run.analysis_id] || "analysis " + run.analysis_id;
      var source = run.source_file ? run.source_file.split("/").pop() : null;
      var started = run.started_at ? Date.parse(run.started_at) : null;
      var ended = run.ended_at ? Date.parse(run.ended_at) : Date.now();
      return el("tr", { "data-run": run.id }, [
        el("td", { "class": "num" }, [el("a", { "class": "run-link", href: "/runs/" + run.id }, [run.id])]),
        el("td", {}, [el("a", { "class": "subtle", href: "/?workflow=" + run.workflow_id }, [workflow])]),
        el("td", {}, [el("a", { "class": "subtle", href: "/?analysis=" + run.analysis_id }, [analysis])]),
        el("td", {}, [badge(run.status, run.error)]),
        el("td", { "class": "source", title: run.source_file || null }, [source || "—"]),
        el("td", {}, [timeCell(run.created_at)]),
        el("td", {}, [timeCell(run.started_at)]),
        el("td", { "class": "num" }, [started === null ? "—" : duration(ended - started)])
      ]);
    }

    function updateRows(page) {
      var body = section.querySelector("tbody");
      var rows = page.runs.map(row);
      if (!rows.length) {
        var empty = body.querySelector("tr.empty");
        if (empty) return;
        rows = [el("tr", { "class": "empty" }, [el("td", { colspan: 8 }, ["No runs match these filters."])])];
      }
      body.replaceChildren.apply(body, rows);
    }

    poll(function () {
      var counts = getJSON(countsUrl).then(updateCounts);
      var rows = live.rows ? getJSON(runsUrl).then(updateRows) : null;
      return Promise.all([counts, rows]);
    }, 4000);
  }

  // --- The run page ---------------------------------------------------------------------------

  function nodeDetail(task) {
    var state = task.state.replace(/_/g, " ");
    return task.try_number > 1 ? state + " · try " + task.try_number : state;
  }

  // Works for HTML and SVG elements alike (an SVG element's className is not a string).
  function setStateClass(node, state) {
    var classes = (node.getAttribute("class") || "").replace(/(^|\s)s-[\w-]+/g, "");
    node.setAttribute("class", (classes + " s-" + state).trim());
  }

  // Colours the graph and the status badge from the API's answer, without a reload.
  function applyStates(data) {
    var status = $("#run-status .badge");
    if (status && status.textContent !== data.run.status) {
      setStateClass(status, data.run.status);
      status.textContent = data.run.status;
    }
    data.tasks.forEach(function (task) {
      var node = $('.dag .node[data-task="' + CSS.escape(task.task_id) + '"]');
      if (!node || node.dataset.state === task.state) return;
      setStateClass(node, task.state);
      node.dataset.state = task.state;
      var detail = node.querySelector(".detail");
      if (detail) detail.textContent = nodeDetail(task);
    });
  }

  function pageStates() {
    var status = $("#run-status .badge");
    var nodes = $all(".dag .node[data-task]").map(function (node) {
      return node.dataset.task + ":" + node.dataset.state;
    });
    return (status ? status.textContent : "") + "|" + nodes.sort().join(",");
  }

  function apiStates(data) {
    var tasks = data.tasks.map(function (task) { return task.task_id + ":" + task.state; });
    return data.run.status + "|" + tasks.sort().join(",");
  }

  var SECTIONS = ["run-head", "graph", "timeline", "tasks", "log-attempts", "events"];

  function runPage(root) {
    var id = root.dataset.runId;
    var lastRefresh = Date.now();
    if (root.dataset.finished !== "true") {
      poll(function () {
        return getJSON("/api/runs/" + id).then(function (data) {
          var changed = apiStates(data) !== pageStates();
          var finished = FINISHED[data.run.status] === true;
          applyStates(data);
          var due = changed || finished || Date.now() - lastRefresh > 10000;
          var refresh = due ? getPage(location.href).then(function (doc) {
            refreshFrom(doc, SECTIONS);
            lastRefresh = Date.now();
          }) : Promise.resolve();
          return refresh.then(function () { return !finished; });
        });
      }, 2000);
    }
    followLog();
  }

  // Follows the shown attempt's log through the API until the attempt has finished.
  var follower = null;
  function followLog() {
    if (follower) { follower.stop(); follower = null; }
    var pre = $("#log"), live = $("#log-live");
    if (!pre || pre.dataset.done === "true") { if (live) live.hidden = true; return; }
    if (live) live.hidden = false;
    pre.scrollTop = pre.scrollHeight;
    var offset = Number(pre.dataset.offset || 0);
    var decoder = new TextDecoder();
    var mine = poll(function () {
      return fetch(pre.dataset.api + "&offset=" + offset, { credentials: "same-origin" })
        .then(function (response) {
          if (response.status === 404) return true; // not written yet
          if (response.status === 401) { toLogin(); return false; }
          if (!response.ok) throw new Error("the log answered " + response.status);
          return response.arrayBuffer().then(function (bytes) {
            if (follower !== mine) return false;
            var done = response.headers.get("X-Butler-Log-Done") === "true";
            if (bytes.byteLength) {
              var atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 30;
              pre.append(decoder.decode(bytes, { stream: !done }));
              offset += bytes.byteLength;
              pre.dataset.offset = offset;
              if (atEnd) pre.scrollTop = pre.scrollHeight;
            }
            if (done) {
              pre.dataset.done = "true";
              if (live) live.hidden = true;
              return false;
            }
            return true;
          });
        });
    }, 1000);
    follower = mine;
  }

  // Shows another attempt's log without leaving the page.
  function showLog(href) {
    return getPage(href).then(function (doc) {
      refreshFrom(doc, ["logs"]);
      history.replaceState(null, "", href);
      followLog();
      var logs = $("#logs");
      if (logs) logs.scrollIntoView({ behavior: "smooth", block: "start" });
    });
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a[data-log-link]");
    if (!link || !$("#logs") || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
    var href = new URL(link.getAttribute("href"), location.href).href;
    event.preventDefault();
    showLog(href).catch(function () { location.href = href; });
  });

  // Reset and cancel buttons post to the API, then show the run as it now is.
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    var problem = $(".action-problem");
    button.disabled = true;
    fetch(button.dataset.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: button.dataset.body || "{}"
    }).then(function (response) {
      if (response.ok) { location.reload(); return; }
      return response.json().catch(function () { return {}; }).then(function (body) {
        throw new Error(body.message || "the server answered " + response.status);
      });
    }).catch(function (error) {
      button.disabled = false;
      if (problem) { problem.textContent = error.message; problem.hidden = false; }
    });
  });

  // --- Other pages ----------------------------------------------------------------------------

  // Filters apply as soon as one is chosen; empty ones stay out of the address.
  $all("form[data-autosubmit]").forEach(function (form) {
    form.addEventListener("change", function () { form.requestSubmit(); });
    form.addEventListener("submit", function () {
      $all("select, input", form).forEach(function (field) {
        if (!field.value) field.disabled = true;
      });
    });
  });

  // A page section redrawn from a fresh copy of the page every few seconds (workers).
  function liveSection(section) {
    var id = section.id;
    poll(function () {
      return getPage(location.href).then(function (doc) { refreshFrom(doc, [id]); });
    }, 5000);
  }

  localizeTimes(document);
  var runs = $("[data-live-runs]");
  if (runs) runsPage(runs);
  var run = $("#run[data-run-id]");
  if (run) runPage(run);
  $all("[data-live-html][id]").forEach(liveSection);
})();
