// `presence`: a member set from a snapshot and presence updates, with
// repeats and stale news ignored (node --test).

import { test } from "node:test";
import assert from "node:assert/strict";
import { presence } from "../../pollgate.js";

/** A Presence whose onChange calls are recorded in `changes`. */
function recorded(options = {}) {
  const changes = [];
  const here = presence({ ...options, onChange: (members, change) => changes.push([members, change]) });
  return { here, changes };
}

test("a snapshot, then arrivals and departures, each reported with what changed", () => {
  const { here, changes } = recorded();
  assert.equal(here.reset({ room: "1", members: ["ann"], version: 10 }), true);
  assert.equal(here.apply({ type: "presence", event: "joined", subscriber: "bob", version: 11 }), true);
  assert.equal(here.apply({ event: "left", subscriber: "ann", version: 12 }), true);
  assert.deepEqual(here.members, ["bob"]);
  assert.equal(here.version, 12);
  assert.ok(here.has("bob") && !here.has("ann"));
  assert.deepEqual(changes, [
    [["ann"], { joined: ["ann"], left: [] }],
    [["ann", "bob"], { joined: ["bob"], left: [] }],
    [["bob"], { joined: [], left: ["ann"] }],
  ]);
});

test("repeats and older news are ignored, by version", () => {
  const { here, changes } = recorded({ members: ["ann", "bob"], version: 20 });
  // Published before the snapshot was taken, delivered after it.
  assert.equal(here.apply({ event: "left", subscriber: "bob", members: ["ann"], version: 19 }), false);
  assert.equal(here.apply({ event: "joined", subscriber: "cat", members: ["ann", "bob", "cat"], version: 21 }), true);
  // At-least-once: the same update again.
  assert.equal(here.apply({ event: "joined", subscriber: "cat", members: ["ann", "bob", "cat"], version: 21 }), false);
  // A snapshot loaded before the last update arrived.
  assert.equal(here.reset({ members: ["ann", "bob"], version: 20 }), false);
  assert.deepEqual(here.members, ["ann", "bob", "cat"]);
  assert.equal(changes.length, 1);
});

test("an update's member list replaces the set; without one, its subscriber is added or removed", () => {
  const { here, changes } = recorded({ members: ["ann", "bob"] });
  here.apply({ event: "left", subscriber: "bob", members: ["ann", "dan"] });
  assert.deepEqual(here.members, ["ann", "dan"]);
  assert.deepEqual(changes[0][1], { joined: ["dan"], left: ["bob"] });
  // Without versions, a repeat still changes nothing.
  assert.equal(here.apply({ event: "joined", subscriber: "ann" }), false);
  assert.equal(here.apply({ event: "left", subscriber: "zed" }), false);
  assert.equal(changes.length, 1);
});

test("pollgate's own shapes: webhook event names, and GET /v1/presence's subscribers", () => {
  const { here } = recorded();
  here.reset({ channel: "room:1", subscribers: [{ subscriber: "ann", since: 1 }, { subscriber: "bob", since: 2 }] });
  here.apply({ id: "a-1", event: "subscriber_left", channel: "room:1", subscriber: "ann", at: 3 });
  here.apply({ id: "a-2", event: "subscriber_joined", channel: "room:1", subscriber: "cat", at: 4 });
  assert.deepEqual(here.members, ["bob", "cat"]);
});

test("what is not a presence update is ignored", () => {
  const { here, changes } = recorded({ members: ["ann"] });
  for (const other of [null, undefined, "joined", 7, { user: "ann", text: "hi" }, { event: "channel_vacated" }, { event: "joined" }]) {
    assert.equal(here.apply(other), false, JSON.stringify(other));
  }
  assert.equal(here.reset(null), false);
  assert.equal(here.reset({ members: "ann" }), false);
  assert.deepEqual(here.members, ["ann"]);
  assert.deepEqual(changes, []);
});

test("a snapshot without a version always applies, and the first version is taken from one", () => {
  const { here } = recorded({ members: ["ann"], version: 5 });
  assert.equal(here.reset({ members: ["bob"] }), true);
  assert.equal(here.version, 5);
  const fresh = presence();
  assert.equal(fresh.version, null);
  assert.equal(fresh.apply({ event: "joined", subscriber: "ann", version: 3 }), true);
  assert.equal(fresh.version, 3);
});
