//! Every public item of the library has a doc comment with an example (a fenced code block),
//! except those listed in `tests/doc_examples.allow`, a list that may only shrink.
//!
//! The public surface is found from the sources: items declared `pub` in modules reachable
//! through `pub mod` from `src/lib.rs`, items re-exported by `pub use` from private modules,
//! and the `pub` methods of inherent impls and the methods of traits of those types.
//! `#[doc(hidden)]` items and `#[cfg(test)]` modules are not public surface.
//!
//! The test fails when a public item lacks an example and is not listed (give it one), and
//! when a listed item has one or no longer exists (remove it from the list), so the list only
//! ever gets shorter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::{Attribute, ImplItem, Item, TraitItem, Visibility};

const ALLOW: &str = "tests/doc_examples.allow";

/// One documented thing: its path (`module::Type::method`) and whether its docs hold a
/// fenced code block.
#[derive(Default)]
struct Surface {
    /// Items reachable by path: path → has an example.
    public: BTreeMap<String, bool>,
    /// `pub` items of private modules: name → (path, has an example), found by `pub use`.
    hidden_by_module: BTreeMap<String, Vec<(String, bool)>>,
    /// Names re-exported by `pub use` from anywhere.
    reexported: BTreeSet<String>,
    /// Methods of inherent impls and traits: type name → [(method path, has an example)].
    methods: BTreeMap<String, Vec<(String, bool)>>,
}

fn has_example(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("doc")
            && matches!(&a.meta, syn::Meta::NameValue(nv)
                if matches!(&nv.value, syn::Expr::Lit(l)
                    if matches!(&l.lit, syn::Lit::Str(s) if s.value().trim_start().starts_with("```"))))
    })
}

fn hidden(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        let text = quote_attr(a);
        (a.path().is_ident("doc") && text.contains("hidden"))
            || (a.path().is_ident("cfg") && text.contains("test"))
    })
}

fn quote_attr(a: &Attribute) -> String {
    match &a.meta {
        syn::Meta::List(l) => l.tokens.to_string(),
        _ => String::new(),
    }
}

fn is_pub(v: &Visibility) -> bool {
    matches!(v, Visibility::Public(_))
}

/// The file of module `name` declared in `file` (`#[path]` honoured).
fn module_file(file: &Path, name: &str, attrs: &[Attribute]) -> PathBuf {
    let dir = file.parent().expect("source file in a directory");
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let base = if matches!(stem, "lib" | "mod") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    for a in attrs {
        if a.path().is_ident("path") {
            if let syn::Meta::NameValue(nv) = &a.meta {
                if let syn::Expr::Lit(l) = &nv.value {
                    if let syn::Lit::Str(s) = &l.lit {
                        return dir.join(s.value());
                    }
                }
            }
        }
    }
    let flat = base.join(format!("{name}.rs"));
    if flat.exists() {
        flat
    } else {
        base.join(name).join("mod.rs")
    }
}

fn type_name(ty: &syn::Type) -> Option<String> {
    match ty {
        syn::Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

impl Surface {
    fn walk_file(&mut self, file: &Path, path: &str, public: bool) {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let parsed =
            syn::parse_file(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", file.display()));
        // A module's own docs (`//!`) are the inner attributes of its file.
        if public && has_example(&parsed.attrs) {
            self.public.insert(path.to_string(), true);
        }
        self.walk_items(&parsed.items, file, path, public);
    }

    fn walk_items(&mut self, items: &[Item], file: &Path, path: &str, public: bool) {
        for item in items {
            self.walk_item(item, file, path, public);
        }
    }

    fn record(&mut self, path: &str, name: String, attrs: &[Attribute], public: bool) {
        if hidden(attrs) {
            return;
        }
        let full = format!("{path}::{name}");
        let example = has_example(attrs);
        if public {
            self.public.insert(full, example);
        } else {
            self.hidden_by_module
                .entry(name)
                .or_default()
                .push((full, example));
        }
    }

    fn walk_item(&mut self, item: &Item, file: &Path, path: &str, public: bool) {
        match item {
            Item::Mod(m) if !hidden(&m.attrs) => {
                let child = format!("{path}::{}", m.ident);
                let child_public = public && is_pub(&m.vis);
                if child_public {
                    self.public.insert(child.clone(), has_example(&m.attrs));
                }
                match &m.content {
                    Some((_, items)) => self.walk_items(items, file, &child, child_public),
                    None => {
                        let f = module_file(file, &m.ident.to_string(), &m.attrs);
                        self.walk_file(&f, &child, child_public);
                    }
                }
            }
            Item::Fn(f) if is_pub(&f.vis) => {
                self.record(path, f.sig.ident.to_string(), &f.attrs, public)
            }
            Item::Struct(s) if is_pub(&s.vis) => {
                self.record(path, s.ident.to_string(), &s.attrs, public)
            }
            Item::Enum(e) if is_pub(&e.vis) => {
                self.record(path, e.ident.to_string(), &e.attrs, public)
            }
            Item::Const(c) if is_pub(&c.vis) => {
                self.record(path, c.ident.to_string(), &c.attrs, public)
            }
            Item::Static(s) if is_pub(&s.vis) => {
                self.record(path, s.ident.to_string(), &s.attrs, public)
            }
            Item::Type(t) if is_pub(&t.vis) => {
                self.record(path, t.ident.to_string(), &t.attrs, public)
            }
            Item::Trait(t) if is_pub(&t.vis) && !hidden(&t.attrs) => {
                let name = t.ident.to_string();
                self.record(path, name.clone(), &t.attrs, public);
                for ti in &t.items {
                    if let TraitItem::Fn(f) = ti {
                        if !hidden(&f.attrs) {
                            self.methods
                                .entry(name.clone())
                                .or_default()
                                .push((format!("{name}::{}", f.sig.ident), has_example(&f.attrs)));
                        }
                    }
                }
            }
            Item::Impl(i) if i.trait_.is_none() && !hidden(&i.attrs) => {
                let Some(name) = type_name(&i.self_ty) else {
                    return;
                };
                for ii in &i.items {
                    match ii {
                        ImplItem::Fn(f) if is_pub(&f.vis) && !hidden(&f.attrs) => {
                            self.methods
                                .entry(name.clone())
                                .or_default()
                                .push((format!("{name}::{}", f.sig.ident), has_example(&f.attrs)));
                        }
                        ImplItem::Const(c) if is_pub(&c.vis) && !hidden(&c.attrs) => {
                            self.methods
                                .entry(name.clone())
                                .or_default()
                                .push((format!("{name}::{}", c.ident), has_example(&c.attrs)));
                        }
                        _ => {}
                    }
                }
            }
            Item::Use(u) if is_pub(&u.vis) && public && !hidden(&u.attrs) => {
                collect_use_names(&u.tree, &mut self.reexported);
            }
            _ => {}
        }
    }

    /// Every public item with whether it has an example, by path.
    fn items(&self) -> BTreeMap<String, bool> {
        let mut all = self.public.clone();
        for name in &self.reexported {
            for (p, e) in self.hidden_by_module.get(name).into_iter().flatten() {
                all.insert(p.clone(), *e);
            }
        }
        let public_types: BTreeSet<String> = all
            .keys()
            .filter_map(|p| p.rsplit("::").next().map(str::to_string))
            .collect();
        for (ty, methods) in &self.methods {
            if public_types.contains(ty) {
                for (m, e) in methods {
                    all.insert(format!("method {m}"), *e);
                }
            }
        }
        all
    }
}

fn collect_use_names(tree: &syn::UseTree, out: &mut BTreeSet<String>) {
    match tree {
        syn::UseTree::Path(p) => collect_use_names(&p.tree, out),
        syn::UseTree::Name(n) => {
            out.insert(n.ident.to_string());
        }
        syn::UseTree::Rename(r) => {
            out.insert(r.ident.to_string());
        }
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| collect_use_names(t, out)),
        syn::UseTree::Glob(_) => {}
    }
}

#[test]
fn every_public_item_has_an_example_or_is_listed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut surface = Surface::default();
    surface.walk_file(&root.join("src/lib.rs"), "qcow2kit", true);
    let items = surface.items();
    assert!(
        items.len() > 100,
        "the walk found only {} public items: it no longer sees the crate",
        items.len()
    );
    let allow_text = std::fs::read_to_string(root.join(ALLOW)).expect("reading the allow list");
    let allowed: BTreeSet<&str> = allow_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let missing: Vec<&String> = items
        .iter()
        .filter(|(p, e)| !**e && !allowed.contains(p.as_str()))
        .map(|(p, _)| p)
        .collect();
    let stale: Vec<&&str> = allowed
        .iter()
        .filter(|p| items.get(**p).is_none_or(|e| *e))
        .collect();
    let with = items.values().filter(|e| **e).count();
    println!(
        "{} public items, {with} with an example, {} listed without",
        items.len(),
        allowed.len()
    );
    assert!(
        missing.is_empty(),
        "public items without an example (add one to their docs):\n{}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        stale.is_empty(),
        "{ALLOW} lists items that now have an example or are gone (remove them):\n{}",
        stale.iter().map(|s| **s).collect::<Vec<_>>().join("\n")
    );
}
