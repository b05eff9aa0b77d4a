// The processes behind the browser tests, all real: a redis-server, the
// chat example's legacy backend (which serves the chat page and the
// client), and pollgate instances on conf/examples/chat.yaml (or other
// routes to the same backend) sharing that Redis. Each runs on free
// loopback ports and is killed when the test file ends.
//
// Binaries: POLLGATE_BIN (default target/debug/pollgate) and
// CHAT_BACKEND_BIN (default target/debug/examples/chat-backend), built by
// `cargo build --all-targets`; REDIS_SERVER (default redis-server).

import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const POLLGATE = process.env.POLLGATE_BIN ?? join(repo, "target/debug/pollgate");
const CHAT_BACKEND = process.env.CHAT_BACKEND_BIN ?? join(repo, "target/debug/examples/chat-backend");
const REDIS_SERVER = process.env.REDIS_SERVER ?? "redis-server";

/** A port nobody listens on right now. */
export async function freePort() {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

/** Polls `check` every 50 ms until it returns a truthy value or `ms` pass. */
export async function until(what, check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// A child process whose output is kept (and shown if the test fails).
class Child {
  constructor(name, command, args, env = {}) {
    this.name = name;
    this.output = "";
    this.process = spawn(command, args, {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, ...env },
    });
    const keep = (chunk) => {
      this.output = (this.output + chunk).slice(-20000);
    };
    this.process.stdout.on("data", keep);
    this.process.stderr.on("data", keep);
    this.exited = once(this.process, "exit").then(([code, signal]) => ({ code, signal }));
  }

  /** Sends `signal` and waits for the exit. Returns {code, signal}. */
  async stop(signal = "SIGKILL") {
    if (this.process.exitCode === null && this.process.signalCode === null) this.process.kill(signal);
    return this.exited;
  }
}

/** A redis-server without persistence: restarting it empties it. */
export class Redis {
  static async start(port) {
    const redis = new Redis();
    redis.port = port ?? (await freePort());
    redis.child = new Child("redis-server", REDIS_SERVER, [
      "--port", String(redis.port), "--bind", "127.0.0.1",
      "--save", "", "--appendonly", "no",
    ]);
    await until("redis-server", () => canConnect(redis.port));
    return redis;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  /** Kills it without a save and starts an empty one on the same port. */
  async restartEmpty() {
    await this.child.stop("SIGKILL");
    const fresh = await Redis.start(this.port);
    this.child = fresh.child;
  }

  stop() {
    return this.child.stop();
  }
}

/**
 * The chat example's backend, which also serves the chat page. It publishes
 * presence messages to the admin API at `admin` (by default an address
 * where nothing listens: never a gateway outside the test).
 */
export class ChatBackend {
  static async start({ admin = "http://127.0.0.1:1" } = {}) {
    const backend = new ChatBackend();
    backend.port = await freePort();
    backend.child = new Child("chat-backend", CHAT_BACKEND, [`127.0.0.1:${backend.port}`], {
      POLLGATE_ADMIN: admin,
    });
    await until("the chat backend", () => canConnect(backend.port));
    return backend;
  }

  stop() {
    return this.child.stop();
  }
}

/**
 * conf/examples/chat.yaml without its listen addresses, pointed at `backend`.
 * With `routes`, those routes instead of the example's routes and of what
 * follows them (its `webhooks:`), on the same upstream.
 */
export function chatConfig(backend, routes) {
  let example = readFileSync(join(repo, "conf/examples/chat.yaml"), "utf8")
    .split("\n")
    .filter((line) => !/^(listen|admin_listen):/.test(line))
    .join("\n")
    .replaceAll("127.0.0.1:3000", `127.0.0.1:${backend.port}`);
  if (routes) example = `${example.slice(0, example.indexOf("\nroutes:"))}\nroutes:\n${routes}`;
  return example;
}

/**
 * A pollgate instance with the Redis broker, on `config` (see chatConfig),
 * with its admin API on `adminPort` when given (e.g. one the backend was
 * told), else on a free port.
 */
export class Gateway {
  static async start(redis, config, { adminPort } = {}) {
    const gateway = new Gateway();
    gateway.port = await freePort();
    gateway.adminPort = adminPort ?? (await freePort());
    config = [
      `listen: "127.0.0.1:${gateway.port}"`,
      `admin_listen: "127.0.0.1:${gateway.adminPort}"`,
      `broker: {url: "${redis.url}"}`,
      `grace_period: 2s`,
      config,
    ].join("\n");
    gateway.config = join(mkdtempSync(join(tmpdir(), "pollgate-browser-")), "pollgate.yaml");
    writeFileSync(gateway.config, config);
    await gateway.run();
    return gateway;
  }

  /** The page's address, e.g. url("/?room=1"). */
  url(path = "/") {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  async run() {
    this.child = new Child("pollgate", POLLGATE, ["serve", "-c", this.config]);
    const ready = () =>
      fetch(`http://127.0.0.1:${this.adminPort}/readyz`).then((r) => r.status === 200);
    await until("pollgate to be ready", async () => {
      if (this.child.process.exitCode !== null) {
        throw new Error(`pollgate exited: ${this.child.output}`);
      }
      return ready();
    });
  }

  /** SIGTERM: held polls are answered with their cursor, then it exits. */
  async terminate() {
    return this.child.stop("SIGTERM");
  }

  /** Starts it again on the same ports and configuration. */
  restart() {
    return this.run();
  }

  /** Publishes `data` (JSON) to `channel` through the publish API. Returns the message id. */
  async publish(channel, data) {
    const response = await fetch(`http://127.0.0.1:${this.adminPort}/v1/publish/${channel}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data),
    });
    if (!response.ok) throw new Error(`publish: HTTP ${response.status}`);
    return (await response.json()).id;
  }

  /** The value of a metric without labels, from the admin listener. */
  async metric(name) {
    const text = await (await fetch(`http://127.0.0.1:${this.adminPort}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith(`${name} `));
    return line ? Number(line.split(" ")[1]) : undefined;
  }

  stop() {
    return this.child.stop();
  }

  get output() {
    return this.child.output;
  }
}

function canConnect(port) {
  return new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}
