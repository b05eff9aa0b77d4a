// Type-checks pollgate.d.ts as a TypeScript user would use it
// (`npx tsc -p test/types`); nothing here runs.

import {
  subscribe,
  watch,
  position,
  backoff,
  retryAfter,
  isRetryableStatus,
  presence,
  DEFAULT_BACKOFF,
  PollgateError,
  type Message,
  type Presence,
  type PresenceSnapshot,
  type Subscription,
} from "@pollgate/client";

interface Chat {
  user: string;
  text: string;
}

async function usage(): Promise<void> {
  const controller = new AbortController();
  const cursor: string = await position("/rooms/1/events", { headers: { Authorization: "Bearer ann" } });
  const sub: Subscription = subscribe<Chat>("/rooms/1/events", {
    cursor,
    persist: true,
    persistKey: "room-1",
    timeout: 25,
    signal: controller.signal,
    headers: () => ({ Authorization: "Bearer ann" }),
    backoff: { initial: 500, max: 10_000 },
    onMessage(message: Message<Chat>, { cursor }) {
      const text: string = message.data.text;
      const at: string | null = cursor;
      void [text, at, message.id, message.channel, message.content_type];
    },
    onGap({ cursor, reason }) {
      const why: "gap" | "cursor refused" = reason;
      void [cursor, why];
    },
    onError(error: PollgateError, { fatal, retryIn }) {
      void [error.status, error.code, error.detail, error.retryable, fatal, retryIn];
    },
    onStatus(status) {
      const s: "live" | "retrying" | "closed" = status;
      void s;
    },
  });
  subscribe("/news", { transport: "sse", credentials: "include", persist: sessionStorage });
  const order = watch<{ status: string }>("/orders/7", {
    as: "json",
    etag: null,
    onChange(value, { etag, response }) {
      void [value.status, etag, response.status];
    },
  });
  const ended: PollgateError | undefined = await sub.closed;
  void [ended, order.etag, sub.cursor, sub.stopped];
  order.close();
  const ms: number = backoff(3, DEFAULT_BACKOFF) + retryAfter("5") + (isRetryableStatus(503) ? 1 : 0);
  void ms;

  const here: Presence = presence({
    members: ["ann"],
    version: 1,
    onChange(members: string[], { joined, left }) {
      void [members.join(", "), joined.length, left.length];
    },
  });
  const snapshot: PresenceSnapshot = await (await fetch("/rooms/1/members")).json();
  const changed: boolean = here.reset(snapshot);
  here.reset({ subscribers: [{ subscriber: "bob", since: 1796640000000 }] });
  here.apply({ event: "joined", subscriber: "cat", members: ["ann", "cat"], version: 2 });
  here.apply({ event: "subscriber_left", subscriber: "cat" });
  subscribe("/rooms/1/events", { onMessage: (message) => here.apply(message.data) });
  const present: boolean = here.has("ann");
  const version: number | null = here.version;
  void [changed, present, version, here.members.length];
}
void usage;
