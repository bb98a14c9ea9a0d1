//! The card domain: blocking one card, or every card of a customer.
//!
//! Handlers are pure: they take cards and customers and return effects — the datom that marks a
//! card blocked, the message that says its status changed, one notification for the customer —
//! and the executor does the rest.

pub mod job;
#[cfg(all(feature = "postgres", feature = "nats"))]
pub mod servers;

/// The environment variable the store URL is read from when `--store` is not given (as the
/// `effects` CLI reads it).
pub const STORE_ENV: &str = "EFFECTS_STORE";

/// The environment variable of the transport URL.
pub const TRANSPORT_ENV: &str = "EFFECTS_TRANSPORT";

/// The environment variable of the namespace (schema and stream) on the servers.
pub const NAMESPACE_ENV: &str = "EFFECTS_NAMESPACE";

use effects_core::catalogue::Catalogue;
use effects_core::catalogue::schemars::JsonSchema;
use effects_core::{Datom, Empty, Message, effect_handler, effects};
use serde::{Deserialize, Serialize};

/// A card's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "effects_core::catalogue::schemars")]
#[serde(rename_all = "snake_case")]
pub enum CardStatus {
    /// In use.
    Active,
    /// Blocked: no payment goes through.
    Blocked,
    /// Closed for good.
    Cancelled,
}

/// A payment card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "effects_core::catalogue::schemars")]
pub struct Card {
    /// The card's id.
    pub id: String,
    /// The customer who holds it.
    pub customer_id: String,
    /// Its status.
    pub status: CardStatus,
}

impl Card {
    /// Only an active card can be blocked.
    pub fn can_block(&self) -> bool {
        self.status == CardStatus::Active
    }

    /// The card, blocked.
    #[must_use]
    pub fn block(&self) -> Card {
        Card {
            status: CardStatus::Blocked,
            ..self.clone()
        }
    }
}

/// A customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "effects_core::catalogue::schemars")]
pub struct Customer {
    /// The customer's id.
    pub id: String,
    /// Their name.
    pub name: String,
}

/// The datom that records a card's new status.
#[derive(Clone, Debug, PartialEq, Eq, Datom)]
#[datom(entity = "card")]
#[derive(JsonSchema)]
#[schemars(crate = "effects_core::catalogue::schemars")]
pub struct BlockedCard {
    /// The card.
    #[datom(id)]
    pub id: String,
    /// Its status, now blocked.
    pub status: CardStatus,
}

impl From<&Card> for BlockedCard {
    fn from(card: &Card) -> Self {
        BlockedCard {
            id: card.id.clone(),
            status: card.status,
        }
    }
}

/// Published when a card's status changes; keyed by card so one card's changes stay in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[message(topic = "card-status-changed")]
#[derive(JsonSchema)]
#[schemars(crate = "effects_core::catalogue::schemars")]
pub struct StatusChanged {
    /// The card.
    #[message(key)]
    pub card_id: String,
    /// Its holder.
    pub customer_id: String,
    /// The new status.
    pub status: CardStatus,
}

impl From<&Card> for StatusChanged {
    fn from(card: &Card) -> Self {
        StatusChanged {
            card_id: card.id.clone(),
            customer_id: card.customer_id.clone(),
            status: card.status,
        }
    }
}

impl From<Card> for StatusChanged {
    fn from(card: Card) -> Self {
        StatusChanged {
            card_id: card.id,
            customer_id: card.customer_id,
            status: card.status,
        }
    }
}

/// Asks the notification service to tell a customer their cards were blocked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Message)]
#[message(topic = "cards-blocked-notify")]
#[derive(JsonSchema)]
#[schemars(crate = "effects_core::catalogue::schemars")]
pub struct CardsBlockedNotify {
    /// The customer.
    #[message(key)]
    pub customer_id: String,
    /// Their name, for the greeting.
    pub name: String,
}

impl From<&Customer> for CardsBlockedNotify {
    fn from(customer: &Customer) -> Self {
        CardsBlockedNotify {
            customer_id: customer.id.clone(),
            name: customer.name.clone(),
        }
    }
}

effects! {
    /// Blocking one card.
    #[derive(Clone, Debug, PartialEq)]
    pub BlockCard {
        datoms:   [one BlockedCard],
        messages: [one StatusChanged],
    }

    /// Blocking every card of a customer.
    #[derive(Clone, Debug, PartialEq)]
    pub BlockAll {
        datoms:   [many BlockedCard],
        messages: [many StatusChanged, one CardsBlockedNotify],
        merges:   [BlockCard],
    }
}

/// Blocks one card: the blocked status and a status-changed message, or nothing when the card
/// cannot be blocked (already blocked, or cancelled).
#[effect_handler(topic = "card-block-requested")]
pub fn block(card: &Card) -> effects![BlockCard | Empty] {
    if !card.can_block() {
        return Empty.into();
    }
    let blocked = card.block();
    BlockCard::builder()
        .blocked_card(BlockedCard::from(&blocked))
        .status_changed(StatusChanged::from(blocked))
        .build()
        .into()
}

/// Blocks every card of a customer: each card's effects merged together, plus one notification
/// for the customer.
#[effect_handler(topic = "customer-cards-block-requested")]
pub fn block_all(customer: &Customer, cards: &[Card]) -> effects![BlockAll] {
    let notify = BlockAll::builder()
        .cards_blocked_notify(CardsBlockedNotify::from(customer))
        .build();
    cards.iter().map(block).fold(notify, BlockAll::merge).into()
}

/// The service's catalogue: its handlers, the schemas they may return, and the JSON Schemas of
/// its payload types (`cards describe` prints it).
pub fn catalogue() -> Catalogue {
    Catalogue::new()
        .handler::<BlockHandler>()
        .handler::<BlockAllHandler>()
        .input::<Card>()
        .payload::<BlockedCard>()
        .payload::<StatusChanged>()
        .payload::<CardsBlockedNotify>()
}
