//! Runs the real `butler` binary against a temporary `BUTLER_HOME`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// A scratch directory with its own `BUTLER_HOME` (at `home/`, not created in advance) that
/// every command runs in.
pub struct Sandbox {
    dir: TempDir,
}

/// What one run of `butler` printed and how it exited.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

impl Outcome {
    /// stdout parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// stdout's lines, split on whitespace, without the header line.
    pub fn rows(&self) -> Vec<Vec<String>> {
        self.stdout
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().map(str::to_owned).collect())
            .collect()
    }

    /// The id in a `Created … with ID: N` line.
    pub fn created_id(&self) -> i64 {
        self.stdout
            .trim()
            .rsplit_once("ID: ")
            .and_then(|(_, id)| id.parse().ok())
            .unwrap_or_else(|| panic!("no `ID: N` in stdout: {:?}", self.stdout))
    }
}

impl Sandbox {
    /// A fresh sandbox.
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }

    /// The sandbox directory, the commands' working directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `BUTLER_HOME` of the commands.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `butler ARGS` in the sandbox, with `extra_env` added to its environment.
    fn command(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_butler"));
        command
            .args(args)
            .current_dir(self.path())
            .env("BUTLER_HOME", self.home())
            .env("HOME", self.path())
            .env_remove("BUTLER_DB")
            .env_remove("BUTLER_QUEUE")
            .env_remove("BUTLER_LOG");
        for (name, value) in extra_env {
            command.env(name, value);
        }
        command
    }

    /// Runs `butler ARGS` with `extra_env` added to the sandbox's environment.
    pub fn run_with_env(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Outcome {
        let output = self
            .command(args, extra_env)
            .output()
            .expect("run the butler binary");
        Outcome {
            stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
            code: output
                .status
                .code()
                .expect("butler exited, not killed by a signal"),
        }
    }

    /// Runs `butler ARGS`.
    pub fn run(&self, args: &[&str]) -> Outcome {
        self.run_with_env(args, &[])
    }

    /// Runs `butler ARGS` and checks that it succeeded.
    pub fn ok(&self, args: &[&str]) -> Outcome {
        let outcome = self.run(args);
        assert_eq!(
            outcome.code, 0,
            "butler {args:?} failed:\nstdout: {}\nstderr: {}",
            outcome.stdout, outcome.stderr
        );
        outcome
    }

    /// Runs `butler ARGS`, checks that it failed with exit code 1 and an `error: ` line, and
    /// returns stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        self.fail_with(1, args)
    }

    /// Runs `butler ARGS`, checks that it was refused as a usage error (exit code 2) with an
    /// `error: ` line before touching `BUTLER_HOME`, and returns stderr.
    pub fn usage_error(&self, args: &[&str]) -> String {
        let had_home = self.home().exists();
        let stderr = self.fail_with(2, args);
        assert_eq!(
            self.home().exists(),
            had_home,
            "a usage error must not touch BUTLER_HOME: butler {args:?}"
        );
        stderr
    }

    fn fail_with(&self, code: i32, args: &[&str]) -> String {
        let outcome = self.run(args);
        assert_eq!(
            outcome.code, code,
            "butler {args:?} should fail with {code}:\nstdout: {}\nstderr: {}",
            outcome.stdout, outcome.stderr
        );
        assert!(
            outcome.stderr.starts_with("error: "),
            "no `error: ` prefix: {}",
            outcome.stderr
        );
        assert!(
            !outcome.stderr.contains("panicked"),
            "butler panicked: {}",
            outcome.stderr
        );
        outcome.stderr
    }

    /// Writes `text` to `relative` under the sandbox, creating directories, and returns the
    /// relative path as a string for use as an argument.
    pub fn write(&self, relative: &str, text: &str) -> String {
        let path = self.path().join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parent directories");
        }
        fs::write(&path, text).expect("write a sandbox file");
        relative.to_owned()
    }

    /// Copies example `name` (from the repository's `examples/`) into the sandbox under
    /// `name/`, and returns that relative directory.
    pub fn copy_example(&self, name: &str) -> String {
        copy_dir(&example(name), &self.path().join(name));
        name.to_owned()
    }

    /// Registers the hello example's `test` workflow (definition from `--definition`) and
    /// returns its id.
    pub fn hello_workflow(&self) -> i64 {
        let dir = example("hello");
        self.ok(&[
            "create-workflow",
            "-n",
            "test",
            "-v",
            "1.0",
            "-c",
            path_str(&dir.join("workflow-config.json")),
            "--definition",
            path_str(&dir.join("workflows/test.toml")),
        ])
        .created_id()
    }

    /// Creates the hello example's analysis and returns its id.
    pub fn hello_analysis(&self) -> i64 {
        let dir = example("hello");
        self.ok(&[
            "create-analysis",
            "-n",
            "hello",
            "-d",
            "2024-03-31",
            "-c",
            path_str(&dir.join("analysis-config.json")),
        ])
        .created_id()
    }

    /// Launches `config` (a file or directory) for the workflow and analysis and returns the
    /// printed run ids.
    pub fn launch(&self, workflow: i64, analysis: i64, config: &str) -> Vec<i64> {
        let outcome = self.ok(&[
            "launch-workflow",
            "-w",
            &workflow.to_string(),
            "-a",
            &analysis.to_string(),
            "-c",
            config,
        ]);
        run_ids(&outcome)
    }

    /// The parsed `list-runs --json` output.
    pub fn runs(&self) -> Vec<Value> {
        match self.ok(&["list-runs", "--json"]).json() {
            Value::Array(runs) => runs,
            other => panic!("list-runs --json printed {other}"),
        }
    }

    /// The effective config of run `id`.
    pub fn effective_config(&self, id: i64) -> Value {
        self.ok(&["print-effective-config", "-r", &id.to_string()])
            .json()
    }
}

impl Sandbox {
    /// Starts `butler ARGS` in the background; its stdout and stderr go to files in the sandbox
    /// named after `name`. The process is killed when the returned value is dropped.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Background {
        self.spawn_with_env(name, args, &[])
    }

    /// [`Sandbox::spawn`] with `extra_env` added to the process's environment.
    pub fn spawn_with_env(
        &self,
        name: &str,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Background {
        let logs = self.path().join("background");
        fs::create_dir_all(&logs).expect("create the background log directory");
        let stdout = logs.join(format!("{name}.out"));
        let stderr = logs.join(format!("{name}.err"));
        let child = self
            .command(args, extra_env)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create a stdout file"))
            .stderr(fs::File::create(&stderr).expect("create a stderr file"))
            .spawn()
            .expect("start the butler binary");
        Background {
            child,
            stdout,
            stderr,
        }
    }

    /// Registers a workflow named `name` from an inline definition and config and returns its
    /// id.
    pub fn workflow(&self, name: &str, definition: &str, config: &Value) -> i64 {
        let definition = self.write(&format!("defs/{name}.toml"), definition);
        let config = self.write(&format!("defs/{name}.json"), &config.to_string());
        self.ok(&[
            "create-workflow",
            "-n",
            name,
            "-v",
            "1",
            "-c",
            &config,
            "--definition",
            &definition,
        ])
        .created_id()
    }

    /// Creates an analysis with `config` and returns its id.
    pub fn analysis(&self, config: &Value) -> i64 {
        let config = self.write("defs/analysis.json", &config.to_string());
        self.ok(&["create-analysis", "-n", "a", "-c", &config])
            .created_id()
    }

    /// The parsed `run-status -r ID --json` output.
    pub fn run_status(&self, id: i64) -> Value {
        self.ok(&["run-status", "-r", &id.to_string(), "--json"])
            .json()
    }

    /// The parsed `events -r ID --json` output.
    pub fn events(&self, id: i64) -> Vec<Value> {
        match self.ok(&["events", "-r", &id.to_string(), "--json"]).json() {
            Value::Array(events) => events,
            other => panic!("events --json printed {other}"),
        }
    }

    /// The status of every run, oldest first, from `list-runs --json`.
    pub fn run_statuses(&self) -> Vec<String> {
        self.runs()
            .iter()
            .map(|run| run["status"].as_str().expect("a status").to_owned())
            .collect()
    }
}

impl Sandbox {
    /// Runs `butler ARGS` like [`Sandbox::run`], but fails the test instead of hanging when it
    /// does not end within twice [`PATIENCE`]: for commands that run the engine.
    pub fn run_engine(&self, args: &[&str]) -> Outcome {
        let mut background = self.spawn("engine", args);
        let status = background.wait_exit(PATIENCE * 2);
        Outcome {
            stdout: background.stdout(),
            stderr: background.stderr(),
            code: status
                .code()
                .unwrap_or_else(|| panic!("butler {args:?} was killed: {status}")),
        }
    }

    /// [`Sandbox::run_engine`], checking that the command succeeded.
    pub fn ok_engine(&self, args: &[&str]) -> Outcome {
        let outcome = self.run_engine(args);
        assert_eq!(
            outcome.code, 0,
            "butler {args:?} failed:\nstdout: {}\nstderr: {}",
            outcome.stdout, outcome.stderr
        );
        outcome
    }
}

/// A string unique to this test process, for a task's command line, so the test can find the
/// task's processes in `/proc`: `base` followed by the process id (`sleep 29.0012345`).
pub fn marker(base: &str) -> String {
    format!("{base}{:07}", std::process::id())
}

/// A `butler` process started in the background; killed (SIGKILL) when dropped.
pub struct Background {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Background {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Sends `signal` (a `kill -s` name such as `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the process") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "butler (pid {}) did not exit within {timeout:?}; stderr:\n{}",
                self.pid(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long a test waits for something the engine does: generous, as the machine may be busy.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `condition` every 100 ms until it holds, failing the test after [`PATIENCE`] with
/// `what` and the last state `condition` reported.
pub fn wait_until<T>(what: &str, mut condition: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match condition() {
            Ok(value) => return value,
            Err(state) if Instant::now() >= deadline => {
                panic!("gave up after {PATIENCE:?} waiting for {what}; last seen: {state}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Ids of this machine's processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid != me && cmdline.contains(marker)).then_some(pid)
        })
        .collect()
}

/// Kills (SIGKILL) every process whose command line contains `marker`: the task processes a
/// test started, which a killed `butler` leaves behind.
pub fn kill_processes_with(marker: &str) {
    for pid in processes_with(marker) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Kills the processes with a marker in their command line when dropped, so a failing test
/// leaves nothing running.
pub struct KillOnDrop(pub String);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_processes_with(&self.0);
    }
}

/// The ids `launch-workflow` printed on stdout, one per line.
pub fn run_ids(outcome: &Outcome) -> Vec<i64> {
    outcome
        .stdout
        .lines()
        .map(|line| {
            line.parse()
                .unwrap_or_else(|_| panic!("not a run id: {line:?}"))
        })
        .collect()
}

/// The directory of example `name` in the repository.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// A path as a command-line argument.
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create the copy's directory");
    for entry in fs::read_dir(from).expect("read an example directory") {
        let entry = entry.expect("read an example entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy an example file");
        }
    }
}
