//! The production layout: programs attached to a cgroup that also holds the
//! agent (the host root). The agent's own dials to routed destinations must
//! not be steered back into itself. One test per file: it moves the whole
//! test process into the cgroup.

use dataplane_common::Counter;
use tests::{
    JoinedCgroup, require_root,
    topology::{API_V4, NODE_TO_SERVER_V4, Topology, addr},
};

#[test]
fn the_agents_own_dials_bypass_steering() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let _inside = JoinedCgroup::join(&topo.cgroup.path).expect("join cgroup");
    let agent = topo.start_agent(topo.config(&["198.51.100.101/32"])).expect("agent starts");
    let a = topo.pod_probe().connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "{a:?}");
    assert_eq!(a.server_saw().map(|s| s.ip().to_string()).as_deref(), Some(NODE_TO_SERVER_V4));
    let k = agent.handle.kernel_counters().expect("counters");
    assert_eq!(k.get(Counter::ConnectRedirected), 1, "{k:?}");
    assert_eq!(k.get(Counter::ConnectAgentSocket), 1, "the agent's dial was recognised: {k:?}");
    let summary = agent.stop();
    assert_eq!(summary.flows.completed, 1, "{:?}", summary.flows);
}
