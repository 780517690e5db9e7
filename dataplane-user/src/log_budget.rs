//! Rationed log lines: what a peer or a workload can make happen many
//! times a second (a failed handshake, a refused flow) is logged in bursts,
//! and the next line says how many were left out. The counters carry the
//! full count; the log never becomes a flood an attacker controls.

use std::time::Duration;

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
}
