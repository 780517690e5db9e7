//! The kernel, as the agent uses it: the capabilities it needs (`caps`),
//! what the running kernel offers (`probe`), the cgroup the programs attach to (`cgroup`), the node-local
//! interface the redirect listeners sit on (`netlink`), and the loaded
//! programs with their maps (`steering`, read by `metrics`; its route tries
//! are changed as one transaction by `trie`; their own log lines are drained
//! by `logs`), and the state pinned under bpffs that outlives the agent and
//! the map layout it must match (`pins`).

pub mod caps;
pub mod cgroup;
mod logs;
pub mod metrics;
pub mod netlink;
pub mod pins;
pub mod probe;
pub mod steering;
mod trie;

pub use pins::Capacity;
pub use steering::{BypassGuard, KernelCounters, MapStats, Recovered, Role, Steering, SteeringError};
