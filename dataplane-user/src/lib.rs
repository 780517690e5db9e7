//! The dataplane agent as a library: `dataplane` (src/main.rs) is a thin CLI
//! over [`agent::Agent`], and tests run the same agent in process.

pub mod admin;
pub mod agent;
pub mod certs;
pub mod cgroup;
pub mod config;
pub mod config_watch;
pub mod connector;
pub mod direct;
pub mod ebpf;
pub mod flow_metrics;
pub mod kernel;
pub mod metrics;
pub mod netlink;
pub mod routes;
pub mod sockopt;
pub mod splice;
pub mod status;
pub mod steer;
pub mod tls;
pub mod tunnel;

/// Locks a mutex, recovering from poisoning: a panic while holding one of the
/// agent's locks (map handles, tables, connection lists) leaves the data
/// consistent, and the agent must keep serving.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
