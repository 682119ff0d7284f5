//! `server`: answer times of `butler server` over HTTP with a big store, measured with `wrk`
//! on loopback beside the answer time of `/health` (the HTTP stack alone) in the same run.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use butler_core::RunStore;
use butler_core::model::NewToken;

use super::{ANALYSES, Args, fixture, open_store, seed_runs};
use crate::report::Figure;

/// One in this many runs is active: 10,000 of 1,000,000.
const ACTIVE_EVERY: i64 = 100;

/// How long `wrk` loads each path.
const LOAD: &str = "5s";

pub async fn run(args: &Args) -> anyhow::Result<Vec<Figure>> {
    let total = args.size.unwrap_or(1_000_000);
    let wrk = which("wrk")
        .context("the server scenario needs wrk on PATH: install it with `apt-get install wrk`")?;
    let butler = butler_binary()?;
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path(), args.durability).await?;
    let (tracker, workflow, first) = fixture(&store).await?;
    let analyses = seed_runs(&store, &tracker, workflow, first, total, ACTIVE_EVERY).await?;
    let (token, secret) = NewToken::generate("bench", true);
    store.create_token(token).await?;
    drop(tracker);
    drop(store);

    let mut server = Server::start(&butler, dir.path())?;
    // The scheduler adopts the active runs when it starts: let it settle before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let analysis = analyses[ANALYSES / 2];
    let paths = [
        ("/health", "health (the HTTP stack alone)"),
        ("/api/runs?limit=50", "runs API, newest 50 of all"),
        (
            &*format!("/api/runs?analysis={analysis}&status=error&limit=50"),
            "runs API, 50 failed runs of one analysis",
        ),
        ("/api/runs/counts", "run counts per status of all runs"),
        ("/", "runs page (HTML), newest 50 with counts"),
        ("/metrics", "/metrics"),
    ];
    let mut figures = Vec::new();
    let mut floor = None;
    for (path, what) in paths {
        let url = format!("{}{path}", server.base);
        let measured = load(&wrk, &url, &secret)?;
        eprintln!(
            "{path}: p50 {:.2} ms, p99 {:.2} ms, {:.0} requests/s",
            measured.p50_ms, measured.p99_ms, measured.per_sec
        );
        let Some((floor_p50, floor_p99)) = floor else {
            floor = Some((measured.p50_ms, measured.p99_ms));
            continue;
        };
        let label = format!(
            "{what}, {total} runs, {} active",
            total as i64 / ACTIVE_EVERY
        );
        figures.push(
            Figure::new("server", format!("{label}: p50"), measured.p50_ms, "ms")
                .limit(floor_p50, "/health p50"),
        );
        figures.push(
            Figure::new("server", format!("{label}: p99"), measured.p99_ms, "ms")
                .limit(floor_p99, "/health p99"),
        );
        figures.push(Figure::new(
            "server",
            format!("{label}: throughput"),
            measured.per_sec,
            "requests/s",
        ));
    }
    let spaced = spaced_scrapes(&server.base)?;
    let label = format!("{total} runs, {} active", total as i64 / ACTIVE_EVERY);
    let floor_p50 = floor.map_or(0.0, |(p50, _)| p50);
    let every = format!("/metrics, one scrape every {COLD_GAP:?}, {label}");
    figures.push(
        Figure::new(
            "server",
            format!("{every}: p50"),
            spaced.answer_p50_ms,
            "ms",
        )
        .limit(floor_p50, "/health p50"),
    );
    figures.push(Figure::new(
        "server",
        format!("{every}: max"),
        spaced.answer_max_ms,
        "ms",
    ));
    figures.push(Figure::new(
        "server",
        format!("/metrics: the server's reading of the store behind it, {label}: p50"),
        spaced.reading_p50_ms,
        "ms",
    ));
    server.stop();
    Ok(figures)
}

/// How many scrapes [`spaced_scrapes`] times, and how far apart: further than the server reads
/// the store, as a Prometheus server scrapes (every 15 s by default).
const COLD_SCRAPES: usize = 10;
const COLD_GAP: Duration = Duration::from_millis(1100);

/// What [`spaced_scrapes`] measured, in milliseconds.
struct Spaced {
    answer_p50_ms: f64,
    answer_max_ms: f64,
    /// `butler_metrics_collect_seconds`: how long the server's reading of the store took.
    reading_p50_ms: f64,
}

/// Times [`COLD_SCRAPES`] requests of `/metrics`, one every [`COLD_GAP`], each on a new
/// connection.
fn spaced_scrapes(base: &str) -> anyhow::Result<Spaced> {
    let address = base.trim_start_matches("http://");
    let mut took = Vec::with_capacity(COLD_SCRAPES);
    let mut readings = Vec::with_capacity(COLD_SCRAPES);
    for _ in 0..COLD_SCRAPES {
        std::thread::sleep(COLD_GAP);
        let begin = std::time::Instant::now();
        let mut stream = std::net::TcpStream::connect(address)?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        took.push(begin.elapsed().as_secs_f64() * 1000.0);
        if !answer.starts_with("HTTP/1.1 200") || !answer.contains("butler_runs") {
            bail!("/metrics did not answer 200 with the run counts:\n{answer:.400}");
        }
        let reading = answer
            .lines()
            .find_map(|line| line.strip_prefix("butler_metrics_collect_seconds "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .context("no butler_metrics_collect_seconds on /metrics")?;
        readings.push(reading * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    readings.sort_by(f64::total_cmp);
    Ok(Spaced {
        answer_p50_ms: took[COLD_SCRAPES / 2],
        answer_max_ms: took[COLD_SCRAPES - 1],
        reading_p50_ms: readings[COLD_SCRAPES / 2],
    })
}

/// The `butler` binary beside this one (build both with `cargo build --release -p butler-cli
/// -p butler-bench`), or `BUTLER_BIN`.
fn butler_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("BUTLER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("butler");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "no butler binary at {}: build it with `cargo build --release -p butler-cli`, or set \
         BUTLER_BIN",
        beside.display()
    )
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// A `butler server` on a port the system picked, with no worker slots, so the store is only
/// read while it is measured.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(butler: &Path, home: &Path) -> anyhow::Result<Server> {
        let mut child = Command::new(butler)
            .args(["server", "--listen", "127.0.0.1:0", "--slots", "0"])
            .env("BUTLER_HOME", home)
            .env_remove("BUTLER_DB")
            .env_remove("BUTLER_QUEUE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", butler.display()))?;
        let stderr = child.stderr.take().context("the server's stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("http://")
                    && let Some((addr, _)) = rest.split_once('/')
                {
                    let _ = tx.send(format!("http://{addr}"));
                }
                // The access log, a line per request, would bury everything else.
                if !line.contains("request served") {
                    eprintln!("server: {line}");
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .context("the server did not print its address within 60 s")?;
        Ok(Server { child, base })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What `wrk` measured.
struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    per_sec: f64,
}

/// Loads `url` with one `wrk` thread and 4 connections for [`LOAD`].
fn load(wrk: &Path, url: &str, secret: &str) -> anyhow::Result<Measured> {
    let output = Command::new(wrk)
        .args(["-t1", "-c4", "-d", LOAD, "--latency", "-H"])
        .arg(format!("Authorization: Bearer {secret}"))
        .arg(url)
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("Non-2xx") {
        bail!("wrk on {url} failed or got error answers:\n{text}");
    }
    let percentile = |name: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .with_context(|| format!("no {name} line in wrk's output:\n{text}"))?;
        parse_duration_ms(line.split_whitespace().nth(1).unwrap_or_default())
    };
    let per_sec = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    Ok(Measured {
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
        per_sec,
    })
}

/// `wrk`'s `812.00us`, `1.52ms` or `2.01s` in milliseconds.
fn parse_duration_ms(text: &str) -> anyhow::Result<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("wrk printed a duration without a unit: {text:?}")
    };
    Ok(number.parse::<f64>()? * factor)
}
