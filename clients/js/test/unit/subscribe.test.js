// The long-poll loop of `subscribe`: cursors, gaps, retries, abort and
// persistence, against a scripted fetch (node --test).

import { test } from "node:test";
import assert from "node:assert/strict";
import { subscribe, position } from "../../pollgate.js";
import { envelope, failure, message, scriptedFetch, MemoryStorage, signalled } from "./fake.js";

const URL_ = "http://gw.test/rooms/1/events";
const fast = { initial: 5, max: 20, factor: 2 };

test("sends back the cursor of each answer and delivers messages in order", async () => {
  const fetch = scriptedFetch([
    () => envelope("1-0", [message("1-0", { text: "a" })]),
    () => envelope("1-0"), // a timeout: the cursor is unchanged
    () => envelope("3-0", [message("2-0", { text: "b" }), message("3-0", { text: "c" })]),
  ]);
  const seen = [];
  const sub = subscribe(URL_, {
    fetch,
    onMessage: (m, { cursor }) => seen.push([m.data.text, cursor]),
  });
  await fetch.requests(4);
  sub.close();
  assert.equal(await sub.closed, undefined);

  const asked = fetch.calls.map((c) => c.url.searchParams.get("cursor"));
  assert.deepEqual(asked, [null, "1-0", "1-0", "3-0"]);
  assert.ok(fetch.calls.every((c) => c.url.searchParams.get("format") === "json"));
  assert.deepEqual(seen, [
    ["a", "1-0"],
    ["b", "3-0"],
    ["c", "3-0"],
  ]);
  assert.equal(sub.cursor, "3-0");
});

test("starts from the given cursor, keeps the URL's own query, and asks for the timeout", async () => {
  const fetch = scriptedFetch([]);
  const sub = subscribe(`${URL_}?lang=en`, { fetch, cursor: "7-1", timeout: 20 });
  await fetch.requests(1);
  sub.close();
  await sub.closed;
  const { searchParams } = fetch.calls[0].url;
  assert.equal(searchParams.get("cursor"), "7-1");
  assert.equal(searchParams.get("timeout"), "20");
  assert.equal(searchParams.get("lang"), "en");
});

test("a gap is reported before the retained messages that follow it", async () => {
  const fetch = scriptedFetch([
    () => envelope("9-0", [message("8-0", "x"), message("9-0", "y")], true),
  ]);
  const events = [];
  const sub = subscribe(URL_, {
    fetch,
    cursor: "1-0",
    onGap: (info) => events.push(["gap", info.cursor, info.reason]),
    onMessage: (m) => events.push(["message", m.id]),
  });
  await fetch.requests(2);
  sub.close();
  await sub.closed;
  assert.deepEqual(events, [
    ["gap", "9-0", "gap"],
    ["message", "8-0"],
    ["message", "9-0"],
  ]);
  assert.equal(fetch.calls[1].url.searchParams.get("cursor"), "9-0");
});

test("a cursor the gateway refuses is dropped and reported as a gap", async () => {
  const storage = new MemoryStorage();
  storage.setItem(`pollgate:${URL_}`, "garbage");
  const fetch = scriptedFetch([
    () => failure(400, "bad_request", "'garbage' is not a cursor pollgate issued"),
  ]);
  const gaps = [];
  const sub = subscribe(URL_, { fetch, persist: storage, onGap: (g) => gaps.push(g) });
  await fetch.requests(2);
  sub.close();
  await sub.closed;
  assert.equal(fetch.calls[0].url.searchParams.get("cursor"), "garbage");
  assert.equal(fetch.calls[1].url.searchParams.get("cursor"), null);
  assert.deepEqual(gaps, [{ cursor: null, reason: "cursor refused" }]);
  assert.equal(storage.getItem(`pollgate:${URL_}`), null);
});

test("network errors and 503s are retried with backoff, honouring Retry-After", async () => {
  const fetch = scriptedFetch([
    () => {
      throw new TypeError("Failed to fetch");
    },
    () => failure(503, "unavailable", "draining", { "Retry-After": "0.05" }),
    () => envelope("1-0", [message("1-0", "back")]),
  ]);
  const errors = [];
  const statuses = [];
  const got = signalled();
  const sub = subscribe(URL_, {
    fetch,
    backoff: fast,
    onError: (e, info) => errors.push({ status: e.status, ...info }),
    onStatus: (s) => statuses.push(s),
    onMessage: (m) => got.resolve(m.data),
  });
  const started = Date.now();
  assert.equal(await got.promise, "back");
  assert.ok(Date.now() - started >= 50, "waited at least Retry-After");
  sub.close();
  await sub.closed;
  assert.equal(errors.length, 2);
  assert.equal(errors[0].status, 0);
  assert.equal(errors[0].fatal, false);
  assert.ok(errors[0].retryIn >= 2.5 && errors[0].retryIn <= 5, `first retry ${errors[0].retryIn}`);
  assert.equal(errors[1].status, 503);
  assert.ok(errors[1].retryIn >= 50);
  assert.deepEqual(statuses, ["retrying", "live", "closed"]);
});

test("a refusal that retrying cannot fix ends the subscription", async () => {
  const fetch = scriptedFetch([() => failure(401, "unauthorized", "log in first")]);
  const errors = [];
  const sub = subscribe(URL_, { fetch, onError: (e, info) => errors.push([e.status, info.fatal]) });
  const error = await sub.closed;
  assert.equal(error.status, 401);
  assert.equal(error.detail, "log in first");
  assert.equal(error.retryable, false);
  assert.deepEqual(errors, [[401, true]]);
  assert.equal(fetch.calls.length, 1);
  assert.ok(sub.stopped);
});

test("aborting the signal ends a held poll at once", async () => {
  const fetch = scriptedFetch([]);
  const controller = new AbortController();
  const errors = [];
  const sub = subscribe(URL_, { fetch, signal: controller.signal, onError: (e) => errors.push(e) });
  await fetch.requests(1);
  controller.abort();
  assert.equal(await sub.closed, undefined);
  assert.ok(fetch.calls[0].init.signal.aborted, "the request in flight was aborted");
  assert.equal(fetch.calls.length, 1);
  assert.deepEqual(errors, [], "closing is not an error");
});

test("closing during a backoff wait ends it without another request", async () => {
  const fetch = scriptedFetch([
    () => {
      throw new TypeError("Failed to fetch");
    },
  ]);
  const retrying = signalled();
  const sub = subscribe(URL_, {
    fetch,
    backoff: { initial: 60000, max: 60000 },
    onError: () => retrying.resolve(),
  });
  await retrying.promise;
  const started = Date.now();
  sub.close();
  await sub.closed;
  assert.ok(Date.now() - started < 1000);
  assert.equal(fetch.calls.length, 1);
});

test("an already aborted signal makes no request", async () => {
  const fetch = scriptedFetch([]);
  const sub = subscribe(URL_, { fetch, signal: AbortSignal.abort() });
  await sub.closed;
  assert.equal(fetch.calls.length, 0);
});

test("a poll with no answer past the deadline is retried", async () => {
  const fetch = scriptedFetch([
    undefined, // held until the deadline aborts it
    () => envelope("1-0", [message("1-0", "late")]),
  ]);
  const errors = [];
  const got = signalled();
  const sub = subscribe(URL_, {
    fetch,
    deadline: 30,
    backoff: fast,
    onError: (e) => errors.push(e.message),
    onMessage: (m) => got.resolve(m.data),
  });
  assert.equal(await got.promise, "late");
  sub.close();
  await sub.closed;
  assert.match(errors[0], /no answer within 30 ms/);
});

test("persist keeps the cursor so the next subscription resumes from it", async () => {
  const storage = new MemoryStorage();
  const first = scriptedFetch([() => envelope("5-0", [message("5-0", "x")])]);
  const a = subscribe(URL_, { fetch: first, persist: storage });
  await first.requests(2);
  a.close();
  await a.closed;
  assert.equal(storage.getItem(`pollgate:${URL_}`), "5-0");

  const second = scriptedFetch([]);
  const b = subscribe(URL_, { fetch: second, persist: storage });
  await second.requests(1);
  b.close();
  await b.closed;
  assert.equal(second.calls[0].url.searchParams.get("cursor"), "5-0");

  const third = scriptedFetch([]);
  const c = subscribe(URL_, { fetch: third, persist: storage, persistKey: "other" });
  await third.requests(1);
  c.close();
  await c.closed;
  assert.equal(third.calls[0].url.searchParams.get("cursor"), null, "another key, another cursor");
});

test("a callback that throws does not stop the subscription", async () => {
  const fetch = scriptedFetch([
    () => envelope("1-0", [message("1-0", 1)]),
    () => envelope("2-0", [message("2-0", 2)]),
  ]);
  const seen = [];
  const uncaught = [];
  const reportError = globalThis.reportError;
  globalThis.reportError = (e) => uncaught.push(e.message);
  const sub = subscribe(URL_, {
    fetch,
    onMessage: (m) => {
      seen.push(m.data);
      if (m.data === 1) throw new Error("bug in the page");
    },
  });
  await fetch.requests(3);
  sub.close();
  await sub.closed;
  globalThis.reportError = reportError;
  assert.deepEqual(seen, [1, 2]);
  assert.deepEqual(uncaught, ["bug in the page"], "reported, not swallowed");
});

test("headers may be a function, called before each request", async () => {
  let token = 0;
  const fetch = scriptedFetch([() => envelope("1-0")]);
  const sub = subscribe(URL_, { fetch, headers: () => ({ Authorization: `Bearer t${++token}` }) });
  await fetch.requests(2);
  sub.close();
  await sub.closed;
  assert.equal(fetch.calls[0].init.headers.Authorization, "Bearer t1");
  assert.equal(fetch.calls[1].init.headers.Authorization, "Bearer t2");
  assert.equal(fetch.calls[0].init.cache, "no-store");
});

test("empty answers that come back at once are paced, not hammered", async () => {
  const steps = Array.from({ length: 6 }, () => () => envelope("1-0"));
  const fetch = scriptedFetch(steps);
  const started = Date.now();
  const sub = subscribe(URL_, { fetch, backoff: { initial: 40, max: 40 } });
  await fetch.requests(6);
  sub.close();
  await sub.closed;
  // The first quick answer is followed at once (a drain sends clients
  // elsewhere); each one after it waits 20 to 40 ms.
  assert.ok(Date.now() - started >= 4 * 20, `took ${Date.now() - started} ms`);
});

test("position reads the current cursor without waiting", async () => {
  const fetch = scriptedFetch([() => envelope("42-0")]);
  assert.equal(await position(`${URL_}?cursor=old`, { fetch }), "42-0");
  const { searchParams } = fetch.calls[0].url;
  assert.equal(searchParams.get("timeout"), "0");
  assert.equal(searchParams.get("cursor"), null);

  const refused = scriptedFetch([() => failure(401, "unauthorized", "log in first")]);
  await assert.rejects(position(URL_, { fetch: refused }), { status: 401 });
});

test("a URL that cannot work is refused at once", () => {
  // No page to resolve it against (Node): a relative URL is an error.
  assert.throws(() => subscribe("/rooms/1/events", { fetch: scriptedFetch([]) }), TypeError);
  assert.throws(() => subscribe("http://[bad", { fetch: scriptedFetch([]) }), TypeError);
});
