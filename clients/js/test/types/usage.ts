// Type-checks pollgate.d.ts as a TypeScript user would use it
// (`npx tsc -p test/types`); nothing here runs.

import {
  subscribe,
  watch,
  position,
  backoff,
  retryAfter,
  isRetryableStatus,
  DEFAULT_BACKOFF,
  PollgateError,
  type Message,
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
}
void usage;
