//! Kernel side of steering: cgroup connect4/6 rewrite routed TCP connects to the
//! agent's node-local listener, sock_ops records each redirected flow under the
//! client's own (address, port) for the agent, and getpeername4/6 show the
//! application the address it dialled.
//!
//! Built for `bpfel-unknown-none` by `cargo xtask build-ebpf`. On any other
//! target the crate is a stub, so `cargo check`, `cargo clippy --workspace`
//! and `cargo test --workspace` work on a fresh clone (as in aya-template).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("dataplane-ebpf holds eBPF programs: build them with `cargo xtask build-ebpf`");
    std::process::exit(1);
}
