// Test doubles for the client's unit tests: a scripted fetch that records
// each request and answers from a list of steps, a held request that ends
// only when aborted, and an in-memory Storage.

/** An answer of pollgate's JSON envelope. */
export function envelope(cursor, messages = [], gap = false) {
  return new Response(JSON.stringify({ cursor, gap, messages }), {
    status: 200,
    headers: { "Content-Type": "application/json", "Pollgate-Cursor": cursor },
  });
}

/** A pollgate JSON error answer. */
export function failure(status, error, detail, headers = {}) {
  return new Response(JSON.stringify({ error, detail }), {
    status,
    headers: { "Content-Type": "application/json", ...headers },
  });
}

/** One message as pollgate sends it. */
export function message(id, data, channel = "room:1") {
  return { id, channel, content_type: "application/json", data };
}

/**
 * A fetch that answers request i with steps[i](url, init) (a Response, a
 * promise of one, or a thrown error). After the last step, requests are
 * held until aborted. `calls` records {url, init}; `next()` resolves when
 * the next request arrives.
 */
export function scriptedFetch(steps) {
  const calls = [];
  let waiters = [];
  const fetch = async (url, init) => {
    calls.push({ url: new URL(url), init });
    const arrived = waiters;
    waiters = [];
    arrived.forEach((resolve) => resolve());
    const step = steps[calls.length - 1] ?? (() => held(init.signal));
    return step(url, init);
  };
  fetch.calls = calls;
  /** Resolves once `n` requests in all have been made. */
  fetch.requests = async (n) => {
    while (calls.length < n) await new Promise((resolve) => waiters.push(resolve));
  };
  return fetch;
}

/** A request that never answers: it rejects when its signal aborts. */
export function held(signal) {
  return new Promise((_, reject) => {
    const fail = () => reject(signal.reason ?? new DOMException("aborted", "AbortError"));
    if (signal.aborted) fail();
    signal.addEventListener("abort", fail, { once: true });
  });
}

/** A Storage kept in a Map. */
export class MemoryStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
}

/** A promise and its resolve, to wait for a callback. */
export function signalled() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}
