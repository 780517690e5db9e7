//! Finds the eBPF object built by `cargo xtask build-ebpf` and hands its path
//! to the crate, which embeds it. Without it the crate still builds (so
//! `cargo check`, clippy and `cargo test` work on a fresh clone), warns, and
//! the agent refuses to steer, saying what to run.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dataplane_no_ebpf)");
    println!("cargo::rerun-if-env-changed=DATAPLANE_EBPF_OBJ");
    let obj = match env::var_os("DATAPLANE_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/ebpf/bpfel-unknown-none/release/dataplane-ebpf")
        }
    };
    // A missing file counts as changed, so the build that follows
    // `cargo xtask build-ebpf` picks the object up.
    println!("cargo::rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        println!(
            "cargo::warning=no eBPF object at {}: this build cannot steer connects \
             (run `cargo xtask build-ebpf`, or point DATAPLANE_EBPF_OBJ at a prebuilt object)",
            obj.display()
        );
        println!("cargo::rustc-cfg=dataplane_no_ebpf");
        return;
    }
    let obj = obj.canonicalize().expect("object path resolves");
    println!("cargo::rustc-env=DATAPLANE_EBPF_OBJ={}", obj.display());
}
