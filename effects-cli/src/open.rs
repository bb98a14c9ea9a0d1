//! Store URLs: which store a command works on.

use std::path::PathBuf;

use effects_core::store::{SqliteOptions, SqliteStore, StoreError};

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// `sqlite:PATH` or `sqlite://PATH`.
    Sqlite(PathBuf),
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// No store given.
    #[error("no store given: pass `--store sqlite:PATH` or set EFFECTS_STORE")]
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
    /// Parses `sqlite:PATH`; `postgres://` and `postgresql://` are recognised and refused until
    /// the PostgreSQL store exists.
    pub(crate) fn parse(url: &str) -> Result<StoreUrl, OpenError> {
        let unsupported = |reason: &str| OpenError::Unsupported {
            url: url.to_owned(),
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
            return Err(unsupported(
                "PostgreSQL stores are not supported by this build of `effects` yet; \
                 use `sqlite:PATH` for the embedded store",
            ));
        }
        Err(unsupported(
            "not a store URL this build knows: use `sqlite:PATH` for the embedded store",
        ))
    }

    /// Opens the store; a file that does not exist, or is not an effects store, is an error and
    /// nothing is created.
    pub(crate) fn open_sqlite(path: &std::path::Path) -> Result<SqliteStore, OpenError> {
        Ok(SqliteStore::open_existing(path, &SqliteOptions::default())?)
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
        let pg = StoreUrl::parse("postgres://localhost/test").unwrap_err();
        assert!(
            pg.to_string().contains("not supported by this build"),
            "{pg}"
        );
        let bare = StoreUrl::parse("cards.db").unwrap_err();
        assert!(bare.to_string().contains("sqlite:PATH"), "{bare}");
        assert!(StoreUrl::parse("sqlite:").is_err());
    }
}
