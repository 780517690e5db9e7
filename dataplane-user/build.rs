//! Finds the eBPF object built by `cargo xtask build-ebpf` and hands its path to
//! the crate, which embeds it. Building without it fails with what to run.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DATAPLANE_EBPF_OBJ");
    let obj = match env::var_os("DATAPLANE_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/ebpf/bpfel-unknown-none/release/dataplane")
        }
    };
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.is_file() {
        eprintln!(
            "error: the eBPF object {} is missing.\n\
             Build it first with:\n\n    cargo xtask build-ebpf\n\n\
             (or point DATAPLANE_EBPF_OBJ at a prebuilt object)",
            obj.display()
        );
        std::process::exit(1);
    }
    let obj = obj.canonicalize().expect("object path resolves");
    println!("cargo:rustc-env=DATAPLANE_EBPF_OBJ={}", obj.display());
}
