//! Inputs: how a delivery becomes the handler's input — decoded from the payload, or loaded
//! from the store through a [`Tracked`] handle that records what it read.

use std::any::type_name;
use std::future::Future;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::datom::LookupRef;
use crate::handler::{DecodeError, Handler};
use crate::store::{Store, StoreError, Tracked};
use crate::transport::Delivery;

/// Why a handler's input could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The payload is not a valid input (or reference): dead-lettered.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// What the payload refers to does not exist: dead-lettered.
    #[error("{what} was not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// What was loaded cannot be turned into the input: dead-lettered.
    #[error("cannot build the input: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
    /// What the input needs has not arrived yet — say a cancellation that overtook the
    /// reservation it cancels (they travel on different partition keys): the worker tries
    /// again after [`WorkerConfig::not_yet`](super::WorkerConfig::not_yet)'s delays, holding
    /// the delivery (and the later ones of its key), and dead-letters it with this reason once
    /// that many attempts said "not yet".
    #[error("not yet: {reason}")]
    NotYet {
        /// What is missing.
        reason: String,
    },
    /// The store failed: the message is retried, unless the store's error is one no retry can
    /// fix ([`StoreError::is_permanent`]), which is dead-lettered.
    #[error("the store failed while loading the input: {0}")]
    Store(#[from] StoreError),
}

impl LoadError {
    /// Whether retrying cannot help (the message is dead-lettered).
    pub fn is_permanent(&self) -> bool {
        match self {
            LoadError::Store(e) => e.is_permanent(),
            LoadError::NotYet { .. } => false,
            LoadError::Decode(_) | LoadError::NotFound { .. } | LoadError::Invalid { .. } => true,
        }
    }
}

/// How a worker turns a delivery into the handler's input: the "load inputs" hook.
///
/// The store comes as a [`Tracked`] handle: every entity read through it is recorded with the
/// version read, and the run commits only if none of them changed since (otherwise the worker
/// loads again and calls the handler again: see the [worker's docs](super#concurrency)).
pub trait Inputs<H: Handler, S: Store>: Send + Sync + 'static {
    /// The input for `delivery`.
    fn input(
        &self,
        handler: &H,
        delivery: &Delivery,
        store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send;
}

/// The default [`Inputs`]: the payload is the input, decoded with [`Handler::decode`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Decode;

impl<H: Handler, S: Store> Inputs<H, S> for Decode {
    fn input(
        &self,
        handler: &H,
        delivery: &Delivery,
        _store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let decoded = handler.decode(&delivery.payload).map_err(LoadError::from);
        async move { decoded }
    }
}

/// The name of `R` for errors: without its module path (`BlockRequest`, not
/// `cards::BlockRequest`), like the input names of handler descriptors; a generic type keeps its
/// full name.
fn reference_name<R>() -> &'static str {
    let full = type_name::<R>();
    if full.contains('<') {
        full
    } else {
        full.rsplit("::").next().unwrap_or(full)
    }
}

fn decode_reference<H: Handler, R: DeserializeOwned>(payload: &[u8]) -> Result<R, LoadError> {
    serde_json::from_slice(payload).map_err(|e| {
        LoadError::Decode(DecodeError {
            handler: H::DESCRIPTOR.name,
            input: reference_name::<R>(),
            reason: e.to_string(),
        })
    })
}

/// [`Inputs`] that decodes a reference `R` from the payload, turns it into a lookup ref and loads
/// that entity (as it is now); the input is the entity decoded with
/// [`Entity::decode`](crate::store::Entity::decode) — attribute names without their namespace,
/// the identity included. A missing entity is [`LoadError::NotFound`].
pub struct LoadEntity<R, F> {
    lookup: F,
    _reference: PhantomData<fn() -> R>,
}

impl<R, F> std::fmt::Debug for LoadEntity<R, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadEntity")
            .field("reference", &type_name::<R>())
            .finish_non_exhaustive()
    }
}

impl<R, F> LoadEntity<R, F>
where
    R: DeserializeOwned + Send + 'static,
    F: Fn(R) -> LookupRef + Send + Sync + 'static,
{
    /// Loads the entity `lookup(reference)` names.
    pub fn new(lookup: F) -> Self {
        LoadEntity {
            lookup,
            _reference: PhantomData,
        }
    }
}

impl<H, S, R, F> Inputs<H, S> for LoadEntity<R, F>
where
    H: Handler,
    S: Store + Clone,
    R: DeserializeOwned + Send + 'static,
    F: Fn(R) -> LookupRef + Send + Sync + 'static,
{
    fn input(
        &self,
        _handler: &H,
        delivery: &Delivery,
        store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let lookup = decode_reference::<H, R>(&delivery.payload).map(&self.lookup);
        async move {
            let lookup = lookup?;
            let entity = store
                .entity(&lookup, None)
                .await?
                .ok_or_else(|| LoadError::NotFound {
                    what: format!("entity {lookup}"),
                })?;
            entity.decode::<H::Input>().map_err(|e| LoadError::Invalid {
                reason: format!("entity {lookup} is not a `{}`: {e}", H::DESCRIPTOR.input),
            })
        }
    }
}

/// [`Inputs`] from a function: decodes a reference `R` from the payload and calls
/// `load(reference, store)` to produce the input. The store is a [`Tracked`] handle (a clone
/// sharing the attempt's record of reads): what `load` reads through it is validated at commit.
pub struct LoadWith<R, F> {
    load: F,
    _reference: PhantomData<fn() -> R>,
}

impl<R, F> std::fmt::Debug for LoadWith<R, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadWith")
            .field("reference", &type_name::<R>())
            .finish_non_exhaustive()
    }
}

impl<R, F> LoadWith<R, F> {
    /// Loads with `load`.
    pub fn new(load: F) -> Self {
        LoadWith {
            load,
            _reference: PhantomData,
        }
    }
}

impl<H, S, R, F, Fut> Inputs<H, S> for LoadWith<R, F>
where
    H: Handler,
    S: Store + Clone,
    R: DeserializeOwned + Send + 'static,
    F: Fn(R, Tracked<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<H::Input, LoadError>> + Send,
{
    fn input(
        &self,
        _handler: &H,
        delivery: &Delivery,
        store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let started = decode_reference::<H, R>(&delivery.payload)
            .map(|reference| (self.load)(reference, store.clone()));
        async move { started?.await }
    }
}

#[cfg(test)]
mod tests {
    use super::reference_name;

    #[test]
    fn reference_names_drop_the_module_path_unless_generic() {
        struct BlockRequest;
        assert_eq!(reference_name::<BlockRequest>(), "BlockRequest");
        assert_eq!(reference_name::<String>(), "String");
        assert_eq!(reference_name::<u64>(), "u64");
        assert!(reference_name::<Vec<BlockRequest>>().starts_with("alloc::vec::Vec<"));
    }
}
