//! The local executor, running real `sh -c` processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use butler_core::executor::{
    Attempt, CONFIG_FILE, CancellationToken, Executor, Finished, LOG_FILE, Outcome, attempt_dir,
};
use butler_providers::local::{LocalExecutor, SCRIPT_FILE};
use serde_json::json;

fn attempt(home: &Path, command: &str) -> Attempt {
    Attempt {
        run_id: 7,
        task_id: "align".to_owned(),
        try_number: 2,
        command: command.to_owned(),
        env: BTreeMap::new(),
        workdir: attempt_dir(home, 7, "align", 2),
        config: json!({"run_id": 7, "sample": "S1", "threads": [1, 2]}).into(),
        timeout: None,
    }
}

async fn execute(attempt: Attempt) -> Finished {
    LocalExecutor::new()
        .execute(attempt, CancellationToken::new())
        .await
        .expect("the attempt is set up")
}

fn log(finished: &Finished) -> String {
    std::fs::read_to_string(&finished.log_path).expect("the log exists")
}

/// Asserts that the attempt exited with 0 and logged `expected` (its log shows if it did not).
fn assert_exited_zero_logging(finished: &Finished, expected: &str) {
    let logged = log(finished);
    assert_eq!(
        finished.outcome,
        Outcome::Exited { code: 0 },
        "log: {logged}"
    );
    assert_eq!(logged, expected);
}

/// Command lines of the live processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is mounted")
        .flatten()
    {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may end between listing and reading; a zombie's command line is empty.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!("{}: {cmdline}", name.to_string_lossy()));
        }
    }
    found
}

/// Fails unless every process with `marker` is gone; SIGKILL is delivered asynchronously, so
/// a killed process may take a moment to disappear.
async fn assert_no_process_with(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes survived the attempt: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn echo_output_lands_in_the_log() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(home.path(), "echo hello; echo world");
    let workdir = attempt.workdir.clone();

    let finished = execute(attempt).await;

    assert_exited_zero_logging(&finished, "hello\nworld\n");
    assert!(finished.outcome.succeeded());
    assert_eq!(finished.log_path, workdir.join(LOG_FILE));
}

#[tokio::test]
async fn stdout_and_stderr_interleave_in_one_log() {
    let home = tempfile::tempdir().unwrap();
    let command = "echo one; echo two >&2; echo three; echo four >&2";

    let finished = execute(attempt(home.path(), command)).await;

    assert_eq!(log(&finished), "one\ntwo\nthree\nfour\n");
}

#[tokio::test]
async fn exit_code_is_reported() {
    let home = tempfile::tempdir().unwrap();

    let finished = execute(attempt(home.path(), "echo partial; exit 3")).await;

    assert_eq!(finished.outcome, Outcome::Exited { code: 3 });
    assert!(!finished.outcome.succeeded());
    assert_eq!(finished.outcome.describe(), "exit code 3");
    assert_eq!(log(&finished), "partial\n");
}

#[tokio::test]
async fn butler_variables_point_at_the_attempt_and_its_config() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(
        home.path(),
        r#"printf '%s\n' "$BUTLER_RUN_ID" "$BUTLER_TASK_ID" "$BUTLER_TRY" "$BUTLER_CONFIG""#,
    );
    let config = attempt.config.clone();
    let config_path = attempt.workdir.join(CONFIG_FILE);

    let finished = execute(attempt).await;

    assert_eq!(
        log(&finished),
        format!("7\nalign\n2\n{}\n", config_path.display())
    );
    assert!(config_path.is_absolute());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(written, *config);
}

#[tokio::test]
async fn task_env_is_passed_and_butler_variables_win() {
    let home = tempfile::tempdir().unwrap();
    let mut attempt = attempt(home.path(), r#"echo "$GREETING $BUTLER_TRY""#);
    attempt.env.insert("GREETING".into(), "hi there".into());
    attempt.env.insert("BUTLER_TRY".into(), "99".into());

    let finished = execute(attempt).await;

    assert_eq!(log(&finished), "hi there 2\n");
}

#[tokio::test]
async fn a_task_path_without_a_shell_still_runs_the_command() {
    let home = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let tool = tools.path().join("greet");
    std::fs::write(&tool, "#!/bin/sh\necho greeted\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut attempt = attempt(home.path(), "greet");
    // A PATH of the task's own tools only: the shell is not looked up along it.
    attempt
        .env
        .insert("PATH".into(), tools.path().to_string_lossy().into_owned());

    let finished = execute(attempt).await;

    assert_exited_zero_logging(&finished, "greeted\n");
}

#[tokio::test]
async fn a_command_too_long_for_an_argument_runs_from_a_script_file() {
    let home = tempfile::tempdir().unwrap();
    // Linux refuses a single argument over 128 KiB; this one is 260 KB.
    let files: Vec<String> = (0..20_000).map(|i| format!("S{i:07}.bam")).collect();
    let command = format!(
        "set -- {}; echo \"$# files, the last ${{20000}}\"",
        files.join(" ")
    );
    assert!(command.len() > 128 * 1024);
    let attempt = attempt(home.path(), &command);
    let script = attempt.workdir.join(SCRIPT_FILE);

    let finished = execute(attempt).await;

    assert_exited_zero_logging(&finished, "20000 files, the last S0019999.bam\n");
    assert_eq!(std::fs::read_to_string(script).unwrap(), command);
}

#[tokio::test]
async fn a_short_command_leaves_no_script_file() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(home.path(), "echo short");
    let script = attempt.workdir.join(SCRIPT_FILE);

    let finished = execute(attempt).await;

    assert_eq!(log(&finished), "short\n");
    assert!(!script.exists());
}

#[tokio::test]
async fn command_runs_in_the_workdir() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(home.path(), "pwd -P; echo data > result.txt");
    let workdir = attempt.workdir.clone();

    let finished = execute(attempt).await;

    let cwd = PathBuf::from(log(&finished).trim_end());
    assert_eq!(cwd, workdir.canonicalize().unwrap());
    assert_eq!(
        std::fs::read_to_string(workdir.join("result.txt")).unwrap(),
        "data\n"
    );
}

#[tokio::test]
async fn timeout_kills_the_command_and_its_children() {
    let home = tempfile::tempdir().unwrap();
    let mut attempt = attempt(home.path(), "sleep 31.25 & sleep 31.25; wait");
    attempt.timeout = Some(Duration::from_millis(500));
    let started = Instant::now();

    let finished = execute(attempt).await;

    let took = started.elapsed();
    assert_eq!(finished.outcome, Outcome::TimedOut);
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "took {took:?}"
    );
    assert_no_process_with("31.25").await;
}

#[tokio::test]
async fn cancel_kills_the_command_and_its_children() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(home.path(), "sleep 31.75 & sleep 31.75; wait");
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let running = tokio::spawn(async move { LocalExecutor::new().execute(attempt, token).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !processes_with("31.75").is_empty(),
        "the command should be running before the cancel"
    );

    let cancelled_at = Instant::now();
    cancel.cancel();
    let finished = running.await.unwrap().unwrap();

    assert_eq!(finished.outcome, Outcome::Cancelled);
    assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    assert_no_process_with("31.75").await;
}

#[tokio::test]
async fn cancelled_before_start_runs_nothing() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(home.path(), "touch ran");
    let workdir = attempt.workdir.clone();
    let cancel = CancellationToken::new();
    cancel.cancel();

    let finished = LocalExecutor::new().execute(attempt, cancel).await.unwrap();

    assert_eq!(finished.outcome, Outcome::Cancelled);
    assert!(!workdir.join("ran").exists());
}

#[tokio::test]
async fn background_jobs_do_not_outlive_a_finished_command() {
    let home = tempfile::tempdir().unwrap();

    let finished = execute(attempt(home.path(), "sleep 32.5 & echo started")).await;

    assert_exited_zero_logging(&finished, "started\n");
    assert_no_process_with("32.5").await;
}

#[tokio::test]
async fn dropping_the_attempt_kills_its_processes() {
    let home = tempfile::tempdir().unwrap();
    let attempt = attempt(home.path(), "sleep 33.5 & sleep 33.5; wait");
    let executor = LocalExecutor::new();

    let result = tokio::time::timeout(
        Duration::from_millis(300),
        executor.execute(attempt, CancellationToken::new()),
    )
    .await;

    assert!(result.is_err(), "the command should still be running");
    assert_no_process_with("33.5").await;
}

#[tokio::test]
async fn a_signal_is_reported_as_such() {
    let home = tempfile::tempdir().unwrap();

    let finished = execute(attempt(home.path(), "kill -TERM $$")).await;

    assert_eq!(finished.outcome, Outcome::Signalled { signal: 15 });
    assert_eq!(finished.outcome.exit_code(), None);
}

#[tokio::test]
async fn unwritable_workdir_is_an_error_naming_the_path() {
    let home = tempfile::tempdir().unwrap();
    // A directory below a regular file cannot be created, even by root.
    let file = home.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let mut attempt = attempt(home.path(), "true");
    attempt.workdir = file.join("runs/7/align/2");

    let err = LocalExecutor::new()
        .execute(attempt, CancellationToken::new())
        .await
        .expect_err("the workdir cannot be created");

    let message = err.to_string();
    assert!(
        message.contains(&*file.join("runs/7/align/2").to_string_lossy()),
        "{message}"
    );
}

#[tokio::test]
async fn unknown_command_exits_127_and_says_so_in_the_log() {
    let home = tempfile::tempdir().unwrap();

    let finished = execute(attempt(home.path(), "butler-no-such-command-4711")).await;

    assert_eq!(finished.outcome, Outcome::Exited { code: 127 });
    let log = log(&finished);
    assert!(
        log.contains("butler-no-such-command-4711") && log.contains("not found"),
        "{log}"
    );
}
