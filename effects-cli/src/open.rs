//! Store URLs: which store a command works on.

use std::path::PathBuf;
use std::time::Duration;

use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::store::{SqliteOptions, SqliteStore, StoreError};

/// The schema of a PostgreSQL store when neither `--schema` nor `EFFECTS_NAMESPACE` names one.
pub(crate) const DEFAULT_SCHEMA: &str = "public";

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// `sqlite:PATH` or `sqlite://PATH`.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`, as given (the schema is a separate option).
    Postgres(String),
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// No store given.
    #[error(
        "no store given: pass `--store sqlite:PATH` or `--store postgres://...`, or set \
         EFFECTS_STORE"
    )]
    Missing,
    /// A URL this build cannot open.
    #[error("`{url}`: {reason}")]
    Unsupported {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The store refused to open.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl StoreUrl {
    /// Parses `sqlite:PATH`, `postgres://...` and `postgresql://...`.
    pub(crate) fn parse(url: &str) -> Result<StoreUrl, OpenError> {
        let unsupported = |reason: &str| OpenError::Unsupported {
            url: redacted(url),
            reason: reason.to_owned(),
        };
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(unsupported("no path: write `sqlite:PATH`"));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        Err(unsupported(
            "not a store URL this build knows: use `sqlite:PATH` for the embedded store, or \
             `postgres://USER@HOST:PORT/DATABASE` with `--schema NAME` for a PostgreSQL store",
        ))
    }

    /// Opens the store; a file that does not exist, or is not an effects store, is an error and
    /// nothing is created.
    pub(crate) fn open_sqlite(path: &std::path::Path) -> Result<SqliteStore, OpenError> {
        Ok(SqliteStore::open_existing(path, &SqliteOptions::default())?)
    }

    /// Connects to the store in `schema` of the database at `url`; a server that does not
    /// answer, a schema that does not exist or is not an effects store, is an error and nothing
    /// is created.
    pub(crate) async fn open_postgres(url: &str, schema: &str) -> Result<PostgresStore, OpenError> {
        let options = PostgresOptions {
            // One command at a time: a small pool, and a short wait for a server that is down.
            pool_size: 2,
            connect_timeout: Duration::from_secs(5),
            pool_timeout: Duration::from_secs(10),
            ..PostgresOptions::new(url).with_schema(schema)
        };
        Ok(PostgresStore::connect_existing(options).await?)
    }
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:[redacted]@{host}"),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            StoreUrl::parse("sqlite:cards.db").unwrap(),
            StoreUrl::Sqlite("cards.db".into())
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///tmp/cards.db").unwrap(),
            StoreUrl::Sqlite("/tmp/cards.db".into())
        );
        for pg in ["postgres://localhost/test", "postgresql://u@h:5432/db"] {
            assert_eq!(
                StoreUrl::parse(pg).unwrap(),
                StoreUrl::Postgres(pg.to_owned())
            );
        }
        let bare = StoreUrl::parse("cards.db").unwrap_err();
        assert!(bare.to_string().contains("sqlite:PATH"), "{bare}");
        assert!(bare.to_string().contains("postgres://"), "{bare}");
        assert!(StoreUrl::parse("sqlite:").is_err());
        let secret = StoreUrl::parse("mysql://app:s3cret@db/x").unwrap_err();
        assert!(!secret.to_string().contains("s3cret"), "{secret}");
    }
}
