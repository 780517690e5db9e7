//! `cargo xtask`: developer tasks that need more than cargo: building the eBPF
//! object (and the toolchain it needs), the demo, and benchmarks.

mod build_ebpf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "dataplane developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs nightly rust-src and a matching bpf-linker if missing).
    BuildEbpf(build_ebpf::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(opts) => build_ebpf::run(&opts).map(|_| ()),
    }
}
