// The chat demo in a real headless Chromium (Debian's, driven by
// playwright-core): two pages on two pollgate instances that share one
// real Redis, in front of the chat backend, which publishes who is in the
// room through instance one.
//
//   node --test --test-concurrency=1 test/browser/
//
// CHROMIUM names the browser (default /usr/bin/chromium); see harness.js for
// the other binaries.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { ChatBackend, Gateway, Redis, chatConfig, freePort, until } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

let redis;
let backend;
let one; // pollgate instance 1
let two; // pollgate instance 2
let browser;

before(async () => {
  redis = await Redis.start();
  const adminPort = await freePort();
  backend = await ChatBackend.start({ admin: `http://127.0.0.1:${adminPort}` });
  one = await Gateway.start(redis, chatConfig(backend), { adminPort });
  two = await Gateway.start(redis, chatConfig(backend));
  browser = await chromium.launch({ executablePath: CHROMIUM });
});

after(async () => {
  await browser?.close();
  await Promise.all([one?.stop(), two?.stop(), backend?.stop(), redis?.stop()]);
});

// A tab of the chat page, in its own browser context (its own storage and
// network), as `user` in `room` through `gateway`.
async function openChat(gateway, room, user) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  await page.goto(gateway.url(`/?room=${room}&user=${user}`));
  // The page has taken its position, loaded the room and subscribed.
  await page.locator("body[data-subscribed]").waitFor({ state: "attached" });
  return { page, context, problems };
}

/** The texts of the messages a page shows, in order. */
function texts(page) {
  return page.locator("#messages li .text").allTextContents();
}

/** Sends `text` from a page and waits for the backend to have taken it. */
async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
  await page.locator("#messages li .text", { hasText: text }).first().waitFor();
}

/** Waits until the page shows `wanted` as its last messages, in order. */
async function waitForMessages(page, wanted, timeout = 15000) {
  await page
    .waitForFunction(
      (wanted) => {
        const all = [...document.querySelectorAll("#messages li .text")].map((e) => e.textContent);
        return wanted.every((text) => all.includes(text));
      },
      wanted,
      { timeout },
    )
    .catch(async (error) => {
      error.message += `\npage shows: ${JSON.stringify(await texts(page))}`;
      throw error;
    });
  const all = await texts(page);
  const positions = wanted.map((text) => all.indexOf(text));
  assert.deepEqual(positions, [...positions].sort((a, b) => a - b), `in order: ${JSON.stringify(all)}`);
  assert.equal(new Set(all).size, all.length, `each once: ${JSON.stringify(all)}`);
}

/** Waits until the page lists `wanted` (in any order) as in the room. */
async function waitForMembers(page, wanted, timeout = 15000) {
  const shown = () =>
    page.evaluate(() => [...document.querySelectorAll("#members li")].map((e) => e.dataset.member));
  await page
    .waitForFunction(
      (wanted) => {
        const all = [...document.querySelectorAll("#members li")].map((e) => e.dataset.member);
        return JSON.stringify(all.sort()) === JSON.stringify([...wanted].sort());
      },
      wanted,
      { timeout },
    )
    .catch(async (error) => {
      error.message += `\npage lists: ${JSON.stringify(await shown())}`;
      throw error;
    });
}

async function heldPolls(gateway, atLeast) {
  await until(`${atLeast} held polls`, async () => (await gateway.metric("pollgate_held_requests")) >= atLeast);
}

test("two pages see each other's messages at once", async () => {
  const ann = await openChat(one, "t1", "ann");
  const bob = await openChat(two, "t1", "bob");
  await heldPolls(one, 1);
  await heldPolls(two, 1);

  const sent = Date.now();
  await say(ann.page, "hello from ann");
  await waitForMessages(bob.page, ["hello from ann"]);
  const took = Date.now() - sent;
  // A poll is held for up to 30 s: an answer within 3 s is the push, not
  // the next poll.
  assert.ok(took < 3000, `bob saw it after ${took} ms`);

  await say(bob.page, "hi ann, bob here");
  await waitForMessages(ann.page, ["hello from ann", "hi ann, bob here"], 3000);
  assert.equal(await ann.page.locator("#messages li .user").last().textContent(), "bob");
  assert.deepEqual(ann.problems, []);
  assert.deepEqual(bob.problems, []);
  await ann.context.close();
  await bob.context.close();
});

test("each page lists who is in the room; a page closed leaves it after the linger", async () => {
  const ann = await openChat(one, "1", "ann");
  const bob = await openChat(two, "1", "bob");
  await waitForMembers(ann.page, ["ann", "bob"]);
  await waitForMembers(bob.page, ["ann", "bob"]);
  assert.equal(await bob.page.locator("#members li.you").getAttribute("data-member"), "bob");
  assert.deepEqual(await texts(ann.page), [], "presence messages are not chat messages");

  // Ann's held poll ends with her page; she leaves once the demo's linger
  // (5 s) has passed without a poll of hers.
  const closed = Date.now();
  await ann.context.close();
  await waitForMembers(bob.page, ["bob"]);
  const took = Date.now() - closed;
  assert.ok(took >= 4500 && took < 12000, `ann left ${took} ms after her page closed`);
  assert.deepEqual(bob.problems, []);
  await bob.context.close();
});

test("a page offline for a few seconds gets every message, in order, when it returns", async () => {
  const ann = await openChat(one, "t2", "ann");
  const bob = await openChat(two, "t2", "bob");
  await heldPolls(one, 1);

  await ann.context.setOffline(true);
  await ann.page.locator('#status[data-status="retrying"]').waitFor();
  const missed = ["one", "two", "three", "four", "five"].map((n) => `while ann was away: ${n}`);
  for (const text of missed) await say(bob.page, text);
  await new Promise((r) => setTimeout(r, 2000));
  assert.deepEqual(await texts(ann.page), [], "offline: nothing reached ann");

  await ann.context.setOffline(false);
  await waitForMessages(ann.page, missed);
  assert.deepEqual(await texts(ann.page), missed);
  assert.ok(await ann.page.locator("#gap").isHidden(), "no gap: nothing was lost");
  await ann.page.locator('#status[data-status="live"]').waitFor();
  await ann.context.close();
  await bob.context.close();
});

test("a gateway restart (SIGTERM, then start again) loses nothing", async () => {
  const ann = await openChat(one, "t3", "ann");
  const bob = await openChat(two, "t3", "bob");
  await say(bob.page, "before the restart");
  await waitForMessages(ann.page, ["before the restart"]);
  await heldPolls(one, 1);

  const exit = await one.terminate();
  assert.equal(exit.code, 0, `pollgate drained and exited 0:\n${one.output}`);
  await ann.page.locator('#status[data-status="retrying"]').waitFor();
  const during = ["while the gateway was down: a", "while the gateway was down: b", "while the gateway was down: c"];
  for (const text of during) await say(bob.page, text);

  await one.restart();
  await waitForMessages(ann.page, ["before the restart", ...during]);
  assert.deepEqual(await texts(ann.page), ["before the restart", ...during]);
  assert.ok(await ann.page.locator("#gap").isHidden(), "no gap: nothing was lost");
  await ann.context.close();
  await bob.context.close();
});

test("a Redis restarted empty shows the gap, and the room is reloaded whole", async () => {
  const ann = await openChat(one, "t4", "ann");
  const bob = await openChat(two, "t4", "bob");
  await say(bob.page, "before Redis lost everything");
  await waitForMessages(ann.page, ["before Redis lost everything"]);
  assert.ok(await ann.page.locator("#gap").isHidden());

  await redis.restartEmpty();
  await until("both instances back on Redis", async () =>
    (await one.metric("pollgate_broker_up")) === 1 && (await two.metric("pollgate_broker_up")) === 1,
  );
  await say(bob.page, "after Redis came back empty");

  await ann.page.locator("#gap").waitFor({ state: "visible", timeout: 15000 });
  await waitForMessages(ann.page, ["before Redis lost everything", "after Redis came back empty"]);
  await ann.context.close();
  await bob.context.close();
});
