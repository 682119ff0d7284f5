//! `butler token`: API tokens are created with a one-time secret, listed without it, and
//! deleted.

use crate::util::Sandbox;

#[test]
fn a_token_is_created_listed_and_deleted() {
    let sandbox = Sandbox::new();
    let created = sandbox.ok(&["token", "create", "--name", "ci", "--read-only"]);
    let lines: Vec<&str> = created.stdout.lines().collect();
    assert!(
        lines[0].contains("read-only token ci"),
        "{}",
        created.stdout
    );
    let secret = lines[1];
    assert!(
        secret.starts_with("butler_") && secret.len() == 71,
        "{secret}"
    );

    let listed = sandbox.ok(&["token", "list", "--json"]).json();
    assert_eq!(listed[0]["name"], "ci");
    assert_eq!(listed[0]["scope"], "read-only");
    let table = sandbox.ok(&["token", "list"]).stdout;
    assert!(
        !table.contains(secret),
        "the secret is never shown again:\n{table}"
    );
    let database = std::fs::read(sandbox.home().join("butler.db")).expect("read the database");
    let text = String::from_utf8_lossy(&database);
    assert!(
        !text.contains(secret),
        "the secret is not stored, only its hash"
    );

    let again = sandbox.fail(&["token", "create", "--name", "ci"]);
    assert!(
        again.contains("already exists") && again.contains("token delete --name ci"),
        "{again}"
    );
    sandbox.ok(&["token", "delete", "--name", "ci"]);
    assert_eq!(
        sandbox.ok(&["token", "list", "--json"]).json(),
        serde_json::json!([])
    );
    let missing = sandbox.fail(&["token", "delete", "--name", "ci"]);
    assert!(missing.contains("token ci not found"), "{missing}");
}
