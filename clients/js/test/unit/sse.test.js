// The EventSource mode of `subscribe`: events, cursor, gap events, and
// reconnects that carry the newest cursor (node --test, with a stand-in
// EventSource that the test drives).

import { test } from "node:test";
import assert from "node:assert/strict";
import { subscribe } from "../../pollgate.js";
import { MemoryStorage } from "./fake.js";

const URL_ = "http://gw.test/rooms/1/events";

// An EventSource whose events the test sends.
function fakeEventSource() {
  const opened = [];
  class FakeEventSource {
    constructor(url, init) {
      this.url = new URL(url);
      this.init = init;
      this.closed = false;
      this.listeners = {};
      opened.push(this);
    }
    addEventListener(type, listener) {
      this.listeners[type] = listener;
    }
    close() {
      this.closed = true;
    }
    message(cursor, message) {
      this.onmessage({ data: JSON.stringify(message), lastEventId: cursor });
    }
  }
  FakeEventSource.opened = opened;
  return FakeEventSource;
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

test("events are messages; the last event id is the cursor, kept on reconnect", async () => {
  const EventSource = fakeEventSource();
  const storage = new MemoryStorage();
  const seen = [];
  const errors = [];
  const sub = subscribe(URL_, {
    transport: "sse",
    EventSource,
    persist: storage,
    backoff: { initial: 5, max: 5 },
    onMessage: (m, { cursor }) => seen.push([m.data, cursor]),
    onError: (e) => errors.push(e.message),
  });
  await tick();
  const [first] = EventSource.opened;
  assert.equal(first.url.searchParams.get("cursor"), null);
  first.onopen();
  first.message("1-0", { id: "1-0", data: "a" });
  first.message("2-0", { id: "2-0", data: "b" });
  assert.equal(sub.cursor, "2-0");
  assert.equal(storage.getItem(`pollgate:${URL_}`), "2-0");

  first.onerror(); // the stream broke: a new one starts from the cursor
  while (EventSource.opened.length < 2) await new Promise((r) => setTimeout(r, 2));
  assert.ok(first.closed, "the broken stream is closed, not left to its own reconnect");
  const second = EventSource.opened[1];
  assert.equal(second.url.searchParams.get("cursor"), "2-0");
  second.message("3-0", { id: "3-0", data: "c" });

  sub.close();
  assert.equal(await sub.closed, undefined);
  assert.ok(second.closed);
  assert.deepEqual(seen, [
    ["a", "1-0"],
    ["b", "2-0"],
    ["c", "3-0"],
  ]);
  assert.deepEqual(errors, ["the event stream was interrupted"]);
});

test("a gap event is reported before the messages that follow it", async () => {
  const EventSource = fakeEventSource();
  const events = [];
  const sub = subscribe(URL_, {
    transport: "sse",
    EventSource,
    cursor: "1-0",
    onGap: (g) => events.push(["gap", g.reason]),
    onMessage: (m) => events.push(["message", m.id]),
  });
  await tick();
  const [source] = EventSource.opened;
  assert.equal(source.url.searchParams.get("cursor"), "1-0");
  source.listeners.gap({ data: '{"gap":true}' });
  source.message("9-0", { id: "9-0" });
  sub.close();
  await sub.closed;
  assert.deepEqual(events, [
    ["gap", "gap"],
    ["message", "9-0"],
  ]);
});

test("cookies across origins are sent with credentials: include", async () => {
  const EventSource = fakeEventSource();
  const sub = subscribe(URL_, { transport: "sse", EventSource, credentials: "include" });
  await tick();
  assert.equal(EventSource.opened[0].init.withCredentials, true);
  sub.close();
  await sub.closed;
});

test("without EventSource the subscription ends with an error", async () => {
  const error = await subscribe(URL_, { transport: "sse", EventSource: null }).closed;
  assert.match(error.message, /EventSource is not available/);
});
