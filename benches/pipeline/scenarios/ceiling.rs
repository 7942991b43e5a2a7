//! `ceiling` (rows numbered 1 in the report): the broker's ceiling,
//! measured by a minimal lapin loop run in a child process (this executable
//! again, with `BENCH_ROLE=ceiling-loop`, which `main` hands to
//! `ceiling_loop_main`) at the worker's `amqp.prefetch` and at a wide
//! prefetch.

use std::{
    env,
    process::{ExitCode, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::{FieldTable, ShortString},
    BasicProperties,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdin, Command},
};
use vidu_worker::config::Settings;

use crate::{
    config::BenchConfig,
    harness::{connect, Deployment, Sink, TERMINAL_KEYS},
    machine::{wait_quiet, CpuMeter, CpuSplit},
    report::{Findings, Row},
    stats::{median_of, spread, Measured},
    BenchResult, CEILING_WIDE_PREFETCH, INSTANT_TASKS,
};

/// The minimal loop, run in a child process like a worker would be.
struct CeilingLoop {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
}

impl CeilingLoop {
    async fn spawn(dep: &Deployment, prefetch: u16) -> BenchResult<Self> {
        let exe = env::current_exe()?;
        let mut child = Command::new(exe)
            .env("BENCH_ROLE", "ceiling-loop")
            .env("BENCH_AMQP_URL", &dep.amqp_url)
            .env("BENCH_CEILING_QUEUE", &dep.topology.request_queue)
            .env("BENCH_CEILING_EXCHANGE", &dep.topology.events_exchange)
            .env("BENCH_CEILING_PREFETCH", prefetch.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the ceiling loop exited at once")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line == "ready" => Ok(Self { child, pid, stdin }),
            other => Err(format!("the ceiling loop did not start: {other:?}").into()),
        }
    }

    async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}

pub(crate) fn ceiling_loop_main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(ceiling_loop()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceiling loop: {e}");
            ExitCode::FAILURE
        }
    }
}

/// consume a request → publish a persistent event to the topic exchange and
/// await its confirm → ack the request; `prefetch` of them in flight. Ends
/// when stdin closes.
async fn ceiling_loop() -> BenchResult<()> {
    let var = |k: &str| env::var(k).map_err(|_| format!("{k} is not set"));
    let url = var("BENCH_AMQP_URL")?;
    let queue = var("BENCH_CEILING_QUEUE")?;
    let exchange = var("BENCH_CEILING_EXCHANGE")?;
    let prefetch: u16 = var("BENCH_CEILING_PREFETCH")?.parse()?;
    let conn = connect(&url, "bench ceiling loop").await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            queue.as_str().into(),
            "bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let body: Arc<[u8]> = terminal_event_body().into_bytes().into();
    let exchange: ShortString = exchange.as_str().into();
    println!("ready");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                if !matches!(line, Ok(Some(_))) {
                    break;
                }
            }
            delivery = consumer.next() => {
                let Some(delivery) = delivery else { break };
                let delivery = delivery?;
                let publisher = publisher.clone();
                let body = body.clone();
                let exchange = exchange.clone();
                tokio::spawn(async move {
                    let props = BasicProperties::default()
                        .with_content_type("application/cloudevents+json".into())
                        .with_delivery_mode(2)
                        .with_message_id(
                            delivery.properties.message_id().clone().unwrap_or_default(),
                        );
                    let confirmed = match publisher
                        .basic_publish(
                            exchange,
                            TERMINAL_KEYS[0].into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        )
                        .await
                    {
                        Ok(confirm) => confirm.await.map(|c| c.is_ack()).unwrap_or(false),
                        Err(_) => false,
                    };
                    let settled = if confirmed {
                        delivery.acker.ack(BasicAckOptions::default()).await
                    } else {
                        delivery
                            .acker
                            .nack(lapin::options::BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            })
                            .await
                    };
                    if let Err(e) = settled {
                        eprintln!("ceiling loop: settle failed: {e}");
                    }
                });
            }
        }
    }
    let _ = conn.close(200, "ceiling loop done".into()).await;
    Ok(())
}

/// A `video.generation.succeeded` event the size and shape of the worker's.
fn terminal_event_body() -> String {
    let now = Utc::now().to_rfc3339();
    serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "vidu-worker",
        "type": TERMINAL_KEYS[0],
        "time": now,
        "subject": "ceiling-123456",
        "datacontenttype": "application/json",
        "data": {
            "request_id": "ceiling-123456",
            "task_id": uuid::Uuid::new_v4().to_string(),
            "video_url": "https://sim.novita.example/videos/00000000-0000-0000-0000-000000000000.mp4",
            "videos": [{
                "url": "https://sim.novita.example/videos/00000000-0000-0000-0000-000000000000.mp4",
                "ttl_seconds": 3600,
                "type": "mp4"
            }],
            "submitted_at": now,
            "completed_at": now,
            "metadata": null
        }
    })
    .to_string()
}

pub(crate) async fn scenario_ceiling(cfg: &BenchConfig, found: &mut Findings) -> Vec<Row> {
    let n = cfg.count(INSTANT_TASKS, 200);
    let worker_prefetch = Settings::load(None).map_or(32, |s| s.amqp.prefetch);
    let mut rows = Vec::new();
    for (i, prefetch) in [worker_prefetch, CEILING_WIDE_PREFETCH]
        .into_iter()
        .enumerate()
    {
        progress!(cfg, "ceiling: {n} requests, prefetch {prefetch}");
        let runs = median_of(cfg, |_| async {
            let run = ceiling_run(cfg, n, prefetch).await?;
            progress!(
                cfg,
                "ceiling: {:.0} tasks/s ({})",
                run.rate,
                run.cpu.describe("loop")
            );
            Ok(run)
        })
        .await;
        match runs {
            Ok((CeilingRun { rate, cpu }, rates)) => {
                rows.push(Row::info(
                    "1",
                    format!("Broker ceiling, minimal loop, prefetch {prefetch} ({n} requests)"),
                    format!("**{rate:.0} tasks/s**{}", spread(&rates)),
                ));
                rows.push(Row::info(
                    "1",
                    format!("  CPU ms per task (prefetch {prefetch})"),
                    cpu.per_task(n, "loop"),
                ));
                if i == 0 {
                    found.ceiling = Some(rate);
                } else {
                    found.ceiling_wide = Some(rate);
                }
            }
            Err(e) => rows.push(Row::failed(
                "1",
                format!("Broker ceiling, prefetch {prefetch}"),
                &e,
            )),
        }
    }
    rows
}

struct CeilingRun {
    rate: f64,
    cpu: CpuSplit,
}

impl Measured for CeilingRun {
    fn rate(&self) -> f64 {
        self.rate
    }
    fn cpu(&self) -> &CpuSplit {
        &self.cpu
    }
}

async fn ceiling_run(cfg: &BenchConfig, n: usize, prefetch: u16) -> BenchResult<CeilingRun> {
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "ceiling").await?;
    let sink = Sink::start(&dep, false).await?;
    let looper = CeilingLoop::spawn(&dep, prefetch).await?;
    let cpu = CpuMeter::start(vec![looper.pid]);
    let t0 = Instant::now();
    dep.publish_requests(n, "ceiling", "a cat turns its head")
        .await?;
    let last = sink.wait_for(n, Duration::from_secs(600)).await;
    let split = cpu.stop();
    looper.stop().await;
    let last = last?;
    Ok(CeilingRun {
        rate: n as f64 / (last - t0).as_secs_f64(),
        cpu: split,
    })
}
