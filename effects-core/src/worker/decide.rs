//! The decide stage: owns turning one delivery into a run to commit — its idempotency key, the
//! duplicate check of a redelivery, the input (decoded or loaded, with the reads recorded), the
//! handler call — or into the reason it settles without one. It writes nothing.

use std::panic::AssertUnwindSafe;

use tracing::{Instrument, info_span};

use super::Inner;
use crate::effects::Effects;
use crate::executor::Committed;
use crate::handler::{Handler, business_key, message_key};
use crate::http::HttpClient;
use crate::store::{InputAck, ReadVersion, Store, Tracked};
use crate::transport::{Delivery, Transport};
use crate::worker::{Inputs, LoadError};

/// A run ready to commit.
#[derive(Debug)]
pub(super) struct Decided {
    /// The idempotency key.
    pub(super) key: String,
    /// The handler's effects.
    pub(super) effects: Effects,
    /// What the input was loaded from, with the versions read.
    pub(super) reads: Vec<ReadVersion>,
    /// The input message, acknowledged in the commit when its log is in the store's database.
    pub(super) input: InputAck,
}

/// What deciding a delivery gave.
#[derive(Debug)]
pub(super) enum Decision {
    /// Effects to commit.
    Run(Decided),
    /// The run exists already (a redelivery, or a retry whose earlier commit did go through):
    /// the duplicate path.
    Found(Committed),
    /// It can never be processed.
    DeadLetter(String),
    /// It failed for now (the store).
    Retry(String),
    /// What its input needs has not arrived yet.
    NotYet(String),
}

impl<S, T, C, H, I> Inner<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    /// Decides one delivery. With `check`, a run already committed under its key is found
    /// first (a redelivery or a retry); without it that is found only before a dead letter, or
    /// at commit (a first delivery rarely has a run).
    pub(super) async fn decide(&self, delivery: &Delivery, check: bool) -> Decision {
        let name = H::DESCRIPTOR.name;
        let mut key = None;
        if H::DESCRIPTOR.key.is_none() {
            if delivery.message_id.is_empty() {
                // Its run would be keyed `handler:topic:`, which every other message without an
                // id would share: the second would be taken for a redelivery of the first.
                return Decision::DeadLetter(
                    "the message id is empty: it names the message's run (`handler:topic:id`), \
                     so messages without one cannot be told apart"
                        .to_owned(),
                );
            }
            let k = message_key(name, &delivery.topic, &delivery.message_id);
            if check {
                if let Some(found) = self.existing(&k).await {
                    return found;
                }
            }
            key = Some(k);
        }
        let tracked = Tracked::new(self.executor.store().clone());
        let input = match self
            .inputs
            .input(&self.handler, delivery, &tracked)
            .instrument(info_span!("effects.load"))
            .await
        {
            Ok(input) => input,
            Err(LoadError::NotYet { reason }) => return Decision::NotYet(reason),
            Err(e) if e.is_permanent() => {
                return self
                    .dead_letter_unless_applied(key.as_deref(), check, e.to_string())
                    .await;
            }
            Err(e) => return Decision::Retry(e.to_string()),
        };
        let key = match key {
            Some(k) => k,
            None => {
                let Some(business) = self.handler.key(&input) else {
                    return Decision::DeadLetter(format!(
                        "handler `{name}` declares a business key but gave none for this input"
                    ));
                };
                let k = business_key(name, &business);
                if check {
                    if let Some(found) = self.existing(&k).await {
                        return found;
                    }
                }
                k
            }
        };
        tracing::Span::current().record("key", key.as_str());
        let handled = {
            let _handle = info_span!("effects.handle", handler = name).entered();
            std::panic::catch_unwind(AssertUnwindSafe(|| -> Effects {
                self.handler.handle(input).into()
            }))
        };
        match handled {
            Ok(effects) => Decision::Run(Decided {
                key,
                effects,
                reads: tracked.reads(),
                input: InputAck::of(delivery),
            }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic".to_owned());
                self.dead_letter_unless_applied(
                    Some(&key),
                    check,
                    format!("handler `{name}` panicked: {what}"),
                )
                .await
            }
        }
    }

    /// The run committed under `key`, if there is one.
    pub(super) async fn existing(&self, key: &str) -> Option<Decision> {
        match self.executor.find(key).await {
            Ok(Some(committed)) => Some(Decision::Found(committed)),
            Ok(None) => None,
            Err(e) => Some(Decision::Retry(e.to_string())),
        }
    }

    /// A dead letter — unless the message's run was applied before (a redelivery of a message
    /// whose input has changed since): then that run stands and this is a duplicate.
    async fn dead_letter_unless_applied(
        &self,
        key: Option<&str>,
        checked: bool,
        reason: String,
    ) -> Decision {
        if let (Some(key), false) = (key, checked) {
            if let Some(found) = self.existing(key).await {
                return found;
            }
        }
        Decision::DeadLetter(reason)
    }
}
