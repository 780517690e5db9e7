//! The `dataplane` binary's contract with operators: exit codes and messages.

use std::process::Command;

fn dataplane(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane")).args(args).output().expect("runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

#[test]
fn a_bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("routes: [{ cidr: 198.51.100.1/24, via: direct }]", "routes[0].cidr"),
        ("routes: [{ cidr: 10.0.0.0/8, via: direct, extra: 1 }]", "unknown field `extra`"),
        ("routes: []", "routes"),
        ("routes: [{ cidr: 10.0.0.0/8, via: direct }, { cidr: 10.1.0.0/16, via: direct }]", "overlaps"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("c{i}.yaml"), text);
        for sub in ["agent", "check"] {
            let (code, out) = dataplane(&[sub, "--config", &path]);
            assert_eq!(code, 64, "{sub} {text}: {out}");
            assert!(out.contains(needle), "{sub} {text}: expected `{needle}` in: {out}");
            assert!(!out.contains("panicked") && !out.contains("backtrace"), "{out}");
        }
    }
    let (code, out) = dataplane(&["agent", "--config", "/nonexistent/dataplane.yaml"]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("/nonexistent/dataplane.yaml"), "{out}");
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, "good.yaml", "routes: [{ cidr: 198.51.100.101/32, via: direct }]\n");
    let (code, out) = dataplane(&["check", "--config", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid (1 routes)"), "{out}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let (code, out) = dataplane(&["agent"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--config"), "{out}");
    let (code, out) = dataplane(&["agent", "--config", "x", "--reload-interval", "often"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("reload-interval"), "{out}");
}
