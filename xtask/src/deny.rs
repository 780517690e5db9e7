//! `cargo xtask deny`: `cargo deny check` (advisories, licences, duplicate
//! versions, sources; deny.toml) against the RustSec snapshot in
//! supply-chain/, for machines that reach crates.io but not GitHub.
//! `--refresh-from DIR` replaces the snapshot from a clone of
//! github.com/rustsec/advisory-db.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};

use crate::build_ebpf::workspace_root;

/// Where cargo deny looks for a clone of the default database under
/// deny.toml's `db-path` (its directory name is derived from the URL).
const DB_DIR: &str = "target/advisory-dbs/advisory-db-3157b0e258782691";
const SNAPSHOT: &str = "supply-chain/advisory-db.tar.xz";
/// The commit and date the snapshot was taken at (supply-chain/README.md).
const SNAPSHOT_COMMIT: &str = "bf5c0d245a92671908518d7e765914d437954ed6";
const SNAPSHOT_DATE: &str = "2026-08-21T08:28:40+02:00";

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// Replace the snapshot from this clone of the advisory database, then check.
    #[arg(long)]
    refresh_from: Option<std::path::PathBuf>,
}

pub fn run(opts: &Options) -> Result<()> {
    let root = workspace_root();
    if let Some(clone) = &opts.refresh_from {
        refresh(clone, &root.join(SNAPSHOT))?;
    }
    ensure!(
        Command::new("cargo-deny").arg("--version").output().is_ok_and(|o| o.status.success()),
        "cargo-deny is not installed: cargo install cargo-deny --locked"
    );
    unpack(&root)?;
    // `--offline` also keeps cargo metadata off the network: fetch first.
    run_ok(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args(["fetch", "--quiet"]),
    )?;
    run_ok(Command::new("cargo-deny").current_dir(&root).args(["--offline", "check"]))
}

/// The snapshot as the git clone cargo deny expects, its one commit dated
/// like the snapshot (cargo deny reads the database's age from it).
fn unpack(root: &Path) -> Result<()> {
    let db = root.join(DB_DIR);
    if db.exists() {
        std::fs::remove_dir_all(&db).with_context(|| format!("removing {}", db.display()))?;
    }
    std::fs::create_dir_all(&db)?;
    run_ok(Command::new("tar").arg("-xJf").arg(root.join(SNAPSHOT)).arg("-C").arg(&db))?;
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.current_dir(&db)
            .args(["-c", "user.name=advisory-db snapshot", "-c", "user.email=snapshot@localhost"])
            .args(args)
            .env("GIT_AUTHOR_DATE", SNAPSHOT_DATE)
            .env("GIT_COMMITTER_DATE", SNAPSHOT_DATE);
        run_ok(&mut c)
    };
    git(&["init", "--quiet"])?;
    git(&["add", "--all"])?;
    git(&["commit", "--quiet", "-m", &format!("rustsec/advisory-db {SNAPSHOT_COMMIT}")])
}

fn refresh(clone: &Path, snapshot: &Path) -> Result<()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("git -C \"$1\" log -1 --format='%H %cI' && git -C \"$1\" archive --format=tar HEAD crates | xz -9 > \"$2\"")
        .args(["sh"])
        .arg(clone)
        .arg(snapshot)
        .output()
        .context("running git archive")?;
    ensure!(out.status.success(), "refreshing the snapshot failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!(
        "xtask: snapshot replaced from {} at {}; update SNAPSHOT_COMMIT/SNAPSHOT_DATE in xtask/src/deny.rs and supply-chain/README.md",
        clone.display(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}
