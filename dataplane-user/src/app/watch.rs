//! Runtime reloads: the config file is re-read on SIGHUP and when its content
//! changes (ConfigMap updates swap a symlink, so content is compared, not
//! mtimes). A file that does not validate is logged and ignored: the running
//! configuration stays in force, whole.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::AgentHandle;
use crate::config::{Config, ConfigError, ValidConfig};

/// Remembers the last text seen so unchanged files are not re-applied.
pub struct ConfigFile {
    path: PathBuf,
    last: Option<String>,
}

impl ConfigFile {
    /// `current` is the text the running configuration came from, if known.
    pub fn new(path: impl Into<PathBuf>, current: Option<String>) -> Self {
        ConfigFile { path: path.into(), last: current }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new, valid configuration if the file changed since the last call;
    /// `Ok(None)` if it did not; an error (once per distinct bad content) if
    /// it changed to something invalid.
    pub fn poll(&mut self) -> Result<Option<ValidConfig>, ConfigError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|source| ConfigError::Read { path: self.path.clone(), source })?;
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        self.last = Some(text.clone());
        Config::parse(&text).map(Some)
    }
}

/// Applies file changes to the agent until the task is dropped.
pub async fn watch(path: PathBuf, handle: AgentHandle, interval: Duration) {
    let current = std::fs::read_to_string(&path).ok();
    let mut file = ConfigFile::new(path, current);
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "SIGHUP reloads unavailable; polling only");
            None
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                info!(path = %file.path().display(), "SIGHUP: checking config");
            }
        }
        match file.poll() {
            Ok(None) => {}
            Ok(Some(config)) => match handle.reload(config) {
                Ok(()) => info!(path = %file.path().display(), "configuration reloaded"),
                Err(e) => error!(path = %file.path().display(), "reload refused: {e}"),
            },
            Err(e) => {
                let e = handle.reload_refused(e);
                error!("reload refused, keeping the running configuration: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_reports_changes_once_and_errors_for_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.yaml");
        let good = "routes: [{ cidr: 10.9.0.0/16, via: direct }]\n";
        std::fs::write(&path, good).expect("write");
        let mut f = ConfigFile::new(&path, Some(good.to_owned()));
        assert!(f.poll().expect("unchanged").is_none());

        std::fs::write(&path, "routes: [{ cidr: 10.8.0.0/16, via: direct }]\n").expect("write");
        let c = f.poll().expect("valid").expect("changed");
        assert_eq!(c.routes[0].cidr, "10.8.0.0/16");
        assert!(f.poll().expect("unchanged").is_none());

        std::fs::write(&path, "routes: [{ cidr: nonsense, via: direct }]\n").expect("write");
        let e = f.poll().expect_err("invalid");
        assert!(e.to_string().contains("routes[0].cidr"), "{e}");
        // The same bad content is reported once, not on every poll.
        assert!(f.poll().expect("unchanged").is_none());

        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(f.poll(), Err(ConfigError::Read { .. })));
    }
}
