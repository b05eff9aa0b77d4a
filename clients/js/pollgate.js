// pollgate.js: the browser (and Node 18+) client for pollgate.
//
// One dependency-free ES module, usable as it is (no build step):
//
//   import { subscribe } from "./pollgate.js";
//   const sub = subscribe("/rooms/1/events", {
//     onMessage: (message) => show(message.data),
//     onGap: () => reloadFromBackend(),
//   });
//   // later: sub.close();
//
// - `subscribe` long-polls a subscribe route with its cursor, so nothing is
//   missed between two polls; retries with exponential backoff and jitter;
//   reports gaps; optionally keeps its cursor in sessionStorage so a reload
//   misses nothing; or streams the route as Server-Sent Events.
// - `watch` long-polls a watch route (a backend GET made long-pollable),
//   keeping the ETag.
// - `position` reads a subscribe route's current cursor, to start from it
//   after loading a snapshot from the backend.
// - `presence` keeps who is here (a member list) from a snapshot and the
//   presence updates a backend publishes, ignoring repeats and stale ones.
//
// The whole contract is in the package's README.md.

/** The default pacing of retries, in milliseconds. */
export const DEFAULT_BACKOFF = Object.freeze({ initial: 1000, max: 30000, factor: 2 });

// Time allowed beyond the hold time for an answer before the request is
// deemed lost (a connection that died without a word).
const DEADLINE_SLACK_MS = 15000;
// Without a `timeout` option the route decides how long a poll is held;
// this is how long to wait for any answer.
const DEFAULT_DEADLINE_MS = 120000;
// An empty answer quicker than this, twice in a row, means the server
// answers without holding (a drain, a misconfigured route): slow down.
const QUICK_ANSWER_MS = 1000;

/**
 * An HTTP answer that was not the expected one, or a failed request.
 * `status` is the HTTP status (0 for a network failure), `code` and `detail`
 * come from pollgate's JSON error body when there is one, and `retryable`
 * says whether the client retries on its own.
 */
export class PollgateError extends Error {
  constructor(message, { status = 0, code, detail, retryable = true, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "PollgateError";
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryable = retryable;
  }
}

/**
 * The delay before retry number `attempt` (1, 2, ...): exponential from
 * `initial` by `factor` up to `max`, then with "equal jitter": a random
 * value between half of it and all of it, so that clients dropped together
 * do not come back together. `random` is Math.random unless given.
 * @returns {number} milliseconds
 */
export function backoff(attempt, options = {}, random = Math.random) {
  const { initial, max, factor } = { ...DEFAULT_BACKOFF, ...options };
  const exp = Math.min(max, initial * factor ** Math.max(0, attempt - 1));
  return exp / 2 + (random() * exp) / 2;
}

/**
 * The wait a `Retry-After` header asks for (seconds, or an HTTP date).
 * @returns {number} milliseconds, 0 when absent or unreadable
 */
export function retryAfter(value, now = Date.now()) {
  if (!value) return 0;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const at = Date.parse(value);
  return Number.isNaN(at) ? 0 : Math.max(0, at - now);
}

/**
 * Whether an HTTP status is worth retrying: timeouts, rate limits, server
 * errors. Anything else (401, 403, 404, ...) stops the loop.
 */
export function isRetryableStatus(status) {
  return status === 408 || status === 425 || status === 429 || status >= 500;
}

/**
 * Long-polls a pollgate subscribe route until closed.
 *
 * Messages arrive in order through `onMessage(message, {cursor})`; a lost
 * position (`gap: true`) is reported to `onGap({cursor})` before the retained
 * messages that follow it. Errors are reported to `onError(error, {retryIn,
 * fatal})`; retryable ones are retried with backoff, others end the
 * subscription.
 *
 * @returns {Subscription} `cursor` (the position so far), `close()`, and
 *   `closed`, a promise of `undefined` once closed or of the `PollgateError`
 *   that ended it.
 */
export function subscribe(url, options = {}) {
  withQuery(url, {}); // a URL that cannot work throws here, not later
  const sub = new Subscription(options);
  const store = cursorStore(url, options);
  sub.cursor = options.cursor ?? store.load() ?? null;
  sub._remember = (cursor) => store.save(cursor);
  const run = options.transport === "sse" ? runEventSource : runPolls;
  sub._start(() => run(sub, url, options));
  return sub;
}

/**
 * Long-polls a pollgate watch route: a backend GET that answers when its
 * resource changes. `onChange(value, {etag, response})` gets the body (parsed
 * as `options.as`: "json" by default, or "text", or "response" for the
 * Response itself) on the first answer and on every change.
 *
 * @returns {Subscription} whose `etag` is the representation seen last.
 */
export function watch(url, options = {}) {
  withQuery(url, {}); // a URL that cannot work throws here, not later
  const sub = new Subscription(options);
  sub.etag = options.etag ?? null;
  sub._start(() => runWatch(sub, url, options));
  return sub;
}

/**
 * The current cursor of a subscribe route, read without waiting (a poll
 * with `timeout=0` and no cursor). Take it before loading a snapshot from
 * the backend, then `subscribe` from it: what is published after it reaches
 * you, so nothing falls between the snapshot and the subscription.
 * @returns {Promise<string>} the cursor
 */
export async function position(url, options = {}) {
  const response = await (options.fetch ?? globalThis.fetch)(
    withQuery(url, { timeout: "0", format: "json", cursor: null }),
    { ...requestInit(options), signal: options.signal },
  );
  if (!response.ok) throw await errorOf(response);
  return (await response.json()).cursor;
}

/**
 * Keeps who is present (a set of member ids) from a snapshot of the
 * backend's and the presence updates it publishes, e.g. from pollgate's
 * presence webhooks. `onChange(members, {joined, left})` is called each
 * time the set changes.
 *
 * A snapshot is `{members, version}` (or pollgate's `{subscribers}`); an
 * update is `{event: "joined" | "left", subscriber, members?, version?}`
 * (the webhooks' `subscriber_joined` and `subscriber_left` too). An update
 * with `members` replaces the set; one without adds or removes its
 * subscriber. A `version` is a number that grows with each change: what
 * carries one not above the version held is a repeat or older news, and is
 * ignored (a snapshot older than it, too).
 *
 * @returns {Presence}
 */
export function presence(options = {}) {
  return new Presence(options);
}

const JOINED = new Set(["joined", "subscriber_joined"]);
const LEFT = new Set(["left", "subscriber_left"]);

/** Who is present (see `presence`). */
export class Presence {
  constructor({ members = [], version = null, onChange } = {}) {
    this._members = new Set(memberIds(members));
    /** The version of what is held, or null. */
    this.version = version;
    this._onChange = onChange;
  }

  /** The members, in the order they came (or the last list's order). */
  get members() {
    return [...this._members];
  }

  /** Whether `id` is present. */
  has(id) {
    return this._members.has(id);
  }

  /** Replaces the set with a snapshot, unless it is older. Returns whether the set changed. */
  reset(snapshot) {
    const list = snapshot?.members ?? snapshot?.subscribers;
    if (!Array.isArray(list) || this._older(snapshot.version, false)) return false;
    return this._become(memberIds(list), snapshot.version);
  }

  /**
   * Applies a presence update; anything else (another kind of message, a
   * repeat, older news) is ignored. Returns whether the set changed.
   */
  apply(update) {
    const joined = JOINED.has(update?.event);
    if (!joined && !LEFT.has(update?.event)) return false;
    if (this._older(update.version, true)) return false;
    if (Array.isArray(update.members)) return this._become(memberIds(update.members), update.version);
    if (typeof update.subscriber !== "string") return false;
    const next = new Set(this._members);
    if (joined) next.add(update.subscriber);
    else next.delete(update.subscriber);
    return this._become(next, update.version);
  }

  // Whether `version` is older than what is held (or the same, `orSame`).
  _older(version, orSame) {
    if (typeof version !== "number" || typeof this.version !== "number") return false;
    return orSame ? version <= this.version : version < this.version;
  }

  _become(ids, version) {
    if (typeof version === "number") this.version = version;
    const next = new Set(ids);
    const joined = [...next].filter((id) => !this._members.has(id));
    const left = [...this._members].filter((id) => !next.has(id));
    this._members = next;
    if (joined.length === 0 && left.length === 0) return false;
    this._onChange?.(this.members, { joined, left });
    return true;
  }
}

// The ids of a member list: strings, or objects with `subscriber` (as in
// pollgate's GET /v1/presence).
function memberIds(list) {
  return list
    .map((member) => (typeof member === "string" ? member : member?.subscriber))
    .filter((id) => typeof id === "string");
}

/** A running subscription (see `subscribe` and `watch`). */
export class Subscription {
  constructor(options) {
    /** The position so far (subscribe), or null. */
    this.cursor = null;
    /** The ETag of the representation seen last (watch), or null. */
    this.etag = null;
    /** A promise of `undefined` once closed, or of the error that ended it. */
    this.closed = new Promise((resolve) => (this._resolveClosed = resolve));
    this._options = options;
    this._stopped = false;
    this._interrupt = null; // ends the request or stream in flight
    this._wake = null; // ends the current wait early
    this._status = null;
    const { signal } = options;
    if (signal?.aborted) this._stopped = true;
    signal?.addEventListener("abort", () => this.close(), { once: true });
  }

  /** Stops the subscription; the request in flight is aborted. Idempotent. */
  close() {
    this._stopped = true;
    this._interrupt?.(null);
    this._wake?.();
  }

  /** Whether `close()` was called, the signal aborted, or a fatal error ended it. */
  get stopped() {
    return this._stopped;
  }

  _start(run) {
    // Going offline ends the request in flight at once (a held poll would
    // otherwise hang on a dead connection); coming back online ends the
    // wait before the next attempt.
    const online = () => this._wake?.();
    const offline = () => this._interrupt?.(new PollgateError("the browser went offline"));
    const events = typeof globalThis.addEventListener === "function";
    if (events) {
      globalThis.addEventListener("online", online);
      globalThis.addEventListener("offline", offline);
    }
    run()
      .then(
        () => undefined,
        (error) => asPollgateError(error),
      )
      .then((error) => {
        this._stopped = true;
        if (events) {
          globalThis.removeEventListener("online", online);
          globalThis.removeEventListener("offline", offline);
        }
        this._setStatus("closed");
        this._resolveClosed(error);
      });
  }

  _setStatus(status) {
    if (status === this._status) return;
    this._status = status;
    this._call("onStatus", status);
  }

  // Calls a user callback; what it throws is reported (as an uncaught
  // error: the console shows it) and does not stop the subscription.
  _call(name, ...args) {
    const callback = this._options[name];
    if (typeof callback !== "function") return;
    try {
      callback(...args);
    } catch (error) {
      if (typeof globalThis.reportError === "function") globalThis.reportError(error);
      else
        setTimeout(() => {
          throw error;
        });
    }
  }

  // Resolves after `ms`, or at once on close() or when the browser is back
  // online.
  _sleep(ms) {
    if (this._stopped) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        if (this._wake === done) this._wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this._wake = done;
    });
  }

  // One request, aborted on close(), when the browser goes offline, or
  // after `deadline` ms without the whole answer. Returns what `read` makes
  // of the response.
  async _fetch(fetchImpl, url, init, deadline, read) {
    const controller = new AbortController();
    this._interrupt = (reason) => controller.abort(reason);
    const timer = setTimeout(
      () => controller.abort(new PollgateError(`no answer within ${deadline} ms`)),
      deadline,
    );
    try {
      const response = await fetchImpl(url, { ...init, signal: controller.signal });
      return await read(response);
    } catch (error) {
      throw controller.signal.aborted && controller.signal.reason
        ? controller.signal.reason
        : asPollgateError(error);
    } finally {
      clearTimeout(timer);
      this._interrupt = null;
    }
  }

  // Reports a failed attempt and waits before the next one; throws the
  // error when it ends the subscription. Returns false once closed.
  async _failed(error, failures) {
    if (this._stopped) return false;
    if (!error.retryable) {
      this._call("onError", error, { fatal: true, retryIn: null });
      throw error;
    }
    const retryIn = Math.max(backoff(failures, this._options.backoff), error.retryAfter ?? 0);
    this._setStatus("retrying");
    this._call("onError", error, { fatal: false, retryIn });
    await this._sleep(retryIn);
    return !this._stopped;
  }
}

// The request loop of `subscribe` and `watch`: one request at a time
// (`request`, which returns what `handle` takes, or AGAIN to go on at once),
// backoff after a failure, and pacing of answers that come back empty at
// once (`handle` returns whether the answer had news).
const AGAIN = Symbol("again");

async function requestLoop(sub, options, request, handle) {
  let failures = 0;
  let quick = 0;
  while (!sub.stopped) {
    const started = Date.now();
    let answer;
    try {
      answer = await request();
    } catch (error) {
      if (sub.stopped) break;
      failures += 1;
      if (!(await sub._failed(error, failures))) break;
      continue;
    }
    if (answer === AGAIN) continue;
    failures = 0;
    sub._setStatus("live");
    const news = handle(answer);
    quick = !news && Date.now() - started < QUICK_ANSWER_MS ? quick + 1 : 0;
    if (quick > 1) await sub._sleep(backoff(quick - 1, options.backoff));
  }
}

// The long-poll loop of `subscribe`.
function runPolls(sub, url, options) {
  const fetchImpl = options.fetch ?? globalThis.fetch;
  const deadline =
    options.deadline ??
    (options.timeout ? options.timeout * 1000 + DEADLINE_SLACK_MS : DEFAULT_DEADLINE_MS);
  const request = async () => {
    const target = withQuery(url, {
      cursor: sub.cursor,
      timeout: options.timeout == null ? null : String(options.timeout),
      format: "json",
    });
    try {
      return await sub._fetch(fetchImpl, target, requestInit(options), deadline, async (response) => {
        if (response.ok) return response.json();
        throw await errorOf(response);
      });
    } catch (error) {
      if (sub.stopped || !refusedCursor(error, sub.cursor)) throw error;
      // A cursor the gateway does not accept (e.g. one persisted for
      // another route): start afresh, and say so as a gap.
      sub.cursor = null;
      sub._remember(null);
      sub._call("onGap", { cursor: null, reason: "cursor refused" });
      return AGAIN;
    }
  };
  return requestLoop(sub, options, request, (body) => deliver(sub, body) > 0);
}

// Hands one envelope to the callbacks, then moves the cursor. Returns the
// number of messages.
function deliver(sub, body) {
  const messages = Array.isArray(body?.messages) ? body.messages : [];
  if (body?.gap) sub._call("onGap", { cursor: body.cursor, reason: "gap" });
  for (const message of messages) {
    if (sub.stopped) return messages.length;
    sub._call("onMessage", message, { cursor: body.cursor });
  }
  if (typeof body?.cursor === "string" && body.cursor !== sub.cursor) {
    sub.cursor = body.cursor;
    sub._remember(body.cursor);
  }
  return messages.length;
}

// The EventSource loop of `subscribe` (transport: "sse"). The browser's own
// reconnect is not used: it would resend the first URL's cursor; each
// reconnect here carries the newest one, with backoff.
async function runEventSource(sub, url, options) {
  const EventSourceImpl = "EventSource" in options ? options.EventSource : globalThis.EventSource;
  if (typeof EventSourceImpl !== "function") {
    throw new PollgateError("EventSource is not available here", { retryable: false });
  }
  let failures = 0;
  while (!sub.stopped) {
    const error = await new Promise((resolve) => {
      const source = new EventSourceImpl(withQuery(url, { cursor: sub.cursor }), {
        withCredentials: options.credentials === "include",
      });
      const end = (reason) => {
        source.close();
        sub._interrupt = null;
        resolve(reason);
      };
      sub._interrupt = (reason) =>
        end(reason ?? new PollgateError("closed", { retryable: false }));
      source.onopen = () => {
        failures = 0;
        sub._setStatus("live");
      };
      source.onmessage = (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (cause) {
          return end(new PollgateError("an event that is not JSON", { cause }));
        }
        sub.cursor = event.lastEventId || sub.cursor;
        sub._call("onMessage", message, { cursor: sub.cursor });
        sub._remember(sub.cursor);
      };
      source.addEventListener("gap", () => sub._call("onGap", { cursor: null, reason: "gap" }));
      source.onerror = () => end(new PollgateError("the event stream was interrupted"));
    });
    if (sub.stopped) break;
    failures += 1;
    if (!(await sub._failed(error, failures))) break;
  }
}

// The loop of `watch`.
function runWatch(sub, url, options) {
  const fetchImpl = options.fetch ?? globalThis.fetch;
  const deadline = options.deadline ?? DEFAULT_DEADLINE_MS;
  const as = options.as ?? "json";
  const request = () => {
    const init = requestInit(options, sub.etag ? { "If-None-Match": sub.etag } : {});
    return sub._fetch(fetchImpl, withQuery(url, {}), init, deadline, async (response) => {
      if (response.status === 304) {
        sub.etag = response.headers.get("ETag") ?? sub.etag;
        return null;
      }
      if (!response.ok) throw await errorOf(response);
      const etag = response.headers.get("ETag");
      if (!etag) {
        throw new PollgateError(
          "the answer has no ETag: not a watch route, or a cross-origin answer that does not expose it",
          { status: response.status, retryable: false },
        );
      }
      const value =
        as === "response" ? response : await (as === "text" ? response.text() : response.json());
      return { value, etag, response };
    });
  };
  return requestLoop(sub, options, request, (change) => {
    if (!change) return false;
    sub.etag = change.etag;
    sub._call("onChange", change.value, { etag: change.etag, response: change.response });
    return true;
  });
}

// Where `subscribe` keeps its cursor between page loads (`persist`).
function cursorStore(url, { persist, persistKey }) {
  let storage = persist;
  if (persist === true) storage = globalThis.sessionStorage;
  if (!storage || typeof storage.getItem !== "function") {
    return { load: () => null, save: () => {} };
  }
  const key = persistKey ?? `pollgate:${url}`;
  return {
    load: () => {
      try {
        return storage.getItem(key);
      } catch {
        return null;
      }
    },
    save: (cursor) => {
      try {
        if (cursor == null) storage.removeItem(key);
        else storage.setItem(key, cursor);
      } catch {
        // Storage full or denied: the subscription goes on without it.
      }
    },
  };
}

// The fetch options of every request: the caller's headers (an object, or
// a function returning one, e.g. to send a fresh token), credentials, and
// no HTTP cache.
function requestInit(options, extra = {}) {
  const headers =
    typeof options.headers === "function" ? options.headers() : (options.headers ?? {});
  return {
    method: "GET",
    headers: { ...headers, ...extra },
    credentials: options.credentials ?? "same-origin",
    cache: "no-store",
  };
}

// `url` with query parameters set (null removes one). Relative URLs are
// resolved against the page's location; without one (Node), a relative URL
// is a TypeError.
function withQuery(url, params) {
  const base = globalThis.location?.href;
  const target = base ? new URL(url, base) : new URL(url);
  for (const [name, value] of Object.entries(params)) {
    if (value == null) target.searchParams.delete(name);
    else target.searchParams.set(name, value);
  }
  return target.toString();
}

// A PollgateError from a non-2xx answer, with pollgate's `error`/`detail`
// when the body has them.
async function errorOf(response) {
  let code;
  let detail;
  try {
    const body = await response.json();
    code = typeof body?.error === "string" ? body.error : undefined;
    detail = typeof body?.detail === "string" ? body.detail : undefined;
  } catch {
    // Not JSON: the status says enough.
  }
  const error = new PollgateError(
    `HTTP ${response.status}${detail ? `: ${detail}` : code ? `: ${code}` : ""}`,
    { status: response.status, code, detail, retryable: isRetryableStatus(response.status) },
  );
  error.retryAfter = retryAfter(response.headers.get("Retry-After"));
  return error;
}

function refusedCursor(error, cursor) {
  return cursor != null && error.status === 400 && /cursor/i.test(error.detail ?? "");
}

function networkError(cause) {
  if (cause instanceof PollgateError) return cause;
  return new PollgateError(`network error: ${cause?.message ?? cause}`, { cause });
}

function asPollgateError(error) {
  return error instanceof PollgateError ? error : networkError(error);
}
