//! Runs a worked example as its doc does: the example backend binary
//! (`cargo test` builds `examples/`) and pollgate on the example's config
//! under `conf/examples/`, on free ports. A backend that publishes finds
//! pollgate's admin API in `POLLGATE_ADMIN`.
#![allow(dead_code)]

use super::{free_port, Pollgate};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// An example backend process and pollgate in front of it; both stop when
/// it drops.
pub struct Example {
    pub pg: Pollgate,
    pub backend_port: u16,
    backend: Child,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.backend.kill();
        let _ = self.backend.wait();
    }
}

impl Example {
    /// Starts example binary `name` and pollgate on `conf/examples/<config>`,
    /// whose upstream address `backend_addr` is replaced by the backend's.
    pub fn start(name: &str, config: &str, backend_addr: &str) -> Example {
        let backend_port = free_port();
        let path = format!("{}/conf/examples/{config}", env!("CARGO_MANIFEST_DIR"));
        let conf: String = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("listen:") && !l.starts_with("admin_listen:"))
            .map(|l| l.replace(backend_addr, &format!("127.0.0.1:{backend_port}")) + "\n")
            .collect();
        // pollgate first, so that the backend can be told its admin address
        // (an upstream's only address is used even before its check passes).
        let pg = Pollgate::start(&conf);
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_pollgate"))
            .parent()
            .unwrap()
            .join("examples")
            .join(name);
        let backend = Command::new(binary)
            .arg(format!("127.0.0.1:{backend_port}"))
            .env("POLLGATE_ADMIN", pg.admin(""))
            .stderr(Stdio::null())
            .spawn()
            .expect("cargo builds examples for tests");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", backend_port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Example {
            pg,
            backend_port,
            backend,
        }
    }
}
