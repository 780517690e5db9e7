//! What runs in the guest: the test binaries (every integration suite of
//! `tests/`), the script that runs them one after another with markers, and
//! reading their results back from its output.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};

/// Payload of the tunnel's bulk-transfer test under emulation (MiB): with
/// the workload, the server and both agents (debug builds) on one emulated
/// CPU, 16 MiB did not finish in 10 minutes; the transfer checks nothing
/// kernel-specific that 2 MiB does not.
const GUEST_BULK_MIB: u32 = 2;
/// How much slower than a real machine the guest's latency bounds may be
/// (`tests::fast_us`): 819 ms was seen under TCG for a reset the host gives
/// in a few ms, against a host bound of 500 ms; 4x keeps every bound below
/// the timeouts whose expiry the bounds rule out (the 3 s wait for a
/// connector's status, the probe's 5 s read timeout).
const GUEST_TIME_SCALE: u32 = 4;

/// Suites that run on the host's kernel only (in `cargo xtask test`, in
/// CI): the fleet's userspace protocol (advertised routes, relays, failover
/// timings) over steering the other suites already check on every kernel.
/// Under emulation one CPU carries up to seven agents, a bulk transfer and
/// the workload, so their sub-second failover timings would measure the
/// emulator (a drain raced a 2 MiB transfer there, and a 200 ms
/// acknowledgement check misfired under that load), and they would add
/// about ten minutes of emulation to CI. Likewise identity patterns,
/// per-identity policy and per-peer limits (`identity`, `peer_limits`:
/// decisions in userspace over the same steering, about six minutes of
/// emulation), the manifests (`deploy`: no kernel involved) and the
/// connector's Kubernetes discovery (`discovery`: an API watch in
/// userspace; what it changes reaches the kernel as learned routes do, as
/// `advertised` checks). The podman suite needs podman, which the guests
/// lack. (Booting
/// the two guests side by side was tried: it halves the matrix, but two
/// TCG vCPUs and their I/O on two cores stretch the guests' latency
/// bounds past what they allow.)
pub(super) const HOST_ONLY: [&str; 8] =
    ["advertised", "relay", "fleet", "identity", "peer_limits", "deploy", "discovery", "podman"];

/// Cargo names test binaries `<suite>-<hash>`.
pub(super) fn suite_name(bin: &Path) -> &str {
    let file = bin.file_name().and_then(|n| n.to_str()).unwrap_or("test");
    file.rsplit_once('-').map_or(file, |(n, _)| n)
}

/// One test binary's run in the guest.
#[derive(Debug, PartialEq)]
pub(super) struct Suite {
    pub name: String,
    pub passed: u32,
    pub failed: u32,
    pub secs: u64,
    pub rc: i32,
}

/// Builds the privileged integration tests (and the probe and agent
/// binaries they spawn) and returns the test executables. The build is
/// `cargo xtask test`'s own (`cargo test --workspace`, one feature
/// resolution), so after it nothing is compiled again: a build of the tests
/// crate alone resolved features differently and rebuilt about 150 crates.
pub(super) fn build_test_binaries(root: &Path) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["test", "--workspace", "--no-run", "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    ensure!(out.status.success(), "building the test binaries failed");
    let suites = root.join("tests/tests");
    let (mut bins, mut agent) = (Vec::new(), false);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let kind = |k: &str| msg["target"]["kind"].as_array().is_some_and(|ks| ks.iter().any(|x| x == k));
        agent |= kind("bin") && msg["target"]["name"] == "dataplane";
        // Every privileged suite: the tests crate's integration tests (not
        // unit tests, nor other crates' integration tests).
        let suite = msg["target"]["src_path"].as_str().is_some_and(|p| Path::new(p).starts_with(&suites));
        if let (true, true, Some(exe)) = (kind("test"), suite, msg["executable"].as_str()) {
            let exe = PathBuf::from(exe);
            if HOST_ONLY.contains(&suite_name(&exe)) {
                eprintln!("xtask: {} runs on the host kernel only (see HOST_ONLY)", suite_name(&exe));
                continue;
            }
            bins.push(exe);
        }
    }
    ensure!(!bins.is_empty(), "cargo built no integration test binaries for the tests crate");
    // The restart suite runs the agent binary itself, beside the probe.
    ensure!(agent, "cargo test --workspace built no dataplane binary");
    Ok(bins)
}

pub(super) fn guest_script(binaries: &[PathBuf], filter: Option<&str>) -> String {
    let mut s = format!(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=0 \
         DATAPLANE_TEST_BULK_MIB={GUEST_BULK_MIB} DATAPLANE_TEST_TIME_SCALE={GUEST_TIME_SCALE}\ncd /\n",
    );
    for bin in binaries {
        let name = suite_name(bin);
        let filter = filter.map(|f| format!(" '{f}'")).unwrap_or_default();
        // One test at a time: the guest has one (emulated) CPU.
        s += &format!(
            "echo \"=== RUN {name} $(date +%s)\"\n'{}' --test-threads=1 --color never{filter} 2>&1\n\
             echo \"=== RC {name} $? $(date +%s)\"\n",
            bin.display()
        );
    }
    s
}

/// The suites in a guest's output: counts from libtest's summary line,
/// times and exit codes from the script's markers.
pub(super) fn parse_suites(log: &str) -> Vec<Suite> {
    let mut suites = Vec::new();
    let mut current: Option<(String, u64, u32, u32)> = None;
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("=== RUN ") {
            let mut f = rest.split_whitespace();
            let name = f.next().unwrap_or_default().to_owned();
            current = Some((name, f.next().and_then(|t| t.parse().ok()).unwrap_or(0), 0, 0));
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| {
                rest.split(';').find_map(|p| {
                    p.trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(what)?
                        .trim()
                        .parse()
                        .ok()
                })
            };
            if let Some(c) = current.as_mut() {
                c.2 += count("passed").unwrap_or(0);
                c.3 += count("failed").unwrap_or(0);
            }
        } else if let Some(rest) = line.strip_prefix("=== RC ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let (Some((name, start, passed, failed)), [_, rc, end]) = (current.take(), f.as_slice()) {
                let secs = end.parse::<u64>().unwrap_or(start).saturating_sub(start);
                suites.push(Suite { name, passed, failed, secs, rc: rc.parse().unwrap_or(-1) });
            }
        }
    }
    suites
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_are_read_from_the_guest_output() {
        let log = "=== BOOTED 6.1.0\n=== RUN steering 100\nrunning 2 tests\n\
                   test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3s\n\
                   === RC steering 0 130\n=== RUN tunnel 130\n\
                   test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
                   === RC tunnel 101 200\n=== RUN observability 200\n\
                   test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out\n\
                   === RC observability 0 201\n=== DONE\n";
        let s = parse_suites(log);
        assert_eq!(
            s,
            vec![
                Suite { name: "steering".into(), passed: 2, failed: 0, secs: 30, rc: 0 },
                Suite { name: "tunnel".into(), passed: 5, failed: 1, secs: 70, rc: 101 },
                Suite { name: "observability".into(), passed: 0, failed: 0, secs: 1, rc: 0 },
            ]
        );
    }
}
