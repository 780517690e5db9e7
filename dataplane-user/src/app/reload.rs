//! Reloads: routes, peers, what this agent serves, policy, timeouts and
//! limits change at runtime; a config that changes anything else is
//! refused whole. Every outcome is
//! counted, and the last refusal is kept for `/status`.

use std::{
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tracing::info;

use super::AgentHandle;
use crate::{
    config::{ConfigError, ValidConfig},
    connector::{PeerCaps, ServePolicy},
    kernel::SteeringError,
    lock,
    tunnel::PeersChange,
};

/// Why a reload was not applied. Nothing of a refused reload takes effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("new TLS material refused, the old stays in force: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("new TLS material refused, the old stays in force: {0}")]
    Tunnel(#[from] crate::tunnel::TunnelError),
    #[error("the new peers' TLS configuration could not be built, nothing was applied: {0}")]
    Peers(crate::tunnel::TunnelError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reload changes {0:?}, which only take effect on restart; nothing was applied")]
    RestartRequired(Vec<&'static str>),
    #[error("the agent is shutting down")]
    Stopped,
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Reload outcomes: `config_reloads_total{result="applied|refused"}` and
/// the last refusal; the same for TLS material (`tls_reloads_total`), and
/// when the certificate in force expires.
#[derive(Debug)]
pub(super) struct ReloadLog {
    outcomes: Family<ResultLabels, Counter>,
    last_refusal: Mutex<Option<crate::admin::ReloadRefusal>>,
    tls_outcomes: Family<ResultLabels, Counter>,
    tls_expiry: Gauge,
}

impl ReloadLog {
    pub fn register(registry: &mut Registry) -> ReloadLog {
        let log = ReloadLog {
            outcomes: Family::default(),
            last_refusal: Mutex::new(None),
            tls_outcomes: Family::default(),
            tls_expiry: Gauge::default(),
        };
        registry.register(
            "config_reloads",
            "Configuration reloads, applied or refused (a refused one changed nothing)",
            log.outcomes.clone(),
        );
        registry.register(
            "tls_reloads",
            "Certificate, key and CA bundle reloads, applied or refused (a refused one changed nothing)",
            log.tls_outcomes.clone(),
        );
        registry.register_with_unit(
            "tls_certificate_expiry_timestamp",
            "When this agent's certificate in force stops being valid (Unix time)",
            Unit::Seconds,
            log.tls_expiry.clone(),
        );
        for result in ["applied", "refused"] {
            let _ = log.outcomes.get_or_create_owned(&ResultLabels { result });
            let _ = log.tls_outcomes.get_or_create_owned(&ResultLabels { result });
        }
        log
    }

    /// Records the certificate now in force.
    pub fn tls_in_force(&self, tls: &crate::tls::TlsMaterial) {
        let at = tls.not_after().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        self.tls_expiry.set(i64::try_from(at).unwrap_or(i64::MAX));
    }

    fn record_tls(&self, refused: bool) {
        let result = if refused { "refused" } else { "applied" };
        self.tls_outcomes.get_or_create(&ResultLabels { result }).inc();
    }

    fn record(&self, refusal: Option<&ReloadError>) {
        let result = if refusal.is_none() { "applied" } else { "refused" };
        self.outcomes.get_or_create(&ResultLabels { result }).inc();
        if let Some(e) = refusal {
            let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            *lock(&self.last_refusal) =
                Some(crate::admin::ReloadRefusal { at_unix: at, error: e.to_string() });
        }
    }

    pub fn status(&self) -> crate::admin::ReloadStatus {
        let n = |result| self.outcomes.get(&ResultLabels { result }).map_or(0, |c| c.get());
        crate::admin::ReloadStatus {
            applied: n("applied"),
            refused: n("refused"),
            last_refusal: lock(&self.last_refusal).clone(),
        }
    }
}

impl AgentHandle {
    /// Applies a new, validated configuration, or refuses it whole; either
    /// way the outcome is counted (and a refusal kept for `/status`).
    pub fn reload(&self, next: ValidConfig) -> Result<(), ReloadError> {
        let outcome = self.apply(next);
        self.0.reloads.record(outcome.as_ref().err());
        outcome
    }

    /// Counts a reload refused before it reached the agent (the file did
    /// not read or validate).
    pub fn reload_refused(&self, error: ConfigError) -> ReloadError {
        let refused = ReloadError::Config(error);
        self.0.reloads.record(Some(&refused));
        refused
    }

    /// Loads the TLS files again (a rotated Secret) and hands the material
    /// to the tunnel: new handshakes use it, connections up keep theirs. A
    /// file that does not load (unreadable, a key that does not match, a
    /// certificate outside its validity) is refused and counted; the old
    /// material stays in force.
    pub fn reload_tls(&self) -> Result<(), ReloadError> {
        let shared = &self.0;
        // Held throughout: a config reload builds its peers' client TLS
        // from the material in force and must not interleave with this.
        let config = lock(&shared.config);
        let (Some(files), Some(tunnel)) = (config.tls.clone(), &shared.tunnel) else { return Ok(()) };
        let outcome = crate::tls::TlsMaterial::load(&files)
            .map_err(ReloadError::from)
            .and_then(|tls| tunnel.set_tls(&tls).map(|()| tls).map_err(ReloadError::from));
        shared.reloads.record_tls(outcome.is_err());
        match outcome {
            Ok(tls) => {
                shared.reloads.tls_in_force(&tls);
                if let Some(c) = &shared.connector {
                    c.set_identity(&tls.identity);
                }
                if let Some(r) = &shared.relay {
                    r.set_identity(&tls.identity);
                }
                info!(identity = %tls.identity, cert = %files.cert.display(), "TLS material reloaded");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn apply(&self, next: ValidConfig) -> Result<(), ReloadError> {
        let shared = &self.0;
        if shared.drain.is_cancelled() {
            return Err(ReloadError::Stopped);
        }
        let mut config = lock(&shared.config);
        let mut restart = config.restart_only_changes(&next);
        if shared.connector.is_none() && next.serves() {
            restart.push("serve (the connector role is set up at start)");
        }
        if !restart.is_empty() {
            return Err(ReloadError::RestartRequired(restart));
        }
        // Everything that can fail comes first, with nothing applied yet:
        // the next peers' TLS, then the kernel's routes. What follows
        // cannot fail.
        let peers = match &shared.tunnel {
            Some(t) if config.peers != next.peers => {
                Some(t.prepare_peers(&next.valid_peers()).map_err(ReloadError::Peers)?)
            }
            _ => None,
        };
        let mut table = lock(&shared.routes);
        let diff = super::route_state::resync(shared, &next, &mut table)?;
        let peers = match (peers, &shared.tunnel) {
            (Some(update), Some(t)) => t.commit_peers(update),
            _ => PeersChange::default(),
        };
        if let Some(c) = &shared.connector {
            c.set_peers(next.peers.iter().map(crate::connector::PeerEntry::from));
            c.set_policy(ServePolicy::new(next.valid_serve().to_vec(), next.valid_policy().to_vec()));
            c.set_caps(PeerCaps::from(&next.limits));
        }
        if let Some(r) = &shared.relay {
            r.set_sources(next.peers.iter().filter(|p| !p.learn.is_empty()).map(|p| p.name.as_str()));
            r.set_policy(
                next.valid_policy().to_vec(),
                next.limits.stream_header_timeout,
                next.timeouts.connect,
            );
        }
        if let Some(t) = &shared.tunnel {
            t.set_limits(&next.limits);
            // What each peer may reach may have changed with serve or policy.
            t.readvertise();
        }
        if let Some(f) = &shared.flow_server {
            f.set_connect_timeout(next.timeouts.connect);
            f.set_flows_per_workload(next.limits.flows_per_workload);
            f.set_flow_idle_timeout(next.limits.flow_idle_timeout);
        }
        info!(
            added = diff.upsert.len(),
            removed = diff.remove.len(),
            peers_added = peers.added.len(),
            peers_removed = peers.removed.len(),
            peers_replaced = peers.replaced.len(),
            "configuration reloaded"
        );
        *config = next;
        Ok(())
    }
}
