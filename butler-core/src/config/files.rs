//! Reading config layers from files and finding a launch's run configs.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// Reads and parses the JSON file at `path`.
///
/// A file that cannot be read is an [`Error::InvalidInput`] naming it; invalid JSON is an
/// [`Error::InvalidInput`] of the form `PATH:LINE:COLUMN: invalid JSON: …`.
pub fn read_json_file(path: &Path) -> Result<Value> {
    let bytes = fs::read(path)
        .map_err(|err| Error::InvalidInput(format!("cannot read {}: {err}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|err| {
        Error::InvalidInput(format!(
            "{}:{}:{}: invalid JSON: {}; fix the file and run the command again",
            path.display(),
            err.line(),
            err.column(),
            json_error_message(&err)
        ))
    })
}

/// The message of a serde_json error without its trailing ` at line L column C`.
pub(crate) fn json_error_message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&suffix) {
        Some(message) => message.to_owned(),
        None => text,
    }
}

/// `value`'s JSON type with its article, as messages name it ("an array").
pub(crate) fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Object(_) => "an object",
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    }
}

/// Checks that a config layer is a JSON object; `source` names where it came from in the error.
pub fn require_object(value: &Value, source: &str) -> Result<()> {
    if value.is_object() {
        return Ok(());
    }
    let found = json_type_name(value);
    Err(Error::InvalidInput(format!(
        "{source}: a config must be a JSON object ({{\"key\": value, …}}), found {found}; \
         wrap the settings in an object"
    )))
}

/// The run config files of a launch from `path`, one per run.
///
/// A file is taken as it is. A directory yields every `*.json` file under it, recursively,
/// sorted by the bytes of their paths; symbolic links to files are followed, links to
/// directories are not (so a link cannot make a loop), and names starting with `.` (hidden
/// files and directories, editor leftovers) are skipped, as a shell's `*` would. A missing path,
/// or a directory without any `*.json`, is an [`Error::InvalidInput`].
pub fn run_config_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).map_err(|err| {
        Error::InvalidInput(format!(
            "cannot read run configs at {}: {err}; pass a JSON file or a directory of them",
            path.display()
        ))
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    collect_json_files(path, &mut files)?;
    if files.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no *.json run configs under {}; put one JSON file per run there",
            path.display()
        )));
    }
    files.sort_unstable_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(files)
}

fn collect_json_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let unreadable = |err: std::io::Error| {
        Error::InvalidInput(format!(
            "cannot read directory {}: {err}; check its permissions",
            dir.display()
        ))
    };
    for entry in fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        if name.starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let file_type = entry
            .file_type()
            .map_err(|err| Error::InvalidInput(format!("cannot read {}: {err}", path.display())))?;
        if file_type.is_dir() {
            collect_json_files(&path, files)?;
        } else if name.ends_with(b".json") {
            if file_type.is_symlink() {
                let target = fs::metadata(&path).map_err(|err| {
                    Error::InvalidInput(format!(
                        "cannot read run config {}: {err}; fix or remove the link",
                        path.display()
                    ))
                })?;
                if !target.is_file() {
                    continue;
                }
            }
            files.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::InvalidInput(message)) => message,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn read_json_file_reads_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wf.json");
        fs::write(&path, r#"{"a": {"b": [1, 2]}}"#).unwrap();
        assert_eq!(read_json_file(&path).unwrap(), json!({"a": {"b": [1, 2]}}));
    }

    #[test]
    fn read_json_file_error_shows_path_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        fs::write(&path, "{\n  \"a\": 1,\n  \"b\": 1 2\n}\n").unwrap();
        let msg = message(read_json_file(&path));
        let expected = format!(
            "{}:3:10: invalid JSON: expected `,` or `}}`",
            path.display()
        );
        assert!(msg.starts_with(&expected), "{msg}");
        assert!(!msg.contains(" at line "), "location given twice: {msg}");
        assert!(
            msg.ends_with("fix the file and run the command again"),
            "{msg}"
        );
    }

    #[test]
    fn read_json_file_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.json");
        let msg = message(read_json_file(&path));
        assert!(
            msg.starts_with(&format!("cannot read {}: ", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn require_object_names_source_and_found_type() {
        assert!(require_object(&json!({}), "x").is_ok());
        let msg = message(require_object(&json!([1]), "runs/s1.json"));
        assert!(
            msg.starts_with("runs/s1.json: a config must be a JSON object"),
            "{msg}"
        );
        assert!(msg.contains("found an array"), "{msg}");
        let msg = message(require_object(&json!("x"), "analysis config"));
        assert!(msg.contains("found a string"), "{msg}");
    }

    #[test]
    fn run_config_files_recurses_and_sorts_by_path_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/nested")).unwrap();
        fs::create_dir_all(root.join("a")).unwrap();
        fs::create_dir_all(root.join(".hidden")).unwrap();
        for file in [
            "s10.json",
            "s2.json",
            "a.json",
            "b/nested/z.json",
            "b/c.json",
            "a/x.json",
            "notes.txt",
            "b/nested/readme.md",
            ".editor.json",
            ".hidden/h.json",
        ] {
            fs::write(root.join(file), "{}").unwrap();
        }
        let files = run_config_files(root).unwrap();
        let relative: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        // Byte order: "a.json" (0x2e) sorts before "a/x.json" (0x2f).
        assert_eq!(
            relative,
            [
                "a.json",
                "a/x.json",
                "b/c.json",
                "b/nested/z.json",
                "s10.json",
                "s2.json"
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn run_config_files_follows_links_to_files() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("real.json");
        fs::write(&target, "{}").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("linked.json")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("dirlink")).unwrap();
        let files = run_config_files(dir.path()).unwrap();
        assert_eq!(files, [dir.path().join("linked.json")]);
    }

    #[test]
    fn run_config_files_takes_a_file_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.json");
        fs::write(&path, "{}").unwrap();
        assert_eq!(run_config_files(&path).unwrap(), [path]);
    }

    #[test]
    fn run_config_files_rejects_missing_path_and_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let msg = message(run_config_files(&missing));
        assert!(msg.contains(&missing.display().to_string()), "{msg}");

        fs::write(dir.path().join("readme.txt"), "").unwrap();
        let msg = message(run_config_files(dir.path()));
        assert_eq!(
            msg,
            format!(
                "no *.json run configs under {}; put one JSON file per run there",
                dir.path().display()
            )
        );
    }

    #[test]
    fn run_config_files_lists_ten_thousand_files() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10_000 {
            fs::write(dir.path().join(format!("s{i:05}.json")), "{}").unwrap();
        }
        let files = run_config_files(dir.path()).unwrap();
        assert_eq!(files.len(), 10_000);
        assert!(files.windows(2).all(|w| w[0] < w[1]));
    }
}
