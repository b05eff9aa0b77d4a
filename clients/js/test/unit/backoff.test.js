// Retry pacing: exponential backoff with jitter, Retry-After, and which
// statuses are retried (node --test).

import { test } from "node:test";
import assert from "node:assert/strict";
import { backoff, retryAfter, isRetryableStatus, DEFAULT_BACKOFF } from "../../pollgate.js";

test("delays double from the initial one up to the maximum", () => {
  const top = () => 1; // the longest delay the jitter allows
  assert.deepEqual(
    [1, 2, 3, 4, 5, 6, 7].map((n) => backoff(n, { initial: 1000, max: 30000 }, top)),
    [1000, 2000, 4000, 8000, 16000, 30000, 30000],
  );
  assert.equal(backoff(50, {}, top), DEFAULT_BACKOFF.max, "no overflow far out");
});

test("jitter keeps each delay between half of it and all of it", () => {
  assert.equal(backoff(3, {}, () => 0), 2000);
  assert.equal(backoff(3, {}, () => 0.5), 3000);
  for (let i = 0; i < 1000; i++) {
    const d = backoff(2, { initial: 100 });
    assert.ok(d >= 100 && d <= 200, `${d}`);
  }
  const spread = new Set(Array.from({ length: 50 }, () => backoff(4)));
  assert.ok(spread.size > 40, "clients dropped together come back apart");
});

test("the factor is configurable", () => {
  assert.equal(backoff(3, { initial: 10, factor: 3, max: 1e6 }, () => 1), 90);
});

test("Retry-After in seconds or as a date", () => {
  assert.equal(retryAfter("3"), 3000);
  assert.equal(retryAfter("0.5"), 500);
  const now = Date.parse("Wed, 25 Nov 2026 10:00:00 GMT");
  assert.equal(retryAfter("Wed, 25 Nov 2026 10:00:07 GMT", now), 7000);
  assert.equal(retryAfter("Wed, 25 Nov 2026 09:00:00 GMT", now), 0, "a date in the past");
  assert.equal(retryAfter(null), 0);
  assert.equal(retryAfter("soon"), 0);
  assert.equal(retryAfter("-5"), 0);
});

test("timeouts, rate limits and server errors are retried; other refusals are not", () => {
  for (const status of [408, 425, 429, 500, 502, 503, 504]) assert.ok(isRetryableStatus(status), `${status}`);
  for (const status of [400, 401, 403, 404, 405, 413]) assert.ok(!isRetryableStatus(status), `${status}`);
});
