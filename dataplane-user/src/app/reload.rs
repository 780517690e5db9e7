//! Reloads: routes, what this agent serves, timeouts and limits change at runtime;
//! a config that changes anything else is refused whole.

use tracing::info;

use super::AgentHandle;
use crate::{
    config::{ConfigError, ValidConfig},
    connector::{PeerCaps, ServePolicy},
    kernel::SteeringError,
    lock,
    routes::RouteTable,
};

/// Why a reload was not applied. Nothing of a refused reload takes effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reload changes {0:?}, which only take effect on restart; nothing was applied")]
    RestartRequired(Vec<&'static str>),
    #[error("the agent is shutting down")]
    Stopped,
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

impl AgentHandle {
    /// Applies a new, validated configuration.
    pub fn reload(&self, next: ValidConfig) -> Result<(), ReloadError> {
        let shared = &self.0;
        if shared.drain.is_cancelled() {
            return Err(ReloadError::Stopped);
        }
        let mut config = lock(&shared.config);
        let mut restart = config.restart_only_changes(&next);
        if shared.connector.is_none() && !next.valid_serve().is_empty() {
            restart.push("serve (the connector role is set up at start)");
        }
        if !restart.is_empty() {
            return Err(ReloadError::RestartRequired(restart));
        }
        let mut table = lock(&shared.routes);
        let new_table = RouteTable::build(next.valid_routes(), &table);
        let diff = table.diff(&new_table);
        if let Some(s) = &shared.steering {
            s.apply(&diff)?;
        }
        if let Some(c) = &shared.connector {
            c.set_policy(ServePolicy::new(next.valid_serve().to_vec()));
            c.set_caps(PeerCaps::from(&next.limits));
        }
        if let Some(t) = &shared.tunnel {
            t.set_limits(&next.limits);
        }
        if let Some(f) = &shared.flow_server {
            f.set_connect_timeout(next.timeouts.connect);
            f.set_flows_per_workload(next.limits.flows_per_workload);
            f.set_flow_idle_timeout(next.limits.flow_idle_timeout);
        }
        info!(added = diff.upsert.len(), removed = diff.remove.len(), "configuration reloaded");
        *table = new_table;
        *config = next;
        Ok(())
    }
}
