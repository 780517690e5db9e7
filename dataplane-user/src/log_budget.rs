//! Rationed log lines: what a peer or a workload can make happen many
//! times a second (a failed handshake, a refused flow) is logged in bursts,
//! and the next line says how many were left out. The counters carry the
//! full count; the log never becomes a flood an attacker controls.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// At most [`LOG_BURST`] lines per [`LOG_WINDOW`]; the
/// first line of the next window says how many were left out. A flood of
/// junk handshakes or refused streams must not become a flood of log lines.
#[derive(Debug, Default)]
pub struct LogBudget {
    state: std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>,
}

const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

impl LogBudget {
    /// `Some(suppressed since the last line)` if a line may be written now.
    pub fn allow(&self, now: std::time::Instant) -> Option<u64> {
        let mut s = crate::lock(&self.state);
        let (start, lines, suppressed) = &mut *s;
        if start.is_none_or(|t| now.duration_since(t) >= LOG_WINDOW) {
            *start = Some(now);
            *lines = 0;
        }
        if *lines < LOG_BURST {
            *lines += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

impl LogBudget {
    /// Nothing pending: its window is over and it left nothing out, so
    /// forgetting it loses nothing.
    fn idle(&self, now: Instant) -> bool {
        let s = crate::lock(&self.state);
        s.2 == 0 && s.0.is_none_or(|t| now.duration_since(t) >= LOG_WINDOW)
    }
}

/// Most keys a [`KeyedLogBudget`] tracks; beyond, new keys share one budget.
const MAX_KEYS: usize = 256;

/// A [`LogBudget`] per key (a peer's identity), so one noisy peer cannot
/// use up the lines that would name another. At most [`MAX_KEYS`] keys:
/// when full, the idle ones are forgotten, and keys that still find no
/// room share one budget.
#[derive(Debug, Default)]
pub struct KeyedLogBudget {
    keys: Mutex<HashMap<Arc<str>, Arc<LogBudget>>>,
    shared: LogBudget,
}

impl KeyedLogBudget {
    /// `Some(suppressed for this key since its last line)` if a line about
    /// `key` may be written now.
    pub fn allow(&self, key: &Arc<str>, now: Instant) -> Option<u64> {
        let budget = {
            let mut keys = crate::lock(&self.keys);
            if !keys.contains_key(key) && keys.len() >= MAX_KEYS {
                keys.retain(|_, b| !b.idle(now));
            }
            match keys.get(key) {
                Some(b) => b.clone(),
                None if keys.len() < MAX_KEYS => keys.entry(key.clone()).or_default().clone(),
                None => return self.shared.allow(now),
            }
        };
        budget.allow(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_allows_a_burst_then_counts_what_it_left_out() {
        let budget = LogBudget::default();
        let t0 = std::time::Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(budget.allow(t0), Some(0));
        }
        assert_eq!(budget.allow(t0), None);
        assert_eq!(budget.allow(t0 + Duration::from_secs(1)), None);
        // The next window's first line reports the two left out.
        assert_eq!(budget.allow(t0 + LOG_WINDOW), Some(2));
        assert_eq!(budget.allow(t0 + LOG_WINDOW), Some(0));
    }

    #[test]
    fn one_noisy_key_does_not_silence_another_and_keys_are_bounded() {
        let budget = KeyedLogBudget::default();
        let t0 = Instant::now();
        let (noisy, quiet): (Arc<str>, Arc<str>) = ("spiffe://t/a".into(), "spiffe://t/b".into());
        for _ in 0..100 {
            let _ = budget.allow(&noisy, t0);
        }
        assert_eq!(budget.allow(&quiet, t0), Some(0), "the quiet key still gets its line");
        for i in 0..(2 * MAX_KEYS) {
            let _ = budget.allow(&Arc::from(format!("spiffe://t/n{i}")), t0);
        }
        assert!(crate::lock(&budget.keys).len() <= MAX_KEYS);
        // A window later the idle keys make room again.
        let later = t0 + LOG_WINDOW;
        assert_eq!(budget.allow(&Arc::from("spiffe://t/new"), later), Some(0));
        assert!(crate::lock(&budget.keys).contains_key("spiffe://t/new"));
    }
}
