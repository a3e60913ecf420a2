/*
 * Resumable chunked uploads for the upload page (templates/uploads/index.html).
 *
 * Each chosen file gets an `Uploader` that creates (or, after a reload,
 * re-finds) its upload on the server with POST /api/uploads/ and then PUTs
 * the file chunk by chunk with a Content-Range header. The server's `offset`
 * is the single source of truth: whenever we are unsure what it stored (a
 * pause, a lost response, a 409) we ask it rather than guess, so a chunk is
 * never skipped and a resend is always safe.
 *
 * An `UploadQueue` runs at most MAX_PARALLEL uploaders at once. When the
 * browser goes offline it gives up the requests in flight (they could only
 * hang) and the uploads wait for the `online` event, keeping their slots.
 * `RecentUploads` renders the "Recent uploads" table from the list endpoint,
 * with a hint on how to resume each partial upload.
 *
 * Without JavaScript none of this runs: the page shows a plain multipart
 * form instead (see the <noscript> parts of the template).
 *
 * Plain ES2020, no dependencies, no build step. File names and every other
 * server-provided string are written with textContent (or as attribute
 * values), never parsed as HTML.
 */
"use strict";

(() => {
  // ------------------------------------------------------------ constants

  // More parallel uploads rarely add throughput (they share one link) but
  // do make each file finish later; three keeps small files flowing past a
  // big one without hogging the connection.
  const MAX_PARALLEL = 3;
  const MAX_RETRIES = 10;
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  // navigator.onLine can be wrong (VPNs, some VMs), so while "offline" we
  // still try again now and then instead of trusting it forever.
  const OFFLINE_RECHECK_MS = 30000;
  const SPEED_WINDOW_MS = 5000;
  // A burst of events (several files completing) should cost one list GET.
  const RECENT_REFRESH_DELAY_MS = 300;
  const NOTICE_TIMEOUT_MS = 10000;
  // Consecutive 409s without progress mean client and server disagree about
  // something we cannot fix by adopting offsets; stop instead of looping.
  const MAX_CONFLICTS = 5;
  const DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024;

  // States in which a row holds (or waits for) an upload slot and in which
  // leaving the page would lose work. An "offline" row keeps its slot: it
  // goes on by itself when the network returns.
  const ACTIVE_STATES = new Set(["queued", "uploading", "retrying", "offline"]);
  const RUNNING_STATES = new Set(["uploading", "retrying", "offline"]);
  // Used as CSS class suffixes, so only known values are accepted.
  const SERVER_STATUSES = new Set(["partial", "complete", "failed", "expired"]);

  const STATE_LABELS = {
    queued: "Waiting…",
    uploading: "Uploading…",
    paused: "Paused",
    retrying: "Retrying…",
    offline: "Offline – waiting for the network…",
    complete: "Complete",
    error: "Failed",
  };

  // Shown when an error response carries no usable `detail` (for example an
  // HTML error page from a proxy in front of Django).
  const HTTP_MESSAGES = {
    400: "The server rejected the request.",
    401: "You are not logged in any more. Reload the page to log in again.",
    403: "You are not allowed to do this.",
    404: "This upload no longer exists on the server.",
    409: "The server expected a different part of the file.",
    410: "This upload has expired on the server.",
    413: "The file is too large for the server.",
    415: "The server did not accept the data format.",
    423: "The upload is busy on the server.",
    429: "Too many requests.",
  };

  // ------------------------------------------------------------ helpers

  const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  /** 1536 -> "1.5 KiB": binary units, as the chunk and size limits are. */
  function formatBytes(bytes) {
    if (!Number.isFinite(bytes) || bytes < 0) return "–";
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    // Bytes are whole; past 100 a decimal is noise.
    const digits = unit === 0 || value >= 100 ? 0 : 1;
    return `${value.toFixed(digits)} ${BYTE_UNITS[unit]}`;
  }

  /**
   * 95 -> "2 min left". Rounded up: a countdown that says "1 min" for the
   * last 59 seconds reads better than one that says "0 min". Empty when the
   * time is unknown, so the caller can hide it.
   */
  function formatEta(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "";
    if (seconds < 60) return `${Math.max(1, Math.ceil(seconds))} s left`;
    const minutes = Math.ceil(seconds / 60);
    if (minutes < 60) return `${minutes} min left`;
    const hours = Math.floor(minutes / 60);
    const rest = minutes % 60;
    return rest ? `${hours} h ${rest} min left` : `${hours} h left`;
  }

  const dateFormat = new Intl.DateTimeFormat(undefined, {
    dateStyle: "medium",
    timeStyle: "short",
  });

  function formatDate(iso) {
    const date = iso ? new Date(iso) : null;
    return date && !Number.isNaN(date.getTime()) ? dateFormat.format(date) : "–";
  }

  /** Whole percent, rounded down so "100%" only ever means "all bytes". */
  function percent(offset, size) {
    if (!(size > 0)) return 100;
    return Math.min(100, Math.floor((offset / size) * 100));
  }

  function abortError(signal) {
    return signal && signal.reason !== undefined
      ? signal.reason
      : new DOMException("The operation was aborted.", "AbortError");
  }

  /** Throw if `signal` was aborted (AbortSignal.throwIfAborted, older-browser safe). */
  function checkAborted(signal) {
    if (signal && signal.aborted) throw abortError(signal);
  }

  /**
   * Await `promise`, then bail out if the run was aborted meanwhile. JS only
   * switches tasks at an await, so checking right after each one guarantees
   * a paused or cancelled run never touches the row again, even when its
   * request had already succeeded.
   */
  async function guarded(signal, promise) {
    const value = await promise;
    checkAborted(signal);
    return value;
  }

  /**
   * One try of an operation within a run. It ends with the run (pause,
   * cancel) or on its own when the network goes away, in which case the run
   * goes on and tries again. (AbortSignal.any would link the two signals,
   * but only browsers from 2024 on have it.)
   */
  class Attempt {
    constructor(runSignal) {
      this.runSignal = runSignal;
      this.controller = new AbortController();
      this.signal = this.controller.signal;
      this.forward = () => this.controller.abort(runSignal.reason);
      if (runSignal.aborted) this.forward();
      else runSignal.addEventListener("abort", this.forward, { once: true });
    }

    /** Cut this try short (its request cannot succeed); the run retries. */
    interrupt() {
      this.controller.abort(new DOMException("The network went away.", "AbortError"));
    }

    /** True when this try, not the whole run, was aborted. */
    get interrupted() {
      return this.signal.aborted && !this.runSignal.aborted;
    }

    /** Call when the try is over, so a long run does not pile up listeners. */
    release() {
      this.runSignal.removeEventListener("abort", this.forward);
    }
  }

  /** setTimeout as a promise that rejects as soon as `signal` aborts. */
  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      if (signal && signal.aborted) {
        reject(abortError(signal));
        return;
      }
      const onAbort = () => {
        clearTimeout(timer);
        reject(abortError(signal));
      };
      const timer = setTimeout(() => {
        if (signal) signal.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      if (signal) signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Resolve on the next `online` event, or after `maxMs` at the latest. */
  function waitForOnline(signal, maxMs) {
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        window.removeEventListener("online", onOnline);
        if (signal) signal.removeEventListener("abort", onAbort);
      };
      const onOnline = () => {
        cleanup();
        resolve();
      };
      const onAbort = () => {
        cleanup();
        reject(abortError(signal));
      };
      const timer = setTimeout(onOnline, maxMs);
      window.addEventListener("online", onOnline);
      if (signal) {
        if (signal.aborted) onAbort();
        else signal.addEventListener("abort", onAbort, { once: true });
      }
    });
  }

  /**
   * Exponential backoff: 1s, 2s, 4s … capped at 30s. Up to 20% is shaved
   * off at random so parallel uploads that failed together (server restart)
   * do not all come back in the same instant.
   */
  function backoffDelay(failures) {
    const full = Math.min(BACKOFF_BASE_MS * 2 ** (failures - 1), BACKOFF_MAX_MS);
    return Math.round(full * (1 - Math.random() * 0.2));
  }

  /**
   * Backoff, but never sooner than the server's Retry-After (seconds form):
   * it is a lower bound, and a fixed "1" must not defeat the backoff.
   */
  function retryDelay(error, failures) {
    const backoff = backoffDelay(failures);
    if (error instanceof ApiError && error.retryAfter !== null) {
      return Math.max(backoff, Math.min(error.retryAfter * 1000, BACKOFF_MAX_MS));
    }
    return backoff;
  }

  function readCookie(name) {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === name) return decodeURIComponent(rest.join("="));
    }
    return null;
  }

  /**
   * Django's CSRF token. The cookie is the normal source; the hidden input of
   * the logout form is a fallback for sites that set CSRF_COOKIE_HTTPONLY or
   * CSRF_USE_SESSIONS, where JS cannot read the cookie.
   */
  function csrfToken() {
    const cookie = readCookie("csrftoken");
    if (cookie) return cookie;
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  /** Only http(s) links from the API become hrefs (no javascript: URLs). */
  function safeHref(url) {
    if (typeof url !== "string" || url === "") return null;
    try {
      const parsed = new URL(url, window.location.href);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  function readConfig() {
    const element = document.getElementById("uploads-config");
    let raw = {};
    if (element) {
      try {
        raw = JSON.parse(element.textContent) || {};
      } catch (_) {
        raw = {};
      }
    }
    const positive = (value, fallback) =>
      Number.isSafeInteger(value) && value > 0 ? value : fallback;
    return {
      chunkSize: positive(raw.chunkSize, DEFAULT_CHUNK_SIZE),
      maxSize: positive(raw.maxSize, Infinity),
      apiUrl: typeof raw.apiUrl === "string" && raw.apiUrl ? raw.apiUrl : "/api/uploads/",
    };
  }

  // ------------------------------------------------------------ errors

  /** An HTTP error response from the API. */
  class ApiError extends Error {
    constructor(status, message, data, retryAfter) {
      super(message);
      this.name = "ApiError";
      this.status = status;
      this.data = data;
      this.retryAfter = retryAfter;
    }
  }

  /** A problem found on the client (too large, server says "expired", …). */
  class UploadError extends Error {
    constructor(message, { resumable = false } = {}) {
      super(message);
      this.name = "UploadError";
      this.resumable = resumable;
    }
  }

  /** Retries ran out; the user may still try again with Resume. */
  class RetriesExhaustedError extends Error {
    constructor(cause) {
      const reason = errorMessage(cause);
      super(`${reason}${/[.!?]$/.test(reason) ? "" : "."} Gave up after ${MAX_RETRIES} retries.`);
      this.name = "RetriesExhaustedError";
      this.cause = cause;
    }
  }

  /**
   * How to react to an error:
   *   "aborted"   – paused or cancelled by the user, not an error at all;
   *   "busy"      – 423, someone else holds the upload, wait and retry;
   *   "transient" – 5xx, 408 or a garbled response, back off and retry;
   *   "network"   – fetch itself failed (offline, DNS, reset…), back off;
   *   "final"     – retrying cannot help, show the message.
   */
  function classify(error) {
    if (error && error.name === "AbortError") return "aborted";
    if (error instanceof ApiError) {
      if (error.status === 423) return "busy";
      if (error.status >= 500 || error.status === 408) return "transient";
      // 400, 401, 403, 404, 410, 413, 415 and every other 4xx, 429 included:
      // this API sends it for "too many unfinished uploads", which waiting
      // alone won't fix.
      return "final";
    }
    if (error instanceof UploadError || error instanceof RetriesExhaustedError) return "final";
    if (isNetworkError(error)) return "network";
    return "transient";
  }

  /** fetch rejects with a TypeError when the request never got an answer. */
  function isNetworkError(error) {
    // By name too: an error from another realm (iframe, test harness) fails instanceof.
    return error instanceof TypeError || Boolean(error && error.name === "TypeError");
  }

  function errorMessage(error) {
    if (error instanceof ApiError || error instanceof UploadError) return error.message;
    if (error instanceof RetriesExhaustedError) return error.message;
    if (isNetworkError(error)) return "Network error.";
    return (error && error.message) || "Unexpected error.";
  }

  /** Short reason shown before "retrying in Ns". */
  function retryReason(error) {
    if (error instanceof ApiError) {
      if (error.status === 423) return "Upload busy on the server";
      return `Server error (${error.status})`;
    }
    if (isNetworkError(error)) return "Network error";
    return "Unexpected response";
  }

  /**
   * The human-readable message of an error body: DRF's {"detail": "..."} or,
   * for validation errors, {"field": ["message", ...]}.
   */
  function detailFrom(data, status) {
    if (data && typeof data === "object") {
      if (typeof data.detail === "string" && data.detail) return data.detail;
      const messages = [];
      for (const [field, value] of Object.entries(data)) {
        for (const message of Array.isArray(value) ? value : [value]) {
          if (typeof message !== "string") continue;
          messages.push(field === "non_field_errors" ? message : `${field}: ${message}`);
        }
      }
      if (messages.length) return messages.join(" ");
    }
    return HTTP_MESSAGES[status] || `The server answered with HTTP ${status}.`;
  }

  // ------------------------------------------------------------ API client

  const api = {
    /**
     * fetch() with the session cookie, the CSRF header on unsafe methods and
     * JSON in/out. Resolves with the parsed body (null for 204 / non-JSON);
     * rejects with ApiError for HTTP errors, TypeError for network errors and
     * AbortError when `signal` aborts.
     */
    async request(method, url, { json, body, headers = {}, signal } = {}) {
      const init = {
        method,
        credentials: "same-origin",
        // Offsets change with every PUT: a cached GET would resume from a
        // stale position (it would only cost a 409, but why pay for it).
        cache: "no-store",
        headers: { Accept: "application/json", ...headers },
        signal,
      };
      if (json !== undefined) {
        init.body = JSON.stringify(json);
        init.headers["Content-Type"] = "application/json";
      } else if (body !== undefined) {
        init.body = body;
      }
      if (method !== "GET" && method !== "HEAD") {
        init.headers["X-CSRFToken"] = csrfToken();
      }

      const response = await fetch(url, init);
      const data = await readJson(response);
      if (!response.ok) {
        const retryAfter = Number.parseInt(response.headers.get("Retry-After") || "", 10);
        throw new ApiError(
          response.status,
          detailFrom(data, response.status),
          data,
          Number.isFinite(retryAfter) && retryAfter >= 0 ? retryAfter : null,
        );
      }
      return data;
    },

    createUpload(file, signal) {
      return api.request("POST", config.apiUrl, {
        json: { filename: file.name, size: file.size },
        signal,
      });
    },

    getUpload(url, signal) {
      return api.request("GET", url, { signal });
    },

    putChunk(url, blob, start, end, size, signal) {
      return api.request("PUT", url, {
        body: blob,
        headers: {
          "Content-Type": "application/octet-stream",
          // END is inclusive, SIZE is the size declared at creation.
          "Content-Range": `bytes ${start}-${end}/${size}`,
        },
        signal,
      });
    },

    deleteUpload(url, signal) {
      return api.request("DELETE", url, { signal });
    },

    listUploads(page, signal) {
      const url = new URL(config.apiUrl, window.location.href);
      url.searchParams.set("page", String(page));
      return api.request("GET", url.href, { signal });
    },
  };

  async function readJson(response) {
    if (response.status === 204) return null;
    const type = response.headers.get("Content-Type") || "";
    if (!type.includes("json")) {
      // Drain the body so the connection can be reused.
      await response.text();
      return null;
    }
    try {
      return await response.json();
    } catch (error) {
      // A broken JSON body is a server problem; a network failure while
      // reading it (TypeError) or an abort must keep their own meaning.
      if (error instanceof SyntaxError) return null;
      throw error;
    }
  }

  /** Reject responses that are not an upload object (e.g. a proxy's page). */
  function checkUpload(data) {
    const ok =
      data &&
      typeof data === "object" &&
      typeof data.url === "string" &&
      typeof data.status === "string" &&
      Number.isSafeInteger(data.offset);
    if (!ok) throw new Error("The server sent an unexpected response.");
    return data;
  }

  // ------------------------------------------------------------ speed meter

  /**
   * Average throughput over the last few seconds. Fed with the bytes the
   * server confirmed, so offsets adopted from the server (resume, 409) do not
   * count as speed.
   */
  class SpeedMeter {
    constructor(windowMs) {
      this.windowMs = windowMs;
      this.reset();
    }

    reset() {
      this.samples = [];
      this.total = 0;
    }

    /** Call when a request starts: the first sample anchors the time base. */
    start() {
      if (this.samples.length === 0) this.samples.push({ time: performance.now(), bytes: 0 });
    }

    add(bytes) {
      const now = performance.now();
      this.total += bytes;
      this.samples.push({ time: now, bytes: this.total });
      // Keep one sample older than the window so a chunk slower than the
      // window still yields a rate.
      while (this.samples.length > 2 && this.samples[1].time <= now - this.windowMs) {
        this.samples.shift();
      }
    }

    /** Bytes per second, or null until there is something to measure. */
    rate() {
      if (this.samples.length < 2) return null;
      const first = this.samples[0];
      const last = this.samples[this.samples.length - 1];
      const seconds = (last.time - first.time) / 1000;
      return seconds > 0 ? (last.bytes - first.bytes) / seconds : null;
    }
  }

  // ------------------------------------------------------------ one file

  let rowCounter = 0;

  /** Same key as the server uses to find a partial upload to resume. */
  function uploadKey(name, size) {
    return `${name}\u0000${size}`;
  }

  function fileKey(file) {
    return uploadKey(file.name, file.size);
  }

  class Uploader {
    constructor(file, queue) {
      this.file = file;
      this.key = fileKey(file);
      this.queue = queue;
      this.upload = null; // last upload object the server sent
      this.offset = 0; // bytes the server has confirmed
      this.state = "queued";
      this.controller = null; // aborts the current run (pause / cancel)
      this.attempt = null; // the try in flight, cut short when the network goes away
      this.needsSync = false; // GET the offset before the next PUT
      this.resumable = true; // false after an error retrying cannot fix
      this.conflicts = 0; // consecutive 409s
      this.checkedAtEnd = false; // re-read the offset once when it reaches the end
      this.speed = new SpeedMeter(SPEED_WINDOW_MS);
      this.row = this.buildRow();
      this.setState("queued");
      this.render();
    }

    // ---- DOM

    buildRow() {
      const template = document.getElementById("upload-row-template");
      const row = template.content.firstElementChild.cloneNode(true);
      const name = this.file.name;
      const id = `upload-${++rowCounter}`;
      const part = (role) => row.querySelector(`[data-role="${role}"]`);

      row.dataset.filename = name;
      this.nameEl = part("name");
      this.stateEl = part("state");
      this.progressEl = part("progress");
      this.bytesEl = part("bytes");
      this.speedEl = part("speed");
      this.etaEl = part("eta");
      this.errorEl = part("error");
      this.downloadEl = part("download");
      this.buttons = {
        pause: row.querySelector('[data-action="pause"]'),
        resume: row.querySelector('[data-action="resume"]'),
        cancel: row.querySelector('[data-action="cancel"]'),
      };

      this.nameEl.textContent = name;
      this.nameEl.title = name; // long names are ellipsised by the CSS
      this.nameEl.id = `${id}-name`;
      this.progressEl.setAttribute("aria-labelledby", this.nameEl.id);
      // Buttons repeat the file name so a screen-reader user tabbing through
      // several rows knows which "Pause" they are on.
      this.buttons.pause.setAttribute("aria-label", `Pause ${name}`);
      this.buttons.resume.setAttribute("aria-label", `Resume ${name}`);
      this.buttons.cancel.setAttribute("aria-label", `Cancel ${name}`);
      this.downloadEl.setAttribute("aria-label", `Download ${name}`);

      row.addEventListener("click", (event) => {
        const button = event.target.closest("button[data-action]");
        if (!button || !row.contains(button)) return;
        const action = button.dataset.action;
        if (action === "pause") this.pause();
        else if (action === "resume") this.resume();
        else if (action === "cancel") this.cancel();
      });
      return row;
    }

    setState(state, text) {
      this.state = state;
      this.row.dataset.state = state;
      this.stateEl.textContent = text || STATE_LABELS[state];
      this.updateButtons();
      this.renderRate();
    }

    updateButtons() {
      const focused = this.row.contains(document.activeElement) ? document.activeElement : null;
      const canResume = this.state === "paused" || (this.state === "error" && this.resumable);
      this.buttons.pause.hidden = !ACTIVE_STATES.has(this.state);
      this.buttons.resume.hidden = !canResume;
      this.buttons.resume.textContent = this.state === "error" ? "Retry" : "Resume";
      this.buttons.cancel.hidden = this.state === "complete";
      // Pause and Resume swap places, and Download replaces both at the end:
      // keep keyboard focus in the row instead of dropping it on <body> when
      // the focused button disappears.
      if (focused && focused.hidden) {
        const next = [...Object.values(this.buttons), this.downloadEl].find((control) => !control.hidden);
        if (next) next.focus();
      }
    }

    render() {
      const size = this.file.size;
      // <progress> cannot show 0 of 0; an empty file is simply "all done".
      this.progressEl.max = size > 0 ? size : 1;
      this.progressEl.value = size > 0 ? this.offset : this.state === "complete" ? 1 : 0;
      const pct = percent(this.offset, size);
      // Native <progress> semantics already say "progressbar"; the explicit
      // values give assistive tech a percentage instead of a byte count.
      this.progressEl.setAttribute("aria-valuenow", String(pct));
      this.progressEl.setAttribute("aria-valuetext", `${pct}% (${formatBytes(this.offset)} of ${formatBytes(size)})`);
      this.bytesEl.textContent = `${formatBytes(this.offset)} of ${formatBytes(size)} (${pct}%)`;
      this.renderRate();
    }

    /** Speed and time left: only while bytes are moving, hidden otherwise. */
    renderRate() {
      const rate = this.state === "uploading" ? this.speed.rate() : null;
      this.speedEl.textContent = rate === null ? "" : `${formatBytes(rate)}/s`;
      const eta = rate !== null && rate > 0 ? formatEta((this.file.size - this.offset) / rate) : "";
      this.etaEl.textContent = eta;
      this.etaEl.hidden = eta === "";
    }

    showError(message) {
      this.errorEl.textContent = message;
      this.errorEl.hidden = !message;
    }

    // ---- user actions

    /** Begin (or continue) uploading; called by the queue when a slot frees. */
    start() {
      const controller = new AbortController();
      this.controller = controller;
      this.showError("");
      this.setState("uploading", this.upload ? "Resuming…" : "Starting…");
      this.run(controller.signal).finally(() => {
        if (this.controller === controller) this.controller = null;
        this.queue.pump();
      });
    }

    pause() {
      if (!ACTIVE_STATES.has(this.state)) return;
      this.stop();
      this.setState("paused");
      announce(`${this.file.name} paused.`);
      this.queue.pump(); // the slot can go to the next queued file
    }

    resume() {
      const canResume = this.state === "paused" || (this.state === "error" && this.resumable);
      if (!canResume) return;
      // An aborted PUT may still have reached the server: ask, don't assume.
      this.needsSync = this.upload !== null;
      this.conflicts = 0;
      this.checkedAtEnd = false;
      this.showError("");
      this.setState("queued");
      announce(`Resuming ${this.file.name}.`);
      this.queue.pump();
    }

    /**
     * Stop, drop the row and delete what the server holds: a cancelled
     * upload cannot be resumed, so its partial data is only in the way.
     */
    async cancel() {
      this.stop();
      const upload = this.upload;
      this.queue.remove(this);
      // The row is gone; say so to those who cannot see it go.
      announce(`${this.file.name} cancelled.`);
      if (upload) {
        try {
          await deleteWithRetry(upload.url);
        } catch (error) {
          this.queue.notify(`Could not cancel “${this.file.name}” on the server: ${errorMessage(error)}`);
        }
        recent.scheduleRefresh();
      }
    }

    /**
     * The browser lost the network. A request in flight now would fail only
     * after a long timeout, or stall for good; give it up at once and wait
     * for the `online` event, keeping the slot. Between tries there is
     * nothing to cut: the next try waits for the network by itself.
     */
    goOffline() {
      if (this.attempt === null) return;
      this.speed.reset();
      this.setState("offline");
      this.attempt.interrupt();
    }

    /** Abort whatever the current run is awaiting (fetch, backoff, offline wait). */
    stop() {
      if (this.controller) this.controller.abort();
      this.controller = null;
      this.speed.reset();
    }

    // ---- the upload itself

    async run(signal) {
      try {
        if (this.upload === null) {
          await this.withRetry(signal, (attemptSignal) => this.create(attemptSignal));
        }
        for (;;) {
          checkAborted(signal);
          const status = this.upload.status;
          if (status === "complete") {
            this.finish();
            return;
          }
          if (status !== "partial") {
            // `error` says why the server gave up (e.g. checksum mismatch).
            const reason = typeof this.upload.error === "string" && this.upload.error ? ` ${this.upload.error}` : "";
            throw new UploadError(`The upload is ${status} on the server.${reason}`);
          }
          await this.withRetry(signal, (attemptSignal) => this.sendNextChunk(attemptSignal));
        }
      } catch (error) {
        // Paused or cancelled: the action already updated (or removed) the row.
        if (signal.aborted) return;
        this.fail(error);
      }
    }

    /**
     * Run `operation(attemptSignal)` until it succeeds, backing off on
     * network errors, 5xx and 423 and waiting for the browser to come back
     * online. Errors that retrying cannot fix, and aborts, propagate at once.
     */
    async withRetry(signal, operation) {
      let failures = 0;
      for (;;) {
        if (navigator.onLine === false) await this.waitUntilOnline(signal);
        const attempt = new Attempt(signal);
        this.attempt = attempt;
        let error;
        try {
          return await operation(attempt.signal);
        } catch (caught) {
          error = caught;
        } finally {
          attempt.release();
          this.attempt = null;
        }
        if (signal.aborted) throw error;
        const kind = classify(error);
        if (attempt.interrupted || (kind === "network" && navigator.onLine === false)) {
          // Failing because we are offline says nothing about the server:
          // wait for the network without spending a retry. The request may
          // have stored part of the chunk, so ask for the offset first.
          if (this.upload !== null) this.needsSync = true;
          continue;
        }
        if (kind === "final" || kind === "aborted") throw error;

        failures += 1;
        if (failures > MAX_RETRIES) throw new RetriesExhaustedError(error);
        // A lost response may hide a chunk the server did store; re-read
        // the offset before resending. (423 means nothing was stored.)
        if (kind !== "busy" && this.upload !== null) this.needsSync = true;
        this.speed.reset();
        await this.countdown(signal, retryDelay(error, failures), retryReason(error));
        this.setState("uploading");
      }
    }

    async waitUntilOnline(signal) {
      this.speed.reset();
      this.setState("offline");
      await waitForOnline(signal, OFFLINE_RECHECK_MS);
      checkAborted(signal);
      if (this.upload !== null) this.needsSync = true;
      this.setState("uploading");
    }

    /** Show "<reason> – retrying in Ns", ticking once per second. */
    async countdown(signal, ms, reason) {
      const until = Date.now() + ms;
      for (;;) {
        const left = until - Date.now();
        // Gone offline meanwhile: stop counting, the caller waits for the network.
        if (left <= 0 || navigator.onLine === false) return;
        this.setState("retrying", `${reason} – retrying in ${Math.ceil(left / 1000)}s`);
        // Sleep to the next whole second so the number ticks evenly.
        await sleep(((left - 1) % 1000) + 1, signal);
      }
    }

    /** POST: creates the upload, or finds our partial one after a reload. */
    async create(signal) {
      const data = checkUpload(await guarded(signal, api.createUpload(this.file, signal)));
      this.applyUpload(data);
      if (data.status === "partial" && data.offset > 0) {
        this.setState("uploading", `Resuming at ${percent(data.offset, this.file.size)}%…`);
      }
      recent.scheduleRefresh();
    }

    /** GET: the server's current offset and status. */
    async sync(signal) {
      const data = checkUpload(await guarded(signal, api.getUpload(this.upload.url, signal)));
      this.applyUpload(data);
      this.needsSync = false;
    }

    async sendNextChunk(signal) {
      if (this.needsSync) {
        await this.sync(signal);
        if (this.upload.status !== "partial") return; // run() decides what next
      }

      const size = this.file.size;
      const start = this.offset;
      if (start >= size) {
        // The server has every byte yet still says "partial". Ask once more
        // (our view may be stale); if it insists, stop instead of spinning.
        if (!this.checkedAtEnd) {
          this.checkedAtEnd = true;
          this.needsSync = true;
          return;
        }
        throw new UploadError("The server received the whole file but did not complete the upload.", {
          resumable: true,
        });
      }

      const end = Math.min(start + config.chunkSize, size) - 1;
      this.speed.start();
      let data;
      try {
        data = await guarded(
          signal,
          api.putChunk(this.upload.url, this.file.slice(start, end + 1), start, end, size, signal),
        );
      } catch (error) {
        if (error instanceof ApiError && error.status === 409) {
          this.adoptServerOffset(error);
          return;
        }
        throw error;
      }
      checkUpload(data);
      this.conflicts = 0;
      this.checkedAtEnd = false;
      this.speed.add(end + 1 - start);
      this.applyUpload(data);
      if (this.state === "uploading") this.setState("uploading"); // drop "Resuming…"
    }

    /**
     * 409: the server's offset differs from ours (an earlier PUT whose
     * response we lost did land, or the file is open in another tab).
     * Continue from wherever the server is.
     */
    adoptServerOffset(error) {
      this.conflicts += 1;
      if (this.conflicts > MAX_CONFLICTS) {
        throw new UploadError(`${error.message} (repeated conflicts)`, { resumable: true });
      }
      this.speed.reset();
      const offset = error.data && error.data.offset;
      if (Number.isSafeInteger(offset) && offset >= 0 && offset <= this.file.size) {
        this.offset = offset;
        this.upload = { ...this.upload, offset };
        this.render();
      } else {
        this.needsSync = true;
      }
    }

    applyUpload(data) {
      this.upload = data;
      this.offset = Math.min(data.offset, this.file.size);
      this.render();
    }

    finish() {
      this.offset = this.file.size;
      // The link first, so setState can move keyboard focus onto it.
      const href = safeHref(this.upload.content_url);
      if (href) {
        this.downloadEl.href = href;
        this.downloadEl.hidden = false;
      }
      this.setState("complete");
      this.render();
      announce(`${this.file.name} uploaded.`);
      recent.scheduleRefresh();
    }

    fail(error) {
      const kind = classify(error);
      // Running out of retries, odd responses and client-side problems that
      // say so can be retried by hand; 4xx answers and the like cannot.
      this.resumable =
        error instanceof RetriesExhaustedError ||
        // "Too many unfinished uploads": fine again once others finish.
        (error instanceof ApiError && error.status === 429) ||
        (error instanceof UploadError && error.resumable) ||
        kind === "transient" ||
        kind === "network";
      const message = errorMessage(error);
      this.setState("error");
      this.showError(message);
      announce(`${this.file.name} failed: ${message}`);
      if (!(error instanceof ApiError || error instanceof UploadError || error instanceof RetriesExhaustedError)) {
        console.error(error); // unexpected: keep the stack for debugging
      }
    }
  }

  /**
   * DELETE, retrying briefly: right after Cancel the aborted PUT may still
   * hold the upload on the server (423), and a blip should not leave a
   * half-upload behind. Already gone (404/410) counts as done.
   */
  async function deleteWithRetry(url) {
    for (let failures = 0; ; failures += 1) {
      try {
        await api.deleteUpload(url);
        return;
      } catch (error) {
        if (error instanceof ApiError && (error.status === 404 || error.status === 410)) return;
        const kind = classify(error);
        if (kind === "final" || failures >= 4) throw error;
        await sleep(retryDelay(error, failures + 1));
      }
    }
  }

  // ------------------------------------------------------------ the queue

  class UploadQueue {
    constructor(listEl, emptyEl, noticeEl) {
      this.listEl = listEl;
      this.emptyEl = emptyEl;
      this.noticeEl = noticeEl;
      this.items = [];
      this.noticeTimer = null;
    }

    /** True while leaving the page would interrupt or drop an upload. */
    get busy() {
      return this.items.some((uploader) => ACTIVE_STATES.has(uploader.state));
    }

    addFiles(files) {
      for (const file of files) this.addFile(file);
      this.pump();
    }

    addFile(file) {
      const existing = this.items.find((uploader) => uploader.key === fileKey(file));
      if (existing) {
        if (ACTIVE_STATES.has(existing.state)) {
          // A second uploader would race the first for the same server upload.
          this.notify(`“${file.name}” is already in the queue.`);
          return;
        }
        if (existing.state === "paused" || (existing.state === "error" && existing.resumable)) {
          existing.file = file; // choosing it again means "go on"
          existing.resume();
          return;
        }
        this.remove(existing); // finished or failed for good: start a new row
      }

      const uploader = new Uploader(file, this);
      this.items.push(uploader);
      this.listEl.append(uploader.row);
      this.updateEmpty();
      if (file.size > config.maxSize) {
        // Save the round trip; the server would answer 413 anyway.
        let size = formatBytes(file.size);
        let limit = formatBytes(config.maxSize);
        // Just over the limit both round the same: show the exact numbers.
        if (size === limit) [size, limit] = [`${file.size} bytes`, `${config.maxSize} bytes`];
        uploader.fail(new UploadError(`The file is too large (${size}); the limit is ${limit}.`));
      }
    }

    /** Start queued uploads, in the order chosen, while slots are free. */
    pump() {
      let running = this.items.filter((uploader) => RUNNING_STATES.has(uploader.state)).length;
      for (const uploader of this.items) {
        if (running >= MAX_PARALLEL) break;
        if (uploader.state === "queued") {
          uploader.start();
          running += 1;
        }
      }
    }

    remove(uploader) {
      const index = this.items.indexOf(uploader);
      if (index === -1) return;
      // Removing the focused row would strand keyboard focus on <body>.
      const hadFocus = uploader.row.contains(document.activeElement);
      this.items.splice(index, 1);
      uploader.row.remove();
      this.updateEmpty();
      if (hadFocus) {
        const neighbour = this.items[index] || this.items[index - 1];
        const target = neighbour
          ? neighbour.row.querySelector("button:not([hidden])")
          : document.getElementById("file-input");
        if (target) target.focus();
      }
      this.pump();
    }

    /** True if a row for this file exists, whatever its state. */
    has(name, size) {
      const key = uploadKey(name, size);
      return this.items.some((uploader) => uploader.key === key);
    }

    /** The browser lost the network: stop sending into the void. */
    goOffline() {
      const running = this.items.filter((uploader) => RUNNING_STATES.has(uploader.state));
      if (running.length === 0) return;
      for (const uploader of running) uploader.goOffline();
      this.notify("You are offline. The uploads continue by themselves when the connection is back.");
    }

    /** Rows waiting for the network notice `online` themselves; just say so. */
    backOnline() {
      if (this.items.some((uploader) => uploader.state === "offline")) {
        this.notify("Back online – continuing the uploads.");
      }
    }

    updateEmpty() {
      this.emptyEl.hidden = this.items.length > 0;
    }

    notify(message) {
      this.noticeEl.textContent = message;
      this.noticeEl.hidden = false;
      clearTimeout(this.noticeTimer);
      this.noticeTimer = setTimeout(() => {
        this.noticeEl.hidden = true;
        this.noticeEl.textContent = "";
      }, NOTICE_TIMEOUT_MS);
    }
  }

  // ------------------------------------------------------------ recent uploads

  class RecentUploads {
    /**
     * `chooseFiles()` opens the file picker; `isQueued(name, size)` says
     * whether the page already has a row for that file (then the table
     * offers no resume hint: the row has its own buttons).
     */
    constructor(tbody, statusEl, { chooseFiles, isQueued }) {
      this.tbody = tbody;
      this.statusEl = statusEl;
      this.chooseFiles = chooseFiles;
      this.isQueued = isQueued;
      this.timer = null;
      this.controller = null;
    }

    scheduleRefresh() {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.refresh(), RECENT_REFRESH_DELAY_MS);
    }

    async refresh() {
      clearTimeout(this.timer);
      // Only the newest answer matters; drop a slower, older request.
      if (this.controller) this.controller.abort();
      const controller = new AbortController();
      this.controller = controller;
      try {
        const data = await api.listUploads(1, controller.signal);
        // Paginated ({results: [...]}) or, if pagination is off, a bare list.
        const uploads = Array.isArray(data) ? data : data && Array.isArray(data.results) ? data.results : [];
        this.render(uploads);
        this.statusEl.hidden = true;
        this.statusEl.textContent = "";
      } catch (error) {
        if (controller.signal.aborted) return;
        this.statusEl.textContent = `Could not load recent uploads: ${errorMessage(error)}`;
        this.statusEl.hidden = false;
      } finally {
        if (this.controller === controller) this.controller = null;
      }
    }

    render(uploads) {
      const rows = uploads.filter((upload) => upload && typeof upload === "object").map((upload) => this.buildRow(upload));
      if (rows.length === 0) {
        const row = document.createElement("tr");
        row.className = "table__empty";
        const cell = appendCell(row, "No uploads yet.");
        cell.colSpan = 6;
        rows.push(row);
      }
      this.tbody.replaceChildren(...rows);
    }

    buildRow(upload) {
      const row = document.createElement("tr");
      const filename = String(upload.filename == null ? "" : upload.filename);
      const status = SERVER_STATUSES.has(upload.status) ? upload.status : "unknown";
      // A tus client may defer its size: null until it declares it, shown as unknown.
      const size = upload.size == null ? NaN : Number(upload.size);
      const offset = Number(upload.offset);
      row.dataset.testid = "recent-upload-row";
      row.dataset.filename = filename;
      row.dataset.status = status;

      const name = appendCell(row, filename, "table__name");
      name.title = filename;

      appendCell(row, formatBytes(size), "num");

      const statusCell = appendCell(row, "");
      const badge = document.createElement("span");
      badge.className = `badge badge--${status}`;
      badge.textContent = String(upload.status == null ? "unknown" : upload.status);
      statusCell.append(badge);

      const pct = status === "complete" ? 100 : percent(offset, size);
      appendCell(row, Number.isNaN(size) && status !== "complete" ? "–" : `${pct}%`, "num");

      const updated = appendCell(row, "");
      const time = document.createElement("time");
      if (typeof upload.updated_at === "string") time.dateTime = upload.updated_at;
      time.textContent = formatDate(upload.updated_at);
      updated.append(time);

      const actions = appendCell(row, "");
      const href = status === "complete" ? safeHref(upload.content_url) : null;
      if (href) {
        const link = document.createElement("a");
        link.href = href;
        link.download = ""; // the server names the file (Content-Disposition)
        link.textContent = "Download";
        link.setAttribute("aria-label", `Download ${filename}`);
        actions.append(link);
      } else if (this.resumableHere(upload, status, size)) {
        actions.append(this.resumeHint(filename, percent(offset, size)));
      }
      return row;
    }

    /**
     * The page resumes a partial REST upload when the same file (name and
     * size) is chosen again. tus uploads are resumed by their URL, which only
     * the client that made them knows, so they get no hint.
     */
    resumableHere(upload, status, size) {
      return (
        status === "partial" &&
        upload.protocol === "rest" &&
        Number.isSafeInteger(size) &&
        !this.isQueued(String(upload.filename), size)
      );
    }

    /** A button that says how to resume, and opens the file picker to do it. */
    resumeHint(filename, pct) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "btn btn--link table__hint";
      button.dataset.testid = "resume-hint";
      button.textContent = `Choose “${filename}” again to resume from ${pct}%`;
      button.addEventListener("click", () => this.chooseFiles());
      return button;
    }
  }

  /** Append a <td> holding `text` (as text, never HTML) to `row`. */
  function appendCell(row, text, className) {
    const cell = document.createElement("td");
    if (className) cell.className = className;
    cell.textContent = text;
    row.append(cell);
    return cell;
  }

  // ------------------------------------------------------------ page wiring

  let announceTimer = null;
  const pendingAnnouncements = [];

  /** Tell screen-reader users about milestones (done, failed, paused…). */
  function announce(message) {
    const region = document.getElementById("upload-announcer");
    if (!region) return;
    // Several files can finish together: collect what arrives meanwhile and
    // read it in one go, rather than letting the last message replace the rest.
    pendingAnnouncements.push(message);
    if (announceTimer !== null) return;
    // Clear first so the same message twice in a row is read twice.
    region.textContent = "";
    announceTimer = setTimeout(() => {
      announceTimer = null;
      region.textContent = pendingAnnouncements.splice(0).join(" ");
    }, 100);
  }

  function hasFiles(event) {
    return Boolean(event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files"));
  }

  /** Files from a drop, skipping folders (they cannot be read as one blob). */
  function droppedFiles(dataTransfer) {
    if (!dataTransfer.items) return { files: Array.from(dataTransfer.files), folders: [] };
    const files = [];
    const folders = [];
    for (const item of Array.from(dataTransfer.items)) {
      if (item.kind !== "file") continue;
      const entry = typeof item.webkitGetAsEntry === "function" ? item.webkitGetAsEntry() : null;
      if (entry && entry.isDirectory) {
        folders.push(entry.name);
        continue;
      }
      const file = item.getAsFile();
      if (file) files.push(file);
    }
    return { files, folders };
  }

  const config = readConfig();
  let recent = null;

  function init() {
    const input = document.getElementById("file-input");
    const dropZone = document.getElementById("drop-zone");
    const list = document.getElementById("upload-list");
    const template = document.getElementById("upload-row-template");
    if (!input || !dropZone || !list || !template) return; // not the upload page

    const queue = new UploadQueue(
      list,
      document.getElementById("upload-list-empty"),
      document.getElementById("upload-notice"),
    );
    recent = new RecentUploads(
      document.getElementById("recent-uploads-body"),
      document.getElementById("recent-status"),
      {
        chooseFiles: () => input.click(),
        isQueued: (name, size) => queue.has(name, size),
      },
    );

    // Show the limit in the same binary units as the rows.
    const maxSizeEl = document.querySelector("[data-max-size]");
    if (maxSizeEl && Number.isFinite(config.maxSize)) maxSizeEl.textContent = formatBytes(config.maxSize);

    input.addEventListener("change", () => {
      queue.addFiles(Array.from(input.files || []));
      // Reset so choosing the same file again (to resume it) fires "change".
      input.value = "";
    });

    // dragenter/dragleave also fire for the zone's children; count them so
    // the highlight does not flicker while the pointer crosses the text.
    let dragDepth = 0;
    const setDragover = (on) => dropZone.classList.toggle("is-dragover", on);
    dropZone.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      dragDepth += 1;
      setDragover(true);
    });
    dropZone.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault(); // allows the drop
      event.dataTransfer.dropEffect = "copy";
    });
    dropZone.addEventListener("dragleave", () => {
      dragDepth = Math.max(0, dragDepth - 1);
      if (dragDepth === 0) setDragover(false);
    });
    dropZone.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      dragDepth = 0;
      setDragover(false);
      const { files, folders } = droppedFiles(event.dataTransfer);
      if (folders.length) queue.notify(`Folders cannot be uploaded: ${folders.join(", ")}. Drop the files inside instead.`);
      queue.addFiles(files);
    });

    // A file dropped just outside the zone would make the browser open it,
    // leaving the page and killing every running upload.
    for (const type of ["dragover", "drop"]) {
      window.addEventListener(type, (event) => {
        if (!hasFiles(event) || dropZone.contains(event.target)) return;
        event.preventDefault();
        event.dataTransfer.dropEffect = "none";
      });
    }

    window.addEventListener("offline", () => queue.goOffline());
    window.addEventListener("online", () => queue.backOnline());

    window.addEventListener("beforeunload", (event) => {
      if (!queue.busy) return;
      // Browsers show their own wording; both lines are needed for all of them.
      event.preventDefault();
      event.returnValue = "";
    });

    document.getElementById("recent-refresh")?.addEventListener("click", () => recent.refresh());
    recent.refresh();

    // Handy for debugging and end-to-end tests; not a public API.
    window.resumableUploads = { queue, recent, api, config };
  }

  init();
})();
