//! Alerts end to end: a real engine on a SQLite store under a temporary `BUTLER_HOME`, the
//! alert watcher, and receivers on 127.0.0.1 standing in for a webhook endpoint, a chat
//! service's incoming webhook and an SMTP server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use butler_core::definition::{Definition, Format};
use butler_core::engine::{Engine, EngineOptions};
use butler_core::model::{Id, RunStatus};
use butler_core::notify::{NotifyConfig, Watcher, WatcherHandle, WatcherOptions};
use butler_core::tracker::{RunSource, Tracker};
use butler_providers::connect::{Backends, connect};
use butler_providers::local::LocalExecutor;
use butler_providers::notify::{from_config, start_watcher};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::util::until;

/// The longest a test waits for anything: the machine is small and shared with builds.
const WAIT: Duration = Duration::from_secs(60);
/// Runs failed at once, and the capacity of each notifier's channel, in the test of a
/// destination that never answers.
const BATCH: usize = 6;

/// One HTTP request as a receiver got it.
#[derive(Debug, Clone)]
struct Request {
    target: String,
    headers: BTreeMap<String, String>,
    body: Value,
}

/// A local HTTP endpoint that records every request and answers with the next status of its
/// script (then 200), or never answers at all.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    /// Answers the first requests with `script`'s statuses, then 200.
    async fn answering(script: &[u16]) -> Receiver {
        Receiver::start(Some(script.to_vec())).await
    }

    /// Reads every request and never answers, holding the connection open.
    async fn silent() -> Receiver {
        Receiver::start(None).await
    }

    async fn start(script: Option<Vec<u16>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let addr = listener.local_addr().expect("its address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.map(|mut s| {
            s.reverse();
            s
        })));
        let recorded = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (recorded, script) = (recorded.clone(), script.clone());
                tokio::spawn(async move {
                    let _ = serve_http(stream, recorded, script).await;
                });
            }
        });
        Receiver { addr, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the requests received.
    async fn wait_until(&self, what: &str, done: impl Fn(&[Request]) -> bool) -> Vec<Request> {
        let deadline = Instant::now() + WAIT;
        loop {
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}; received: {requests:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Serves the requests of one connection.
async fn serve_http(
    stream: TcpStream,
    recorded: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<Option<Vec<u16>>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let target = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        recorded.lock().unwrap().push(Request {
            target,
            headers,
            body,
        });
        let status = script
            .lock()
            .unwrap()
            .as_mut()
            .map(|script| script.pop().unwrap_or(200));
        let Some(status) = status else {
            // Never answer; keep the connection until the client gives up.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest).await;
            return Ok(());
        };
        let text = if status == 200 { "ok" } else { "try later" };
        let answer = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        reader.get_mut().write_all(answer.as_bytes()).await?;
    }
}

/// One message as the SMTP receiver got it.
#[derive(Debug, Clone)]
struct Mail {
    from: String,
    to: Vec<String>,
    data: String,
}

/// A local SMTP server speaking just enough of the protocol to accept messages.
async fn smtp_receiver() -> (SocketAddr, Arc<Mutex<Vec<Mail>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a local port");
    let addr = listener.local_addr().expect("its address");
    let mails = Arc::new(Mutex::new(Vec::new()));
    let recorded = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let _ = serve_smtp(stream, recorded).await;
            });
        }
    });
    (addr, mails)
}

async fn serve_smtp(stream: TcpStream, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(b"220 receiver.test ESMTP ready\r\n")
        .await?;
    let mut mail = Mail {
        from: String::new(),
        to: Vec::new(),
        data: String::new(),
    };
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let answer: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250 receiver.test\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            mail.from = command[10..].trim().to_owned();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            mail.to.push(command[8..].trim().to_owned());
            b"250 OK\r\n"
        } else if upper == "DATA" {
            reader
                .get_mut()
                .write_all(b"354 end with <CRLF>.<CRLF>\r\n")
                .await?;
            loop {
                let mut data = String::new();
                if reader.read_line(&mut data).await? == 0 {
                    return Ok(());
                }
                if data == ".\r\n" {
                    break;
                }
                mail.data.push_str(data.strip_prefix('.').unwrap_or(&data));
            }
            mails.lock().unwrap().push(mail.clone());
            b"250 OK queued\r\n"
        } else if upper == "QUIT" {
            reader.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else if upper == "RSET" || upper == "NOOP" {
            b"250 OK\r\n"
        } else {
            b"502 command not implemented\r\n"
        };
        reader.get_mut().write_all(answer).await?;
    }
}

/// The text of a message body as a mail reader shows it: quoted-printable decoded.
fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).replace("\r\n", "\n")
}

/// One test's world: a temporary `BUTLER_HOME` with a SQLite store, a failing workflow and an
/// analysis.
struct World {
    home: TempDir,
    backends: Backends,
    tracker: Tracker,
    workflow: Id,
    analysis: Id,
    launched: usize,
}

impl World {
    async fn new() -> World {
        let home = tempfile::tempdir().expect("a temporary BUTLER_HOME");
        let url = format!("sqlite://{}/butler.db", home.path().display());
        let backends = connect(&url, None).await.expect("the store opens");
        let tracker = Tracker::new(backends.store.clone());
        let definition = Definition::parse(
            "[[tasks]]\nid = \"align\"\nrun = \"echo aligning; exit 3\"\n",
            Format::Toml,
            "failing.toml",
        )
        .expect("a valid definition");
        let workflow = tracker
            .create_workflow("failing", "1.0", json!({}), definition)
            .await
            .expect("workflow")
            .id;
        let analysis = tracker
            .create_analysis("batch-7", chrono::Utc::now().date_naive(), json!({}))
            .await
            .expect("analysis")
            .id;
        World {
            home,
            backends,
            tracker,
            workflow,
            analysis,
            launched: 0,
        }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.home().join("notify.toml"), text).expect("notify.toml is written");
    }

    fn options(&self, slots: usize) -> EngineOptions {
        let mut options = EngineOptions::new(self.home().to_path_buf(), slots);
        options.poll = Duration::from_millis(50);
        options
    }

    fn start_engine(&self) -> Engine {
        Engine::start(
            self.backends.store.clone(),
            self.backends.queue.clone(),
            Arc::new(LocalExecutor::new()),
            self.options(2),
        )
    }

    async fn launch(&mut self, count: usize) -> Vec<Id> {
        let sources = (0..count)
            .map(|i| RunSource {
                source: None,
                config: json!({ "sample": self.launched + i }),
            })
            .collect();
        self.launched += count;
        self.tracker
            .launch(self.workflow, self.analysis, sources, false)
            .await
            .expect("launch")
            .into_iter()
            .map(|run| run.id)
            .collect()
    }

    /// Runs `runs` to their end and checks that every one failed, within `limit`.
    async fn fail_all(&self, engine: &mut Engine, runs: &[Id], limit: Duration) {
        let done = tokio::time::timeout(limit, engine.wait_for(runs, |_| {}))
            .await
            .unwrap_or_else(|_| panic!("the runs finish within {limit:?}"))
            .expect("the engine runs");
        assert!(
            done.iter().all(|run| run.status == RunStatus::Error),
            "{done:?}"
        );
    }
}

/// A watcher started the way `butler server` starts it, from `BUTLER_HOME/notify.toml`.
async fn server_watcher(world: &World, engine_options: &EngineOptions) -> WatcherHandle {
    start_watcher(world.backends.store.clone(), engine_options, None)
        .await
        .expect("the notify config is valid")
        .expect("a notify config exists, so alerts are on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_reach_a_webhook_and_a_chat_hook_that_fails_twice_first() {
    let hook = Receiver::answering(&[]).await;
    let chat = Receiver::answering(&[503, 503]).await;
    let mut world = World::new().await;
    world.write_config(&format!(
        r#"
        on_failure = ["hook", "chat"]
        dashboard_url = "https://butler.example.org/"

        [notifiers.hook]
        kind = "webhook"
        url = "{}"
        headers = {{ Authorization = "Bearer t0k3n" }}

        [notifiers.chat]
        kind = "slack"
        url = "{}"
        "#,
        hook.url("/butler/alerts?token=abc"),
        chat.url("/services/T0/B0/secret")
    ));
    let mut engine = world.start_engine();
    let watcher = server_watcher(&world, &world.options(2)).await;
    let runs = world.launch(2).await;
    world.fail_all(&mut engine, &runs, WAIT).await;

    let got = hook
        .wait_until("both failures at the webhook", |r| r.len() >= 2)
        .await;
    let mut alerted: Vec<i64> = got
        .iter()
        .filter_map(|r| r.body["run_id"].as_i64())
        .collect();
    alerted.sort_unstable();
    assert_eq!(alerted, runs, "each failure once: {got:#?}");
    for request in &got {
        assert_eq!(request.target, "/butler/alerts?token=abc");
        assert_eq!(request.headers["authorization"], "Bearer t0k3n");
        assert_eq!(request.headers["content-type"], "application/json");
        let body = &request.body;
        let run = body["run_id"].as_i64().unwrap();
        assert_eq!(body["kind"], "run_failed");
        assert_eq!(body["workflow"], "failing");
        assert_eq!(body["workflow_version"], "1.0");
        assert_eq!(body["analysis"], "batch-7");
        assert_eq!(body["title"], format!("Run {run} failed: failing 1.0"));
        assert_eq!(
            body["link"],
            format!("https://butler.example.org/runs/{run}")
        );
        let reason = body["reason"].as_str().unwrap();
        assert!(
            reason.contains("task `align`") && reason.contains("exit code 3"),
            "{reason}"
        );
        assert!(body["body"].as_str().unwrap().contains(reason), "{body}");
    }

    // Two 503s, then each alert delivered: the first after two retries.
    let got = chat
        .wait_until("both failures at the chat hook", |r| r.len() >= 4)
        .await;
    assert_eq!(got.len(), 4, "{got:#?}");
    assert_eq!(got[0].body, got[1].body, "a retry repeats the message");
    assert_eq!(got[1].body, got[2].body);
    for request in &got {
        assert_eq!(request.target, "/services/T0/B0/secret");
        let text = request.body["text"].as_str().unwrap();
        assert!(
            text.starts_with(":x: Run ") && text.contains("failed: failing 1.0"),
            "{text}"
        );
        assert_eq!(request.body["blocks"][0]["type"], "header");
    }
    // The notifier counts a delivery once it has read the answer, just after the receiver saw it.
    let chat_stats = watcher.stats("chat").unwrap();
    until("both chat alerts are counted", WAIT, async || {
        chat_stats.snapshot().0 >= 2
    })
    .await;
    assert_eq!(chat_stats.snapshot(), (2, 0, 0));
    assert_eq!(
        chat_stats
            .failed_attempts
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    watcher.stop().await;
    engine.stop().await.expect("the engine stops");
    assert_eq!(hook.requests().len(), 2, "nothing sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_never_answers_holds_up_neither_the_scheduler_nor_the_others() {
    let silent = Receiver::silent().await;
    let hook = Receiver::answering(&[]).await;
    let mut world = World::new().await;
    let config = NotifyConfig::parse(
        &format!(
            "on_failure = [\"stuck\", \"hook\"]\n\
             [notifiers.stuck]\nkind = \"webhook\"\nurl = \"{}\"\ntimeout = \"1h\"\n\
             [notifiers.hook]\nkind = \"webhook\"\nurl = \"{}\"\n",
            silent.url("/"),
            hook.url("/")
        ),
        "notify.toml",
    )
    .expect("a valid config");
    let mut options = WatcherOptions::new(Duration::from_secs(15));
    options.poll = Duration::from_millis(50);
    options.delivery.capacity = BATCH;
    options.delivery.attempt_timeout = Duration::from_secs(3600);
    let watcher = Watcher::new(world.backends.store.clone(), config.routes.clone(), options)
        .await
        .expect("watcher")
        .start(from_config(&config).expect("notifiers"));
    let mut engine = world.start_engine();

    // In batches no larger than a channel, so that the answering hook, which keeps up, never
    // has to drop one.
    let mut runs = Vec::new();
    for _ in 0..3 {
        let batch = world.launch(BATCH).await;
        world.fail_all(&mut engine, &batch, WAIT).await;
        runs.extend(batch);
        hook.wait_until("every failure at the answering hook", |r| {
            r.len() >= runs.len()
        })
        .await;
    }
    assert_eq!(hook.requests().len(), runs.len());

    // The stuck destination holds one alert and its channel a batch; the rest were dropped.
    let stuck = watcher.stats("stuck").unwrap().clone();
    let expected_drops = (runs.len() - 1 - BATCH) as u64;
    let deadline = Instant::now() + WAIT;
    while stuck.snapshot().2 < expected_drops {
        assert!(Instant::now() < deadline, "drops: {:?}", stuck.snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stuck.snapshot(), (0, 0, expected_drops));
    assert_eq!(
        silent.requests().len(),
        1,
        "one attempt hangs, nothing else is tried"
    );

    let stopping = Instant::now();
    watcher.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stop abandons the stuck delivery after its grace: {:?}",
        stopping.elapsed()
    );
    engine.stop().await.expect("the engine stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_arrives_by_email_with_its_subject_and_body() {
    let (smtp, mails) = smtp_receiver().await;
    let mut world = World::new().await;
    world.write_config(&format!(
        r#"
        on_failure = ["oncall"]

        [notifiers.oncall]
        kind = "email"
        host = "127.0.0.1"
        port = {}
        tls = "none"
        from = "Butler <butler@example.org>"
        to = ["ops@example.org", "Lab <lab@example.org>"]
        "#,
        smtp.port()
    ));
    let mut engine = world.start_engine();
    let watcher = server_watcher(&world, &world.options(2)).await;
    let runs = world.launch(1).await;
    world.fail_all(&mut engine, &runs, WAIT).await;

    let deadline = Instant::now() + WAIT;
    let mail = loop {
        if let Some(mail) = mails.lock().unwrap().first().cloned() {
            break mail;
        }
        assert!(Instant::now() < deadline, "no email arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(mail.from, "<butler@example.org>");
    assert_eq!(mail.to, ["<ops@example.org>", "<lab@example.org>"]);
    let run = runs[0];
    let (head, body) = mail
        .data
        .split_once("\r\n\r\n")
        .expect("headers, a blank line, then the body");
    assert!(
        head.lines()
            .any(|l| l == format!("Subject: [butler] Run {run} failed: failing 1.0")),
        "{head}"
    );
    assert!(head.contains("Content-Type: text/plain"), "{head}");
    let body = decode_quoted_printable(body);
    assert!(
        body.starts_with(&format!(
            "Run {run} of workflow failing 1.0 (analysis batch-7) ended in error.\n\
             Reason: task `align` failed: exit code 3"
        )),
        "{body}"
    );
    assert!(body.contains(&format!("Details: /runs/{run}")), "{body}");
    assert!(body.contains("Sent by Butler (run_failed alert"), "{body}");
    watcher.stop().await;
    engine.stop().await.expect("the engine stops");
    assert_eq!(mails.lock().unwrap().len(), 1, "one email for one failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_count_the_runs_of_each_period() {
    let hook = Receiver::answering(&[]).await;
    let mut world = World::new().await;
    world.write_config(&format!(
        "report = [\"hook\"]\nreport_every = \"1s\"\n\
         [notifiers.hook]\nkind = \"webhook\"\nurl = \"{}\"\n",
        hook.url("/reports")
    ));
    let mut options = world.options(2);
    options.schedule = false;
    assert!(
        start_watcher(world.backends.store.clone(), &options, None)
            .await
            .expect("no error")
            .is_none(),
        "a process that does not schedule sends no alert"
    );
    let mut engine = world.start_engine();
    let watcher = server_watcher(&world, &world.options(2)).await;
    let runs = world.launch(3).await;
    world.fail_all(&mut engine, &runs, WAIT).await;

    let failed = |requests: &[Request]| -> u64 {
        requests
            .iter()
            .flat_map(|r| r.body["counts"].as_array().cloned().unwrap_or_default())
            .map(|c| c["failed"].as_u64().unwrap_or(0))
            .sum()
    };
    let got = hook
        .wait_until("reports counting the three failures", |r| failed(r) >= 3)
        .await;
    assert_eq!(failed(&got), 3, "each failure in one report: {got:#?}");
    for request in &got {
        assert_eq!(request.body["kind"], "report");
        assert!(
            request.body["title"]
                .as_str()
                .unwrap()
                .starts_with("Butler report: ")
        );
        for counts in request.body["counts"].as_array().into_iter().flatten() {
            assert_eq!(counts["workflow"], "failing");
            assert_eq!(counts["completed"], 0);
        }
    }
    watcher.stop().await;
    engine.stop().await.expect("the engine stops");
}

#[tokio::test]
async fn no_config_means_no_watcher_and_a_bad_one_is_refused() {
    let world = World::new().await;
    let options = world.options(1);
    assert!(
        start_watcher(world.backends.store.clone(), &options, None)
            .await
            .expect("no config is no error")
            .is_none()
    );
    world.write_config("on_failure = [\"ops\"]\n");
    let err = start_watcher(world.backends.store.clone(), &options, None)
        .await
        .expect_err("an undeclared notifier is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("notify.toml") && msg.contains("`on_failure` names notifier `ops`"),
        "{msg}"
    );
    let elsewhere = world.home().join("elsewhere.toml");
    let err = start_watcher(world.backends.store.clone(), &options, Some(&elsewhere))
        .await
        .expect_err("a named file must exist");
    assert!(err.to_string().contains("elsewhere.toml"), "{err}");
}
