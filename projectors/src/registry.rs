//! The one place projectors are registered.

use std::sync::Arc;

use crate::DynProjector;

/// Every projector, in a stable order.
pub fn all() -> Vec<Arc<dyn DynProjector>> {
    vec![
        Arc::new(crate::customer360::Customer360Projector),
        Arc::new(crate::order_view::OrderViewProjector),
        Arc::new(crate::analytics::AnalyticsProjector),
    ]
}

/// A projector by its name.
pub fn by_name(name: &str) -> Option<Arc<dyn DynProjector>> {
    all().into_iter().find(|p| p.name() == name)
}
