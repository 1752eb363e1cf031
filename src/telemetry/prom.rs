//! The counters as Prometheus metrics: names, help, and the exporter.
//!
//! [`samples`] turns a [`Counters`] snapshot into flat Prometheus samples
//! (what `engine.metrics()` returns, keyed as the text format writes
//! them). [`Exporter`] feeds the same figures into a
//! `metrics-exporter-prometheus` recorder of its own (never the process's
//! global recorder, which belongs to the application) and renders the text
//! format with HELP and TYPE lines.
//!
//! The recorder takes histogram samples one by one, so the exporter is fed
//! every [`FEED_EVERY`] by a thread of its own with each bucket's new
//! latencies as one value (their mean, which lies in the bucket) repeated
//! per latency: bucket counts and sums come out exact, and the samples
//! waiting in the recorder are bounded by one feeding's settlements. The
//! thread exists only once something asked for the exporter.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::counters::{self, BUCKETS, Counters, Event, Histogram, LATENCY_BOUNDS_US, Op, Side, Via};

/// How often the exporter's thread feeds it.
pub const FEED_EVERY: Duration = Duration::from_millis(100);

pub const REQUESTS: &str = "shardwire_transfer_requests_total";
pub const BYTES: &str = "shardwire_transfer_bytes_total";
pub const FAILURES: &str = "shardwire_transfer_failures_total";
pub const DURATION: &str = "shardwire_transfer_duration_seconds";
pub const IN_FLIGHT: &str = "shardwire_transfer_in_flight";
pub const CONNECTIONS: &str = "shardwire_connections_total";
pub const RECONNECTS: &str = "shardwire_reconnects_total";
pub const FALLBACKS: &str = "shardwire_fallbacks_total";
pub const CHECKSUM_FAILURES: &str = "shardwire_checksum_failures_total";
pub const DEVICE_BYTES: &str = "shardwire_rdma_device_bytes_total";
pub const RAIL_PAUSES: &str = "shardwire_rdma_rail_pauses_total";
pub const STREAM_OBJECTS: &str = "shardwire_stream_objects_total";
pub const STREAM_BYTES: &str = "shardwire_stream_bytes_total";
pub const STREAM_ERRORS: &str = "shardwire_stream_errors_total";
pub const STREAM_SESSIONS: &str = "shardwire_stream_sessions_total";

/// Every metric: name, kind, help.
pub const METRICS: &[(&str, Kind, &str)] = &[
    (REQUESTS, Kind::Counter, "Transfer requests settled, by operation, transport and side."),
    (BYTES, Kind::Counter, "Bytes moved by settled transfer requests."),
    (FAILURES, Kind::Counter, "Transfer requests that failed or timed out."),
    (DURATION, Kind::Histogram, "Initiator latency of a transfer request, from submission to settlement."),
    (IN_FLIGHT, Kind::Gauge, "Initiator transfer requests submitted and not yet settled."),
    (
        CONNECTIONS,
        Kind::Counter,
        "Data connections opened (tcp: by initiators, and accepted by targets; rdma: endpoints).",
    ),
    (RECONNECTS, Kind::Counter, "Data connections opened again to a peer that had one before."),
    (FALLBACKS, Kind::Counter, "Transfer requests handed from one transport to another."),
    (
        CHECKSUM_FAILURES,
        Kind::Counter,
        "Transfer requests whose CRC-32C did not match (target: found there; initiator: failed with -400).",
    ),
    (DEVICE_BYTES, Kind::Counter, "Bytes moved through each local RDMA device."),
    (RAIL_PAUSES, Kind::Counter, "Times a rail of an RDMA device was paused after errors."),
    (STREAM_OBJECTS, Kind::Counter, "Objects sent or received on object streams, per trname."),
    (STREAM_BYTES, Kind::Counter, "Object bytes sent or received on object streams, per trname."),
    (STREAM_ERRORS, Kind::Counter, "Objects that failed on object streams, per trname."),
    (STREAM_SESSIONS, Kind::Counter, "Object-stream sessions (connections) opened, per trname."),
];

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One value of a metric: counters and gauges as they are; a histogram as
/// its buckets (cumulative counts and the sum of the latencies, in seconds).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Box<Histogram>),
}

/// A metric's value for one set of labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

fn sample(name: &'static str, labels: &[(&'static str, &str)], value: Value) -> Sample {
    Sample { name, labels: labels.iter().map(|&(k, v)| (k, v.to_string())).collect(), value }
}

/// The figures as samples, in a stable order. Transfer series and events
/// that never counted are left out, as a recorder leaves out metrics
/// nobody touched.
pub fn samples(c: &Counters) -> Vec<Sample> {
    let mut out = Vec::new();
    for op in Op::ALL {
        for via in Via::ALL {
            for side in Side::ALL {
                let s = c.series(op, via, side);
                if s.requests == 0 {
                    continue;
                }
                let labels = [("op", op.label()), ("transport", via.label()), ("side", side.label())];
                out.push(sample(REQUESTS, &labels, Value::Counter(s.requests)));
                out.push(sample(BYTES, &labels, Value::Counter(s.bytes)));
                out.push(sample(FAILURES, &labels, Value::Counter(s.failures)));
                if side == Side::Initiator {
                    let h = Value::Histogram(Box::new(s.latency));
                    out.push(sample(DURATION, &labels[..2], h));
                }
            }
        }
    }
    for via in Via::ALL {
        if c.submitted[via as usize] > 0 {
            out.push(sample(IN_FLIGHT, &[("transport", via.label())], Value::Gauge(c.in_flight(via) as f64)));
        }
    }
    type Labels = &'static [(&'static str, &'static str)];
    let events: [(Event, &'static str, Labels); 8] = [
        (Event::TcpConnect, CONNECTIONS, &[("transport", "tcp"), ("side", "initiator")]),
        (Event::TcpAccept, CONNECTIONS, &[("transport", "tcp"), ("side", "target")]),
        (Event::RdmaConnect, CONNECTIONS, &[("transport", "rdma"), ("side", "initiator")]),
        (Event::TcpReconnect, RECONNECTS, &[("transport", "tcp")]),
        (Event::LocalToTcp, FALLBACKS, &[("from", "local"), ("to", "tcp")]),
        (Event::RdmaToTcp, FALLBACKS, &[("from", "rdma"), ("to", "tcp")]),
        (Event::TcpChecksumTarget, CHECKSUM_FAILURES, &[("transport", "tcp"), ("side", "target")]),
        (Event::TcpChecksumInitiator, CHECKSUM_FAILURES, &[("transport", "tcp"), ("side", "initiator")]),
    ];
    for (e, name, labels) in events {
        if c.event(e) > 0 {
            out.push(sample(name, labels, Value::Counter(c.event(e))));
        }
    }
    let mut devices: Vec<_> = c.devices.iter().collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    for d in devices {
        out.push(sample(DEVICE_BYTES, &[("device", &d.name)], Value::Counter(d.bytes)));
        out.push(sample(RAIL_PAUSES, &[("device", &d.name)], Value::Counter(d.rail_pauses)));
    }
    let mut streams: Vec<_> = c.streams.iter().collect();
    streams.sort_by(|a, b| (&a.trname, a.direction).cmp(&(&b.trname, b.direction)));
    for s in streams {
        let labels = [("trname", s.trname.as_str()), ("direction", s.direction.label())];
        out.push(sample(STREAM_OBJECTS, &labels, Value::Counter(s.objects)));
        out.push(sample(STREAM_BYTES, &labels, Value::Counter(s.bytes)));
        out.push(sample(STREAM_ERRORS, &labels, Value::Counter(s.errors)));
        out.push(sample(STREAM_SESSIONS, &labels, Value::Counter(s.sessions)));
    }
    out
}

/// The bucket bounds in seconds, as the text format writes `le`.
pub fn bounds_s() -> [f64; BUCKETS - 1] {
    LATENCY_BOUNDS_US.map(|us| us as f64 / 1e6)
}

/// A sample's series as the text format writes it: `name{k="v",...}`.
fn series_key(name: &str, labels: &[(&'static str, String)], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() { name.to_string() } else { format!("{name}{{{}}}", parts.join(",")) }
}

/// A label value, escaped as the text format wants.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The samples flattened: one number per series of the text format
/// (histograms as `_bucket{le=...}` cumulative counts, `_sum` in seconds
/// and `_count`).
pub fn flatten(samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples {
        match &s.value {
            Value::Counter(v) => {
                out.insert(series_key(s.name, &s.labels, None), *v as f64);
            }
            Value::Gauge(v) => {
                out.insert(series_key(s.name, &s.labels, None), *v);
            }
            Value::Histogram(h) => {
                let (counts, sums_ns) = (&h.counts, &h.sums_ns);
                let mut cumulative = 0;
                for (b, bound) in bounds_s().iter().enumerate() {
                    cumulative += counts[b];
                    let le = bound.to_string();
                    out.insert(
                        series_key(&format!("{}_bucket", s.name), &s.labels, Some(("le", &le))),
                        cumulative as f64,
                    );
                }
                cumulative += counts[BUCKETS - 1];
                out.insert(
                    series_key(&format!("{}_bucket", s.name), &s.labels, Some(("le", "+Inf"))),
                    cumulative as f64,
                );
                let sum_ns = sums_ns.iter().fold(0u64, |a, &b| a.saturating_add(b));
                out.insert(series_key(&format!("{}_sum", s.name), &s.labels, None), sum_ns as f64 / 1e9);
                out.insert(series_key(&format!("{}_count", s.name), &s.labels, None), cumulative as f64);
            }
        }
    }
    out
}

/// The process's figures, flattened (what `engine.metrics()` returns).
pub fn figures() -> BTreeMap<String, f64> {
    flatten(&samples(&counters::snapshot()))
}

/// A Prometheus recorder fed from the counters.
pub struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The histograms as last fed, to feed only what is new.
    fed: Mutex<BTreeMap<String, [u64; BUCKETS * 2]>>,
}

impl Exporter {
    fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DURATION.to_string()), &bounds_s())
            .expect("the bounds are finite and not empty")
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for &(name, kind, help) in METRICS {
                match kind {
                    Kind::Counter => metrics::describe_counter!(name, help),
                    Kind::Gauge => metrics::describe_gauge!(name, help),
                    Kind::Histogram => metrics::describe_histogram!(name, metrics::Unit::Seconds, help),
                }
            }
        });
        Self { recorder, handle, fed: Mutex::new(BTreeMap::new()) }
    }

    /// Brings the recorder up to date with the counters.
    pub fn feed(&self) {
        let samples = samples(&counters::snapshot());
        let mut fed = self.fed.lock().unwrap_or_else(|e| e.into_inner());
        metrics::with_local_recorder(&self.recorder, || {
            for s in &samples {
                let labels: Vec<metrics::Label> =
                    s.labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
                match &s.value {
                    Value::Counter(v) => metrics::counter!(s.name, labels).absolute(*v),
                    Value::Gauge(v) => metrics::gauge!(s.name, labels).set(*v),
                    Value::Histogram(hist) => {
                        let (counts, sums_ns) = (&hist.counts, &hist.sums_ns);
                        let before = fed.entry(series_key(s.name, &s.labels, None)).or_insert([0; BUCKETS * 2]);
                        let h = metrics::histogram!(s.name, labels);
                        for b in 0..BUCKETS {
                            let new = counts[b].saturating_sub(before[b]);
                            if new > 0 {
                                let sum_ns = sums_ns[b].saturating_sub(before[BUCKETS + b]);
                                h.record_many(sum_ns as f64 / new as f64 / 1e9, new as usize);
                            }
                            before[b] = counts[b];
                            before[BUCKETS + b] = sums_ns[b];
                        }
                    }
                }
            }
        });
        drop(fed);
        self.handle.run_upkeep();
    }

    /// The text format, up to date.
    pub fn render(&self) -> String {
        self.feed();
        self.handle.render()
    }
}

/// The process's exporter, started (with its feeding thread) on first use.
pub fn exporter() -> &'static Exporter {
    static EXPORTER: OnceLock<Exporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("sw-metrics".into()).spawn(|| {
            loop {
                std::thread::sleep(FEED_EVERY);
                exporter().feed();
            }
        });
        if let Err(e) = spawned {
            // Rendering feeds too; without the thread, samples wait for
            // the next scrape instead.
            log::warn!("metrics: cannot start the feeding thread ({e}); figures are brought up to date per scrape");
        }
        Exporter::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::counters::{Direction, StreamCounts, series_index};

    #[test]
    fn histograms_flatten_to_cumulative_buckets() {
        let mut c = Counters::default();
        let i = series_index(Op::Write, Via::Tcp, Side::Initiator);
        c.series[i].requests = 3;
        c.series[i].bytes = 300;
        c.series[i].latency.observe(Duration::from_micros(5));
        c.series[i].latency.observe(Duration::from_micros(15));
        c.series[i].latency.observe(Duration::from_secs(20));
        c.submitted[0] = 4;
        let f = flatten(&samples(&c));
        let labels = "op=\"write\",transport=\"tcp\"";
        assert_eq!(f[&format!("{DURATION}_bucket{{{labels},le=\"0.00001\"}}")], 1.0);
        assert_eq!(f[&format!("{DURATION}_bucket{{{labels},le=\"0.00002\"}}")], 2.0);
        assert_eq!(f[&format!("{DURATION}_bucket{{{labels},le=\"10\"}}")], 2.0);
        assert_eq!(f[&format!("{DURATION}_bucket{{{labels},le=\"+Inf\"}}")], 3.0);
        assert_eq!(f[&format!("{DURATION}_count{{{labels}}}")], 3.0);
        assert!((f[&format!("{DURATION}_sum{{{labels}}}")] - 20.00002).abs() < 1e-9);
        assert_eq!(f[&format!("{BYTES}{{{labels},side=\"initiator\"}}")], 300.0);
        assert_eq!(f[&format!("{IN_FLIGHT}{{transport=\"tcp\"}}")], 1.0);
        assert!(!f.keys().any(|k| k.contains("transport=\"rdma\"")), "untouched series are left out");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut c = Counters::default();
        c.streams.push(StreamCounts {
            trname: "a\"b\\c".into(),
            direction: Direction::Tx,
            objects: 1,
            bytes: 2,
            errors: 0,
            sessions: 1,
        });
        let f = flatten(&samples(&c));
        assert!(f.contains_key(&format!("{STREAM_OBJECTS}{{trname=\"a\\\"b\\\\c\",direction=\"tx\"}}")), "{f:?}");
    }
}
