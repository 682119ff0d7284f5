//! The JSON API of `butler server`, against a real server process that schedules and runs the
//! tasks itself.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

use crate::http::Server;
use crate::util::{KillOnDrop, Sandbox, marker, processes_with, wait_until};

/// A client of one server, presenting `token` when there is one.
struct Api<'a> {
    server: &'a Server,
    client: Client,
    token: Option<String>,
}

impl<'a> Api<'a> {
    fn new(server: &'a Server, token: Option<&str>) -> Api<'a> {
        Api {
            server,
            client: Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("build an HTTP client"),
            token: token.map(str::to_owned),
        }
    }

    /// The same server with another token (or none).
    fn with_token(&self, token: Option<&str>) -> Api<'a> {
        Api {
            server: self.server,
            client: self.client.clone(),
            token: token.map(str::to_owned),
        }
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    fn get(&self, path: &str) -> Response {
        self.authorize(self.client.get(self.url(path)))
            .send()
            .unwrap_or_else(|e| self.gone(path, e))
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.authorize(self.client.post(self.url(path)).json(body))
            .send()
            .unwrap_or_else(|e| self.gone(path, e))
    }

    fn post_raw(&self, path: &str, content_type: &str, body: &str) -> Response {
        self.authorize(self.client.post(self.url(path)))
            .header(CONTENT_TYPE, content_type)
            .body(body.to_owned())
            .send()
            .unwrap_or_else(|e| self.gone(path, e))
    }

    fn gone(&self, path: &str, error: reqwest::Error) -> ! {
        panic!(
            "request to {path} failed: {error}; server stderr:\n{}",
            self.server.process.stderr()
        )
    }

    /// `GET path`, checked to answer 200 with JSON.
    fn json(&self, path: &str) -> Value {
        expect_json(self.get(path), StatusCode::OK, path)
    }

    /// `POST path` with a JSON body, checked to answer `status` with JSON.
    fn post_json(&self, path: &str, body: &Value, status: StatusCode) -> Value {
        expect_json(self.post(path, body), status, path)
    }

    /// Waits until every run the server knows has finished; returns the counts.
    fn wait_all_finished(&self) -> Value {
        wait_until("every run to finish", || {
            let counts = self.json("/api/runs/counts");
            let unfinished: u64 = ["ready", "scheduled", "in-progress"]
                .iter()
                .map(|s| counts[s].as_u64().expect("a count"))
                .sum();
            if unfinished == 0 {
                Ok(counts)
            } else {
                Err(counts.to_string())
            }
        })
    }

    /// Waits until run `id` has status `status`; returns its detail.
    fn wait_status(&self, id: i64, status: &str) -> Value {
        wait_until(&format!("run {id} to be {status}"), || {
            let detail = self.json(&format!("/api/runs/{id}"));
            if detail["run"]["status"] == status {
                Ok(detail)
            } else {
                Err(detail.to_string())
            }
        })
    }
}

/// The JSON body of `response`, after checking its status.
fn expect_json(response: Response, status: StatusCode, what: &str) -> Value {
    let got = response.status();
    let text = response.text().expect("read the body");
    assert_eq!(got, status, "{what} answered {got}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what} answered non-JSON ({e}): {text}"))
}

/// Checks that `response` is an error in the API's shape with this status and code; returns
/// its message.
fn expect_error(response: Response, status: StatusCode, code: &str) -> String {
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let url = response.url().to_string();
    let body = expect_json(response, status, &url);
    assert!(
        content_type.starts_with("application/json"),
        "{url}: an error is JSON, not {content_type:?}"
    );
    let keys: BTreeSet<&str> = body
        .as_object()
        .unwrap_or_else(|| panic!("{url}: an error is an object: {body}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["error", "message"]), "{url}: {body}");
    assert_eq!(body["error"], code, "{url}: {body}");
    body["message"].as_str().expect("a message").to_owned()
}

fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("a text header")
        .to_owned()
}

/// Creates a token and returns its secret.
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
        .expect("the secret on the second line")
        .to_owned()
}

/// Every run id of a listing, following `next` from page to page.
fn walk(api: &Api, query: &str) -> (Vec<i64>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(after) => format!("/api/runs?{query}&after={after}"),
            None => format!("/api/runs?{query}"),
        };
        let page = api.json(&path);
        pages += 1;
        ids.extend(
            page["runs"]
                .as_array()
                .expect("runs")
                .iter()
                .map(|r| r["id"].as_i64().expect("an id")),
        );
        match page["next"].as_i64() {
            Some(next) => after = Some(next),
            None => return (ids, pages),
        }
        assert!(pages < 100, "paging does not end: {ids:?}");
    }
}

fn ids(page: &Value) -> Vec<i64> {
    page["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["id"].as_i64().expect("an id"))
        .collect()
}

#[test]
fn runs_are_paged_filtered_counted_and_inspected_with_their_logs() {
    let sandbox = Sandbox::new();
    let say = sandbox.workflow(
        "say",
        "[[tasks]]\nid = \"say\"\nrun = \"echo '{{ config.message }}'\"\n",
        &json!({"message": "from the workflow", "greeting": "hi"}),
    );
    let fail = sandbox.workflow(
        "fail",
        "[[tasks]]\nid = \"boom\"\nrun = \"echo going down; exit 3\"\n",
        &json!({}),
    );
    let big = sandbox.workflow(
        "big",
        "[[tasks]]\nid = \"print\"\nrun = \"head -c 1500000 /dev/zero | tr '\\\\0' x\"\n",
        &json!({}),
    );
    let analysis = sandbox.analysis(&json!({"message": "from the analysis"}));
    for i in 1..=5 {
        sandbox.write(
            &format!("say-runs/run-{i}.json"),
            &json!({"message": format!("run {i}")}).to_string(),
        );
    }
    sandbox.write("fail-runs/a.json", "{\"n\": 1}");
    sandbox.write("fail-runs/b.json", "{\"n\": 2}");
    sandbox.write("big-runs/a.json", "{}");
    assert_eq!(sandbox.launch(say, analysis, "say-runs"), [1, 2, 3, 4, 5]);
    assert_eq!(sandbox.launch(fail, analysis, "fail-runs"), [6, 7]);
    let other = sandbox.analysis(&json!({}));
    assert_eq!(sandbox.launch(big, other, "big-runs"), [8]);

    let secret = token(&sandbox, "ci", false);
    let server = sandbox.start_server("server", &[]);
    let api = Api::new(&server, Some(&secret));
    let counts = api.wait_all_finished();
    assert_eq!(
        counts,
        json!({"ready": 0, "scheduled": 0, "in-progress": 0, "completed": 6, "error": 2,
               "cancelled": 0, "total": 8})
    );

    // Newest first by default; `next` walks every run exactly once.
    let (newest, pages) = walk(&api, "limit=3");
    assert_eq!(newest, [8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(pages, 3);
    let first = api.json("/api/runs?limit=3");
    assert_eq!(first["next"], 6);
    let (oldest, pages) = walk(&api, "order=oldest&limit=4");
    assert_eq!(oldest, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(pages, 2, "a full last page has no empty page after it");
    let all = api.json("/api/runs?workflow=&analysis=&status=&limit=");
    assert_eq!(
        ids(&all),
        [8, 7, 6, 5, 4, 3, 2, 1],
        "empty parameters are ignored"
    );
    assert_eq!(all["next"], Value::Null);
    assert_eq!(all["runs"][0]["status"], "completed");
    assert_eq!(all["runs"][0]["workflow_id"], big);
    assert!(all["runs"][0]["created_at"].as_str().unwrap().contains('T'));

    // Filters.
    assert_eq!(ids(&api.json("/api/runs?status=error")), [7, 6]);
    assert_eq!(
        ids(&api.json(&format!("/api/runs?workflow={fail}"))),
        [7, 6]
    );
    assert_eq!(ids(&api.json(&format!("/api/runs?analysis={other}"))), [8]);
    let mixed = api.json(&format!(
        "/api/runs?workflow={say}&analysis={analysis}&status=completed&order=oldest"
    ));
    assert_eq!(ids(&mixed), [1, 2, 3, 4, 5]);
    let (errors, _) = walk(&api, "status=error&limit=1");
    assert_eq!(errors, [7, 6]);
    let counts = api.json(&format!("/api/runs/counts?workflow={fail}"));
    assert_eq!(
        (counts["error"].as_u64(), counts["total"].as_u64()),
        (Some(2), Some(2))
    );
    let counts = api.json(&format!("/api/runs/counts?analysis={analysis}"));
    assert_eq!(
        (counts["completed"].as_u64(), counts["total"].as_u64()),
        (Some(5), Some(7))
    );

    // A run with its tasks.
    let detail = api.json("/api/runs/1");
    assert_eq!(detail["run"]["id"], 1);
    assert_eq!(detail["run"]["status"], "completed");
    let task = &detail["tasks"][0];
    assert_eq!(
        (
            &task["task_id"],
            &task["state"],
            &task["try_number"],
            &task["last_started_try"]
        ),
        (&json!("say"), &json!("succeeded"), &json!(1), &json!(1))
    );
    assert_eq!(task["exit_code"], 0);
    let failed = api.json("/api/runs/6");
    assert_eq!(failed["run"]["status"], "error");
    assert_eq!(failed["tasks"][0]["state"], "failed");
    assert_eq!(failed["tasks"][0]["exit_code"], 3);

    // Events, a page at a time.
    let events = api.json("/api/runs/1/events");
    let events = events.as_array().expect("an array of events");
    assert!(events.len() >= 4, "{events:?}");
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["id"].as_i64() < w[1]["id"].as_i64())
    );
    assert!(events.iter().all(|e| e["run_id"] == 1));
    assert_eq!(events.last().unwrap()["to"], "completed");
    let second = api.json(&format!(
        "/api/runs/1/events?after={}&limit=1",
        events[0]["id"]
    ));
    assert_eq!(second, json!([events[1]]));

    // The effective config with the layer of every key.
    let config = api.json("/api/runs/1/config");
    assert_eq!(config["data"]["message"], "run 1");
    assert_eq!(config["data"]["greeting"], "hi");
    assert_eq!(config["data"]["analysis_run_id"], 1);
    assert_eq!(config["sha256"].as_str().map(str::len), Some(64));
    let layers: Vec<(String, String)> = config["provenance"]
        .as_array()
        .expect("provenance")
        .iter()
        .map(|p| {
            let key = p["key"].as_str().expect("a key").to_owned();
            (key, p["layer"].as_str().expect("a layer").to_owned())
        })
        .collect();
    for (key, layer) in [
        ("message", "run"),
        ("greeting", "workflow"),
        ("analysis_run_id", "butler"),
    ] {
        assert!(
            layers.contains(&(key.to_owned(), layer.to_owned())),
            "{key} from {layer}: {layers:?}"
        );
    }

    // The commands its tasks run, rendered with that config.
    assert_eq!(
        api.json("/api/runs/1/commands"),
        json!([{"task": "say", "command": "echo 'run 1'", "env": {}}])
    );
    assert_eq!(
        api.get("/api/runs/999/commands").status(),
        StatusCode::NOT_FOUND
    );

    // Logs: the latest attempt by default, from an offset, with what the attempt is.
    let log = api.get("/api/runs/1/logs/say");
    assert_eq!(log.status(), StatusCode::OK);
    assert_eq!(header(&log, "x-butler-try"), "1");
    assert_eq!(header(&log, "x-butler-log-size"), "6");
    assert_eq!(header(&log, "x-butler-log-done"), "true");
    assert!(header(&log, "content-type").starts_with("text/plain"));
    assert_eq!(log.text().unwrap(), "run 1\n");
    let tail = api.get("/api/runs/1/logs/say?offset=2&try=1");
    assert_eq!(header(&tail, "x-butler-log-next-offset"), "6");
    assert_eq!(tail.text().unwrap(), "n 1\n");
    let past = api.get("/api/runs/1/logs/say?offset=100");
    assert_eq!(past.status(), StatusCode::OK);
    assert_eq!(header(&past, "x-butler-log-size"), "6");
    assert_eq!(past.text().unwrap(), "");
    assert_eq!(
        api.get("/api/runs/6/logs/boom").text().unwrap(),
        "going down\n"
    );
    let message = expect_error(
        api.get("/api/runs/1/logs/say?try=2"),
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert!(message.contains("no attempt 2"), "{message}");
    let message = expect_error(
        api.get("/api/runs/1/logs/nope"),
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert!(
        message.contains("\"nope\"") && message.contains("its tasks are: say"),
        "{message}"
    );

    // A large log comes in chunks of at most 1 MiB.
    let chunk = api.get("/api/runs/8/logs/print");
    assert_eq!(header(&chunk, "x-butler-log-size"), "1500000");
    assert_eq!(header(&chunk, "x-butler-log-next-offset"), "1048576");
    let body = chunk.bytes().unwrap();
    assert_eq!(body.len(), 1_048_576);
    let rest = api
        .get("/api/runs/8/logs/print?offset=1048576")
        .bytes()
        .unwrap();
    assert_eq!(rest.len(), 1_500_000 - 1_048_576);
    assert!(body.iter().chain(rest.iter()).all(|b| *b == b'x'));

    // Workers and queues: the server's own worker, and an empty task queue.
    let workers = api.json("/api/workers");
    let worker = &workers[0];
    assert_eq!(worker["state"], "alive", "{workers}");
    assert_eq!(worker["slots"], 2);
    assert_eq!(worker["queue"], "butler.tasks");
    assert!(worker["heartbeat_at"].is_string());
    let queues = api.json("/api/queues");
    assert_eq!(queues[0]["name"], "butler.tasks", "{queues}");
    assert_eq!(queues[0]["ready"], 0);
    assert_eq!(queues[0]["leased"], 0);
    assert_eq!(queues[0]["oldest_ready_age_seconds"], Value::Null);
    assert_eq!(queues[1]["name"], "butler.tasks.python");
}

#[test]
fn workflows_analyses_and_runs_are_created_launched_reset_and_cancelled() {
    let sandbox = Sandbox::new();
    let secret = token(&sandbox, "ci", false);
    let server = sandbox.start_server("server", &[]);
    let api = Api::new(&server, Some(&secret));

    let response = api.post(
        "/api/workflows",
        &json!({
            "name": "greet", "version": "1", "config": {"who": "world"},
            "definition": "[[tasks]]\nid = \"hello\"\nrun = \"echo hello {{ config.who }}\"\n",
        }),
    );
    assert_eq!(header(&response, "location"), "/api/workflows/1");
    let workflow = expect_json(response, StatusCode::CREATED, "create a workflow");
    assert_eq!(workflow["id"], 1);
    assert_eq!(workflow["definition"]["tasks"][0]["id"], "hello");
    let message = expect_error(
        api.post(
            "/api/workflows",
            &json!({"name": "greet", "version": "1", "config": {}, "definition": "[[tasks]]\nid = \"x\"\nrun = \"true\"\n"}),
        ),
        StatusCode::CONFLICT,
        "already_exists",
    );
    assert!(message.contains("greet"), "{message}");
    let json_definition = json!({"tasks": [{"id": "hello", "run": "echo hi {{ config.who }}"}]});
    let second = api.post_json(
        "/api/workflows",
        &json!({"name": "greet", "version": "2", "config": {"who": "json"}, "format": "json",
                "definition": json_definition.to_string()}),
        StatusCode::CREATED,
    );
    assert_eq!(second["version"], "2");
    assert_eq!(api.json("/api/workflows").as_array().map(Vec::len), Some(2));
    assert_eq!(api.json("/api/workflows/2")["name"], "greet");

    let analysis = api.post_json(
        "/api/analyses",
        &json!({"name": "batch", "date": "2024-05-02", "config": {"who": "analysis"}}),
        StatusCode::CREATED,
    );
    assert_eq!(analysis["start_date"], "2024-05-02");
    assert_eq!(api.json("/api/analyses/1")["name"], "batch");
    assert_eq!(api.json("/api/analyses").as_array().map(Vec::len), Some(1));

    // Launched through the API, run by the server.
    let launched = api.post_json(
        "/api/launch",
        &json!({"workflow": 1, "analysis": 1, "runs": [{"who": "alice"}, {"who": "bob"}]}),
        StatusCode::CREATED,
    );
    let runs = launched["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r["status"] == "ready"), "{launched}");
    assert_eq!(
        (runs[0]["id"].as_i64(), runs[1]["id"].as_i64()),
        (Some(1), Some(2))
    );
    api.wait_status(1, "completed");
    api.wait_status(2, "completed");
    assert_eq!(
        api.get("/api/runs/2/logs/hello").text().unwrap(),
        "hello bob\n"
    );

    let message = expect_error(
        api.post(
            "/api/launch",
            &json!({"workflow": 1, "analysis": 1, "runs": [{"who": "alice"}]}),
        ),
        StatusCode::CONFLICT,
        "conflict",
    );
    assert!(
        message.contains("duplicates run 1") && message.contains("allow_duplicates"),
        "{message}"
    );
    assert_eq!(
        api.json("/api/runs/counts")["total"],
        2,
        "nothing was launched"
    );
    let again = api.post_json(
        "/api/launch",
        &json!({"workflow": 1, "analysis": 1, "runs": [{"who": "alice"}], "allow_duplicates": true}),
        StatusCode::CREATED,
    );
    let third = again["runs"][0]["id"].as_i64().expect("an id");
    api.wait_status(third, "completed");

    // Reset every task of a finished run: it runs again, as attempt 2.
    let reset = api.post_json("/api/runs/1/reset", &json!({"all": true}), StatusCode::OK);
    assert_eq!(reset["id"], 1);
    assert_eq!(reset["status"], "ready");
    let detail = api.wait_status(1, "completed");
    assert_eq!(detail["tasks"][0]["try_number"], 2);
    let log = api.get("/api/runs/1/logs/hello");
    assert_eq!(header(&log, "x-butler-try"), "2");
    assert_eq!(log.text().unwrap(), "hello alice\n");
    assert_eq!(
        api.get("/api/runs/1/logs/hello?try=1").text().unwrap(),
        "hello alice\n"
    );
    let events = api.json("/api/runs/1/events");
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["by"] == "api" && e["to"] == "ready"),
        "the reset is recorded as the API's: {events}"
    );
    // Without a body, a reset runs the tasks that did not succeed: none here.
    let response = api.post_raw("/api/runs/2/reset", "application/json", "");
    assert_eq!(
        expect_json(response, StatusCode::OK, "reset")["status"],
        "ready"
    );
    api.wait_status(2, "completed");

    // Cancel a running run: its command is killed.
    let sleep = format!("sleep {}", marker("31."));
    let _cleanup = KillOnDrop(sleep.clone());
    api.post_json(
        "/api/workflows",
        &json!({"name": "sleepy", "version": "1", "config": {},
                "definition": format!("[[tasks]]\nid = \"nap\"\nrun = \"{sleep}\"\n")}),
        StatusCode::CREATED,
    );
    let launched = api.post_json(
        "/api/launch",
        &json!({"workflow": 3, "analysis": 1, "runs": [{}]}),
        StatusCode::CREATED,
    );
    let id = launched["runs"][0]["id"].as_i64().expect("an id");
    wait_until("the task to run", || {
        let detail = api.json(&format!("/api/runs/{id}"));
        let running = detail["tasks"][0]["state"] == "running";
        if running && !processes_with(&sleep).is_empty() {
            Ok(())
        } else {
            Err(detail.to_string())
        }
    });
    let message = expect_error(
        api.post(&format!("/api/runs/{id}/reset"), &json!({})),
        StatusCode::CONFLICT,
        "conflict",
    );
    assert!(
        message.contains("only a finished run can be reset"),
        "{message}"
    );
    let cancelled = api.post_json(
        &format!("/api/runs/{id}/cancel"),
        &json!({}),
        StatusCode::OK,
    );
    assert_eq!(cancelled["status"], "cancelled");
    wait_until("the command to be killed", || {
        let left = processes_with(&sleep);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    let message = expect_error(
        api.post(&format!("/api/runs/{id}/cancel"), &json!({})),
        StatusCode::CONFLICT,
        "conflict",
    );
    assert!(message.contains("already cancelled"), "{message}");
}

#[test]
fn tokens_guard_the_api_and_read_only_tokens_cannot_change_anything() {
    let sandbox = Sandbox::new();
    let writer = token(&sandbox, "admin", false);
    let reader = token(&sandbox, "viewer", true);
    let deleted = token(&sandbox, "gone", false);
    sandbox.ok(&["token", "delete", "--name", "gone"]);
    let server = sandbox.start_server("server", &[]);
    let api = Api::new(&server, Some(&writer));
    api.post_json(
        "/api/analyses",
        &json!({"name": "batch", "config": {}}),
        StatusCode::CREATED,
    );

    for token in [
        None,
        Some("butler_not-a-real-token"),
        Some(deleted.as_str()),
    ] {
        let stranger = api.with_token(token);
        for path in ["/api/runs", "/api/workflows", "/openapi.json"] {
            let message =
                expect_error(stranger.get(path), StatusCode::UNAUTHORIZED, "unauthorized");
            assert!(message.contains("butler token create"), "{message}");
        }
        expect_error(
            stranger.post("/api/analyses", &json!({"name": "x", "config": {}})),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
    }

    let viewer = api.with_token(Some(&reader));
    assert_eq!(viewer.json("/api/analyses")[0]["name"], "batch");
    assert_eq!(viewer.json("/api/runs")["runs"], json!([]));
    assert_eq!(viewer.json("/openapi.json")["info"]["title"], "Butler");
    let writes = [
        (
            "/api/launch",
            json!({"workflow": 1, "analysis": 1, "runs": [{}]}),
        ),
        ("/api/runs/1/reset", json!({"all": true})),
        ("/api/runs/1/cancel", json!({})),
        (
            "/api/workflows",
            json!({"name": "w", "version": "1", "config": {}, "definition": ""}),
        ),
        ("/api/analyses", json!({"name": "x", "config": {}})),
    ];
    for (path, body) in writes {
        let message = expect_error(
            viewer.post(path, &body),
            StatusCode::FORBIDDEN,
            "read_only_token",
        );
        assert!(message.contains("--read-only"), "{message}");
    }
    assert_eq!(api.json("/api/analyses").as_array().map(Vec::len), Some(1));

    // The dashboard's cookie works as well as the header.
    let response = api
        .client
        .get(api.url("/api/analyses"))
        .header("cookie", format!("butler_token={reader}"))
        .send()
        .expect("send");
    assert_eq!(response.status(), StatusCode::OK);
}

#[test]
fn the_openapi_document_covers_every_route_and_no_auth_needs_no_token() {
    let sandbox = Sandbox::new();
    let server = sandbox.start_server("server", &["--no-auth"]);
    let api = Api::new(&server, None);
    api.post_json(
        "/api/workflows",
        &json!({"name": "w", "version": "1", "config": {},
                "definition": "[[tasks]]\nid = \"t\"\nrun = \"echo done\"\n"}),
        StatusCode::CREATED,
    );
    api.post_json(
        "/api/analyses",
        &json!({"name": "a", "config": {}}),
        StatusCode::CREATED,
    );
    api.post_json(
        "/api/launch",
        &json!({"workflow": 1, "analysis": 1, "runs": [{}]}),
        StatusCode::CREATED,
    );
    api.wait_status(1, "completed");

    let document = api.json("/openapi.json");
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        document["openapi"]
    );
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    let paths = document["paths"].as_object().expect("paths");
    let documented: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let contract = BTreeSet::from([
        "/api/workflows",
        "/api/workflows/{id}",
        "/api/analyses",
        "/api/analyses/{id}",
        "/api/runs",
        "/api/runs/counts",
        "/api/launch",
        "/api/runs/{id}",
        "/api/runs/{id}/events",
        "/api/runs/{id}/config",
        "/api/runs/{id}/commands",
        "/api/runs/{id}/logs/{task}",
        "/api/runs/{id}/reset",
        "/api/runs/{id}/cancel",
        "/api/workers",
        "/api/queues",
        "/openapi.json",
    ]);
    assert_eq!(documented, contract);
    assert_eq!(
        paths["/api/runs"]["get"]["parameters"]
            .as_array()
            .map(Vec::len),
        Some(6)
    );
    let run_schema = &document["components"]["schemas"]["Run"]["properties"]["status"]["enum"];
    assert_eq!(run_schema[2], "in-progress", "{run_schema}");

    // Every documented path answers: GET with real ids, and POST-only paths refuse GET with
    // 405 (a path missing from the router would answer 404).
    for (path, item) in paths {
        let real = path.replace("{id}", "1").replace("{task}", "t");
        let response = api.get(&real);
        if item.get("get").is_some() {
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "GET {real}: {}",
                response.text().unwrap()
            );
        } else {
            assert!(item.get("post").is_some(), "{path}");
            let message = expect_error(
                response,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            );
            assert!(message.contains(&real), "{message}");
        }
    }
}

#[test]
fn bad_input_is_refused_with_an_error_naming_the_problem() {
    let sandbox = Sandbox::new();
    let server = sandbox.start_server("server", &["--no-auth"]);
    let api = Api::new(&server, None);
    let bad = |path: &str, needles: &[&str]| {
        let message = expect_error(api.get(path), StatusCode::BAD_REQUEST, "invalid_input");
        for needle in needles {
            assert!(
                message.contains(needle),
                "GET {path}: {message:?} lacks {needle:?}"
            );
        }
    };
    bad(
        "/api/runs?limit=5000",
        &["limit must be between 1 and 1000; got 5000"],
    );
    bad(
        "/api/runs?limit=0",
        &["limit must be between 1 and 1000; got 0"],
    );
    bad("/api/runs?limit=ten", &["limit", "\"ten\""]);
    bad(
        "/api/runs?status=done",
        &["status", "\"done\"", "ready, scheduled, in-progress"],
    );
    bad(
        "/api/runs?order=sideways",
        &["order must be newest or oldest"],
    );
    bad("/api/runs?workflow=first", &["workflow", "\"first\""]);
    bad(
        "/api/runs?stauts=error",
        &["unknown query parameter `stauts`", "status"],
    );
    bad("/api/runs/counts?analysis=-1", &["analysis", "\"-1\""]);
    bad("/api/runs/abc", &["run id", "\"abc\""]);
    bad(
        "/api/runs/1/events?limit=20000",
        &["limit must be between 1 and 10000"],
    );
    bad("/api/runs/1/logs/t?offset=-5", &["offset", "\"-5\""]);

    let missing = |path: &str, needle: &str| {
        let message = expect_error(api.get(path), StatusCode::NOT_FOUND, "not_found");
        assert!(message.contains(needle), "GET {path}: {message}");
    };
    missing("/api/runs/999", "run 999 not found");
    missing("/api/runs/999/events", "run 999 not found");
    missing("/api/runs/999/logs/t", "run 999 not found");
    missing("/api/workflows/7", "workflow 7 not found");
    missing("/api/runs?analysis=5", "analysis 5 not found");
    missing("/api/runs/counts?workflow=5", "workflow 5 not found");
    missing("/api/nothing-here", "/api/nothing-here");

    let message = expect_error(
        api.post_raw("/api/launch", "application/json", "{\"workflow\": 1,"),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert!(message.contains("not valid JSON"), "{message}");
    let message = expect_error(
        api.post_raw(
            "/api/launch",
            "application/x-www-form-urlencoded",
            "workflow=1",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert!(
        message.contains("Content-Type: application/json"),
        "{message}"
    );
    let message = expect_error(
        api.post("/api/launch", &json!({"workflow": 1})),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(message.contains("missing field `analysis`"), "{message}");
    let message = expect_error(
        api.post(
            "/api/launch",
            &json!({"workflow": 1, "analysis": 1, "runs": [], "extra": 1}),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(message.contains("unknown field `extra`"), "{message}");
    let message = expect_error(
        api.post(
            "/api/launch",
            &json!({"workflow": 9, "analysis": 9, "runs": [{}]}),
        ),
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert!(message.contains("workflow 9 not found"), "{message}");
    let message = expect_error(
        api.post(
            "/api/workflows",
            &json!({"name": "loop", "version": "1", "config": {}, "definition":
                "[[tasks]]\nid = \"a\"\nrun = \"true\"\nneeds = [\"b\"]\n[[tasks]]\nid = \"b\"\nrun = \"true\"\nneeds = [\"a\"]\n"}),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(message.contains("cycle"), "{message}");
    let message = expect_error(
        api.post("/api/workflows", &json!({"name": "w", "version": "1", "config": [], "definition": "[[tasks]]\nid = \"a\"\nrun = \"true\"\n"})),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(message.contains("workflow config"), "{message}");
    let message = expect_error(
        api.post(
            "/api/workflows",
            &json!({"name": "w", "version": "1", "config": {}, "format": "yaml", "definition": ""}),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(
        message.contains("format") && message.contains("toml"),
        "{message}"
    );
    let message = expect_error(
        api.post(
            "/api/analyses",
            &json!({"name": "a", "date": "31/12/2024", "config": {}}),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(message.contains("YYYY-MM-DD"), "{message}");
    api.post_json(
        "/api/workflows",
        &json!({"name": "w", "version": "1", "config": {},
        "definition": "[[tasks]]\nid = \"t\"\nrun = \"echo {{ config.sample }}\"\n"}),
        StatusCode::CREATED,
    );
    api.post_json(
        "/api/analyses",
        &json!({"name": "a", "config": {}}),
        StatusCode::CREATED,
    );
    let message = expect_error(
        api.post(
            "/api/launch",
            &json!({"workflow": 1, "analysis": 1, "runs": []}),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(message.contains("nothing to launch"), "{message}");
    let message = expect_error(
        api.post(
            "/api/launch",
            &json!({"workflow": 1, "analysis": 1, "runs": [{"sample": "S1"}, {"other": 1}]}),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(
        message.contains("run config #2") && message.contains("sample"),
        "{message}"
    );
    assert_eq!(
        api.json("/api/runs/counts")["total"],
        0,
        "a refused launch creates nothing"
    );

    let response = api
        .client
        .delete(api.url("/api/runs"))
        .send()
        .expect("send");
    let message = expect_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert!(
        message.contains("/api/runs") && message.contains("DELETE"),
        "{message}"
    );
}
