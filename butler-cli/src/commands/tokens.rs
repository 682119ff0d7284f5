//! `token create`, `token list` and `token delete`: the API tokens of `butler server`.

use std::io::Write;

use anyhow::{Result, bail};
use butler_core::model::NewToken;
use butler_core::tracker::Tracker;
use serde_json::Value;

use crate::opt::{TokenCommand, TokenCreate};
use crate::output::{Table, precise_timestamp};

/// Runs one `token` subcommand.
pub async fn run(tracker: &Tracker, command: TokenCommand, out: &mut impl Write) -> Result<()> {
    match command {
        TokenCommand::Create(args) => create(tracker, args, out).await,
        TokenCommand::List(args) => list(tracker, args.json, out).await,
        TokenCommand::Delete(args) => {
            tracker.store().delete_token(&args.name).await?;
            writeln!(out, "Deleted token {}", args.name)?;
            Ok(())
        }
    }
}

async fn create(tracker: &Tracker, args: TokenCreate, out: &mut impl Write) -> Result<()> {
    let name = args.name.trim();
    if name.is_empty() || name.chars().any(char::is_control) {
        bail!(
            "--name {:?} is not a name; give a printable one such as ci-launcher",
            args.name
        );
    }
    let (token, secret) = NewToken::generate(name, args.read_only);
    tracker.store().create_token(token).await?;
    let scope = if args.read_only {
        "read-only"
    } else {
        "read-write"
    };
    writeln!(
        out,
        "Created {scope} token {name}. Its secret, shown only this once:"
    )?;
    writeln!(out, "{secret}")?;
    Ok(())
}

async fn list(tracker: &Tracker, json: bool, out: &mut impl Write) -> Result<()> {
    let mut table = Table::new(&["NAME", "SCOPE", "CREATED"]);
    for token in tracker.store().list_tokens().await? {
        let scope = if token.read_only {
            "read-only"
        } else {
            "read-write"
        };
        table.push(vec![
            Value::from(token.name),
            Value::from(scope),
            precise_timestamp(token.created_at),
        ]);
    }
    table.print(out, json)?;
    Ok(())
}
