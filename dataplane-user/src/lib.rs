//! The dataplane agent as a library: `dataplane` (src/main.rs) is a thin CLI
//! over [`app::Agent`], and tests run the same agent in process.
//!
//! One folder per role, in the order a flow meets them:
//! - `kernel`: what the kernel offers, the cgroup, the redirect interface,
//!   and the eBPF programs and maps that steer routed connects;
//! - `steer`: the redirect listeners, accepting and serving each steered
//!   flow through its route's upstream (`direct`, a tunnel peer, or the
//!   peers advertising a learned route);
//! - `tunnel`: QUIC endpoint, peer pool, handshake, dialing; it carries
//!   streams and knows no roles (inbound streams go to a `StreamHandler`);
//! - `connector`: serving streams peers open: policy, dial, splice;
//! - `relay`: forwarding client streams to the connectors that advertise
//!   their destinations, stream to stream, attesting the client's identity;
//! - `tls`: mutual-TLS material, verifiers, identities, certificates;
//! - `identity`: identity patterns (`spiffe://example.org/node/*`), which
//!   peers entries and policy rules admit;
//! - `admin`: the HTTP admin API over a narrow read interface;
//! - `app`: the composition root: start, reload, drain and shutdown order;
//! - `config`, `ranges`, `routes`, `process`, `memory`, `sockopt`,
//!   `traffic`, `log_budget`: what they say.

pub mod admin;
pub mod app;
pub mod config;
pub mod connector;
pub mod identity;
pub mod kernel;
pub mod log_budget;
pub mod memory;
pub mod process;
pub mod ranges;
pub mod relay;
pub mod routes;
pub mod sockopt;
pub mod steer;
pub mod tls;
pub mod traffic;
pub mod tunnel;

/// Locks a mutex, recovering from poisoning: a panic while holding one of the
/// agent's locks (map handles, tables, connection lists) leaves the data
/// consistent, and the agent must keep serving.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
