//! The programs' own log lines (aya-log): their level follows the agent's,
//! and their ring buffer is drained on the runtime.

use tracing::warn;

pub(super) type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The kernel-side log level follows the agent's: below it, the programs skip
/// logging entirely (one global load on the hot path).
pub(super) fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    let level = match LevelFilter::current() {
        LevelFilter::TRACE => aya_log::Level::Trace,
        LevelFilter::DEBUG => aya_log::Level::Debug,
        LevelFilter::INFO => aya_log::Level::Info,
        LevelFilter::WARN => aya_log::Level::Warn,
        _ => aya_log::Level::Error,
    };
    level as u8
}

/// Drains the programs' log ring buffer on the runtime; hands the logger
/// back where there is no runtime to drain it on.
pub(super) fn spawn_kernel_logger(logger: KernelLogger) -> Option<KernelLogger> {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return Some(logger) };
    // SAFETY: the logger owns its ring buffer fd, which stays open and the same
    // for as long as the logger (moved into the AsyncFd) lives.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let (logger, e) = e.into_parts();
            warn!(error = %e, "eBPF logs will not be drained");
            return Some(logger);
        }
    };
    handle.spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    None
}
