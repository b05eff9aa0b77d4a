// Type declarations of pollgate.js, the client for pollgate's subscribe and
// watch routes, and its member list for presence. The contract is in
// README.md.

/** One message of a subscribe answer, as pollgate sends it. */
export interface Message<T = unknown> {
  /** The message id, `<ms>-<seq>`. */
  id: string;
  /** The channel it was published to. */
  channel: string;
  /** The content type it was published with. */
  content_type: string;
  /** The JSON value for JSON messages, else a string (base64 when `encoding` says so). */
  data: T;
  /** `"base64"` when `data` is base64 (a body that is not UTF-8). */
  encoding?: "base64";
}

/** Pacing of retries, in milliseconds. */
export interface Backoff {
  /** The first delay (default 1000). */
  initial?: number;
  /** The longest delay (default 30000). */
  max?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
}

/** Where a subscription stands: answered last time, waiting to retry, or ended. */
export type Status = "live" | "retrying" | "closed";

/** What `onError` is told besides the error. */
export interface ErrorInfo {
  /** True when the error ends the subscription (e.g. 401, 403, 404). */
  fatal: boolean;
  /** Milliseconds until the next attempt, or null when fatal. */
  retryIn: number | null;
}

/** What `onGap` is told. */
export interface GapInfo {
  /** The new cursor (null on an event stream, and when the cursor was refused). */
  cursor: string | null;
  /** `"gap"`: the position was lost; `"cursor refused"`: the gateway did not accept the cursor. */
  reason: "gap" | "cursor refused";
}

/** A Storage-like object (sessionStorage, localStorage, or your own). */
export interface CursorStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** Options shared by `subscribe`, `watch` and `position`. */
export interface RequestOptions {
  /** Request headers, or a function returning them before each request (e.g. a fresh token). */
  headers?: Record<string, string> | (() => Record<string, string>);
  /** fetch's credentials mode (default "same-origin"); "include" for cookies across origins. */
  credentials?: RequestCredentials;
  /** Stops the subscription (or the request of `position`). */
  signal?: AbortSignal;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

/** Options of `subscribe` and `watch`. */
export interface LoopOptions extends RequestOptions {
  /** Called on every error; retryable ones are retried after `retryIn` ms. */
  onError?: (error: PollgateError, info: ErrorInfo) => void;
  /** Called when the status changes. */
  onStatus?: (status: Status) => void;
  /** Pacing of retries. */
  backoff?: Backoff;
  /** Milliseconds to wait for an answer before the request counts as lost
   * (default: `timeout` plus 15 s, or 120 s). */
  deadline?: number;
}

/** Options of `subscribe`. */
export interface SubscribeOptions<T = unknown> extends LoopOptions {
  /** Called for each message, in order. */
  onMessage?: (message: Message<T>, info: { cursor: string | null }) => void;
  /** Called when messages were lost; the retained messages follow through `onMessage`. */
  onGap?: (info: GapInfo) => void;
  /** The position to start from (wins over a persisted one). */
  cursor?: string | null;
  /** Keeps the cursor across page loads: `true` for sessionStorage, or a Storage. */
  persist?: boolean | CursorStorage;
  /** The storage key (default `pollgate:<url>`). */
  persistKey?: string;
  /** Hold time to ask for, in seconds (the route's timeout caps it). */
  timeout?: number;
  /** `"poll"` (default) long-polls; `"sse"` opens an EventSource on the route. */
  transport?: "poll" | "sse";
  /** An EventSource implementation (default: the global one). */
  EventSource?: typeof EventSource;
}

/** Options of `watch`. */
export interface WatchOptions<T = unknown> extends LoopOptions {
  /** Called on the first answer and on every change. */
  onChange?: (value: T, info: { etag: string; response: Response }) => void;
  /** The ETag already seen: the first request is then held until a change. */
  etag?: string | null;
  /** How to read the body: "json" (default), "text", or "response" (unread). */
  as?: "json" | "text" | "response";
}

/** A running subscription or watch. */
export class Subscription {
  /** The position so far (subscribe). */
  readonly cursor: string | null;
  /** The ETag seen last (watch). */
  readonly etag: string | null;
  /** Whether it has ended or is ending. */
  readonly stopped: boolean;
  /** Resolves once it has ended: undefined when closed, the error when one ended it. */
  readonly closed: Promise<PollgateError | undefined>;
  /** Stops it; the request in flight is aborted. */
  close(): void;
}

/** A failed request or an unexpected answer. */
export class PollgateError extends Error {
  /** The HTTP status, 0 for a network failure. */
  status: number;
  /** pollgate's `error` code, when the body had one. */
  code?: string;
  /** pollgate's `detail`, when the body had one. */
  detail?: string;
  /** Whether the client retries on its own. */
  retryable: boolean;
  /** Milliseconds asked for by `Retry-After`, when present. */
  retryAfter?: number;
}

/** Long-polls (or streams) a subscribe route until closed. Throws a TypeError
 * for a URL that cannot be resolved (a relative one outside a page). */
export function subscribe<T = unknown>(url: string | URL, options?: SubscribeOptions<T>): Subscription;

/** Long-polls a watch route, keeping the ETag. Throws a TypeError for a URL
 * that cannot be resolved. */
export function watch<T = unknown>(url: string | URL, options?: WatchOptions<T>): Subscription;

/** The current cursor of a subscribe route, without waiting. */
export function position(url: string | URL, options?: RequestOptions): Promise<string>;

/** Member ids, or entries naming one in `subscriber` (pollgate's `GET /v1/presence`). */
export type MemberList = ReadonlyArray<string | { subscriber: string; since?: number }>;

/** Who is present, as a backend answers it. */
export interface PresenceSnapshot {
  /** The members. */
  members?: MemberList;
  /** The members, as pollgate's `GET /v1/presence/{channel}` names them. */
  subscribers?: MemberList;
  /** Grows with each change; a snapshot older than the version held is ignored. */
  version?: number | null;
}

/** One arrival or departure, as a backend publishes it. */
export interface PresenceUpdate {
  /** What happened; pollgate's webhook event names are taken too. */
  event: "joined" | "left" | "subscriber_joined" | "subscriber_left";
  /** Who came or went. */
  subscriber?: string;
  /** Everyone present after it: replaces the set when given. */
  members?: MemberList;
  /** Grows with each change; an update not above the version held is ignored. */
  version?: number | null;
}

/** What `onChange` is told besides the members. */
export interface PresenceChange {
  /** Ids that came. */
  joined: string[];
  /** Ids that went. */
  left: string[];
}

/** Options of `presence`. */
export interface PresenceOptions {
  /** The members to start from (no `onChange` for them). */
  members?: MemberList;
  /** Their version. */
  version?: number | null;
  /** Called each time the set changes, with the members after it. */
  onChange?: (members: string[], change: PresenceChange) => void;
}

/** Who is present: a member set kept from snapshots and presence updates. */
export class Presence {
  /** The members, in the order they came (or the last list's order). */
  readonly members: string[];
  /** The version of what is held, or null. */
  readonly version: number | null;
  /** Whether `id` is present. */
  has(id: string): boolean;
  /** Replaces the set with a snapshot, unless it is older. Returns whether the set changed. */
  reset(snapshot: PresenceSnapshot): boolean;
  /** Applies a presence update; anything else, a repeat or older news is
   * ignored. Returns whether the set changed. */
  apply(update: PresenceUpdate): boolean;
  apply(message: unknown): boolean;
}

/** Keeps who is present from a snapshot and presence updates. */
export function presence(options?: PresenceOptions): Presence;

/** The delay before retry `attempt` (1, 2, ...), with jitter, in milliseconds. */
export function backoff(attempt: number, options?: Backoff, random?: () => number): number;

/** Milliseconds a `Retry-After` value asks for; 0 when absent or unreadable. */
export function retryAfter(value: string | null | undefined, now?: number): number;

/** Whether a status is retried: 408, 425, 429 and 5xx. */
export function isRetryableStatus(status: number): boolean;

/** The default backoff. */
export const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;
