// The loop of `watch`: ETags kept and sent back, changes reported, errors
// retried or fatal (node --test).

import { test } from "node:test";
import assert from "node:assert/strict";
import { watch } from "../../pollgate.js";
import { failure, scriptedFetch, signalled } from "./fake.js";

const URL_ = "http://gw.test/orders/7";

function representation(body, etag) {
  return new Response(JSON.stringify(body), {
    status: 200,
    headers: { "Content-Type": "application/json", ETag: etag },
  });
}

const notModified = (etag) => new Response(null, { status: 304, headers: { ETag: etag } });

test("reports the first answer and each change, sending the ETag back", async () => {
  const fetch = scriptedFetch([
    () => representation({ status: "new" }, '"v1"'),
    () => notModified('"v1"'), // a hold that timed out
    () => representation({ status: "paid" }, '"v2"'),
  ]);
  const changes = [];
  const sub = watch(URL_, { fetch, onChange: (value, { etag }) => changes.push([value.status, etag]) });
  await fetch.requests(4);
  sub.close();
  assert.equal(await sub.closed, undefined);
  const sent = fetch.calls.map((c) => c.init.headers["If-None-Match"] ?? null);
  assert.deepEqual(sent, [null, '"v1"', '"v1"', '"v2"']);
  assert.deepEqual(changes, [
    ["new", '"v1"'],
    ["paid", '"v2"'],
  ]);
  assert.equal(sub.etag, '"v2"');
  assert.equal(fetch.calls[0].init.cache, "no-store");
});

test("starts held when given the ETag already seen", async () => {
  const fetch = scriptedFetch([]);
  const sub = watch(URL_, { fetch, etag: '"v9"' });
  await fetch.requests(1);
  sub.close();
  await sub.closed;
  assert.equal(fetch.calls[0].init.headers["If-None-Match"], '"v9"');
});

test("reads the body as text or leaves the response unread", async () => {
  const fetch = scriptedFetch([() => new Response("plain", { headers: { ETag: '"t"' } })]);
  const got = signalled();
  const sub = watch(URL_, { fetch, as: "text", onChange: (v) => got.resolve(v) });
  assert.equal(await got.promise, "plain");
  sub.close();
  await sub.closed;

  const raw = scriptedFetch([() => representation({ a: 1 }, '"r"')]);
  const response = signalled();
  const sub2 = watch(URL_, { fetch: raw, as: "response", onChange: (v) => response.resolve(v) });
  const r = await response.promise;
  assert.equal(r.status, 200);
  assert.deepEqual(await r.json(), { a: 1 });
  sub2.close();
  await sub2.closed;
});

test("upstream trouble (502, 504) is retried with backoff", async () => {
  const fetch = scriptedFetch([
    () => failure(502, "bad_gateway", "connection refused"),
    () => failure(504, "gateway_timeout", "read timed out"),
    () => representation({ ok: true }, '"v1"'),
  ]);
  const errors = [];
  const got = signalled();
  const sub = watch(URL_, {
    fetch,
    backoff: { initial: 5, max: 10 },
    onError: (e, { fatal }) => errors.push([e.status, fatal]),
    onChange: (v) => got.resolve(v),
  });
  assert.deepEqual(await got.promise, { ok: true });
  sub.close();
  await sub.closed;
  assert.deepEqual(errors, [
    [502, false],
    [504, false],
  ]);
});

test("an answer without ETag ends the watch with a clear error", async () => {
  const fetch = scriptedFetch([() => new Response("{}", { status: 200 })]);
  const error = await watch(URL_, { fetch }).closed;
  assert.equal(error.retryable, false);
  assert.match(error.message, /no ETag/);
  assert.equal(fetch.calls.length, 1);
});

test("a 404 ends the watch", async () => {
  const fetch = scriptedFetch([() => failure(404, "not_found", "no such order")]);
  const error = await watch(URL_, { fetch }).closed;
  assert.equal(error.status, 404);
  assert.equal(error.detail, "no such order");
});
