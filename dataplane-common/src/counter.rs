//! Reasons counted by the eBPF programs, one per exit path: the index into the
//! per-CPU `COUNTERS` array and the `reason` label the agent exports.

/// One counter slot per exit path of every hook.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4/6: rewritten to the agent's listener.
    ConnectRedirected = 0,
    /// connect4/6: no route matched.
    ConnectNotRouted = 1,
    /// connect4/6: not a TCP socket (UDP, raw, MPTCP, ...).
    ConnectNotTcp = 2,
    /// connect4/6: the agent's own socket (in BYPASS).
    ConnectAgentSocket = 3,
    /// connect4/6: routed, but the family has no redirect listener: refused.
    ConnectNoListener = 4,
    /// connect4/6: routed, but recording the original destination failed:
    /// refused (neither redirected blind nor let out by the default route).
    ConnectMapError = 5,
    /// connect4/6: the REDIRECT config entry could not be read: refused.
    ConnectConfigError = 6,
    /// sock_ops: a redirected socket was established and its flow recorded.
    SockOpsFlowRecorded = 7,
    /// sock_ops: recording the flow for the agent failed.
    SockOpsMapError = 8,
    /// sock_ops: a redirected socket closed; its ORIG_DST entry was removed.
    SockOpsClosed = 9,
    /// getpeername4/6: the original destination was returned.
    GetpeernameRestored = 10,
    /// connect6: an IPv4-mapped destination was routed via the IPv4 table.
    Connect6V4Mapped = 11,
    /// connect4/6: routed, but the route's peer has no live connection:
    /// refused in the kernel.
    ConnectNoPeer = 12,
    /// sock_ops: a redirected socket closed; its FLOWS entry was removed
    /// (with `SockOpsFlowRecorded`, what the agent estimates evictions by).
    SockOpsFlowForgotten = 13,
}

impl Counter {
    /// Number of slots in the COUNTERS map.
    pub const COUNT: u32 = 14;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectRedirected,
        Counter::ConnectNotRouted,
        Counter::ConnectNotTcp,
        Counter::ConnectAgentSocket,
        Counter::ConnectNoListener,
        Counter::ConnectMapError,
        Counter::ConnectConfigError,
        Counter::SockOpsFlowRecorded,
        Counter::SockOpsMapError,
        Counter::SockOpsClosed,
        Counter::GetpeernameRestored,
        Counter::Connect6V4Mapped,
        Counter::ConnectNoPeer,
        Counter::SockOpsFlowForgotten,
    ];

    /// The hook family the counter belongs to (metric label `hook`).
    pub const fn hook(self) -> &'static str {
        match self {
            Counter::ConnectRedirected
            | Counter::ConnectNotRouted
            | Counter::ConnectNotTcp
            | Counter::ConnectAgentSocket
            | Counter::ConnectNoListener
            | Counter::ConnectMapError
            | Counter::ConnectConfigError
            | Counter::Connect6V4Mapped
            | Counter::ConnectNoPeer => "connect",
            Counter::SockOpsFlowRecorded
            | Counter::SockOpsMapError
            | Counter::SockOpsClosed
            | Counter::SockOpsFlowForgotten => "sock_ops",
            Counter::GetpeernameRestored => "getpeername",
        }
    }

    /// The reason (metric label `reason`).
    pub const fn reason(self) -> &'static str {
        match self {
            Counter::ConnectRedirected => "redirected",
            Counter::ConnectNotRouted => "not_routed",
            Counter::ConnectNotTcp => "not_tcp",
            Counter::ConnectAgentSocket => "agent_socket",
            Counter::ConnectNoListener => "no_listener",
            Counter::ConnectMapError => "map_error",
            Counter::ConnectConfigError => "config_error",
            Counter::SockOpsFlowRecorded => "flow_recorded",
            Counter::SockOpsMapError => "map_error",
            Counter::SockOpsClosed => "closed",
            Counter::GetpeernameRestored => "restored",
            Counter::Connect6V4Mapped => "v4_mapped",
            Counter::ConnectNoPeer => "no_peer",
            Counter::SockOpsFlowForgotten => "flow_forgotten",
        }
    }
}
