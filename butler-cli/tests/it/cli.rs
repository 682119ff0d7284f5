//! What every command shares: `--version`, usage errors, `--db`, `BUTLER_DB` and `BUTLER_HOME`.

use std::fs;

use butler_providers::connect::default_store_url;

use crate::util::Sandbox;

#[test]
fn version_is_printed() {
    let outcome = Sandbox::new().ok(&["--version"]);
    assert_eq!(
        outcome.stdout,
        format!("butler {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_with_2() {
    let sandbox = Sandbox::new();
    for args in [
        &["no-such-command"][..],
        &["create-workflow", "-n", "x"],
        &["launch-workflow", "-w", "one", "-a", "1", "-c", "runs"],
        &["list-runs", "--limit", "-3"],
        &[],
    ] {
        let outcome = sandbox.run(args);
        assert_eq!(outcome.code, 2, "butler {args:?}: {outcome:?}");
        assert!(outcome.stdout.is_empty(), "{outcome:?}");
        assert!(
            outcome.stderr.starts_with("error: ") || outcome.stderr.contains("Usage: butler"),
            "{outcome:?}"
        );
    }
    assert!(
        !sandbox.home().exists(),
        "a usage error must not touch BUTLER_HOME"
    );
}

#[test]
fn a_missing_or_bad_input_file_is_refused_before_butler_home_is_created() {
    let sandbox = Sandbox::new();
    let definition = sandbox.write("hello.toml", "[[tasks]]\nid = \"a\"\nrun = \"true\"\n");
    let bad = sandbox.write("bad.json", "{\"a\": 1,}");
    let create_workflow = |config| {
        let args = "create-workflow -n w -v 1 --definition".split(' ');
        args.chain([definition.as_str(), "-c", config])
            .collect::<Vec<_>>()
    };
    let launch = |config, wait| {
        let args = "launch-workflow -w 1 -a 1 -c".split(' ');
        args.chain([config]).chain(wait).collect::<Vec<_>>()
    };
    let cases = [
        (create_workflow("nowhere.json"), "nowhere.json"),
        (create_workflow(&bad), "bad.json"),
        (
            vec!["create-analysis", "-n", "a", "-c", "nowhere.json"],
            "nowhere.json",
        ),
        (vec!["update-config", "-w", "1", "-c", &bad], "bad.json"),
        (launch("nowhere", None), "nowhere"),
        (launch(&bad, Some("--wait")), "bad.json"),
    ];
    for (args, file) in cases {
        let stderr = sandbox.fail(&args);
        assert!(
            stderr.contains(file),
            "butler {args:?} must name {file}: {stderr}"
        );
        assert!(
            !sandbox.home().exists(),
            "butler {args:?} failed on its input but created BUTLER_HOME"
        );
    }
}

#[test]
fn help_lists_butlers_commands() {
    let help = Sandbox::new().ok(&["--help"]).stdout;
    for command in [
        "create-workflow",
        "list-workflows",
        "create-analysis",
        "list-analyses",
        "launch-workflow",
        "list-runs",
        "update-config",
        "get-run-count",
        "print-effective-config",
        "print-config",
        "print-commands",
        "wait",
        "server",
        "worker",
        "run-status",
        "logs",
        "events",
        "reset-run",
        "cancel-run",
    ] {
        assert!(
            help.contains(command),
            "{command} missing from --help:\n{help}"
        );
    }
}

#[test]
fn butler_home_is_created_on_first_use() {
    let sandbox = Sandbox::new();
    let home = sandbox.path().join("deep/new/home");
    let outcome = sandbox.run_with_env(
        &["list-workflows"],
        &[("BUTLER_HOME", home.to_str().unwrap())],
    );
    assert_eq!(outcome.code, 0, "{outcome:?}");
    assert!(home.is_dir());
}

#[test]
fn home_defaults_to_dot_butler_under_home() {
    let sandbox = Sandbox::new();
    let outcome = sandbox.run_with_env(&["list-analyses"], &[("BUTLER_HOME", "")]);
    assert_eq!(outcome.code, 0, "{outcome:?}");
    assert!(sandbox.path().join(".butler").is_dir());
}

#[test]
fn db_flag_and_env_point_at_another_store() {
    let sandbox = Sandbox::new();
    let other_dir = sandbox.path().join("other");
    fs::create_dir_all(&other_dir).unwrap();
    let other = default_store_url(&other_dir);

    sandbox.hello_workflow();
    let config = sandbox.write("wf.json", "{}");
    let definition = sandbox.write("def.toml", "[[tasks]]\nid = \"a\"\nrun = \"true\"\n");
    let created = sandbox.ok(&[
        "--db",
        &other,
        "create-workflow",
        "-n",
        "elsewhere",
        "-v",
        "1",
        "-c",
        &config,
        "--definition",
        &definition,
    ]);
    assert_eq!(
        created.created_id(),
        1,
        "the other store starts its own ids"
    );

    let names = |outcome: crate::util::Outcome| -> Vec<String> {
        outcome
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(sandbox.ok(&["list-workflows", "--json"])), ["test"]);
    assert_eq!(
        names(sandbox.ok(&["list-workflows", "--json", "--db", &other])),
        ["elsewhere"]
    );
    let via_env = sandbox.run_with_env(
        &["list-workflows", "--json"],
        &[("BUTLER_DB", other.as_str())],
    );
    assert_eq!(via_env.code, 0, "{via_env:?}");
    assert_eq!(names(via_env), ["elsewhere"]);
}

#[test]
fn an_unusable_store_url_is_an_error_not_a_panic() {
    let sandbox = Sandbox::new();
    let stderr = sandbox.fail(&["--db", "nosuchscheme://x", "list-workflows"]);
    assert!(stderr.contains("nosuchscheme"), "{stderr}");
}

#[test]
fn a_home_that_cannot_be_created_is_named() {
    let sandbox = Sandbox::new();
    let file = sandbox.write("not-a-dir", "");
    let home = sandbox.path().join(&file).join("home");
    let outcome = sandbox.run_with_env(
        &["list-workflows"],
        &[("BUTLER_HOME", home.to_str().unwrap())],
    );
    assert_eq!(outcome.code, 1, "{outcome:?}");
    assert!(
        outcome
            .stderr
            .starts_with("error: cannot create Butler's home"),
        "{}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("BUTLER_HOME"), "{}", outcome.stderr);
}
