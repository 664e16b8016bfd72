//! Routes each event only to the projectors that declared its type.

use std::collections::HashMap;
use std::sync::Arc;

use contract::{Event, EventType};
use projectors::DynProjector;

pub struct Router {
    projectors: Vec<Arc<dyn DynProjector>>,
    routes: HashMap<EventType, Vec<usize>>,
}

/// A batch split by projector: `per_projector[i]` are the events for `projectors()[i]`,
/// in arrival order.
pub struct Routed<'a> {
    pub per_projector: Vec<Vec<&'a Event>>,
    /// Events no projector handles (unknown types): counted and skipped.
    pub unrouted: usize,
}

impl Router {
    pub fn new(projectors: Vec<Arc<dyn DynProjector>>) -> Router {
        let mut routes: HashMap<EventType, Vec<usize>> = HashMap::new();
        for (i, p) in projectors.iter().enumerate() {
            for t in p.handles() {
                routes.entry(*t).or_default().push(i);
            }
        }
        Router { projectors, routes }
    }

    pub fn projectors(&self) -> &[Arc<dyn DynProjector>] {
        &self.projectors
    }

    pub fn route<'a>(&self, events: impl IntoIterator<Item = &'a Event>) -> Routed<'a> {
        let mut out = Routed {
            per_projector: vec![Vec::new(); self.projectors.len()],
            unrouted: 0,
        };
        for e in events {
            match e.event_type().and_then(|t| self.routes.get(&t)) {
                Some(targets) => {
                    for &i in targets {
                        out.per_projector[i].push(e);
                    }
                }
                None => out.unrouted += 1,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, aggregate_type: &str, data: serde_json::Value) -> Event {
        contract::EventEnvelope::from_value(json!({
            "event_id": uuid::Uuid::new_v4().to_string(), "aggregate_type": aggregate_type,
            "aggregate_id": "ord-1", "sequence_number": 0, "global_position": 1,
            "event_type": event_type, "event_data": data, "timestamp": "2026-11-22T10:00:00Z"}))
        .unwrap()
        .into_event()
        .unwrap()
    }

    #[test]
    fn events_go_only_where_declared_and_unknown_types_are_counted() {
        let router = Router::new(projectors::all());
        let names: Vec<&str> = router.projectors().iter().map(|p| p.name()).collect();
        let shipped = event(
            "order.shipped",
            "order",
            json!({"order_id": "ord-1", "customer_id": "c", "carrier": "x", "tracking_number": "y"}),
        );
        let unknown = event("order.gift_wrapped", "order", json!({}));
        let created = event(
            "customer.created",
            "customer",
            json!({"customer_id": "ord-1", "name": "n", "email": "e"}),
        );
        let events = [shipped, unknown, created];
        let routed = router.route(&events);
        assert_eq!(routed.unrouted, 1);
        let count =
            |name: &str| routed.per_projector[names.iter().position(|n| *n == name).unwrap()].len();
        assert_eq!(
            count("order_view"),
            1,
            "customer.created is not for order views"
        );
        assert_eq!(count("customer360"), 2);
        assert_eq!(count("analytics"), 2);
    }
}
