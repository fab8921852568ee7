//! The metrics a Prometheus user looks for first on any process, whatever it is:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_threads`, `process_start_time_seconds` (the names and meanings of the
//! Prometheus client libraries' process collectors, so existing dashboards and alerts
//! work), and `spur_build_info{version}` (always 1: joins a version onto other series).
//!
//! They are read from `/proc/self` when scraped, not sampled in the background: nothing
//! runs between scrapes, and a scrape sees the values of that moment. Where `/proc` is not
//! there (not Linux), only `spur_build_info` is reported.
//!
//! The control plane registers the same collector: this file is also compiled into
//! spur-control (see its `lib.rs`), so that the control plane does not depend on the data
//! plane for it.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Adds the process metrics and `spur_build_info` to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Debug)]
struct ProcessCollector;

/// One reading of `/proc/self`.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    threads: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: f64,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = ConstGauge::new(1i64);
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        let mut family = encoder.encode_descriptor(
            "spur_build_info",
            "The version of the running binary (always 1)",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&labels)?)?;
        let Some(r) = read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(r.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                r.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                r.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                r.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                r.max_fds,
            ),
            ("process_threads", "Number of OS threads", r.threads),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                r.start_time_seconds,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn read() -> Option<Reading> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    // SAFETY: sysconf and getrlimit only read process-wide settings into the values given.
    let (ticks, page, max_fds) = unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max_fds = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur as f64
        } else {
            0.0
        };
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
            max_fds,
        )
    };
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    let mut r = parse_stat(&stat, ticks, page, boot_time)?;
    r.open_fds = open_fds;
    r.max_fds = max_fds;
    Some(r)
}

#[cfg(not(target_os = "linux"))]
fn read() -> Option<Reading> {
    None
}

/// The fields of `/proc/self/stat` (see proc(5)) after the command name, which is in
/// parentheses and may itself hold spaces and parentheses: so split after the last `)`.
/// `ticks`: clock ticks per second; `page`: bytes per page; `boot_time`: Unix seconds.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_stat(stat: &str, ticks: f64, page: f64, boot_time: f64) -> Option<Reading> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: index i here is field i + 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<f64>().ok();
    if ticks <= 0.0 {
        return None;
    }
    Some(Reading {
        cpu_seconds: (num(14)? + num(15)?) / ticks,
        threads: num(20)?,
        start_time_seconds: boot_time + num(22)? / ticks,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page,
        open_fds: 0.0,
        max_fds: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_by_position_after_the_name() {
        let stat = "4242 (spur (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 \
                    12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let r = parse_stat(stat, 100.0, 4096.0, 1_700_000_000.0).unwrap();
        assert_eq!(r.cpu_seconds, 3.0);
        assert_eq!(r.threads, 7.0);
        assert_eq!(r.start_time_seconds, 1_700_000_123.45);
        assert_eq!(r.virtual_bytes, 104_857_600.0);
        assert_eq!(r.resident_bytes, 2560.0 * 4096.0);
        assert!(parse_stat("garbage", 100.0, 4096.0, 0.0).is_none());
    }

    #[test]
    fn encodes_in_the_prometheus_names() {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(&format!(
            "spur_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        if cfg!(target_os = "linux") {
            for name in [
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_open_fds ",
                "process_max_fds ",
                "process_start_time_seconds ",
                "# TYPE process_cpu_seconds counter",
            ] {
                assert!(text.contains(name), "{name} missing:\n{text}");
            }
        }
    }
}
