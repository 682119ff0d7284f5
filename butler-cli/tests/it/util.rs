//! Runs the real `butler` binary against a temporary `BUTLER_HOME`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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

    /// Runs `butler ARGS` with `extra_env` added to the sandbox's environment.
    pub fn run_with_env(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Outcome {
        let mut command = Command::new(env!("CARGO_BIN_EXE_butler"));
        command
            .args(args)
            .current_dir(self.path())
            .env("BUTLER_HOME", self.home())
            .env("HOME", self.path())
            .env_remove("BUTLER_DB")
            .env_remove("BUTLER_LOG");
        for (name, value) in extra_env {
            command.env(name, value);
        }
        let output = command.output().expect("run the butler binary");
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
        let outcome = self.run(args);
        assert_eq!(
            outcome.code, 1,
            "butler {args:?} should fail with 1:\nstdout: {}\nstderr: {}",
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
