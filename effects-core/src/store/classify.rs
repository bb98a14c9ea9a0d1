//! What a store error means for the work that met it: [`StoreError::kind`]. It owns the one
//! table from PostgreSQL SQLSTATE classes and SQLite result codes to a [`StoreErrorKind`]; the
//! worker reads it to decide between a dead letter and a retry, so one value a store refuses
//! cannot hold back the inputs behind it, and a passing outage dead-letters nothing.
//!
//! The rule behind the table: an error is [`StoreErrorKind::Data`] only when the values of the
//! operation are what the database refuses, so that running the same operation again must fail
//! the same way, whatever else happens meanwhile. An error caused by the database's state or
//! setup (a missing table, a permission, a corrupt file) is [`StoreErrorKind::Environment`]:
//! no retry fixes it either, but neither does dead-lettering the input — every other input
//! would fail the same way, and once an operator fixes the database they all succeed. Anything
//! else, and anything not known, is [`StoreErrorKind::Transient`].

use super::StoreError;

/// What a [`StoreError`] says about the operation that met it.
///
/// # PostgreSQL
///
/// By the SQLSTATE's class (its first two characters), as the PostgreSQL manual's appendix A
/// lists them:
///
/// - Data — the statement's values: `21` cardinality violation, `22` data exception (such as
///   `22021`, a NUL in text), `23` integrity constraint violation, `44` WITH CHECK OPTION
///   violation, `54` program limit exceeded (such as an index row larger than 2 704 bytes).
/// - Transient — the moment: `08` connection exception, `25` invalid transaction state (a
///   read-only standby after a failover, an idle transaction's timeout, a transaction aborted by
///   an earlier error), `40` transaction rollback (serialization failure, deadlock: the store
///   retries those itself first), `53` insufficient resources, `55` object not in prerequisite
///   state (lock not available), `57` operator intervention (statement timeout, cancel,
///   shutdown), `58` system error (I/O), `72` snapshot too old; and `P0`, PL/pgSQL: a trigger's
///   `RAISE` without an error code, which the store installs none of, so that its meaning is an
///   operator's and not known (as SQLite's `RAISE`).
/// - Environment — the database's setup: `0A` feature not supported, `28` invalid
///   authorization, `3D` invalid catalog name, `3F` invalid schema name, `42` syntax error or
///   access rule violation (undefined table or column, insufficient privilege), `F0`
///   configuration file error, `XX` internal error (data or index corrupted), and the other
///   classes of misuse (`03`, `09`, `0B`, `0F`, `0L`, `0P`, `0Z`, `20`, `24`, `26`, `27`, `2B`,
///   `2D`, `2F`, `34`, `38`, `39`, `3B`, `HV`).
/// - Transient — any other class: not known.
///
/// A trigger may raise any SQLSTATE (`RAISE ... USING ERRCODE = '23505'`): the class it
/// chooses decides.
///
/// # SQLite
///
/// By the result code:
///
/// - Data: `SQLITE_CONSTRAINT` with every extended code (`_UNIQUE`, `_PRIMARYKEY`, `_NOTNULL`,
///   `_CHECK`, `_FOREIGNKEY`, `_DATATYPE`, ...) but `_TRIGGER` and `_COMMITHOOK`;
///   `SQLITE_MISMATCH`, `SQLITE_TOOBIG`; and a value the driver cannot bind (a string with a NUL
///   where SQLite needs a C string, an integer out of range).
/// - Transient: `SQLITE_CONSTRAINT_TRIGGER` (a trigger's `RAISE(ABORT, ..)`: the store installs
///   none, so its meaning is an operator's, as PostgreSQL's `P0001`),
///   `SQLITE_CONSTRAINT_COMMITHOOK`, `SQLITE_BUSY`, `SQLITE_LOCKED`, `SQLITE_IOERR`,
///   `SQLITE_FULL`, `SQLITE_NOMEM`, `SQLITE_INTERRUPT`, `SQLITE_ABORT`, `SQLITE_PROTOCOL`,
///   `SQLITE_SCHEMA` (the schema changed under a statement, which is prepared again).
/// - Environment: `SQLITE_ERROR` (a missing table or column: the schema), `SQLITE_READONLY`,
///   `SQLITE_PERM`, `SQLITE_AUTH`, `SQLITE_CORRUPT`, `SQLITE_NOTADB`, `SQLITE_CANTOPEN`,
///   `SQLITE_NOLFS`, `SQLITE_MISUSE`, `SQLITE_RANGE`, `SQLITE_INTERNAL`, `SQLITE_NOTFOUND`, and
///   every error the driver reports about what it read back (a column of another type than
///   the store wrote, invalid UTF-8, no row).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The database refused the operation's own values (a data exception, an integrity
    /// violation, a value too large for it): the same operation fails the same way every time.
    /// A worker dead-letters the input with the store's reason.
    Data,
    /// It may succeed if tried again: the connection was lost, the transaction was chosen as a
    /// serialization failure's or a deadlock's victim, a statement timed out or was cancelled,
    /// the database was busy, locked, out of resources or failing I/O. Also every error whose
    /// cause is not known. A worker retries it.
    Transient,
    /// The database or its setup is wrong — a table or schema missing, a privilege or a
    /// feature lacking, a corrupt file, a failed migration: no retry fixes it until an operator
    /// does, and it is not the operation's values. A worker retries it (its inputs wait rather
    /// than all being dead-lettered) and logs it as an error.
    Environment,
}

impl StoreError {
    /// What the error says about the operation that met it: see [`StoreErrorKind`] for the
    /// PostgreSQL SQLSTATEs and SQLite result codes of each kind.
    ///
    /// - [`StoreError::Database`]: by the server's SQLSTATE for PostgreSQL (an error without
    ///   one — the connection closed, an I/O error, the pool timed out — is transient), by the
    ///   result code for SQLite.
    /// - [`StoreError::Open`], [`StoreError::Migration`] and [`StoreError::Corrupt`] (stored
    ///   data that this library did not write): [`StoreErrorKind::Environment`].
    /// - [`StoreError::Task`] (the blocking task panicked or was cancelled):
    ///   [`StoreErrorKind::Transient`].
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::Database { source, .. } => source_kind(source.as_ref()),
            StoreError::Open { .. } | StoreError::Migration { .. } | StoreError::Corrupt { .. } => {
                StoreErrorKind::Environment
            }
            StoreError::Task { .. } => StoreErrorKind::Transient,
        }
    }

    /// Whether no retry of the operation can succeed because the store refused its values
    /// ([`StoreErrorKind::Data`]): the input that produced them is a dead letter.
    pub fn is_permanent(&self) -> bool {
        self.kind() == StoreErrorKind::Data
    }
}

fn source_kind(source: &(dyn std::error::Error + Send + Sync + 'static)) -> StoreErrorKind {
    #[cfg(feature = "postgres")]
    if let Some(e) = source.downcast_ref::<crate::postgres::PostgresError>() {
        return e
            .code()
            .map_or(StoreErrorKind::Transient, |c| sqlstate_kind(c.code()));
    }
    #[cfg(feature = "sqlite")]
    if let Some(e) = source.downcast_ref::<rusqlite::Error>() {
        return sqlite_kind(e);
    }
    let _ = source;
    StoreErrorKind::Transient
}

/// The kind of a PostgreSQL error by its SQLSTATE's class (see [`StoreErrorKind`]). Without
/// the `postgres` feature only its tests use it: the table is checked whatever the features.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn sqlstate_kind(code: &str) -> StoreErrorKind {
    match code.get(..2) {
        Some("21" | "22" | "23" | "44" | "54") => StoreErrorKind::Data,
        Some("08" | "25" | "40" | "53" | "55" | "57" | "58" | "72" | "P0") => {
            StoreErrorKind::Transient
        }
        Some(
            "03" | "09" | "0A" | "0B" | "0F" | "0L" | "0P" | "0Z" | "20" | "24" | "26" | "27"
            | "28" | "2B" | "2D" | "2F" | "34" | "38" | "39" | "3B" | "3D" | "3F" | "42" | "F0"
            | "HV" | "XX",
        ) => StoreErrorKind::Environment,
        _ => StoreErrorKind::Transient,
    }
}

/// The kind of a SQLite error by its result code (see [`StoreErrorKind`]).
#[cfg(feature = "sqlite")]
fn sqlite_kind(e: &rusqlite::Error) -> StoreErrorKind {
    use rusqlite::ErrorCode as C;
    use rusqlite::ffi;
    match e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            C::ConstraintViolation => match failure.extended_code {
                ffi::SQLITE_CONSTRAINT_TRIGGER | ffi::SQLITE_CONSTRAINT_COMMITHOOK => {
                    StoreErrorKind::Transient
                }
                _ => StoreErrorKind::Data,
            },
            C::TypeMismatch | C::TooBig => StoreErrorKind::Data,
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::SystemIoFailure
            | C::DiskFull
            | C::OutOfMemory
            | C::OperationInterrupted
            | C::OperationAborted
            | C::FileLockingProtocolFailed
            | C::SchemaChanged => StoreErrorKind::Transient,
            _ => StoreErrorKind::Environment,
        },
        rusqlite::Error::ToSqlConversionFailure(_) | rusqlite::Error::NulError(_) => {
            StoreErrorKind::Data
        }
        _ => StoreErrorKind::Environment,
    }
}

#[cfg(test)]
mod tests {
    use super::{StoreErrorKind, sqlstate_kind};
    use crate::store::StoreError;

    use StoreErrorKind::{Data, Environment, Transient};

    /// One SQLSTATE of every class PostgreSQL 15 defines (appendix A), with its kind.
    const SQLSTATES: &[(&str, StoreErrorKind)] = &[
        ("00000", Transient), // successful completion: never an error; not known
        ("01000", Transient), // warning
        ("02000", Transient), // no data
        ("03000", Environment),
        ("08000", Transient),
        ("08003", Transient), // connection does not exist
        ("08006", Transient), // connection failure
        ("09000", Environment),
        ("0A000", Environment), // feature not supported
        ("0B000", Environment),
        ("0F000", Environment),
        ("0L000", Environment),
        ("0P000", Environment),
        ("0Z000", Environment),
        ("20000", Environment),
        ("21000", Data), // cardinality violation (ON CONFLICT affecting a row twice)
        ("22000", Data),
        ("22001", Data), // string data right truncation
        ("22003", Data), // numeric value out of range
        ("22021", Data), // invalid byte sequence for encoding "UTF8": 0x00
        ("22P02", Data), // invalid text representation
        ("22P05", Data), // untranslatable character
        ("23000", Data),
        ("23502", Data), // not null violation
        ("23503", Data), // foreign key violation
        ("23505", Data), // unique violation
        ("23514", Data), // check violation
        ("24000", Environment),
        ("25000", Transient),
        ("25006", Transient), // read only SQL transaction: a standby after a failover
        ("25P02", Transient), // in failed SQL transaction: the cause came earlier
        ("25P03", Transient), // idle in transaction session timeout
        ("26000", Environment),
        ("27000", Environment),
        ("28000", Environment),
        ("28P01", Environment), // invalid password
        ("2B000", Environment),
        ("2D000", Environment),
        ("2F000", Environment),
        ("34000", Environment),
        ("38000", Environment),
        ("39000", Environment),
        ("3B000", Environment),
        ("3D000", Environment), // the database does not exist
        ("3F000", Environment), // the schema does not exist
        ("40000", Transient),
        ("40001", Transient), // serialization failure
        ("40002", Transient),
        ("40003", Transient),
        ("40P01", Transient), // deadlock detected
        ("42000", Environment),
        ("42501", Environment), // insufficient privilege
        ("42601", Environment), // syntax error
        ("42703", Environment), // undefined column
        ("42P01", Environment), // undefined table
        ("44000", Data),
        ("53000", Transient),
        ("53100", Transient), // disk full
        ("53200", Transient), // out of memory
        ("53300", Transient), // too many connections
        ("54000", Data),      // index row size exceeds maximum
        ("54001", Data),      // statement too complex
        ("55000", Transient),
        ("55P03", Transient), // lock not available
        ("57000", Transient),
        ("57014", Transient), // query canceled: statement timeout
        ("57P01", Transient), // admin shutdown
        ("57P03", Transient), // cannot connect now
        ("58000", Transient),
        ("58030", Transient), // I/O error
        ("72000", Transient), // snapshot too old
        ("F0000", Environment),
        ("HV000", Environment),
        ("P0000", Transient),
        ("P0001", Transient), // raise exception: a trigger's RAISE
        ("XX000", Environment),
        ("XX001", Environment), // data corrupted
        ("XX002", Environment), // index corrupted
        ("ZZ999", Transient),   // a class not known
        ("", Transient),
    ];

    #[test]
    fn every_sqlstate_class_has_its_kind() {
        for &(code, kind) in SQLSTATES {
            assert_eq!(sqlstate_kind(code), kind, "SQLSTATE {code}");
        }
    }

    #[test]
    fn errors_that_are_not_the_databases_have_their_kind() {
        let kind = |e: StoreError| e.kind();
        assert_eq!(
            kind(StoreError::Task {
                reason: "panicked".into()
            }),
            Transient
        );
        assert_eq!(
            kind(StoreError::Corrupt {
                what: "a run".into(),
                reason: "bad".into()
            }),
            Environment
        );
        assert_eq!(
            kind(StoreError::Migration {
                version: 9,
                name: "x".into(),
                reason: "unknown".into()
            }),
            Environment
        );
        assert_eq!(
            kind(StoreError::Open {
                location: "x".into(),
                source: "no".into()
            }),
            Environment
        );
        // A driver error of no known type (a pool timeout, a message): not known.
        let other = StoreError::Database {
            operation: "x",
            source: "the pool timed out".into(),
        };
        assert_eq!(other.kind(), Transient);
        assert!(!other.is_permanent());
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn every_sqlite_result_code_has_its_kind() {
        use rusqlite::ffi;
        let codes: &[(i32, &str, StoreErrorKind)] = &[
            (ffi::SQLITE_CONSTRAINT, "CONSTRAINT", Data),
            (ffi::SQLITE_CONSTRAINT_CHECK, "CONSTRAINT_CHECK", Data),
            (ffi::SQLITE_CONSTRAINT_DATATYPE, "CONSTRAINT_DATATYPE", Data),
            (
                ffi::SQLITE_CONSTRAINT_FOREIGNKEY,
                "CONSTRAINT_FOREIGNKEY",
                Data,
            ),
            (ffi::SQLITE_CONSTRAINT_FUNCTION, "CONSTRAINT_FUNCTION", Data),
            (ffi::SQLITE_CONSTRAINT_NOTNULL, "CONSTRAINT_NOTNULL", Data),
            (ffi::SQLITE_CONSTRAINT_PINNED, "CONSTRAINT_PINNED", Data),
            (
                ffi::SQLITE_CONSTRAINT_PRIMARYKEY,
                "CONSTRAINT_PRIMARYKEY",
                Data,
            ),
            (ffi::SQLITE_CONSTRAINT_ROWID, "CONSTRAINT_ROWID", Data),
            (ffi::SQLITE_CONSTRAINT_UNIQUE, "CONSTRAINT_UNIQUE", Data),
            (ffi::SQLITE_CONSTRAINT_VTAB, "CONSTRAINT_VTAB", Data),
            (
                ffi::SQLITE_CONSTRAINT_TRIGGER,
                "CONSTRAINT_TRIGGER",
                Transient,
            ),
            (
                ffi::SQLITE_CONSTRAINT_COMMITHOOK,
                "CONSTRAINT_COMMITHOOK",
                Transient,
            ),
            (ffi::SQLITE_MISMATCH, "MISMATCH", Data),
            (ffi::SQLITE_TOOBIG, "TOOBIG", Data),
            (ffi::SQLITE_BUSY, "BUSY", Transient),
            (ffi::SQLITE_BUSY_SNAPSHOT, "BUSY_SNAPSHOT", Transient),
            (ffi::SQLITE_BUSY_TIMEOUT, "BUSY_TIMEOUT", Transient),
            (ffi::SQLITE_LOCKED, "LOCKED", Transient),
            (ffi::SQLITE_IOERR, "IOERR", Transient),
            (ffi::SQLITE_IOERR_FSYNC, "IOERR_FSYNC", Transient),
            (ffi::SQLITE_FULL, "FULL", Transient),
            (ffi::SQLITE_NOMEM, "NOMEM", Transient),
            (ffi::SQLITE_INTERRUPT, "INTERRUPT", Transient),
            (ffi::SQLITE_ABORT, "ABORT", Transient),
            (ffi::SQLITE_PROTOCOL, "PROTOCOL", Transient),
            (ffi::SQLITE_SCHEMA, "SCHEMA", Transient),
            (ffi::SQLITE_ERROR, "ERROR", Environment),
            (ffi::SQLITE_READONLY, "READONLY", Environment),
            (ffi::SQLITE_PERM, "PERM", Environment),
            (ffi::SQLITE_AUTH, "AUTH", Environment),
            (ffi::SQLITE_CORRUPT, "CORRUPT", Environment),
            (ffi::SQLITE_NOTADB, "NOTADB", Environment),
            (ffi::SQLITE_CANTOPEN, "CANTOPEN", Environment),
            (ffi::SQLITE_NOLFS, "NOLFS", Environment),
            (ffi::SQLITE_MISUSE, "MISUSE", Environment),
            (ffi::SQLITE_RANGE, "RANGE", Environment),
            (ffi::SQLITE_INTERNAL, "INTERNAL", Environment),
            (ffi::SQLITE_NOTFOUND, "NOTFOUND", Environment),
        ];
        for &(code, name, kind) in codes {
            let e = StoreError::Database {
                operation: "x",
                source: Box::new(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)),
            };
            assert_eq!(e.kind(), kind, "SQLITE_{name}");
            assert_eq!(e.is_permanent(), kind == Data, "SQLITE_{name}");
        }
        // Errors of the driver itself, each made by a function (`rusqlite::Error` is not
        // `Clone`).
        type Make = fn() -> rusqlite::Error;
        let driver: &[(Make, StoreErrorKind)] = &[
            (
                || rusqlite::Error::NulError(std::ffi::CString::new("a\0b").unwrap_err()),
                Data,
            ),
            (
                || rusqlite::Error::ToSqlConversionFailure("u64 out of range".into()),
                Data,
            ),
            (|| rusqlite::Error::QueryReturnedNoRows, Environment),
            (
                || rusqlite::Error::InvalidColumnType(0, "x".into(), rusqlite::types::Type::Null),
                Environment,
            ),
        ];
        for (error, kind) in driver {
            let e = StoreError::Database {
                operation: "x",
                source: Box::new(error()),
            };
            assert_eq!(e.kind(), *kind, "{:?}", error());
        }
    }
}
