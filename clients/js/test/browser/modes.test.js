// The client's other modes in a real headless Chromium, against real
// pollgate instances on one real Redis: Server-Sent Events across a gateway
// restart, `watch` on a legacy GET, `position`, and an AbortSignal that
// releases the held poll on the server.
//
// The page is any page of the gateway's origin; the test imports the
// client the chat backend serves (/pollgate.js) into it and drives it with
// page.evaluate.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { ChatBackend, Gateway, Redis, chatConfig, until } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

// Open subscribe routes, and the chat backend's room list as a watch route.
const ROUTES = `
  - path: "/sub/{channel}"
    methods: [GET]
    subscribe: {channels: ["{channel}"], timeout: 30s}
  - path: "/rooms/{room}/messages"
    methods: [GET]
    upstream: chat
    watch: {channels: ["room:{room}"], timeout: 30s}
  - path: "/rooms/{room}/messages"
    methods: [POST]
    upstream: chat
    publish: {channel: "room:{room}", body: none}
  - path: "/"
    upstream: chat
`;

let redis;
let backend;
let one;
let two;
let browser;

before(async () => {
  redis = await Redis.start();
  backend = await ChatBackend.start();
  one = await Gateway.start(redis, chatConfig(backend, ROUTES));
  two = await Gateway.start(redis, chatConfig(backend, ROUTES));
  browser = await chromium.launch({ executablePath: CHROMIUM });
});

after(async () => {
  await browser?.close();
  await Promise.all([one?.stop(), two?.stop(), backend?.stop(), redis?.stop()]);
});

// A page on `gateway`'s origin with the client imported as window.pollgate.
async function clientPage(gateway) {
  const page = await browser.newPage();
  await page.goto(gateway.url("/rooms/none/messages"));
  await page.evaluate(async () => {
    window.pollgate = await import("/pollgate.js");
  });
  return page;
}

/** Waits until `expression` (evaluated in the page) is truthy. */
function waitIn(page, expression, arg, timeout = 15000) {
  return page.waitForFunction(expression, arg, { timeout });
}

test("SSE: events in order, and a gateway restart resumes from the newest cursor", async () => {
  const page = await clientPage(one);
  await two.publish("sse1", { n: 0 }); // before the subscription: not wanted
  await page.evaluate(async () => {
    window.got = [];
    window.statuses = [];
    const cursor = await pollgate.position("/sub/sse1");
    window.sub = pollgate.subscribe("/sub/sse1", {
      transport: "sse",
      cursor,
      backoff: { initial: 200, max: 1000 },
      onMessage: (m) => window.got.push(m.data.n),
      onStatus: (s) => window.statuses.push(s),
    });
  });
  await waitIn(page, () => window.statuses.includes("live"));
  for (const n of [1, 2, 3]) await two.publish("sse1", { n });
  await waitIn(page, () => window.got.length >= 3);

  assert.equal((await one.terminate()).code, 0);
  await waitIn(page, () => window.statuses.includes("retrying"));
  for (const n of [4, 5]) await two.publish("sse1", { n }); // while it is down
  await one.restart();
  await two.publish("sse1", { n: 6 });
  await waitIn(page, () => window.got.length >= 6);
  await new Promise((r) => setTimeout(r, 300)); // room for a duplicate to show
  assert.deepEqual(await page.evaluate(() => window.got), [1, 2, 3, 4, 5, 6]);
  await page.evaluate(() => window.sub.close());
  await page.close();
});

test("watch: the room's list, first as it is, then on each change", async () => {
  const page = await clientPage(one);
  await page.evaluate(() => {
    window.changes = [];
    window.sub = pollgate.watch("/rooms/w1/messages", {
      onChange: (list, { etag }) => window.changes.push({ texts: list.map((m) => m.text), etag }),
    });
  });
  await waitIn(page, () => window.changes.length === 1);
  await until("the watch to be held", async () => (await one.metric("pollgate_held_watchers")) >= 1);

  const post = (text) =>
    fetch(two.url("/rooms/w1/messages"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user: "cat", text }),
    });
  assert.equal((await post("first")).status, 201);
  await waitIn(page, () => window.changes.length === 2);
  assert.equal((await post("second")).status, 201);
  await waitIn(page, () => window.changes.length === 3);

  const changes = await page.evaluate(() => window.changes);
  assert.deepEqual(
    changes.map((c) => c.texts),
    [[], ["first"], ["first", "second"]],
  );
  assert.equal(new Set(changes.map((c) => c.etag)).size, 3, "a new ETag per change");
  await page.evaluate(() => window.sub.close());
  await page.close();
});

test("aborting the signal releases the poll held on the server", async () => {
  const page = await clientPage(one);
  await until("no held polls", async () => (await one.metric("pollgate_held_requests")) === 0);
  await page.evaluate(() => {
    window.controller = new AbortController();
    window.sub = pollgate.subscribe("/sub/abort1", { signal: window.controller.signal });
  });
  await until("the poll to be held", async () => (await one.metric("pollgate_held_requests")) === 1);
  const ended = await page.evaluate(async () => {
    window.controller.abort();
    return (await window.sub.closed) === undefined;
  });
  assert.ok(ended, "closed resolves without an error");
  await until("the server to release it", async () => (await one.metric("pollgate_held_requests")) === 0);
  await page.close();
});
