//! pollgate: a long-poll gateway on Pingora.
//!
//! Data flows one way: [`config`] → [`routes`] → [`gateway`] / [`admin`] →
//! [`hub`] → [`broker`]. [`server`] assembles the Pingora server; `main.rs`
//! holds the command line.

pub mod admin;
pub mod admission;
pub mod answer;
pub mod ascii;
pub mod authorize;
pub mod broker;
pub mod cli;
pub mod config;
pub mod cursor;
pub mod error;
pub mod fairness;
pub mod front;
pub mod gateway;
pub mod h1;
pub mod history;
pub mod hold;
pub mod http1;
pub mod hub;
pub mod lifecycle;
pub mod listener;
pub mod malformed;
pub mod message;
pub mod metrics;
pub mod poll;
pub mod prefetch;
pub mod presence;
pub mod relay;
pub mod respond;
pub mod routes;
pub mod secret;
pub mod server;
pub mod shards;
pub mod sse;
pub mod subscription;
pub mod target;
pub mod tcp;
pub mod template;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod waiter;
pub mod watch;
