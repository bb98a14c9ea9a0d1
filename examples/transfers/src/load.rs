//! The inputs of the handlers, loaded from the store through the worker's
//! [`Tracked`] handle: every entity read here is validated when the run commits,
//! so a run computed from a balance that changed meanwhile is refused and computed again.

use effects_core::LookupRef;
use effects_core::store::{Store, Tracked};
use effects_core::worker::LoadError;
use serde::de::DeserializeOwned;

use crate::{Account, FraudChecked, SettleInput, Transfer, TransferInput, TransferRecord};

/// The lookup ref of an account.
pub fn account_ref(id: &str) -> LookupRef {
    LookupRef::new("account/id", id)
}

/// The lookup ref of a transfer.
pub fn transfer_ref(id: &str) -> LookupRef {
    LookupRef::new("transfer/id", id)
}

/// Reads one entity through the tracked store and decodes it.
async fn entity<S: Store, T: DeserializeOwned>(
    store: &Tracked<S>,
    lookup: LookupRef,
    what: &str,
) -> Result<T, LoadError> {
    let entity = store
        .entity(&lookup, None)
        .await?
        .ok_or_else(|| LoadError::NotFound {
            what: format!("{what} {lookup}"),
        })?;
    entity.decode().map_err(|e| LoadError::Invalid {
        reason: format!("{lookup} is not {what}: {e}"),
    })
}

/// The input of [`transfer`](crate::transfer): the transfer from the message, and both accounts
/// as they are now. A transfer naming an account that does not exist is dead-lettered.
pub async fn transfer_input<S: Store>(
    transfer: Transfer,
    store: Tracked<S>,
) -> Result<TransferInput, LoadError> {
    let payer: Account = entity(&store, account_ref(&transfer.from), "an account").await?;
    let payee: Account = entity(&store, account_ref(&transfer.to), "an account").await?;
    Ok(TransferInput {
        transfer,
        payer,
        payee,
    })
}

/// The input of [`settle`](crate::settle): the verdict from the message, the held transfer and
/// both its accounts as they are now.
///
/// A verdict travels on its own partition key, so it can overtake the transfer it settles (a
/// fraud-check service that answers through the broker before the transfer's run is recorded,
/// or a verdict re-sent by an operator): a verdict whose transfer is not recorded yet is
/// [`LoadError::NotYet`], and the worker tries it again a little later instead of
/// dead-lettering it.
pub async fn settle_input<S: Store>(
    check: FraudChecked,
    store: Tracked<S>,
) -> Result<SettleInput, LoadError> {
    let lookup = transfer_ref(&check.transfer_id);
    if store.entity(&lookup, None).await?.is_none() {
        return Err(LoadError::NotYet {
            reason: format!("the transfer {lookup} this verdict settles is not recorded yet"),
        });
    }
    let transfer: TransferRecord = entity(&store, lookup, "a transfer").await?;
    let payer: Account = entity(&store, account_ref(&transfer.from), "an account").await?;
    let payee: Account = entity(&store, account_ref(&transfer.to), "an account").await?;
    Ok(SettleInput {
        check,
        transfer,
        payer,
        payee,
    })
}
