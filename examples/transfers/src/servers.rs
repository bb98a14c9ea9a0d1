//! The job on servers (features `postgres` and `nats`): the PostgreSQL store in a schema of the
//! run's own and the NATS JetStream transport on a stream of the run's own, both named by the
//! run's [`Namespace`].

use std::collections::BTreeMap;
use std::time::Duration;

use effects_core::nats::async_nats::jetstream::consumer::{
    AckPolicy, DeliverPolicy, PullConsumer, pull,
};
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::transport::DeadLetter;

use crate::backend::{Backend, Namespace, QUESTION_TIMEOUT};
use crate::job::Error;

/// The PostgreSQL store and the NATS transport of one run.
#[derive(Clone, Debug)]
pub struct Servers {
    /// The store.
    pub store: PostgresStore,
    /// The transport.
    pub nats: NatsTransport,
    /// The store's URL as given (for the job's own count of transactions).
    url: String,
    /// The schema and the stream.
    namespace: Namespace,
}

fn setup(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Setup {
        reason: format!("{what}: {e}"),
    }
}

/// The NATS settings of a run: the stream and subject prefix named after its namespace.
pub fn nats_config(url: &str, namespace: &Namespace) -> NatsConfig {
    let mut config = NatsConfig::new(url).with_stream(namespace.as_str(), namespace.as_str());
    config.connection_name = Some(format!("transfers {namespace}"));
    config
}

impl Servers {
    /// Connects to both servers, creating the schema (with its migrations) and the stream if
    /// they do not exist yet.
    pub async fn connect(
        store_url: &str,
        nats_url: &str,
        namespace: &Namespace,
        pool_size: usize,
    ) -> Result<Servers, Error> {
        let options = PostgresOptions {
            pool_size: pool_size.max(2),
            statement_timeout: Some(Duration::from_secs(30)),
            ..PostgresOptions::new(store_url).with_schema(namespace.as_str())
        };
        let store = PostgresStore::connect(options).await?;
        let nats = NatsTransport::connect(nats_config(nats_url, namespace))
            .await
            .map_err(|e| setup(&format!("cannot use NATS at {nats_url}"), e))?;
        Ok(Servers {
            store,
            nats,
            url: store_url.to_owned(),
            namespace: namespace.clone(),
        })
    }

    /// How many messages the subjects matching `filter` hold: the pending count of a
    /// throw-away consumer, deleted at once.
    async fn count(&self, filter: String) -> Result<u64, Error> {
        let js = self.nats.jetstream();
        let stream = self.nats.config().stream.as_str();
        let reader: PullConsumer = tokio::time::timeout(
            QUESTION_TIMEOUT,
            js.create_consumer_on_stream(
                pull::Config {
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::None,
                    filter_subject: filter.clone(),
                    inactive_threshold: Duration::from_secs(30),
                    ..pull::Config::default()
                },
                stream,
            ),
        )
        .await
        .map_err(|_| setup(&format!("counting {filter}"), "NATS did not answer"))?
        .map_err(|e| setup(&format!("counting {filter}"), e))?;
        let pending = reader.cached_info().num_pending;
        let name = reader.cached_info().name.clone();
        // A reader left behind expires by itself.
        let _ = js.delete_consumer_from_stream(&name, stream).await;
        Ok(pending)
    }

    /// The subjects of a topic: `<prefix>.msg.<topic>.>`.
    fn topic_filter(&self, topic: &str) -> String {
        let unkeyed = self.nats.subject_for(topic, None);
        let all = unkeyed.strip_suffix(".u").unwrap_or(&unkeyed);
        format!("{all}.>")
    }
}

impl Backend for Servers {
    type Store = PostgresStore;
    type Transport = NatsTransport;

    fn store(&self) -> &PostgresStore {
        &self.store
    }

    fn transport(&self) -> &NatsTransport {
        &self.nats
    }

    fn describe(&self) -> String {
        format!(
            "PostgreSQL and NATS: store in {}, messages on NATS stream {}",
            self.store.location(),
            self.nats.config().stream
        )
    }

    async fn unacknowledged(&self, consumer: &str, topic: &str) -> Result<u64, Error> {
        let js = self.nats.jetstream();
        let stream = self.nats.config().stream.as_str();
        let mut left = 0;
        for name in self.nats.consumer_names(consumer, topic) {
            let found = tokio::time::timeout(
                QUESTION_TIMEOUT,
                js.get_consumer_from_stream::<pull::Config, _, _>(&name, stream),
            )
            .await;
            match found {
                Ok(Ok(lane)) => {
                    let info = lane.cached_info();
                    left += info.num_pending + info.num_ack_pending as u64;
                }
                // Not created yet (no worker of the group has fetched): every message of the
                // topic is still to be delivered to it.
                Ok(Err(_)) => return self.count(self.topic_filter(topic)).await,
                Err(_) => return Err(setup("asking NATS about a consumer", "no answer")),
            }
        }
        Ok(left)
    }

    async fn runs_finished(&self) -> Result<bool, Error> {
        let backlog = self.store.backlog().await?;
        Ok(backlog.open_runs == 0 && backlog.pending_rows == 0)
    }

    async fn dead_letters(&self, consumer: &str) -> Result<Vec<DeadLetter>, Error> {
        let letters = self.nats.dead_letters(consumer).await?;
        Ok(letters
            .into_iter()
            .map(|d| DeadLetter {
                consumer: d.consumer,
                topic: d.topic,
                sequence: d.sequence,
                message_id: d.message_id,
                payload: d.payload,
                reason: d.reason,
                deliveries: d.deliveries,
                dead_lettered_at: Default::default(),
            })
            .collect())
    }

    async fn published(&self, topic: &str) -> Result<usize, Error> {
        let n = self.count(self.topic_filter(topic)).await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn runs_per_key(&self) -> Result<BTreeMap<String, u64>, Error> {
        let failed = |e: tokio_postgres::Error| Error::Setup {
            reason: format!(
                "cannot count the runs in schema {}: {}",
                self.namespace,
                e.as_db_error()
                    .map_or_else(|| e.to_string(), ToString::to_string)
            ),
        };
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .map_err(failed)?;
        let driver = tokio::spawn(connection);
        client
            .query(
                "SELECT set_config('search_path', $1, false)",
                &[&self.namespace.as_str()],
            )
            .await
            .map_err(failed)?;
        let rows = client
            .query(
                "SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key",
                &[],
            )
            .await
            .map_err(failed)?;
        drop(client);
        driver.abort();
        Ok(rows
            .iter()
            .map(|r| {
                let n: i64 = r.get(1);
                (r.get::<_, String>(0), u64::try_from(n).unwrap_or(0))
            })
            .collect())
    }
}

/// Drops a run's schema and deletes its stream: for tests that clean up after themselves.
pub async fn remove(store_url: &str, nats_url: &str, namespace: &Namespace) -> Result<(), Error> {
    let (client, connection) = tokio_postgres::connect(store_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| setup("connecting to PostgreSQL", e))?;
    let driver = tokio::spawn(connection);
    // The namespace is checked to be a plain lower-case name (see `Namespace::parse`): it is
    // an identifier, which cannot be a parameter.
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            namespace.as_str()
        ))
        .await
        .map_err(|e| setup("dropping the schema", e))?;
    drop(client);
    driver.abort();
    let nats = effects_core::nats::async_nats::connect(nats_url)
        .await
        .map_err(|e| setup("connecting to NATS", e))?;
    let js = effects_core::nats::async_nats::jetstream::new(nats);
    // Gone already is fine.
    let _ = js.delete_stream(namespace.as_str()).await;
    Ok(())
}
