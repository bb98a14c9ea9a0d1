//! One mistake, one error, as an editor sees it.
//!
//! rustc's terminal output hides a diagnostic identical to one already shown, and trybuild
//! compares that text; an editor reads `--message-format=json`, which is what this check counts.
//! It rebuilds the cases of trybuild's last run (its scratch package under
//! `target/tests/trybuild/effects-tests`, whose dependencies are already built) in one cargo
//! invocation with the flags trybuild used, attributes every error diagnostic to its case by the
//! source path cargo reports, and fails if a compile-fail case gives more than one error (or
//! none), unless the case is a listed exception.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Cases that deliberately give more than one error, with how many and why.
pub(crate) const EXCEPTIONS: &[(&str, usize, &str)] = &[(
    "ui/schema/merge-into-one-slot.rs",
    2,
    "`merges: [BlockCard]` into a schema with two `one` slots of BlockCard's types: each slot \
     that cannot absorb is a separate fix, so each is named",
)];

/// rustc flags trybuild passes (its `rustflags.rs` and `build_all_tests`): the same flags, so
/// cargo reuses the dependencies trybuild built.
const RUSTFLAGS: &str =
    r#"["--cfg", "trybuild", "--verbose", "-A", "dead_code", "--diagnostic-width=140"]"#;

/// Error diagnostics per source file in cargo's JSON messages.
pub(crate) fn errors_by_file(json: &str) -> BTreeMap<PathBuf, Vec<String>> {
    let mut out: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-message" || msg["message"]["level"] != "error" {
            continue;
        }
        let text = msg["message"]["message"].as_str().unwrap_or_default();
        if text.starts_with("aborting due to") {
            continue;
        }
        let Some(src) = msg["target"]["src_path"].as_str() else {
            continue;
        };
        out.entry(PathBuf::from(src))
            .or_default()
            .push(text.to_owned());
    }
    out
}

/// The cases whose error count is not the expected one: one per case, or the exception's count.
pub(crate) fn violations(
    cases: &[PathBuf],
    errors: &BTreeMap<PathBuf, Vec<String>>,
    tests_dir: &Path,
) -> Vec<String> {
    let mut out = Vec::new();
    for case in cases {
        let name = case
            .strip_prefix(tests_dir)
            .unwrap_or(case)
            .to_string_lossy()
            .into_owned();
        let expected = EXCEPTIONS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or(1, |(_, count, _)| *count);
        let found = errors.get(case).map_or(&[][..], Vec::as_slice);
        if found.len() != expected {
            out.push(format!(
                "{name}: {} error diagnostic(s), expected {expected}:\n    {}",
                found.len(),
                found.join("\n    ")
            ));
        }
    }
    out
}

/// The compile-fail cases under `tests/ui`.
pub(crate) fn compile_fail_cases(tests_dir: &Path) -> Vec<PathBuf> {
    let mut cases = Vec::new();
    for group in ["schema", "derive", "handler"] {
        let dir = tests_dir.join("ui").join(group);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                cases.push(path.canonicalize().expect("the case's path"));
            }
        }
    }
    cases.sort();
    cases
}

/// The host target, which trybuild builds for.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV prints the host")
}

/// Builds trybuild's scratch package with JSON messages and checks every compile-fail case.
pub(crate) fn check() {
    let tests_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .canonicalize()
        .expect("the tests directory");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .to_path_buf();
    let project = target.join("tests").join("trybuild").join("effects-tests");
    assert!(
        project.join("Cargo.toml").exists(),
        "trybuild's scratch package is missing at {}: the ui test builds it first",
        project.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let triple = host_triple();
    let output = Command::new(&cargo)
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", target.join("tests").join("trybuild"))
        .env("CARGO_INCREMENTAL", "0")
        .env_remove("RUSTFLAGS")
        .arg("build")
        .arg("--offline")
        .arg(format!("--config=build.rustflags={RUSTFLAGS}"))
        .arg(format!("--config=target.{triple}.rustflags={RUSTFLAGS}"))
        .args(["--target", &triple])
        .args(["--bins", "--keep-going", "--quiet", "--color=never"])
        .arg("--message-format=json")
        .output()
        .expect("cargo runs");
    let json = String::from_utf8_lossy(&output.stdout);
    let errors = errors_by_file(&json);
    let cases = compile_fail_cases(&tests_dir);
    assert!(
        cases.len() >= 40,
        "found only {} compile-fail cases",
        cases.len()
    );
    let bad = violations(&cases, &errors, &tests_dir);
    assert!(
        bad.is_empty(),
        "a mistake should give one error diagnostic in --message-format=json (what an editor \
         shows); list a deliberate exception in tests/tests/one_error/mod.rs with its reason:\n{}",
        bad.join("\n")
    );
}

/// The counting itself: a duplicate of one diagnostic (hidden in the terminal, kept in JSON)
/// is counted twice, and a case with none is reported too.
pub(crate) fn self_test() {
    let line = |src: &str, level: &str, text: &str| {
        serde_json::json!({
            "reason": "compiler-message",
            "target": { "src_path": src },
            "message": { "level": level, "message": text },
        })
        .to_string()
    };
    let json = [
        line("/t/ui/schema/a.rs", "error", "`Card` is not a datom"),
        line("/t/ui/schema/a.rs", "error", "`Card` is not a datom"),
        line("/t/ui/schema/a.rs", "warning", "unused import"),
        line("/t/ui/schema/b.rs", "error", "one"),
        line(
            "/t/ui/schema/b.rs",
            "error",
            "aborting due to 1 previous error",
        ),
        "not json".to_owned(),
    ]
    .join("\n");
    let errors = errors_by_file(&json);
    let cases: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| PathBuf::from(format!("/t/ui/schema/{n}.rs")))
        .collect();
    let bad = violations(&cases, &errors, Path::new("/t"));
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].starts_with("ui/schema/a.rs: 2 error"), "{bad:?}");
    assert!(bad[1].starts_with("ui/schema/c.rs: 0 error"), "{bad:?}");
}
