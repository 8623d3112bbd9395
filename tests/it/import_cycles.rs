//! No import cycles between the crate's modules (module = source file): every `crate::`,
//! `super::` and `self::` path in `src/**/*.rs` (in `use` items and in code) is resolved to the
//! file that defines it, following `pub use` re-exports, and the resulting graph must have no
//! cycle. Inline modules belong to their file. Items under `#[cfg(test)]` are left out: unit
//! tests are built only into the test harness, on top of the library, and may use any module
//! (a test comparing a fused op with the composed one it replaces, for example).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Source text without comments and string/char literal contents (doc links and messages are
/// not imports).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            // raw string: r"..", r#".."#
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if j < b.len() && b[j] == b'"' {
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                j += 1;
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                out.push_str("\"\"");
                i = j + close.len();
            } else {
                out.push('r');
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            i += 1;
        } else if b[i] == b'\'' {
            // char literal ('x', '\n', '\'') or a lifetime ('a)
            let lit = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 3)
            } else {
                None
            };
            match lit {
                Some(end) => {
                    out.push_str("' '");
                    i = end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `code` with every `#[cfg(test)]` item (up to its `;` or its closing brace) blanked.
fn drop_test_items(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(p) = out[from..].find("#[cfg(test)]") {
        let at = from + p;
        let rest = &out[at..];
        let end = match (rest.find(';'), rest.find('{')) {
            (Some(semi), Some(open)) if semi < open => at + semi + 1,
            (_, Some(open)) => {
                let mut depth = 0;
                let mut end = out.len();
                for (k, c) in out[at + open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = at + open + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (Some(semi), None) => at + semi + 1,
            (None, None) => out.len(),
        };
        let blank: String = out[at..end]
            .chars()
            .map(|c| if c == '\n' { c } else { ' ' })
            .collect();
        out.replace_range(at..end, &blank);
        from = end;
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Expands a use tree (`a::{b, c::{d, e as f}}`) into paths; `self` inside braces names the prefix.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(open) = tree.find('{') else {
        let segs: Vec<String> = tree
            .split("::")
            .map(|s| s.split(" as ").next().unwrap().trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        return vec![segs];
    };
    let prefix: Vec<String> = tree[..open]
        .split("::")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let body = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (k, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&body[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    let mut out = Vec::new();
    for p in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
        for tail in expand(p) {
            let mut path = prefix.clone();
            if tail.first().map(String::as_str) != Some("self") || tail.len() > 1 {
                path.extend(tail);
            }
            out.push(path);
        }
    }
    out
}

/// Byte ranges of inline modules (`mod name { .. }`) with their names.
fn inline_mods(code: &str) -> Vec<(usize, usize, String)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = code[i..].find("mod ") {
        let at = i + p;
        i = at + 4;
        if at > 0 && is_ident(b[at - 1]) {
            continue;
        }
        let name_end = at + 4 + b[at + 4..].iter().take_while(|&&c| is_ident(c)).count();
        let name = &code[at + 4..name_end];
        let rest = code[name_end..].trim_start();
        if name.is_empty() || !rest.starts_with('{') {
            continue;
        }
        let open = code.len() - rest.len();
        let mut depth = 0;
        let mut end = code.len();
        for (k, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push((open, end, name.to_string()));
    }
    out
}

struct Crate {
    files: BTreeMap<Module, PathBuf>,
    code: BTreeMap<Module, String>,
}

impl Crate {
    fn load(src: &Path) -> Crate {
        let mut files = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path.strip_prefix(src).unwrap().with_extension("");
                    let mut module: Module = rel
                        .iter()
                        .map(|s| s.to_string_lossy().into_owned())
                        .collect();
                    if module.last().is_some_and(|s| s == "mod") {
                        module.pop();
                    }
                    if module == ["lib"] || module == ["main"] {
                        module.clear();
                    }
                    files.insert(module, path);
                }
            }
        }
        let code = files
            .iter()
            .map(|(m, p)| {
                let text = std::fs::read_to_string(p).unwrap();
                (m.clone(), drop_test_items(&strip(&text)))
            })
            .collect();
        Crate { files, code }
    }

    /// Absolute path of `segs` as written at byte `at` of module `m`'s file.
    fn absolute(&self, m: &Module, at: usize, segs: &[String]) -> Option<Vec<String>> {
        let mut scope = m.clone();
        for (start, end, name) in inline_mods(&self.code[m]) {
            if start < at && at < end {
                scope.push(name);
            }
        }
        let mut segs = segs.to_vec();
        match segs.first().map(String::as_str) {
            Some("crate") => Some(segs.split_off(1)),
            Some("super") | Some("self") => {
                while let Some(s) = segs.first().cloned() {
                    match s.as_str() {
                        "super" => {
                            scope.pop()?;
                        }
                        "self" => {}
                        _ => break,
                    }
                    segs.remove(0);
                }
                scope.extend(segs);
                Some(scope)
            }
            // a child module named directly from its parent file (`use child::X;` in mod.rs)
            Some(first) => {
                let mut child = m.clone();
                child.push(first.to_string());
                self.files.contains_key(&child).then(|| {
                    let mut p = m.clone();
                    p.extend(segs);
                    p
                })
            }
            None => None,
        }
    }

    /// `(path, at)` of every `use` item in a module's file, expanded.
    fn uses(&self, m: &Module) -> Vec<(Vec<String>, usize, bool)> {
        let code = &self.code[m];
        let b = code.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(p) = code[i..].find("use ") {
            let at = i + p;
            i = at + 4;
            if at > 0 && is_ident(b[at - 1]) {
                continue;
            }
            let public =
                code[..at].trim_end().ends_with("pub") || code[..at].trim_end().ends_with(')');
            let Some(semi) = code[at..].find(';') else {
                continue;
            };
            for path in expand(&code[at + 4..at + semi]) {
                out.push((path, at, public));
            }
            i = at + semi;
        }
        out
    }

    /// The file defining the item at absolute path `abs`, following `pub use` re-exports.
    fn resolve(&self, abs: &[String], depth: usize) -> Option<Module> {
        let n = (0..=abs.len())
            .rev()
            .find(|&n| self.files.contains_key(&abs[..n]))?;
        let module = abs[..n].to_vec();
        if let (Some(name), true) = (abs.get(n), depth < 8) {
            for (path, at, public) in self.uses(&module) {
                if public && path.last() == Some(name) {
                    if let Some(mut target) = self.absolute(&module, at, &path) {
                        target.extend_from_slice(&abs[n + 1..]);
                        if let Some(r) = self.resolve(&target, depth + 1) {
                            return Some(r);
                        }
                    }
                }
            }
        }
        Some(module)
    }

    /// Files each file depends on.
    fn graph(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let mut graph = BTreeMap::new();
        for m in self.files.keys() {
            let code = &self.code[m];
            let mut deps = BTreeSet::new();
            let mut paths: Vec<(Vec<String>, usize)> =
                self.uses(m).into_iter().map(|(p, at, _)| (p, at)).collect();
            // paths in code: crate::a::b, super::a, self::a
            let b = code.as_bytes();
            for root in ["crate::", "super::", "self::"] {
                let mut i = 0;
                while let Some(p) = code[i..].find(root) {
                    let at = i + p;
                    i = at + root.len();
                    if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b':') {
                        continue;
                    }
                    let end = at
                        + b[at..]
                            .iter()
                            .take_while(|&&c| is_ident(c) || c == b':')
                            .count();
                    let segs: Vec<String> = code[at..end]
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    paths.push((segs, at));
                }
            }
            for (path, at) in paths {
                if let Some(abs) = self.absolute(m, at, &path) {
                    if let Some(target) = self.resolve(&abs, 0) {
                        if &target != m {
                            deps.insert(target);
                        }
                    }
                }
            }
            graph.insert(m.clone(), deps);
        }
        graph
    }
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Module) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        for w in &t.g[v] {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.stack.contains(&w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_import_cycles_between_modules() {
    let krate = Crate::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let graph = krate.graph();
    let found = cycles(&graph);
    let mut report = String::new();
    for comp in &found {
        report.push_str(&format!(
            "cycle among {}:\n",
            comp.iter().map(name).collect::<Vec<_>>().join(", ")
        ));
        for a in comp {
            for b in graph[a].iter().filter(|b| comp.contains(b)) {
                report.push_str(&format!("  {} -> {}\n", name(a), name(b)));
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

#[test]
fn the_checker_sees_a_cycle_through_a_re_export_and_super() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(
        src.join("a/mod.rs"),
        "pub mod x;\npub mod y;\npub use x::X; // use crate::b::Gone;\n",
    )
    .unwrap();
    // x -> b (a path in code), b -> x (through a's re-export), y -> x (through super); x's
    // unit tests (x -> y) are left out
    std::fs::write(
        src.join("a/x.rs"),
        "pub struct X;\nfn f() { crate::b::g(); }\n#[cfg(test)]\nmod tests { use crate::a::y; }\n",
    )
    .unwrap();
    std::fs::write(
        src.join("a/y.rs"),
        "use super::x::X;\nconst S: &str = \"crate::b\";\n",
    )
    .unwrap();
    std::fs::write(src.join("b.rs"), "use crate::a::X;\npub fn g() {}\n").unwrap();
    let krate = Crate::load(src);
    let graph = krate.graph();
    let m = |s: &str| -> Module { s.split("::").map(str::to_string).collect() };
    assert_eq!(graph[&m("a::y")], BTreeSet::from([m("a::x")]));
    assert_eq!(graph[&m("b")], BTreeSet::from([m("a::x")]));
    assert_eq!(cycles(&graph), vec![vec![m("a::x"), m("b")]]);
    // without the code path in x the graph has no cycle
    std::fs::write(src.join("a/x.rs"), "pub struct X;\n").unwrap();
    assert!(cycles(&Crate::load(src).graph()).is_empty());
}
