//! The dashboard as a person sees it: a real `butler server` with completed, failed and
//! running runs, read through a plain HTTP client and through headless Chromium driven over
//! WebDriver (chromedriver).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

use crate::http::Server;
use crate::util::{KillOnDrop, PATIENCE, Sandbox, marker, wait_until};

/// A server with runs in every interesting state, and tokens to read it with. Dropped in
/// field order: the server stops, then its task processes, then the sandbox goes.
struct Scene {
    server: Server,
    _tasks: KillOnDrop,
    /// Runs of `greet` that completed (samples alpha and beta).
    completed: Vec<i64>,
    /// The run of `broken` that failed (sample gamma).
    failed: i64,
    /// The run of `slow` that is still running: its `tick` task prints a line a second.
    running: i64,
    /// The secret of a read-write token.
    secret: String,
    /// The secret of a read-only token.
    read_only: String,
    sandbox: Sandbox,
}

const GREET: &str = r#"
[[tasks]]
id = "hello"
run = "echo hello from {{ config.sample }}"

[[tasks]]
id = "shout"
needs = ["hello"]
run = "echo HELLO AGAIN"
"#;

const BROKEN: &str = r#"
[[tasks]]
id = "prepare"
run = "echo preparing {{ config.sample }}"

[[tasks]]
id = "fail"
needs = ["prepare"]
run = "echo about to fail on {{ config.sample }}; exit 3"

[[tasks]]
id = "never"
needs = ["fail"]
run = "true"
"#;

impl Scene {
    fn new(name: &str) -> Scene {
        let sandbox = Sandbox::new();
        let tick_marker = marker(&format!("dashboard-{name}-"));
        let workflow_config = json!({"sample": "workflow-default", "threads": 2});
        let greet = sandbox.workflow("greet", GREET, &workflow_config);
        let broken = sandbox.workflow("broken", BROKEN, &workflow_config);
        let slow_definition = format!(
            "[[tasks]]\nid = \"tick\"\nrun = \"for i in $(seq 1 90); do echo tick $i; sleep 1; \
             done # {tick_marker}\"\n\n[[tasks]]\nid = \"after\"\nneeds = [\"tick\"]\nrun = \
             \"true\"\n"
        );
        let slow = sandbox.workflow("slow", &slow_definition, &workflow_config);
        let analysis = sandbox.analysis(&json!({"reference": "hg38"}));
        sandbox.write("runs/greet/alpha.json", r#"{"sample": "alpha"}"#);
        sandbox.write("runs/greet/beta.json", r#"{"sample": "beta"}"#);
        sandbox.write("runs/broken/gamma.json", r#"{"sample": "gamma"}"#);
        sandbox.write("runs/slow/delta.json", r#"{"sample": "delta"}"#);
        let completed = sandbox.launch(greet, analysis, "runs/greet");
        let failed = sandbox.launch(broken, analysis, "runs/broken")[0];
        let secret = token(&sandbox, "browser", false);
        let read_only = token(&sandbox, "viewer", true);

        let tasks = KillOnDrop(tick_marker);
        let server = sandbox.start_server(name, &[]);
        wait_until("the greet and broken runs to finish", || {
            let statuses = sandbox.run_statuses();
            (statuses == ["completed", "completed", "error"])
                .then_some(())
                .ok_or(format!("{statuses:?}"))
        });
        // Launched last, so it is the newest run and the only one still running.
        let running = sandbox.launch(slow, analysis, "runs/slow")[0];
        wait_until("the slow run's task to print", || {
            let log = std::fs::read_to_string(
                sandbox
                    .home()
                    .join(format!("runs/{running}/tick/1/output.log")),
            )
            .unwrap_or_default();
            log.contains("tick 2").then_some(()).ok_or(log)
        });
        Scene {
            server,
            _tasks: tasks,
            completed,
            failed,
            running,
            secret,
            read_only,
            sandbox,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }
}

/// Creates a token and returns its secret (the second line `token create` prints).
fn token(sandbox: &Sandbox, name: &str, read_only: bool) -> String {
    let mut args = vec!["token", "create", "--name", name];
    if read_only {
        args.push("--read-only");
    }
    let created = sandbox.ok(&args);
    created
        .stdout
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("no secret in {:?}", created.stdout))
        .trim()
        .to_owned()
}

/// A client that shows redirects instead of following them.
fn http() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// GET `path` with the token cookie, checking the status; returns the page.
fn page(scene: &Scene, secret: &str, path: &str, status: StatusCode) -> String {
    let response = http()
        .get(scene.url(path))
        .header(COOKIE, format!("butler_token={secret}"))
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    body(response, status, path)
}

fn body(response: Response, status: StatusCode, what: &str) -> String {
    let got = response.status();
    let text = response.text().expect("a response body");
    assert_eq!(got, status, "{what}:\n{text}");
    text
}

/// The text of the table row of run `id` in a runs page, tags removed.
fn run_row(html: &str, id: i64) -> Option<String> {
    let start = html.find(&format!("<tr data-run=\"{id}\">"))?;
    let end = html[start..].find("</tr>")? + start;
    Some(strip_tags(&html[start..end]))
}

/// `pairs` as an HTML form posts them (`application/x-www-form-urlencoded`).
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    char::from(b).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The text a browser shows for `html`: tags removed, entities decoded, spaces collapsed.
fn strip_tags(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn pages_render_and_a_read_only_token_sees_no_buttons() {
    let scene = Scene::new("dashboard-http");
    let client = http();

    // Without a token, a page sends the browser to the login page, and back afterwards.
    let response = client
        .get(scene.url("/runs/1?x=1"))
        .send()
        .expect("GET /runs/1");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/login?next=/runs/1%3Fx%3D1");
    let login = body(
        client
            .get(scene.url("/login?next=/runs/1"))
            .send()
            .expect("GET /login"),
        StatusCode::OK,
        "the login page",
    );
    assert!(login.contains("name=\"secret\"") && login.contains("butler token create"));

    // A wrong secret shows the form again with the reason; a right one sets the cookie.
    let wrong = client
        .post(scene.url("/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("secret", "butler_wrong"), ("next", "/")]))
        .send()
        .expect("POST /login");
    let wrong = body(wrong, StatusCode::UNAUTHORIZED, "a wrong secret");
    assert!(wrong.contains("matches no token") && wrong.contains("name=\"secret\""));
    let path = format!("/runs/{}", scene.failed);
    let right = client
        .post(scene.url("/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[
            ("secret", scene.secret.as_str()),
            ("next", path.as_str()),
        ]))
        .send()
        .expect("POST /login");
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    assert_eq!(right.headers()[LOCATION], path.as_str());
    let cookie = right.headers()[SET_COOKIE]
        .to_str()
        .expect("a cookie")
        .to_owned();
    for part in [
        format!("butler_token={}", scene.secret),
        "HttpOnly".into(),
        "SameSite=Strict".into(),
        "Path=/".into(),
    ] {
        assert!(cookie.contains(&part), "{part} missing from {cookie}");
    }
    // `next` only ever leads to this server.
    let elsewhere = client
        .post(scene.url("/login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[
            ("secret", scene.secret.as_str()),
            ("next", "//elsewhere.example/"),
        ]))
        .send()
        .expect("POST /login");
    assert_eq!(elsewhere.headers()[LOCATION], "/");

    // The runs page: every run with its status, the counts, filters, keyset pages.
    let runs = page(&scene, &scene.secret, "/", StatusCode::OK);
    let failed_row = run_row(&runs, scene.failed).expect("the failed run's row");
    assert!(
        failed_row.contains("broken 1")
            && failed_row.contains("error")
            && failed_row.contains("gamma.json"),
        "{failed_row}"
    );
    let running_row = run_row(&runs, scene.running).expect("the running run's row");
    assert!(running_row.contains("in-progress"), "{running_row}");
    for id in &scene.completed {
        assert!(
            run_row(&runs, *id)
                .expect("a completed row")
                .contains("completed")
        );
    }
    let chips = strip_tags(&runs[runs.find("class=\"chips\"").expect("chips")..]);
    for expected in [
        "all 4",
        "in-progress 1",
        "completed 2",
        "error 1",
        "cancelled 0",
    ] {
        assert!(chips.contains(expected), "{expected} not in {chips:.200}");
    }
    let errors = page(&scene, &scene.secret, "/?status=error", StatusCode::OK);
    assert!(run_row(&errors, scene.failed).is_some());
    assert!(run_row(&errors, scene.completed[0]).is_none());
    let first = page(&scene, &scene.secret, "/?limit=2", StatusCode::OK);
    assert!(run_row(&first, scene.running).is_some() && run_row(&first, scene.failed).is_some());
    assert!(run_row(&first, scene.completed[0]).is_none());
    let older = format!("/?after={}&amp;limit=2", scene.failed);
    assert!(
        first.replace("&#x2f;", "/").contains(&older),
        "an older link: {first}"
    );
    let second = page(
        &scene,
        &scene.secret,
        &format!("/?after={}&limit=2", scene.failed),
        StatusCode::OK,
    );
    assert!(run_row(&second, scene.completed[0]).is_some());
    assert!(run_row(&second, scene.failed).is_none());

    // A run: its graph, timeline, log, events and config; buttons for a read-write token.
    let failed = page(&scene, &scene.secret, &path, StatusCode::OK);
    for expected in [
        "data-task=\"fail\" data-state=\"failed\"",
        "data-task=\"never\" data-state=\"upstream_failed\"",
        "class=\"bar s-failed\"",
        "about to fail on gamma",
        "exit code 3",
        "Reset failed tasks",
    ] {
        assert!(
            failed.contains(expected),
            "{expected} missing from the failed run's page"
        );
    }
    let provenance = strip_tags(
        &failed[failed
            .find("class=\"table provenance\"")
            .expect("provenance")..],
    );
    for expected in [
        "sample run \"gamma\"",
        "threads workflow 2",
        "reference analysis \"hg38\"",
    ] {
        assert!(
            provenance.contains(expected),
            "{expected} not in {provenance:.300}"
        );
    }
    let commands = strip_tags(&failed[failed.find("id=\"commands\"").expect("commands")..]);
    assert!(
        commands.contains("fail echo about to fail on gamma; exit 3"),
        "the rendered command is not in {commands:.300}"
    );
    let hello = page(
        &scene,
        &scene.secret,
        &format!("/runs/{}?task=hello&try=1", scene.completed[0]),
        StatusCode::OK,
    );
    assert!(hello.contains("hello from alpha"));
    let running = page(
        &scene,
        &scene.secret,
        &format!("/runs/{}", scene.running),
        StatusCode::OK,
    );
    assert!(running.contains("Cancel run") && running.contains("data-done=\"false\""));

    // A read-only token reads everything and is offered no button that changes anything.
    let viewer_failed = page(&scene, &scene.read_only, &path, StatusCode::OK);
    assert!(viewer_failed.contains("about to fail on gamma"));
    assert!(viewer_failed.contains(">read-only<"));
    let viewer_running = page(
        &scene,
        &scene.read_only,
        &format!("/runs/{}", scene.running),
        StatusCode::OK,
    );
    for html in [&viewer_failed, &viewer_running] {
        assert!(
            !html.contains("data-action"),
            "a read-only page with a button"
        );
        assert!(!html.contains("Reset failed tasks") && !html.contains("Cancel run"));
    }

    // The other pages.
    let workflows = page(&scene, &scene.read_only, "/workflows", StatusCode::OK);
    assert!(
        workflows.contains("greet") && workflows.contains("echo hello from {{ config.sample }}")
    );
    assert!(strip_tags(&workflows).contains("2 runs"));
    let analyses = page(&scene, &scene.read_only, "/analyses", StatusCode::OK);
    assert!(analyses.contains("hg38") && strip_tags(&analyses).contains("completed 2"));
    // The worker reports its busy slots with its next heartbeat.
    let workers = wait_until("the worker to report one busy slot", || {
        let text = strip_tags(&page(&scene, &scene.read_only, "/workers", StatusCode::OK));
        text.contains("1 / 2").then_some(text.clone()).ok_or(text)
    });
    assert!(
        workers.contains("alive") && workers.contains("butler.tasks"),
        "{workers}"
    );

    // Mistakes in the address are explained.
    let missing = page(&scene, &scene.secret, "/runs/9999", StatusCode::NOT_FOUND);
    assert!(missing.contains("9999"));
    let bogus = page(
        &scene,
        &scene.secret,
        "/?status=bogus",
        StatusCode::BAD_REQUEST,
    );
    assert!(bogus.contains("bogus") && bogus.contains("in-progress"));

    // Assets are long-cached under a name that changes with their content.
    let css = runs
        .split("rel=\"stylesheet\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a stylesheet link")
        .replace("&#x2f;", "/");
    let asset = client
        .get(scene.url(&css))
        .send()
        .expect("GET the stylesheet");
    assert_eq!(asset.status(), StatusCode::OK);
    assert!(
        asset.headers()[CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert!(
        asset.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    let stale = client
        .get(scene.url("/assets/dashboard.0.css"))
        .send()
        .expect("GET");
    assert_eq!(stale.status(), StatusCode::NOT_FOUND);

    // Logging out forgets the cookie.
    let out = client
        .post(scene.url("/logout"))
        .send()
        .expect("POST /logout");
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(
        out.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[test]
fn without_auth_the_login_page_leads_straight_to_the_runs() {
    let sandbox = Sandbox::new();
    let server = sandbox.start_server("dashboard-open", &["--no-auth"]);
    let client = http();
    let login = client
        .get(format!("{}/login?next=/workers", server.base))
        .send()
        .expect("GET /login");
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    assert_eq!(login.headers()[LOCATION], "/workers");
    let runs = body(
        client
            .get(format!("{}/", server.base))
            .send()
            .expect("GET /"),
        StatusCode::OK,
        "the runs page",
    );
    assert!(runs.contains("No runs yet") && !runs.contains("Log out"));
}

// --- The browser ---------------------------------------------------------------------------

/// chromedriver, started on a free port; killed with the browser it started when dropped.
struct Driver {
    child: Child,
    url: String,
    _browsers: KillOnDrop,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chromedriver to use, or why the browser test cannot run.
fn chromedriver() -> Result<PathBuf, String> {
    let path = std::env::var_os("BUTLER_TEST_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: install Debian's chromium and chromium-driver (scripts/services does), \
             or set BUTLER_TEST_CHROMEDRIVER",
            path.display()
        ))
    }
}

fn start_driver(sandbox: &Sandbox, path: &PathBuf) -> Driver {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let log = std::fs::File::create(sandbox.path().join("chromedriver.log")).expect("a log file");
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
    let addr = format!("127.0.0.1:{port}");
    wait_until("chromedriver to listen", || {
        std::net::TcpStream::connect(&addr)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let profile = sandbox.path().join("browser-profile");
    Driver {
        child,
        url: format!("http://{addr}"),
        _browsers: KillOnDrop(profile.display().to_string()),
        profile,
    }
}

async fn open_browser(driver: &Driver) -> Browser {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1360,1000",
                format!("--user-data-dir={}", driver.profile.display()),
            ]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("open a browser session through chromedriver: {e}"))
}

/// Polls `check` until it answers `Ok`, failing after [`PATIENCE`] with `what` and the last
/// answer.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("gave up waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn text(browser: &Browser, css: &str) -> Result<String, String> {
    let element = browser
        .find(Locator::Css(css))
        .await
        .map_err(|e| format!("{css}: {e}"))?;
    element.text().await.map_err(|e| format!("{css}: {e}"))
}

async fn click(browser: &Browser, css: &str) {
    let element = browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("find {css}: {e}"));
    element
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn path(browser: &Browser) -> String {
    let url = browser.current_url().await.expect("the current address");
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

async fn script(browser: &Browser, code: &str) -> Value {
    browser
        .execute(code, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("run {code}: {e}"))
}

/// Saves a screenshot of the page to `$BUTLER_TEST_SCREENSHOTS/NAME.png` when that is set.
async fn screenshot(browser: &Browser, name: &str) {
    let Some(dir) = std::env::var_os("BUTLER_TEST_SCREENSHOTS") else {
        return;
    };
    let png = browser.screenshot().await.expect("a screenshot");
    let path = PathBuf::from(dir).join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn a_person_logs_in_filters_runs_and_follows_a_running_log_in_a_browser() {
    let driver_path = match chromedriver() {
        Ok(path) => path,
        Err(reason) if std::env::var("BUTLER_TEST_REQUIRE_BROWSER").as_deref() == Ok("1") => {
            panic!("BUTLER_TEST_REQUIRE_BROWSER=1 but {reason}")
        }
        Err(reason) => {
            eprintln!("skipping the dashboard's browser test: {reason}");
            return;
        }
    };
    let scene = Scene::new("dashboard-browser");
    let driver = start_driver(&scene.sandbox, &driver_path);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let browser = open_browser(&driver).await;
        browse(&browser, &scene).await;
        browser.close().await.expect("close the browser");
    });
}

async fn browse(browser: &Browser, scene: &Scene) {
    // The runs page needs a token: the login page asks for one.
    browser
        .goto(&scene.url("/"))
        .await
        .expect("open the dashboard");
    assert_eq!(path(browser).await, "/login?next=/");
    let field = browser
        .find(Locator::Css("#secret"))
        .await
        .expect("the secret field");
    field.send_keys("butler_not_a_token").await.expect("type");
    click(browser, "button[type=submit]").await;
    let problem = eventually("the login error", || text(browser, ".alert")).await;
    assert!(problem.contains("matches no token"), "{problem}");
    let field = browser
        .find(Locator::Css("#secret"))
        .await
        .expect("the secret field");
    field.send_keys(&scene.secret).await.expect("type");
    click(browser, "button[type=submit]").await;
    eventually("the runs page", || async {
        let at = path(browser).await;
        (at == "/").then_some(()).ok_or(at)
    })
    .await;

    // The counts per status and a row per run.
    let chip = |status: &'static str| {
        let css = format!(".chip[data-status=\"{status}\"] .chip-count");
        async move { text(browser, &css).await }
    };
    assert_eq!(chip("all").await.unwrap(), "4");
    assert_eq!(chip("completed").await.unwrap(), "2");
    assert_eq!(chip("error").await.unwrap(), "1");
    assert_eq!(chip("in-progress").await.unwrap(), "1");
    let rows = browser
        .find_all(Locator::Css("#runs tbody tr[data-run]"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 4);
    let newest = rows[0].text().await.expect("a row's text");
    assert!(
        newest.contains("slow 1") && newest.contains("in-progress"),
        "{newest}"
    );
    // The live refresh redraws the rows from the API without reloading the page.
    script(
        browser,
        "window.stayed = true; document.querySelector('#runs tbody tr[data-run]').dataset.seen = '1'",
    )
    .await;
    eventually("the rows to be redrawn by the live refresh", || async {
        let replaced = script(
            browser,
            "var row = document.querySelector('#runs tbody tr[data-run]'); \
             return !!row && !row.dataset.seen",
        )
        .await;
        (replaced == json!(true))
            .then_some(())
            .ok_or(format!("{replaced}"))
    })
    .await;
    assert_eq!(
        script(browser, "return window.stayed === true").await,
        json!(true)
    );
    screenshot(browser, "dashboard-runs").await;

    // Filtering by status: the error chip leaves the failed run.
    click(browser, ".chip[data-status=\"error\"]").await;
    eventually("the runs in error", || async {
        let at = path(browser).await;
        at.contains("status=error").then_some(()).ok_or(at)
    })
    .await;
    let rows = browser
        .find_all(Locator::Css("#runs tbody tr[data-run]"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    let row = rows[0].text().await.expect("a row's text");
    assert!(
        row.contains("broken 1") && row.contains("gamma.json"),
        "{row}"
    );

    // Filtering by workflow with the select applies at once.
    browser
        .find(Locator::Css("select[name=status]"))
        .await
        .expect("the status filter")
        .select_by_value("")
        .await
        .expect("choose all statuses");
    eventually("the filter to apply", || async {
        let at = path(browser).await;
        (!at.contains("status=")).then_some(()).ok_or(at)
    })
    .await;
    browser
        .find(Locator::Css("select[name=workflow]"))
        .await
        .expect("the workflow filter")
        .select_by_label("greet 1")
        .await
        .expect("choose greet");
    eventually("two greet runs", || async {
        let rows = browser
            .find_all(Locator::Css("#runs tbody tr[data-run]"))
            .await
            .map_err(|e| e.to_string())?;
        let at = path(browser).await;
        (rows.len() == 2 && at.contains("workflow="))
            .then_some(())
            .ok_or(format!("{} rows at {at}", rows.len()))
    })
    .await;

    // Through to the failed run.
    browser
        .goto(&scene.url("/?status=error"))
        .await
        .expect("the runs in error");
    click(
        browser,
        &format!("a.run-link[href=\"/runs/{}\"]", scene.failed),
    )
    .await;
    eventually("the failed run's page", || async {
        let at = path(browser).await;
        (at == format!("/runs/{}", scene.failed))
            .then_some(())
            .ok_or(at)
    })
    .await;
    assert_eq!(text(browser, "#run-status .badge").await.unwrap(), "error");
    let node = |task: &'static str| async move {
        let css = format!(".dag .node[data-task=\"{task}\"]");
        let element = browser.find(Locator::Css(&css)).await.expect(task);
        let class = element
            .attr("class")
            .await
            .expect("a class")
            .unwrap_or_default();
        let shown = element.text().await.expect("a node's text");
        (class, shown)
    };
    let (class, shown) = node("prepare").await;
    assert!(
        class.contains("s-succeeded") && shown.contains("succeeded"),
        "{class} {shown}"
    );
    let (class, shown) = node("fail").await;
    assert!(
        class.contains("s-failed") && shown.contains("failed"),
        "{class} {shown}"
    );
    let (class, shown) = node("never").await;
    assert!(
        class.contains("s-upstream_failed") && shown.contains("upstream failed"),
        "{class} {shown}"
    );
    let bars = browser
        .find_all(Locator::Css(".gantt .bar"))
        .await
        .expect("timeline bars");
    let mut outcomes = Vec::new();
    for bar in &bars {
        outcomes.push(
            bar.attr("class")
                .await
                .expect("a class")
                .unwrap_or_default(),
        );
    }
    assert_eq!(outcomes, ["bar s-succeeded", "bar s-failed"]);
    let log = text(browser, "#log").await.unwrap();
    assert!(log.contains("about to fail on gamma"), "{log}");
    let events = text(browser, "#events").await.unwrap();
    assert!(
        events.contains("exit code 3") && events.contains("upstream failed"),
        "{events}"
    );
    let provenance = text(browser, ".provenance").await.unwrap();
    for expected in [
        "sample run \"gamma\"",
        "threads workflow 2",
        "reference analysis \"hg38\"",
    ] {
        assert!(
            provenance.contains(expected),
            "{expected} not in {provenance}"
        );
    }
    assert!(
        text(browser, ".actions")
            .await
            .unwrap()
            .contains("Reset failed tasks")
    );
    screenshot(browser, "dashboard-failed-run").await;

    // A click on a task in the graph shows its log.
    click(browser, ".dag .node[data-task=\"prepare\"] a").await;
    eventually("the prepare task's log", || async {
        let log = text(browser, "#log").await?;
        log.contains("preparing gamma").then_some(()).ok_or(log)
    })
    .await;

    // A completed run's log.
    browser
        .goto(&scene.url(&format!("/runs/{}", scene.completed[0])))
        .await
        .expect("a completed run");
    let log = text(browser, "#log").await.unwrap();
    assert!(log.contains("hello from alpha"), "{log}");
    assert_eq!(
        text(browser, "#run-status .badge").await.unwrap(),
        "completed"
    );

    // The running task's log grows while the page stays.
    browser
        .goto(&scene.url(&format!("/runs/{}", scene.running)))
        .await
        .expect("the running run");
    let (class, _) = node("tick").await;
    assert!(class.contains("s-running"), "{class}");
    assert_eq!(text(browser, "#log-live").await.unwrap(), "following");
    script(
        browser,
        "window.stayed = true; document.getElementById('timeline').dataset.seen = '1'",
    )
    .await;
    let lines = |log: &str| log.lines().filter(|l| l.starts_with("tick ")).count();
    let before = lines(&text(browser, "#log").await.unwrap());
    assert!(
        before >= 2,
        "the log shows what was printed: {before} lines"
    );
    let grown = eventually("the log to grow", || async {
        let now = lines(&text(browser, "#log").await?);
        (now >= before + 3)
            .then_some(now)
            .ok_or(format!("{now} lines, {before} at first"))
    })
    .await;
    assert_eq!(
        script(browser, "return window.stayed === true").await,
        json!(true),
        "the page was not reloaded"
    );
    let log = text(browser, "#log").await.unwrap();
    assert!(
        log.contains(&format!("tick {grown}")),
        "lines in order: {log}"
    );
    // The timeline of a running run is redrawn as its attempt goes on.
    eventually("the timeline to be redrawn", || async {
        let fresh = script(
            browser,
            "return !document.getElementById('timeline').dataset.seen",
        )
        .await;
        (fresh == json!(true))
            .then_some(())
            .ok_or(format!("{fresh}"))
    })
    .await;
    screenshot(browser, "dashboard-running-run").await;

    // The workers page, redrawn while it is open.
    browser
        .goto(&scene.url("/workers"))
        .await
        .expect("the workers page");
    let workers = text(browser, "#workers-live").await.unwrap();
    assert!(
        workers.contains("alive") && workers.contains("butler.tasks"),
        "{workers}"
    );
    script(
        browser,
        "document.querySelector('#workers-live table').dataset.seen = '1'",
    )
    .await;
    eventually("the workers page to refresh", || async {
        let fresh = script(
            browser,
            "return !document.querySelector('#workers-live table').dataset.seen",
        )
        .await;
        (fresh == json!(true))
            .then_some(())
            .ok_or(format!("{fresh}"))
    })
    .await;

    // Logging out leads back to the login page.
    click(browser, ".who button").await;
    eventually("the login page", || async {
        let at = path(browser).await;
        at.starts_with("/login").then_some(()).ok_or(at)
    })
    .await;
}
