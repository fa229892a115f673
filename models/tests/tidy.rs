//! ARCHITECTURE.md's arrows as a test (rust-analyzer's `tidy.rs` is the model): which workspace
//! crate may depend on which, which module of `models` may import which, and no `todo!()` or
//! `unimplemented!()` in code that ships. A rule no test checks drifts; when one of these fails,
//! either the code broke an arrow or the architecture changed — then change ARCHITECTURE.md and
//! this file together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("models/ has a parent: the workspace root")
        .to_path_buf()
}

/// The dependency tables of a Cargo.toml: `(table, crate names)`, where `table` is
/// `dependencies`, `dev-dependencies` or `build-dependencies` (target-specific tables count as
/// their plain kind). Keys are read from `name = ...` and `name.workspace = true` lines, which is
/// the only style the workspace uses; a `[dependencies.name]` table counts as `name`.
fn dependency_tables(toml: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table: Option<String> = None;
    for line in toml.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            table = None;
            for kind in ["dev-dependencies", "build-dependencies", "dependencies"] {
                let whole = name == kind || name.ends_with(&format!(".{kind}"));
                let sub = name
                    .strip_prefix(&format!("{kind}."))
                    .or_else(|| name.split_once(&format!(".{kind}.")).map(|(_, s)| s));
                if whole {
                    table = Some(kind.to_string());
                    break;
                }
                if let Some(dep) = sub {
                    out.entry(kind.to_string())
                        .or_default()
                        .insert(dep.to_string());
                    break;
                }
            }
            continue;
        }
        if let Some(t) = &table {
            let key = line
                .split(['=', '.'])
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"');
            if !key.is_empty() {
                out.entry(t.clone()).or_default().insert(key.to_string());
            }
        }
    }
    out
}

/// The workspace members from the root Cargo.toml: `(directory, package name)`.
fn members(root: &Path) -> Vec<(String, String)> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).expect("read the root Cargo.toml");
    let start = toml
        .find("members")
        .expect("the root Cargo.toml lists members");
    let list = &toml[start..];
    let list = &list[list.find('[').expect("members = [") + 1..];
    let list = &list[..list.find(']').expect("members = [...]")];
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .map(|dir| {
            let toml = std::fs::read_to_string(root.join(&dir).join("Cargo.toml"))
                .unwrap_or_else(|e| panic!("read {dir}/Cargo.toml: {e}"));
            let name = toml
                .lines()
                .find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("name")
                        .map(|r| r.trim_start())
                        .and_then(|r| r.strip_prefix('='))
                        .map(|r| r.trim().trim_matches('"').to_string())
                })
                .unwrap_or_else(|| panic!("{dir}/Cargo.toml has no package name"));
            (dir, name)
        })
        .collect()
}

/// The workspace crates each crate may depend on (normal and build dependencies), as
/// ARCHITECTURE.md draws them. The end-to-end `tests` crate drives everything and may use any.
const ALLOWED: &[(&str, &[&str])] = &[
    ("attune-protocol", &[]),
    ("attune-models", &[]),
    ("attune-engine", &["attune-models", "attune-protocol"]),
    // The shells: the command line and the desktop app, each able to run the server.
    (
        "attune-cli",
        &["attune-engine", "attune-protocol", "attune-server"],
    ),
    (
        "attune-app",
        &["attune-engine", "attune-protocol", "attune-server"],
    ),
    ("attune-ui", &["attune-protocol"]),
    // The OpenAI-shaped HTTP surface sits over the engine, beside the shells.
    ("attune-server", &["attune-engine", "attune-protocol"]),
];

/// Crates that only tests use: the end-to-end `tests` crate and a shared test-support crate
/// (any name ending in `test-support`). They may use any crate; no crate may depend on them
/// except as a dev-dependency.
fn test_only(name: &str) -> bool {
    name == "attune-tests" || name.ends_with("test-support")
}

/// Arrows that are broken today and being removed (issue 16, item 6: data-directory rules into
/// the engine, CLI wording into the CLI). Each entry must still be needed: once the dependency is
/// gone the test fails until the entry is deleted, so this list only shrinks.
const KNOWN_BREAKS: &[(&str, &str)] = &[];

/// External crates that only some crates may use: `(dependency prefix, crates allowed)`.
const CONFINED: &[(&str, &[&str])] = &[
    // Only the shell knows Tauri.
    ("tauri", &["attune-app"]),
    // Only the engine speaks SQL.
    ("rusqlite", &["attune-engine"]),
    // The IPC types stay plain serde, and the UI never links the model runtime.
    ("candle", &["attune-models", "attune-engine"]),
];

#[test]
fn crate_dependencies_follow_the_architecture() {
    let root = workspace_root();
    let members = members(&root);
    let names: BTreeSet<String> = members.iter().map(|(_, n)| n.clone()).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut errors = Vec::new();
    let mut breaks_seen = BTreeSet::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (dir, name) in &members {
        let toml = std::fs::read_to_string(root.join(dir).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("read {dir}/Cargo.toml: {e}"));
        let tables = dependency_tables(&toml);
        let normal: BTreeSet<String> = ["dependencies", "build-dependencies"]
            .iter()
            .flat_map(|t| tables.get(*t).into_iter().flatten().cloned())
            .collect();
        let internal: BTreeSet<String> = normal.intersection(&names).cloned().collect();
        graph.insert(name.clone(), internal.clone());
        for dep in internal.iter().filter(|d| test_only(d)) {
            if !test_only(name) {
                errors.push(format!(
                    "{dir}/Cargo.toml: {name} depends on the test-only crate {dep} outside \
                     [dev-dependencies]"
                ));
            }
        }
        if !test_only(name) {
            let Some(ok) = allowed.get(name.as_str()) else {
                errors.push(format!(
                    "{dir}/Cargo.toml: crate {name} has no rule here; draw its arrows in \
                     ARCHITECTURE.md and add them to ALLOWED in models/tests/tidy.rs"
                ));
                continue;
            };
            for dep in &internal {
                if ok.contains(&dep.as_str()) {
                    continue;
                }
                if KNOWN_BREAKS.contains(&(name.as_str(), dep.as_str())) {
                    breaks_seen.insert((name.clone(), dep.clone()));
                    continue;
                }
                errors.push(format!(
                    "{dir}/Cargo.toml: {name} depends on {dep}; ARCHITECTURE.md allows {name} -> {ok:?}"
                ));
            }
        }
        for (prefix, who) in CONFINED {
            for dep in normal.iter().filter(|d| d.starts_with(prefix)) {
                if !who.contains(&name.as_str()) && !test_only(name) {
                    errors.push(format!(
                        "{dir}/Cargo.toml: {name} depends on {dep}; only {who:?} may use {prefix}*"
                    ));
                }
            }
        }
        // A dev-dependency must not point back up: nothing this crate is built into.
        if let Some(dev) = tables.get("dev-dependencies") {
            graph
                .entry(format!("{name} (dev)"))
                .or_default()
                .extend(dev.intersection(&names).cloned());
        }
    }
    for (name, dev) in graph.clone().iter().filter(|(n, _)| n.ends_with(" (dev)")) {
        let me = name.trim_end_matches(" (dev)");
        for dep in dev {
            if reaches(&graph, dep, me) {
                errors.push(format!(
                    "{me}: dev-dependency {dep} depends on {me} itself (an upward arrow)"
                ));
            }
        }
    }
    for (from, to) in KNOWN_BREAKS {
        if !breaks_seen.contains(&(from.to_string(), to.to_string())) {
            errors.push(format!(
                "{from} no longer depends on {to}: delete that entry from KNOWN_BREAKS"
            ));
        }
    }
    assert!(errors.is_empty(), "broken arrows:\n{}", errors.join("\n"));
}

fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut stack = vec![from.to_string()];
    let mut seen = BTreeSet::new();
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        if seen.insert(n.clone()) {
            stack.extend(graph.get(&n).into_iter().flatten().cloned());
        }
    }
    false
}

/// The Rust files under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if p.is_dir() {
                if !matches!(name.as_ref(), "target" | "node_modules" | "dist" | ".git") {
                    stack.push(p);
                }
            } else if name.ends_with(".rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A file's code with `//` comments removed (so doc links may name any module).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level `crate::` modules a file's code names (`use crate::x`, `crate::x::y`,
/// `$crate::x`, and the items of `use crate::{a, b}`).
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(pos) = code[i..].find("crate::") {
        let at = i + pos;
        i = at + "crate::".len();
        let before = at.checked_sub(1).map(|j| bytes[j]);
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
            continue;
        }
        let rest = &code[i..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let head = item.trim().split("::").next().unwrap_or("").trim();
                if !head.is_empty() {
                    out.insert(head.to_string());
                }
            }
        } else {
            let head: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !head.is_empty() {
                out.insert(head);
            }
        }
    }
    out
}

#[test]
fn models_modules_import_downward_only() {
    let src = workspace_root().join("models/src");
    let mut errors = Vec::new();
    let mut kernels_seen = 0;
    for file in rust_files(&src) {
        let rel = file
            .strip_prefix(&src)
            .expect("under models/src")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let used = crate_paths(&code(&text));
        if rel.starts_with("kernels/") {
            kernels_seen += 1;
            // Kernels know tensors and slices: they may name each other and the error type,
            // nothing of the model or the trainer.
            for m in &used {
                if !matches!(m.as_str(), "kernels" | "error" | "Error" | "Result") {
                    errors.push(format!(
                        "models/src/{rel}: a kernel imports crate::{m}; kernels import neither \
                         the model nor the trainer"
                    ));
                }
            }
        } else if rel.starts_with("export/") {
            // Exports sit on top: they write models and trained adapters.
        } else {
            if !rel.starts_with("train/") && used.contains("train") {
                errors.push(format!(
                    "models/src/{rel}: model code imports crate::train; the trainer builds on \
                     the model, never the reverse (move what both need into kernels/)"
                ));
            }
            if used.contains("export") {
                errors.push(format!(
                    "models/src/{rel}: imports crate::export; exports build on the model and \
                     the trainer, never the reverse"
                ));
            }
        }
    }
    assert!(
        kernels_seen >= 8,
        "models/src/kernels/ holds {kernels_seen} files: the layout ARCHITECTURE.md describes is gone"
    );
    assert!(errors.is_empty(), "broken arrows:\n{}", errors.join("\n"));
}

#[test]
fn no_placeholder_macros_in_shipped_code() {
    let root = workspace_root();
    // Spelled in two pieces so this file does not match itself.
    let bad = [concat!("todo", "!("), concat!("unimplemented", "!(")];
    let mut errors = Vec::new();
    for dir in ["models", "crates", "src-tauri", "ui"] {
        for file in rust_files(&root.join(dir)) {
            let rel = file
                .strip_prefix(&root)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            // Test and bench files, and each file's test module (by convention its last item).
            if rel.contains("/tests/") || rel.contains("/benches/") {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("read a source file");
            let shipped = text
                .lines()
                .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
                .collect::<Vec<_>>()
                .join("\n");
            for (n, line) in code(&shipped).lines().enumerate() {
                if bad.iter().any(|b| line.contains(b)) {
                    errors.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        errors.is_empty(),
        "placeholders in shipped code:\n{}",
        errors.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // The parsers the rules rest on, on the shapes they must read.
    let t = dependency_tables(
        "[package]\nname = \"x\"\n[dependencies]\na = { workspace = true }\nb.workspace = true\n\
         [target.'cfg(unix)'.dependencies]\nc = \"1\"\n[dev-dependencies]\nd = \"1\"\n\
         [dependencies.e]\nversion = \"1\"\n",
    );
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(t["dependencies"], set(&["a", "b", "c", "e"]));
    assert_eq!(t["dev-dependencies"], set(&["d"]));
    let used = crate_paths(&code(
        "use crate::{kernels::x, Error};\n// crate::train in a comment\nlet y = crate::llama::f();\n\
         use super::*; let z = $crate::kernels::cpu_f32;",
    ));
    assert_eq!(used, set(&["kernels", "Error", "llama"]));
    assert!(members(&workspace_root())
        .iter()
        .any(|(_, n)| n == "attune-models"));
}
