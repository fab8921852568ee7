//! The request series of one route target (listener, route, cluster), resolved when a
//! snapshot is compiled, so that counting a request formats nothing and looks up nothing
//! by name: `spur_requests_total` (by code, gRPC status and client identity),
//! `spur_request_duration_seconds` (by client identity, with exemplars),
//! `spur_response_first_byte_seconds` and the byte counters.
//!
//! Client identities come from verified certificates, not from request data, and each
//! target keeps at most [`MAX_CLIENTS`] of them as label values; later ones are counted as
//! `client_id="other"`, so a label set stays bounded whatever certificates appear.

use super::{
    ClientRouteLabels, CodeCounters, DurationHistogram, Metrics, RequestLabels, RouteLabels,
    TraceLabel,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Distinct client identities a target keeps as label values.
pub const MAX_CLIENTS: usize = 1000;

/// The series of one client identity (or of requests without one).
pub struct ClientSeries {
    pub requests: CodeCounters<RequestLabels>,
    pub duration: DurationHistogram,
}

pub struct TargetMetrics {
    labels: RouteLabels,
    requests: Family<RequestLabels, Counter>,
    durations: Family<ClientRouteLabels, DurationHistogram, fn() -> DurationHistogram>,
    /// Requests without a verified client identity (`client_id=""`).
    anonymous: ClientSeries,
    clients: RwLock<HashMap<Arc<str>, Arc<ClientSeries>>>,
    /// Identities beyond [`MAX_CLIENTS`].
    other: OnceLock<ClientSeries>,
    pub first_byte: Histogram,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
}

/// What an ended exchange tells its target's series.
pub struct Finished<'a> {
    pub client: Option<&'a Arc<str>>,
    pub status: u16,
    pub grpc: Option<u8>,
    pub elapsed: Duration,
    /// Time to the response head (`None`: no head was sent).
    pub first_byte: Option<Duration>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The trace of a sampled request, for the duration's exemplar.
    pub exemplar: Option<TraceLabel>,
}

fn series(
    requests: &Family<RequestLabels, Counter>,
    durations: &Family<ClientRouteLabels, DurationHistogram, fn() -> DurationHistogram>,
    labels: &RouteLabels,
    client_id: Arc<str>,
) -> ClientSeries {
    let duration = durations
        .get_or_create(&ClientRouteLabels {
            listener: labels.listener.clone(),
            route: labels.route.clone(),
            cluster: labels.cluster.clone(),
            client_id: client_id.clone(),
        })
        .clone();
    ClientSeries {
        requests: CodeCounters::new(
            requests,
            RequestLabels {
                listener: labels.listener.clone(),
                route: labels.route.clone(),
                cluster: labels.cluster.clone(),
                code: 0,
                grpc_status: None,
                client_id,
            },
        ),
        duration,
    }
}

impl TargetMetrics {
    pub fn new(
        m: &Metrics,
        listener: &Arc<str>,
        route: &Arc<str>,
        cluster: &Arc<str>,
    ) -> TargetMetrics {
        let labels = RouteLabels {
            listener: listener.clone(),
            route: route.clone(),
            cluster: cluster.clone(),
        };
        let anonymous = series(&m.requests, &m.request_duration, &labels, "".into());
        let first_byte = m.response_first_byte.get_or_create(&labels).clone();
        let request_bytes = m.request_bytes.get_or_create(&labels).clone();
        let response_bytes = m.response_bytes.get_or_create(&labels).clone();
        TargetMetrics {
            requests: m.requests.clone(),
            durations: m.request_duration.clone(),
            labels,
            anonymous,
            clients: RwLock::new(HashMap::new()),
            other: OnceLock::new(),
            first_byte,
            request_bytes,
            response_bytes,
        }
    }

    /// Counts an ended exchange.
    pub fn record(&self, f: &Finished<'_>) {
        match f.client {
            None => count(&self.anonymous, f),
            Some(id) => self.with_client(id, |s| count(s, f)),
        }
        if let Some(d) = f.first_byte {
            self.first_byte.observe(d.as_secs_f64());
        }
        self.request_bytes.inc_by(f.bytes_in);
        self.response_bytes.inc_by(f.bytes_out);
    }

    fn with_client(&self, id: &Arc<str>, f: impl FnOnce(&ClientSeries)) {
        if let Some(s) = self.clients.read().unwrap().get(id) {
            return f(s);
        }
        let mut clients = self.clients.write().unwrap();
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(id) {
            drop(clients);
            let other = self.other.get_or_init(|| {
                series(
                    &self.requests,
                    &self.durations,
                    &self.labels,
                    "other".into(),
                )
            });
            return f(other);
        }
        let s = clients
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(series(
                    &self.requests,
                    &self.durations,
                    &self.labels,
                    id.clone(),
                ))
            })
            .clone();
        drop(clients);
        f(&s)
    }
}

fn count(s: &ClientSeries, f: &Finished<'_>) {
    s.requests.inc_grpc(f.status, f.grpc);
    s.duration
        .observe(f.elapsed.as_secs_f64(), f.exemplar.clone(), None);
}
