//! Where the job keeps its state and its messages, named by URL: `--store sqlite:PATH` and
//! `--transport sqlite:PATH` today (the embedded default: store and log in one file). Each kind
//! of URL is one variant here, so a PostgreSQL store or a NATS transport is one more variant and
//! one more arm where the job opens them.

use std::fmt;
use std::path::{Path, PathBuf};

/// A store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:PATH`: the embedded SQLite store in the file at `PATH`.
    Sqlite(PathBuf),
}

/// A transport URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransportUrl {
    /// `sqlite:PATH`: the embedded log in the SQLite file at `PATH`.
    Sqlite(PathBuf),
}

/// A URL this build cannot use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlError {
    /// `--store` or `--transport`.
    pub flag: &'static str,
    /// The URL as given.
    pub url: String,
    /// What is wrong, and what to write instead.
    pub reason: String,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`: {}", self.flag, self.url, self.reason)
    }
}

impl std::error::Error for UrlError {}

fn sqlite_path(flag: &'static str, url: &str) -> Result<PathBuf, UrlError> {
    let error = |reason: String| UrlError {
        flag,
        url: url.to_owned(),
        reason,
    };
    match url.split_once(':') {
        Some(("sqlite", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        Some(("sqlite", _)) => Err(error(
            "names no file: write `sqlite:PATH`, as in `sqlite:/tmp/transfers.db`".to_owned(),
        )),
        Some((scheme @ ("postgres" | "postgresql" | "nats"), _)) => Err(error(format!(
            "`{scheme}` is not supported by this example yet: use `sqlite:PATH`"
        ))),
        _ => Err(error(
            "is not a URL this example knows: use `sqlite:PATH`".to_owned(),
        )),
    }
}

impl StoreUrl {
    /// Parses `sqlite:PATH`.
    pub fn parse(url: &str) -> Result<StoreUrl, UrlError> {
        sqlite_path("--store", url).map(StoreUrl::Sqlite)
    }

    /// The SQLite file, for the embedded store.
    pub fn sqlite_path(&self) -> &Path {
        match self {
            StoreUrl::Sqlite(path) => path,
        }
    }
}

impl TransportUrl {
    /// Parses `sqlite:PATH`.
    pub fn parse(url: &str) -> Result<TransportUrl, UrlError> {
        sqlite_path("--transport", url).map(TransportUrl::Sqlite)
    }

    /// The transport that goes with `store` when none is named: its own log, in the same file.
    pub fn beside(store: &StoreUrl) -> TransportUrl {
        match store {
            StoreUrl::Sqlite(path) => TransportUrl::Sqlite(path.clone()),
        }
    }

    /// Checks that this transport can be used with `store`: the embedded log lives in the
    /// store's own file, which is what lets a run publish its messages in the transaction that
    /// applies its datoms.
    pub fn check_with(&self, store: &StoreUrl) -> Result<(), UrlError> {
        match (self, store) {
            (TransportUrl::Sqlite(log), StoreUrl::Sqlite(db)) if log == db => Ok(()),
            (TransportUrl::Sqlite(log), StoreUrl::Sqlite(db)) => Err(UrlError {
                flag: "--transport",
                url: format!("sqlite:{}", log.display()),
                reason: format!(
                    "the embedded log lives in the store's file: give `sqlite:{}` or leave --transport out",
                    db.display()
                ),
            }),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
        }
    }
}

impl fmt::Display for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_parse_and_others_say_what_to_write() {
        assert_eq!(
            StoreUrl::parse("sqlite:/tmp/t.db"),
            Ok(StoreUrl::Sqlite("/tmp/t.db".into()))
        );
        let err = StoreUrl::parse("postgres://127.0.0.1/test").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--store `postgres://127.0.0.1/test`: `postgres` is not supported by this example yet: use `sqlite:PATH`"
        );
        let err = TransportUrl::parse("sqlite:").unwrap_err();
        assert!(err.to_string().contains("names no file"), "{err}");
        assert!(TransportUrl::parse("/tmp/t.db").is_err());
    }

    #[test]
    fn the_embedded_log_must_share_the_store_file() {
        let store = StoreUrl::parse("sqlite:/tmp/a.db").unwrap();
        assert_eq!(TransportUrl::beside(&store).check_with(&store), Ok(()));
        let err = TransportUrl::parse("sqlite:/tmp/b.db")
            .unwrap()
            .check_with(&store)
            .unwrap_err();
        assert!(err.to_string().contains("sqlite:/tmp/a.db"), "{err}");
    }
}
