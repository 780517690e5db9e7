//! Runtime reloads: the config file is re-read on SIGHUP and when its content
//! changes (ConfigMap updates swap a symlink, so content is compared, not
//! mtimes). A file that does not validate is logged and ignored: the running
//! configuration stays in force, whole. The TLS files (certificate, key, CA
//! bundle: a cert-manager Secret) are watched the same way and reloaded
//! without a restart.

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

/// The TLS files' contents last seen: a change to any of them (a rotated
/// Secret swaps all three at once) is one reload.
#[derive(Debug, Default)]
pub struct TlsFilesSeen {
    last: Option<Vec<Vec<u8>>>,
}

impl TlsFilesSeen {
    /// Whether the files at `files` differ from the last call's (the first
    /// call only records them). Unreadable files count as a change, so the
    /// reload that follows reports them.
    pub fn changed(&mut self, files: &crate::config::TlsFiles) -> bool {
        let now: Vec<Vec<u8>> = [&files.ca, &files.cert, &files.key]
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect();
        let changed = self.last.as_ref().is_some_and(|l| *l != now);
        self.last = Some(now);
        changed
    }
}

/// Applies file changes to the agent until the task is dropped.
pub async fn watch(path: PathBuf, handle: AgentHandle, interval: Duration) {
    let current = std::fs::read_to_string(&path).ok();
    let mut file = ConfigFile::new(path, current);
    let mut tls_seen = TlsFilesSeen::default();
    if let Some(files) = handle.tls_files() {
        tls_seen.changed(&files);
    }
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
        if let Some(files) = handle.tls_files()
            && tls_seen.changed(&files)
            && let Err(e) = handle.reload_tls()
        {
            error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_to_any_tls_file_is_seen_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = crate::config::TlsFiles {
            ca: dir.path().join("ca.crt"),
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        for (p, text) in [(&files.ca, "ca"), (&files.cert, "cert"), (&files.key, "key")] {
            std::fs::write(p, text).expect("write");
        }
        let mut seen = TlsFilesSeen::default();
        assert!(!seen.changed(&files), "the first look only records");
        assert!(!seen.changed(&files));
        std::fs::write(&files.key, "rotated").expect("write");
        assert!(seen.changed(&files), "a rotated key is a change");
        assert!(!seen.changed(&files), "seen once");
        std::fs::remove_file(&files.ca).expect("rm");
        assert!(seen.changed(&files), "a file gone is a change (the reload reports it)");
    }

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
