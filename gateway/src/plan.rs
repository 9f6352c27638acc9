//! Turns the validated configuration file into a `RoutingPlan`: one backend per configured
//! target (built by the caller's factory, so this crate needs no bridge), routes in order, and
//! queue mappings.

use std::collections::HashMap;
use std::sync::Arc;

use warren_backends::Backend;
use warren_config::{ConfigFile, RouteMode as ConfigMode, Unmatched};

use crate::routes::{QueueMapping, Route, RouteMode, RoutingPlan};

/// Builds the plan. `build_backend` makes the backend named by a configuration entry.
pub fn build_plan<E: std::fmt::Display>(
    config: &ConfigFile,
    mut build_backend: impl FnMut(&str, &warren_config::BackendConfig) -> Result<Arc<dyn Backend>, E>,
) -> Result<RoutingPlan, String> {
    let mut backends: HashMap<&str, Arc<dyn Backend>> = HashMap::new();
    for (name, backend) in &config.backends {
        let built = build_backend(name, backend)
            .map_err(|e| format!("backend '{name}' ({}): {e}", backend.kind()))?;
        backends.insert(name.as_str(), built);
    }
    let lookup = |name: &str| {
        backends
            .get(name)
            .cloned()
            .ok_or_else(|| format!("unknown backend '{name}'"))
    };
    let mut plan = RoutingPlan {
        reject_unmatched: config.unmatched == Unmatched::Reject,
        ..Default::default()
    };
    for route in &config.routes {
        let m = &route.matcher;
        plan.routes.push(Route::new(
            m.exchange.clone(),
            m.routing_key.clone(),
            m.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            lookup(&route.backend)?,
            route.destination.clone(),
            match route.mode {
                ConfigMode::Forward => RouteMode::Forward,
                ConfigMode::Mirror => RouteMode::Mirror,
            },
        ));
    }
    for q in &config.queues {
        plan.mappings.push(QueueMapping {
            name: q.name.clone(),
            backend: lookup(&q.backend)?,
            source: q.source.clone(),
            prefetch: q.prefetch,
        });
    }
    plan.backends = backends.into_values().collect();
    Ok(plan)
}
