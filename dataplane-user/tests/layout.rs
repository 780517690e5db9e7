//! The crate's layout stays as designed: no two top-level modules import each
//! other (directly or round a longer circle), the tunnel imports no role, and
//! the admin server does not import the agent. Read from the sources: every
//! `crate::` path in `src/`, attributed to the top-level module whose folder
//! or file it is in.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level module -> the top-level modules it names through `crate::`.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without line comments (doc comments mention paths freely).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The first segment after each `crate::`, expanding `crate::{a, b::c}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let after = rest.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            // Split the group's top level on commas.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()).to_owned());
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()).to_owned());
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(after).to_owned());
        }
    }
    out.remove("");
    out
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("component").as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        let names = named_modules(&code(&text));
        let deps = graph.entry(module.clone()).or_default();
        // `crate::lock` and the like are items of the crate root, not modules.
        deps.extend(names.into_iter().filter(|n| *n != module && src_has_module(&src, n)));
    }
    graph
}

fn src_has_module(src: &Path, name: &str) -> bool {
    src.join(format!("{name}.rs")).is_file() || src.join(name).join("mod.rs").is_file()
}

/// A cycle through `node`, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(g: &Graph, n: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn the_reader_sees_grouped_and_plain_paths() {
    let names = named_modules("use crate::{a::{B, C}, d, e::f};\nlet x = crate::g::h();");
    assert_eq!(names, ["a", "d", "e", "g"].map(String::from).into(), "the check can see imports");
    let looped = Graph::from([
        ("x".to_owned(), BTreeSet::from(["y".to_owned()])),
        ("y".to_owned(), BTreeSet::from(["x".to_owned()])),
    ]);
    assert!(cycle(&looped).is_some(), "the check can find a circle");
}

#[test]
fn top_level_modules_import_no_circle() {
    let g = graph();
    assert!(g.len() >= 8, "found the modules: {g:?}");
    assert!(g["app"].contains("steer") && g["app"].contains("tunnel"), "the graph is read: {g:?}");
    assert_eq!(cycle(&g), None, "an import circle between modules: {g:#?}");
}

#[test]
fn the_tunnel_knows_no_roles_and_admin_knows_no_agent() {
    let g = graph();
    for role in ["steer", "connector", "app", "admin"] {
        assert!(!g["tunnel"].contains(role), "tunnel imports {role}: {:?}", g["tunnel"]);
    }
    assert!(!g["admin"].contains("app"), "admin imports the agent: {:?}", g["admin"]);
}
