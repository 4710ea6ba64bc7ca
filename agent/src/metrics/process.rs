//! The standard `process_*` metrics (CPU, memory, file descriptors, start time) of the agent
//! itself, read from /proc at each scrape, as every Prometheus client library serves them.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// Reads /proc/self when scraped; a value that cannot be read is left out.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(process) = procfs::process::Process::myself() else {
            return Ok(());
        };
        fn gauge(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            value: f64,
        ) -> Result<(), std::fmt::Error> {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)
        }
        if let Ok(stat) = process.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            let page = procfs::page_size();
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                (stat.rss * page) as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stat.vsize as f64,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    boot as f64 + stat.starttime as f64 / ticks,
                )?;
            }
            let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?;
            cpu.encode(metric)?;
        }
        if let Ok(open) = process.fd_count() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                open as f64,
            )?;
        }
        if let Ok(limits) = process.limits() {
            if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                gauge(
                    &mut encoder,
                    "process_max_fds",
                    "Maximum number of open file descriptors.",
                    max as f64,
                )?;
            }
        }
        Ok(())
    }
}
