//! How many flows each workload (source address: a pod, or the node itself)
//! has open, and the cap on it: one pod must not take the descriptors and
//! memory every other pod's flows need.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

/// Open flows per workload. The map holds only workloads with open flows,
/// which on a node are its pods.
#[derive(Debug)]
pub struct Workloads {
    cap: AtomicUsize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open flow of a workload; dropping it closes the count.
#[derive(Debug)]
pub struct WorkloadSlot {
    workloads: Arc<Workloads>,
    source: IpAddr,
}

impl Workloads {
    pub fn new(cap: usize) -> Workloads {
        Workloads { cap: AtomicUsize::new(cap), open: Mutex::default() }
    }

    /// Applies a reloaded cap to flows opened from now on.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Relaxed);
    }

    /// A slot for a new flow from `source`, or `None` at the cap.
    pub fn open(self: &Arc<Self>, source: IpAddr) -> Option<WorkloadSlot> {
        let source = source.to_canonical();
        let mut open = crate::lock(&self.open);
        let n = open.entry(source).or_default();
        if *n >= self.cap.load(Relaxed) {
            if *n == 0 {
                open.remove(&source);
            }
            return None;
        }
        *n += 1;
        Some(WorkloadSlot { workloads: self.clone(), source })
    }
}

impl Drop for WorkloadSlot {
    fn drop(&mut self) {
        let mut open = crate::lock(&self.workloads.open);
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_is_capped_alone_and_its_slots_come_back() {
        let w = Arc::new(Workloads::new(2));
        let pod: IpAddr = "10.200.0.2".parse().expect("ip");
        let other: IpAddr = "10.200.0.3".parse().expect("ip");
        let a = w.open(pod).expect("first");
        let _b = w.open(pod).expect("second");
        assert!(w.open(pod).is_none(), "the third is over the cap");
        assert!(w.open(other).is_some(), "another pod is unaffected");
        drop(a);
        assert_eq!(crate::lock(&w.open).get(&pod).copied(), Some(1));
        assert!(w.open(pod).is_some(), "a closed flow frees its slot");
        w.set_cap(0);
        assert!(w.open(other).is_none());
        assert_eq!(crate::lock(&w.open).len(), 1, "only workloads with open flows are kept");
    }
}
