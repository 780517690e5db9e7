//! The capabilities steering needs, checked before anything is loaded: a
//! container granted too few fails at start with the one it lacks named,
//! not with a verifier or netlink error later.

use std::fmt;

/// A capability steering needs, with its bit in the kernel's sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    bit: u32,
    why: &'static str,
}

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What steering needs. CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON (as the kernel treats it, and as kernels before 5.8, which
/// have neither, require). CAP_PERFMON lets the verifier accept the
/// programs' pointer spills: Linux 6.18 loads them without it, 6.1 refuses
/// them ("attempt to corrupt spilled pointer on stack"; the kernel
/// matrix's `capabilities` suite).
pub const STEERING: [Capability; 3] = [
    Capability { name: "CAP_BPF", bit: CAP_BPF, why: "loading the eBPF programs and creating their maps" },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: CAP_NET_ADMIN,
        why: "attaching the programs to the cgroup and creating the redirect interface",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        why: "the verifier accepting the programs' pointer spills (Linux 6.1 refuses them without it)",
    },
];

/// For redirect listeners on a port below 1024 (the default, so no
/// unprivileged process can take it first).
pub const PRIVILEGED_PORT: Capability = Capability {
    name: "CAP_NET_BIND_SERVICE",
    bit: CAP_NET_BIND_SERVICE,
    why: "binding the redirect listeners on a port below 1024 (steering.redirect)",
};

/// What steering with redirect listeners on `ports` needs.
pub fn for_steering(ports: impl IntoIterator<Item = u16>) -> Vec<Capability> {
    let mut needed = STEERING.to_vec();
    if ports.into_iter().any(|p| p < 1024) {
        needed.push(PRIVILEGED_PORT);
    }
    needed
}

/// The capabilities in `needed` that the effective set `effective` lacks.
pub fn missing(effective: u64, needed: &[Capability]) -> Vec<Capability> {
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON (never CAP_NET_ADMIN).
    let held = |c: &&Capability| has(c.bit) || (c.bit != CAP_NET_ADMIN && has(CAP_SYS_ADMIN));
    needed.iter().filter(|c| !held(c)).copied().collect()
}

/// This process's effective capability set, from `/proc/self/status`.
pub fn effective() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_effective(&status).ok_or_else(|| std::io::Error::other("no CapEff line in /proc/self/status"))
}

fn parse_effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Steering cannot start: these capabilities are missing.
#[derive(Debug, PartialEq, Eq)]
pub struct Missing(pub Vec<Capability>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|c| c.name).collect();
        write!(f, "the agent lacks {} (", names.join(", "))?;
        for (i, c) in self.0.iter().enumerate() {
            write!(f, "{}{}: {}", if i > 0 { "; " } else { "" }, c.name, c.why)?;
        }
        write!(
            f,
            "); grant them (Kubernetes: securityContext.capabilities.add [BPF, PERFMON, NET_ADMIN, NET_BIND_SERVICE], \
             SYS_ADMIN in place of BPF and PERFMON before Linux 5.8) or run as root"
        )
    }
}

impl std::error::Error for Missing {}

/// Checks this process holds what steering with redirect listeners on
/// `ports` needs.
pub fn check_steering(ports: impl IntoIterator<Item = u16>) -> Result<(), Missing> {
    // An unreadable status is not a refusal: the load says what it lacks.
    let Ok(effective) = effective() else { return Ok(()) };
    let lacking = missing(effective, &for_steering(ports));
    if lacking.is_empty() { Ok(()) } else { Err(Missing(lacking)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(caps: &[u32]) -> u64 {
        caps.iter().fold(0, |acc, b| acc | (1 << b))
    }

    #[test]
    fn each_lacking_capability_is_named() {
        let all = bits(&[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]);
        assert!(missing(all, &STEERING).is_empty());
        let names = |m: Vec<Capability>| m.into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(missing(bits(&[CAP_NET_ADMIN, CAP_PERFMON]), &STEERING)), ["CAP_BPF"]);
        assert_eq!(names(missing(bits(&[CAP_BPF, CAP_PERFMON]), &STEERING)), ["CAP_NET_ADMIN"]);
        assert_eq!(names(missing(bits(&[CAP_BPF, CAP_NET_ADMIN]), &STEERING)), ["CAP_PERFMON"]);
        assert_eq!(names(missing(0, &STEERING)), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        // SYS_ADMIN covers BPF and PERFMON, never NET_ADMIN.
        assert_eq!(names(missing(bits(&[CAP_SYS_ADMIN]), &STEERING)), ["CAP_NET_ADMIN"]);
        assert!(missing(bits(&[CAP_SYS_ADMIN, CAP_NET_ADMIN]), &STEERING).is_empty());
        // The redirect port decides about NET_BIND_SERVICE.
        assert_eq!(names(missing(all, &for_steering([1013]))), ["CAP_NET_BIND_SERVICE"]);
        assert!(missing(all, &for_steering([15001, 15002])).is_empty());
        let e = Missing(missing(0, &STEERING)).to_string();
        assert!(
            e.starts_with("the agent lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (CAP_BPF: loading"),
            "{e}"
        );
    }

    #[test]
    fn the_effective_set_is_read_from_status() {
        let status =
            "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_effective(status), Some(bits(&[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN])));
        assert_eq!(parse_effective("Name:\tx\n"), None);
        assert!(effective().is_ok(), "this process's own status reads");
    }
}
