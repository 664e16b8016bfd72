//! A deterministic, realistic event history: the same seed always gives the same events.
//!
//! Customers are created and updated, talk to agents (with a drifting mood behind their
//! sentiment scores), place orders that walk their lifecycle (some fail validation, some are
//! cancelled) and open support tickets that get resolved.

use chrono::{DateTime, Duration, TimeZone, Utc};
use contract::catalogue::*;
use contract::{EventData, EventEnvelope};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, json};
use uuid::Uuid;

/// Namespace of the v5 UUIDs given to generated events.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0f_4c1e_8b9d_4f2a_9e57_1c3b_5d7e_9f01);

const FIRST_NAMES: &[&str] = &[
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Margaret", "Linus", "Radia", "Donald",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Hamilton", "Torvalds",
    "Perlman", "Knuth",
];
const CITIES: &[&str] = &[
    "Oslo", "Lyon", "Porto", "Graz", "Ghent", "Turku", "Bergen", "Cork",
];
const INTERACTION_TYPES: &[&str] = &["chat", "call", "email", "visit"];
const CHANNELS: &[&str] = &["web", "phone", "app", "store"];
const CARRIERS: &[&str] = &["UPS", "DHL", "FedEx", "PostNord"];
const WAREHOUSES: &[&str] = &["wh-north", "wh-south", "wh-east"];
const PRIORITIES: &[&str] = &["low", "normal", "high", "urgent"];
const SUBJECTS: &[&str] = &[
    "Late delivery",
    "Damaged item",
    "Refund request",
    "Wrong size",
    "Login problem",
];

struct Customer {
    id: String,
    next_seq: i64,
    mood: f64,
    last_event: Uuid,
}

#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Placed,
    Validated,
    Paid,
    Preparing,
    Shipped,
}

struct Order {
    id: String,
    customer_id: String,
    next_seq: i64,
    stage: Stage,
    total_cents: i64,
    correlation: Uuid,
    last_event: Uuid,
}

struct Ticket {
    id: String,
    customer_id: String,
    next_seq: i64,
    correlation: Uuid,
}

/// Yields the events of a history in commit order. `global_position` is left at 1: the
/// event store assigns positions on append.
pub struct History {
    rng: ChaCha8Rng,
    namespace: String,
    clock: DateTime<Utc>,
    customers: Vec<Customer>,
    orders: Vec<Order>,
    tickets: Vec<Ticket>,
    counters: [u64; 3],
}

impl History {
    /// `namespace` prefixes every aggregate id (e.g. `t1-` gives `t1-cus-0`), so several
    /// histories can share one event store.
    pub fn new(seed: u64, namespace: &str) -> History {
        History {
            rng: ChaCha8Rng::seed_from_u64(seed),
            namespace: namespace.to_owned(),
            clock: Utc
                .with_ymd_and_hms(2026, 1, 1, 8, 0, 0)
                .single()
                .unwrap_or_default(),
            customers: Vec::new(),
            orders: Vec::new(),
            tickets: Vec::new(),
            counters: [0; 3],
        }
    }

    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs[self.rng.random_range(0..xs.len())]
    }

    fn next_id(&mut self, kind: usize, prefix: &str) -> String {
        let n = self.counters[kind];
        self.counters[kind] += 1;
        format!("{}{prefix}-{n}", self.namespace)
    }

    fn event(
        &mut self,
        aggregate_id: &str,
        seq: i64,
        data: EventData,
        correlation: Option<Uuid>,
        causation: Option<Uuid>,
    ) -> EventEnvelope {
        // Up to two minutes between events: a history of a million events spans years.
        self.clock += Duration::milliseconds(self.rng.random_range(1..120_000));
        let event_id = Uuid::new_v5(
            &EVENT_ID_NAMESPACE,
            format!("{aggregate_id}/{seq}").as_bytes(),
        );
        let mut meta = Map::new();
        meta.insert(
            "correlation_id".into(),
            json!(correlation.unwrap_or(event_id)),
        );
        if let Some(c) = causation {
            meta.insert("causation_id".into(), json!(c));
        }
        meta.insert("source".into(), json!("generator"));
        // Built from catalogue data, so it always validates.
        let Some(event_type) = data.event_type() else {
            unreachable!("the generator only builds catalogue events")
        };
        let envelope = EventEnvelope {
            event_id,
            aggregate_type: event_type.aggregate_type(),
            aggregate_id: aggregate_id.to_owned(),
            sequence_number: seq,
            // Assigned by the event store on append.
            global_position: 1,
            event_type: event_type.as_str().to_owned(),
            event_data: data.to_json(),
            metadata: meta,
            timestamp: self.clock,
        };
        match envelope.checked() {
            Ok(e) => e,
            Err(e) => unreachable!("generated event breaks the contract: {e}"),
        }
    }

    fn create_customer(&mut self) -> EventEnvelope {
        let id = self.next_id(0, "cus");
        let first = self.pick(FIRST_NAMES);
        let last = self.pick(LAST_NAMES);
        let city = self.pick(CITIES);
        let phone = self
            .rng
            .random_bool(0.6)
            .then(|| format!("+47 {:08}", self.rng.random_range(0..100_000_000u32)));
        let data = EventData::CustomerCreated(CustomerCreated {
            customer_id: id.clone(),
            name: format!("{first} {last}"),
            email: format!("{}.{}@example.com", first.to_lowercase(), id),
            phone,
            address: Some(
                json!({"city": city, "street": format!("{} Main St", self.rng.random_range(1..200))}),
            ),
        });
        let e = self.event(&id, 0, data, None, None);
        let mood = self.rng.random_range(0.2..0.9);
        self.customers.push(Customer {
            id,
            next_seq: 1,
            mood,
            last_event: e.event_id,
        });
        e
    }

    fn update_customer(&mut self, i: usize) -> EventEnvelope {
        let city = self.pick(CITIES);
        let c = &self.customers[i];
        let (id, seq, cause) = (c.id.clone(), c.next_seq, c.last_event);
        let mut changes = Map::new();
        changes.insert(
            "address".into(),
            json!({"city": city, "street": "1 New Rd"}),
        );
        let data = EventData::CustomerUpdated(CustomerUpdated {
            customer_id: id.clone(),
            changes,
            previous_values: Map::new(),
        });
        let e = self.event(&id, seq, data, None, Some(cause));
        let c = &mut self.customers[i];
        c.next_seq += 1;
        c.last_event = e.event_id;
        e
    }

    fn interaction(&mut self, i: usize) -> EventEnvelope {
        let kind = self.pick(INTERACTION_TYPES);
        let channel = self.pick(CHANNELS);
        let drift: f64 = self.rng.random_range(-0.15..0.15);
        let noise: f64 = self.rng.random_range(-0.1..0.1);
        let has_score = self.rng.random_bool(0.9);
        let agent = format!("agent-{}", self.rng.random_range(1..40));
        let interaction_n = self.rng.random::<u32>();
        let c = &mut self.customers[i];
        c.mood = (c.mood + drift).clamp(0.0, 1.0);
        let score = ((c.mood + noise).clamp(0.0, 1.0) * 1000.0).round() / 1000.0;
        let (id, seq, cause) = (c.id.clone(), c.next_seq, c.last_event);
        let data = EventData::InteractionRecorded(InteractionRecorded {
            customer_id: id.clone(),
            agent_id: agent,
            interaction_id: format!("int-{interaction_n:08x}"),
            interaction_type: kind.to_owned(),
            channel: Some(channel.to_owned()),
            sentiment_score: has_score.then_some(score),
        });
        let e = self.event(&id, seq, data, None, Some(cause));
        let c = &mut self.customers[i];
        c.next_seq += 1;
        c.last_event = e.event_id;
        e
    }

    fn place_order(&mut self, i: usize) -> EventEnvelope {
        let customer_id = self.customers[i].id.clone();
        let id = self.next_id(1, "ord");
        let n_items = self.rng.random_range(1..5);
        let mut items = Vec::with_capacity(n_items);
        let mut total_cents = 0i64;
        for _ in 0..n_items {
            let quantity = self.rng.random_range(1..4u32);
            let price_cents = self.rng.random_range(199..25_000i64);
            total_cents += price_cents * i64::from(quantity);
            items.push(OrderItem {
                product_id: format!("sku-{}", self.rng.random_range(100..400)),
                quantity,
                unit_price: price_cents as f64 / 100.0,
            });
        }
        let city = self.pick(CITIES);
        let mut addr = Map::new();
        addr.insert("city".into(), json!(city));
        addr.insert(
            "street".into(),
            json!(format!("{} Harbour Rd", self.rng.random_range(1..90))),
        );
        let data = EventData::OrderPlaced(OrderPlaced {
            order_id: id.clone(),
            customer_id: customer_id.clone(),
            items,
            shipping_address: addr,
            total_amount: total_cents as f64 / 100.0,
            currency: Some("EUR".into()),
        });
        let e = self.event(&id, 0, data, None, None);
        self.orders.push(Order {
            id,
            customer_id,
            next_seq: 1,
            stage: Stage::Placed,
            total_cents,
            correlation: e.event_id,
            last_event: e.event_id,
        });
        e
    }

    /// The order's next lifecycle step; an order that ends is dropped from the open list.
    fn advance_order(&mut self, i: usize) -> EventEnvelope {
        let roll: f64 = self.rng.random();
        let carrier = self.pick(CARRIERS);
        let warehouse = self.pick(WAREHOUSES);
        let tracking = format!("1Z{:012}", self.rng.random_range(0..1_000_000_000_000u64));
        let payment = format!("pay-{:08x}", self.rng.random::<u32>());
        let o = &self.orders[i];
        let (order_id, customer_id) = (o.id.clone(), o.customer_id.clone());
        let cancel = |previous: &str, by: &str| {
            EventData::OrderCancelled(OrderCancelled {
                order_id: order_id.clone(),
                customer_id: customer_id.clone(),
                reason: "customer changed their mind".into(),
                cancelled_by: by.into(),
                previous_status: previous.into(),
            })
        };
        let (data, next, ends) = match o.stage {
            Stage::Placed if roll < 0.08 => (
                EventData::OrderValidationFailed(OrderValidationFailed {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    reason: "address could not be verified".into(),
                    details: vec![json!({"field": "shipping_address", "code": "UNVERIFIED"})],
                }),
                o.stage,
                true,
            ),
            Stage::Placed if roll < 0.11 => (cancel("created", "customer"), o.stage, true),
            Stage::Placed => (
                EventData::OrderValidated(OrderValidated {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    validation_details: Map::from_iter([(
                        "fraud_score".into(),
                        json!(((roll * 100.0).round()) / 100.0),
                    )]),
                }),
                Stage::Validated,
                false,
            ),
            Stage::Validated if roll < 0.05 => {
                (cancel("payment_pending", "customer"), o.stage, true)
            }
            Stage::Validated => (
                EventData::OrderPaymentConfirmed(OrderPaymentConfirmed {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    payment_id: payment,
                    amount: o.total_cents as f64 / 100.0,
                    transaction_details: Map::from_iter([("method".into(), json!("card"))]),
                }),
                Stage::Paid,
                false,
            ),
            Stage::Paid if roll < 0.03 => (cancel("payment_confirmed", "support"), o.stage, true),
            Stage::Paid => (
                EventData::OrderPreparationStarted(OrderPreparationStarted {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    warehouse_id: warehouse.into(),
                }),
                Stage::Preparing,
                false,
            ),
            Stage::Preparing => (
                EventData::OrderShipped(OrderShipped {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                    carrier: carrier.into(),
                    tracking_number: tracking,
                }),
                Stage::Shipped,
                false,
            ),
            Stage::Shipped => (
                EventData::OrderCompleted(OrderCompleted {
                    order_id: order_id.clone(),
                    customer_id: customer_id.clone(),
                }),
                o.stage,
                true,
            ),
        };
        let (seq, corr, cause) = (o.next_seq, o.correlation, o.last_event);
        let e = self.event(&order_id, seq, data, Some(corr), Some(cause));
        if ends {
            self.orders.swap_remove(i);
        } else {
            let o = &mut self.orders[i];
            o.stage = next;
            o.next_seq += 1;
            o.last_event = e.event_id;
        }
        e
    }

    fn open_ticket(&mut self, i: usize) -> EventEnvelope {
        let customer_id = self.customers[i].id.clone();
        let id = self.next_id(2, "tkt");
        let data = EventData::TicketCreated(TicketCreated {
            ticket_id: id.clone(),
            customer_id: customer_id.clone(),
            subject: self.pick(SUBJECTS).into(),
            priority: self.pick(PRIORITIES).into(),
            channel: self.pick(CHANNELS).into(),
        });
        let e = self.event(&id, 0, data, None, None);
        self.tickets.push(Ticket {
            id,
            customer_id,
            next_seq: 1,
            correlation: e.event_id,
        });
        e
    }

    fn resolve_ticket(&mut self, i: usize) -> EventEnvelope {
        let t = self.tickets.swap_remove(i);
        let data = EventData::TicketResolved(TicketResolved {
            ticket_id: t.id.clone(),
            customer_id: t.customer_id,
            resolution: "resolved by agent".into(),
        });
        self.event(
            &t.id,
            t.next_seq,
            data,
            Some(t.correlation),
            Some(t.correlation),
        )
    }
}

impl Iterator for History {
    type Item = EventEnvelope;

    fn next(&mut self) -> Option<EventEnvelope> {
        let roll: f64 = self.rng.random();
        // New customers keep arriving; the first few come before anything else.
        if self.customers.len() < 3 || roll < 0.06 {
            return Some(self.create_customer());
        }
        let c = self.rng.random_range(0..self.customers.len());
        let e = match roll {
            r if r < 0.09 => self.update_customer(c),
            r if r < 0.40 => self.interaction(c),
            r if r < 0.55 => self.place_order(c),
            r if r < 0.60 => self.open_ticket(c),
            r if r < 0.65 && !self.tickets.is_empty() => {
                let t = self.rng.random_range(0..self.tickets.len());
                self.resolve_ticket(t)
            }
            _ if !self.orders.is_empty() => {
                let o = self.rng.random_range(0..self.orders.len());
                self.advance_order(o)
            }
            _ => self.place_order(c),
        };
        Some(e)
    }
}
