//! The machine the bench runs on: the machine line of the report, readings
//! from `/proc` (RSS, CPU seconds, the local broker's process, how busy the
//! machine is), the wait for a quiet machine, the CPU meter that splits a
//! run's CPU between broker, bench and measured processes, and recording a
//! worker with `perf`.

use std::{
    env,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use crate::{config::BenchConfig, BenchResult};

pub(crate) async fn machine_line(cfg: &BenchConfig) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rabbit = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("rabbitmqctl")
            .arg("version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .filter(|v| !v.is_empty())
    .unwrap_or_else(|| "unknown (rabbitmqctl not available)".into());
    let overrides: Vec<String> = env::vars()
        .filter(|(k, _)| k.starts_with("VIDU_WORKER__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let overrides = if overrides.is_empty() {
        "shipped worker defaults".to_owned()
    } else {
        format!("worker overrides: {}", overrides.join(" "))
    };
    let _ = cfg;
    format!(
        "{cores} cores, RabbitMQ {rabbit}, vidu-worker {} (release), {overrides}",
        env!("CARGO_PKG_VERSION")
    )
}

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM), in MiB.
pub(crate) fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// User plus system CPU seconds of a process (clock ticks of 1/100 s).
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The RabbitMQ server process on this machine, if it is local.
pub(crate) fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// Waits (up to `BENCH_QUIET_WAIT` seconds, default 120) until the machine
/// is quiet: less than a quarter of a core busy over one second while
/// nothing of the bench runs. Other processes (builds, test suites) on a
/// 2-core machine change every figure.
pub(crate) async fn wait_quiet(cfg: &BenchConfig) {
    let deadline = Instant::now() + cfg.quiet_wait;
    let mut told = false;
    loop {
        let Some(before) = machine_busy_secs() else {
            return;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(after) = machine_busy_secs() else {
            return;
        };
        let busy = after - before;
        if busy < 0.25 {
            return;
        }
        if Instant::now() >= deadline {
            progress!(
                cfg,
                "  the machine is still busy ({:.0}% of a core outside the bench); measuring anyway",
                busy * 100.0
            );
            return;
        }
        if !told {
            progress!(
                cfg,
                "  waiting for a quiet machine ({:.0}% of a core busy outside the bench)",
                busy * 100.0
            );
            told = true;
        }
    }
}

/// CPU seconds used by the broker, this bench process (simulator, producer,
/// event consumer) and the measured processes over one run.
pub(crate) struct CpuMeter {
    /// The broker's VMs (every node of a cluster), summed.
    brokers: Vec<u32>,
    others: Vec<u32>,
    start: Vec<Option<f64>>,
    machine_start: Option<f64>,
    wall: Instant,
}

#[derive(Clone)]
pub(crate) struct CpuSplit {
    wall: f64,
    broker: Option<f64>,
    bench: Option<f64>,
    measured: Option<f64>,
    /// Everything else on the machine (other tests, builds): noise.
    other: Option<f64>,
}

/// Busy CPU seconds of the whole machine since boot (`/proc/stat`).
fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy / 100.0)
}

impl CpuMeter {
    pub(crate) fn start(others: Vec<u32>) -> Self {
        Self::start_with(broker_pid().into_iter().collect(), others)
    }

    /// With the broker's own processes (a private node or cluster).
    pub(crate) fn start_with(brokers: Vec<u32>, others: Vec<u32>) -> Self {
        let mut meter = Self {
            brokers,
            others,
            start: Vec::new(),
            machine_start: machine_busy_secs(),
            wall: Instant::now(),
        };
        meter.start = meter.read();
        meter
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids = self.brokers.clone();
        pids.push(std::process::id());
        pids.extend(&self.others);
        pids
    }

    fn read(&self) -> Vec<Option<f64>> {
        self.pids().into_iter().map(proc_cpu_secs).collect()
    }

    pub(crate) fn stop(&self) -> CpuSplit {
        let end = self.read();
        let delta: Vec<Option<f64>> = end
            .iter()
            .zip(&self.start)
            .map(|(e, s)| Some((*e)? - (*s)?))
            .collect();
        let sum = |d: &[Option<f64>]| d.iter().try_fold(0.0, |acc, d| d.map(|d| acc + d));
        let nb = self.brokers.len();
        let broker = if nb == 0 { None } else { sum(&delta[..nb]) };
        let measured = sum(&delta[nb + 1..]);
        let machine = machine_busy_secs()
            .zip(self.machine_start)
            .map(|(e, s)| e - s);
        // Without the broker's figure, nothing is known about the rest.
        let ours = if nb == 0 { None } else { sum(&delta) };
        CpuSplit {
            wall: self.wall.elapsed().as_secs_f64(),
            broker,
            bench: delta[nb],
            measured,
            other: machine.zip(ours).map(|(m, o)| (m - o).max(0.0)),
        }
    }
}

impl CpuSplit {
    /// `broker 61% · worker 55% · bench 30%` of one core each, over the run.
    pub(crate) fn describe(&self, measured: &str) -> String {
        let pct = |v: Option<f64>| {
            v.map_or_else(
                || "n/a".into(),
                |v| format!("{:.0}%", v / self.wall * 100.0),
            )
        };
        format!(
            "broker {} · {measured} {} · bench client+simulator {} · other processes {} (of one core, over {:.1} s)",
            pct(self.broker),
            pct(self.measured),
            pct(self.bench),
            pct(self.other),
            self.wall
        )
    }

    /// Share of one core that other processes took (0 when unknown).
    pub(crate) fn other_share(&self) -> f64 {
        self.other.map_or(0.0, |o| o / self.wall)
    }

    /// CPU milliseconds per task, by process.
    pub(crate) fn per_task(&self, n: usize, measured: &str) -> String {
        let ms = |v: Option<f64>| {
            v.map_or_else(|| "n/a".into(), |v| format!("{:.2}", v * 1000.0 / n as f64))
        };
        format!(
            "broker {} · {measured} {} · bench {}",
            ms(self.broker),
            ms(self.measured),
            ms(self.bench)
        )
    }
}

pub(crate) fn start_perf(cfg: &BenchConfig, path: &str, pid: u32) -> BenchResult<Child> {
    progress!(cfg, "  recording worker {pid} with perf into {path}");
    let child = Command::new("perf")
        .arg("record")
        .args(&cfg.perf_args)
        .arg("-o")
        .arg(path)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start perf (BENCH_PERF): {e}"))?;
    Ok(child)
}

pub(crate) async fn stop_perf(cfg: &BenchConfig, child: &mut Child) {
    if let Some(pid) = child.id() {
        signal(pid, "INT");
    }
    match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
        Ok(_) => progress!(cfg, "  perf data written"),
        Err(_) => {
            let _ = child.start_kill();
            progress!(cfg, "  perf did not stop in time; killed");
        }
    }
}

/// Sends `sig` (`TERM`, `KILL`, `INT`, ...) to process `pid`.
pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}
