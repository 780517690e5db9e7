//! The tunnel's wire protocol, sans-IO: pure encode/decode over byte slices,
//! no sockets, no clocks, so every message is property-tested and fuzzed and
//! both ends agree by construction. `no_std`, so the same code could run
//! anywhere; the agent is its only user today, and the control messages to
//! come (relay announcements, names) land here too.
//!
//! - [`stream`]: the header that opens each flow's QUIC stream and the status
//!   that answers it (docs/protocol.md).
//! - [`control`]: the frames each side of a connection writes on its control
//!   stream: hello, advertised routes, draining.
#![cfg_attr(not(test), no_std)]

pub mod control;
pub mod stream;

#[cfg(test)]
mod control_tests;
#[cfg(test)]
mod tests;
