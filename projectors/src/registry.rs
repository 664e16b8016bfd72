//! The one place projectors are registered: one line each.

use crate::{FactProjector, Projector, ProjectorInfo};

/// Receives every registered projector with its concrete type, so the engine can build a
/// typed pipeline for each (no type erasure between a projector and its store).
pub trait Registrar {
    fn document<P: Projector>(&mut self, p: P);
    fn facts<F: FactProjector>(&mut self, f: F);
}

/// Every projector, in a stable order.
pub fn register_all(r: &mut impl Registrar) {
    r.document(crate::customer360::Customer360Projector);
    r.document(crate::order_view::OrderViewProjector);
    r.facts(crate::analytics::AnalyticsProjector);
}

/// Name, store and handled types of every projector, in registration order.
pub fn infos() -> Vec<ProjectorInfo> {
    struct Collect(Vec<ProjectorInfo>);
    impl Registrar for Collect {
        fn document<P: Projector>(&mut self, p: P) {
            self.0.push(ProjectorInfo::of(&p));
        }
        fn facts<F: FactProjector>(&mut self, f: F) {
            self.0.push(ProjectorInfo::of_facts(&f));
        }
    }
    let mut c = Collect(Vec::new());
    register_all(&mut c);
    c.0
}

/// The names of every projector.
pub fn names() -> Vec<&'static str> {
    infos().into_iter().map(|i| i.name).collect()
}

/// One projector's info by name.
pub fn info(name: &str) -> Option<ProjectorInfo> {
    infos().into_iter().find(|i| i.name == name)
}
