//! Boot images and iPXE scripts: the image catalog (`images/<name>/image.toml`) and the script templates in
//! `boot-scripts/` that turn a boot decision into the text iPXE runs.
//!
//! Templates use `{{name}}` placeholders so that iPXE's own `${setting}` syntax passes through untouched.
//! Every placeholder a template uses is checked when the templates load, so a typo in a template is an error
//! at start or reload, not a broken script handed to a node at 3 a.m.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::diag::{parse_toml, Diagnostics};

/// One boot image as described by its `image.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    #[serde(default)]
    pub description: String,
    /// CPU architecture the image runs on (`x86_64`, `arm64`, `i386`), or `any`.
    #[serde(default = "any_arch")]
    pub arch: String,
    /// How the node boots: a kernel and initrds over HTTP (the default), or `sanboot`: the firmware boots
    /// the slot's whole disk (its own bootloader) over iSCSI.
    #[serde(default)]
    pub kind: ImageKind,
    /// Kernel file, relative to the image's folder (required for `kernel` images).
    #[serde(default)]
    pub kernel: String,
    /// Initrd files, relative to the image's folder, loaded in order.
    #[serde(default)]
    pub initrds: Vec<String>,
    /// Kernel command line; `{{mac}}`, `{{image}}`, `{{hostname}}`, `{{base_url}}`, `{{server}}`, and under a
    /// policy `{{cluster}}`, `{{slot}}`, `{{address}}` (the slot's identity), `{{disk}}`
    /// (`nbd:<server>:<port>:<cluster>/<slot>`, the slot's NBD disk) and `{{disk_export}}` are filled in;
    /// `{{agent}}` becomes `corral.api=<base_url> corral.token=<this boot's token>` for the image's
    /// `corral-agent`.
    #[serde(default)]
    pub cmdline: String,
    /// The command line carries secrets of its own (a key, a password): the script is then served only
    /// to the node itself, from its address, even without a policy. (Under a policy every node script is.)
    #[serde(default)]
    pub secret: bool,
}

fn any_arch() -> String {
    "any".into()
}

/// How an image boots.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// iPXE loads a kernel and initrds from corral over HTTP.
    #[default]
    Kernel,
    /// iPXE `sanboot`s the slot's disk from corral's iSCSI target: a whole-disk image with its own
    /// bootloader (an installed OS, an appliance). The image has no files; its disk is the cluster's.
    Sanboot,
}

/// An image in the catalog: its spec and where its files are.
#[derive(Debug)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    pub spec: ImageSpec,
    /// `spec.cmdline`, compiled.
    pub cmdline: Template,
    /// When the files were last looked for (unix seconds) and what was missing then.
    checked: std::sync::Mutex<(u64, Vec<String>)>,
}

impl Image {
    /// An image from its spec; fails when the cmdline has an unknown placeholder.
    pub fn new(name: String, dir: PathBuf, spec: ImageSpec) -> Result<Image, String> {
        let cmdline = Template::compile(&spec.cmdline, CMDLINE_VARS)?;
        Ok(Image {
            name,
            dir,
            spec,
            cmdline,
            checked: std::sync::Mutex::new((u64::MAX, Vec::new())),
        })
    }
}

/// The images under the catalog directory, by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub images: BTreeMap<String, Arc<Image>>,
}

/// Placeholders an image's cmdline may use.
const CMDLINE_VARS: &[&str] = &[
    "mac",
    "image",
    "hostname",
    "base_url",
    "server",
    "cluster",
    "slot",
    "address",
    "disk",
    "disk_export",
    "agent",
    "nbd_psk",
];

impl Catalog {
    /// Loads every `*/image.toml` under `dir`. A missing directory is an empty catalog; a broken image file
    /// is an error naming its file, line and column. Images whose files are missing still load (the files
    /// may be built later) but [`Image::missing_files`] reports them.
    pub fn load(dir: &Path) -> Result<Catalog, Diagnostics> {
        let mut images = BTreeMap::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
            Err(e) => {
                return Err(Diagnostics::single(
                    dir,
                    format!("cannot read image catalog: {e}"),
                ))
            }
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            let file = d.join("image.toml");
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let name = d
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match parse_toml::<ImageSpec>(&text, &file) {
                Ok(spec) => {
                    let mut errs = Vec::new();
                    match spec.kind {
                        ImageKind::Kernel if spec.kernel.is_empty() => errs.push((
                            vec!["kernel".to_string()],
                            "a kernel image needs `kernel` (or `kind = \"sanboot\"`)".into(),
                        )),
                        ImageKind::Sanboot => {
                            for (key, set) in [
                                ("kernel", !spec.kernel.is_empty()),
                                ("initrds", !spec.initrds.is_empty()),
                                ("cmdline", !spec.cmdline.is_empty()),
                            ] {
                                if set {
                                    errs.push((
                                        vec![key.to_string()],
                                        format!(
                                            "a sanboot image boots its disk's own bootloader: \
                                             `{key}` would be ignored"
                                        ),
                                    ));
                                }
                            }
                        }
                        ImageKind::Kernel => {}
                    }
                    for (key, val) in [
                        ("kernel", std::slice::from_ref(&spec.kernel)),
                        ("initrds", &spec.initrds[..]),
                    ] {
                        for f in val.iter().filter(|f| !f.is_empty()) {
                            if !is_plain_relative(f) {
                                errs.push((
                                    vec![key.to_string()],
                                    format!("`{f}` must be a path inside the image folder"),
                                ));
                            }
                        }
                    }
                    match Image::new(name.clone(), d.clone(), spec) {
                        Ok(image) if errs.is_empty() => {
                            images.insert(name, Arc::new(image));
                        }
                        Ok(_) => {}
                        Err(e) => errs.push((vec!["cmdline".to_string()], e)),
                    }
                    if !errs.is_empty() {
                        errors.extend(Diagnostics::from_paths(&text, &file, errs).0);
                    }
                }
                Err(e) => errors.extend(e.0),
            }
        }
        if errors.is_empty() {
            Ok(Catalog { images })
        } else {
            Err(Diagnostics(errors))
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Image>> {
        self.images.get(name)
    }
}

impl Image {
    /// Files the spec names that are not on disk.
    pub fn missing_files(&self) -> Vec<String> {
        std::iter::once(&self.spec.kernel)
            .filter(|k| !k.is_empty())
            .chain(&self.spec.initrds)
            .filter(|f| !self.dir.join(f).is_file())
            .cloned()
            .collect()
    }

    /// [`Image::missing_files`], looked up at most once per second: a booting rack asks thousands of times
    /// a second and the answer changes only when an operator builds or removes files.
    pub fn missing_files_at(&self, now: u64) -> Vec<String> {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if checked.0 != now {
            *checked = (now, self.missing_files());
        }
        checked.1.clone()
    }

    /// Whether a node reporting iPXE `buildarch` can run this image.
    pub fn runs_on(&self, buildarch: Option<&str>) -> bool {
        let a = self.spec.arch.as_str();
        match buildarch {
            _ if a == "any" => true,
            None => true,
            // 32-bit iPXE (undionly on BIOS) runs on 64-bit machines: it says nothing against x86_64.
            Some("i386") => a == "x86_64" || a == "i386",
            Some(b) => b == a,
        }
    }
}

/// A relative path with no `..`, no root and no empty parts: a file inside the image folder.
fn is_plain_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The script templates.
#[derive(Debug, Clone)]
pub struct Templates {
    pub entry: Template,
    pub node: Template,
    pub sanboot: Template,
    pub parked: Template,
    pub error: Template,
}

/// Placeholders each template may use.
const ENTRY_VARS: &[&str] = &["base_url"];
const NODE_VARS: &[&str] = &[
    "base_url",
    "mac",
    "image",
    "kernel_url",
    "cmdline",
    "initrd_commands",
    "hostname",
];
const SANBOOT_VARS: &[&str] = &[
    "base_url",
    "mac",
    "image",
    "hostname",
    "root_path",
    "initiator_iqn",
    "auth_commands",
];
const PARKED_VARS: &[&str] = &["base_url", "mac", "poll"];
const ERROR_VARS: &[&str] = &["base_url", "mac", "poll", "message"];

impl Templates {
    /// Loads `entry.ipxe`, `node.ipxe`, `sanboot.ipxe`, `parked.ipxe` and `error.ipxe` from `dir`, checking
    /// placeholders.
    pub fn load(dir: &Path) -> Result<Templates, Diagnostics> {
        let mut errors = Vec::new();
        let mut read = |name: &str, vars: &[&'static str]| -> Template {
            let file = dir.join(name);
            match std::fs::read_to_string(&file) {
                Ok(t) => {
                    if !t.starts_with("#!ipxe") {
                        errors.push(
                            Diagnostics::single(
                                &file,
                                "an iPXE script must start with #!ipxe".into(),
                            )
                            .0
                            .remove(0),
                        );
                    }
                    Template::compile(&t, vars).unwrap_or_else(|e| {
                        errors.push(Diagnostics::single(&file, e).0.remove(0));
                        Template::empty()
                    })
                }
                Err(e) => {
                    errors.push(
                        Diagnostics::single(&file, format!("cannot read template: {e}"))
                            .0
                            .remove(0),
                    );
                    Template::empty()
                }
            }
        };
        let t = Templates {
            entry: read("entry.ipxe", ENTRY_VARS),
            node: read("node.ipxe", NODE_VARS),
            sanboot: read("sanboot.ipxe", SANBOOT_VARS),
            parked: read("parked.ipxe", PARKED_VARS),
            error: read("error.ipxe", ERROR_VARS),
        };
        if errors.is_empty() {
            Ok(t)
        } else {
            Err(Diagnostics(errors))
        }
    }
}

/// A template split once, at load, into literal text and placeholders, so rendering a script for a node is
/// a few copies rather than a search through the text on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(std::ops::Range<usize>),
    Var(&'static str),
}

impl Template {
    /// Compiles `text`; fails on a `{{name}}` that is not in `allowed`, or an unclosed `{{`.
    pub fn compile(text: &str, allowed: &[&'static str]) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut pos = 0;
        while let Some(i) = text[pos..].find("{{").map(|i| i + pos) {
            if i > pos {
                parts.push(Part::Lit(pos..i));
            }
            let Some(j) = text[i + 2..].find("}}").map(|j| j + i + 2) else {
                return Err("unclosed `{{` placeholder".into());
            };
            let name = text[i + 2..j].trim();
            let Some(known) = allowed.iter().find(|a| **a == name) else {
                let hint = crate::config::diag::nearest(name, allowed)
                    .map(|n| format!(", did you mean `{{{{{n}}}}}`?"))
                    .unwrap_or_default();
                return Err(format!(
                    "unknown placeholder `{{{{{name}}}}}`{hint} (known: {})",
                    allowed.join(", ")
                ));
            };
            parts.push(Part::Var(known));
            pos = j + 2;
        }
        if pos < text.len() {
            parts.push(Part::Lit(pos..text.len()));
        }
        Ok(Template {
            source: text.to_string(),
            parts,
        })
    }

    /// A template that renders nothing (stands in for one that failed to load).
    pub fn empty() -> Template {
        Template {
            source: String::new(),
            parts: Vec::new(),
        }
    }

    /// The template's text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Fills each placeholder with its value (a placeholder with no value renders empty).
    pub fn render(&self, vars: &[(&str, &str)]) -> String {
        let mut out = String::with_capacity(self.source.len() + 256);
        for p in &self.parts {
            match p {
                Part::Lit(r) => out.push_str(&self.source[r.clone()]),
                Part::Var(name) => {
                    if let Some((_, v)) = vars.iter().find(|(k, _)| k == name) {
                        out.push_str(v);
                    }
                }
            }
        }
        out
    }
}

/// Makes a value safe to place in an iPXE script line: no line breaks, and `${` cannot start an expansion.
pub fn ipxe_safe(s: &str) -> String {
    if !s.contains(['\n', '\r']) && !s.contains("${") {
        return s.to_string();
    }
    s.replace(['\n', '\r'], " ").replace("${", "$ {")
}

/// What a node's script needs to know about the node.
pub struct NodeVars<'a> {
    pub base_url: &'a str,
    pub server: &'a str,
    pub mac: &'a str,
    pub hostname: &'a str,
    /// The slot's cluster, slot number and address (empty without a policy or identity address).
    pub cluster: &'a str,
    pub slot: &'a str,
    pub address: &'a str,
    /// The slot's disk as `nbd:<server>:<port>:<export>`, and the export name alone (empty when the
    /// cluster has no disk).
    pub disk: &'a str,
    pub disk_export: &'a str,
    /// `corral.api=... corral.token=...` for the agent (empty without a policy).
    pub agent: &'a str,
    /// `corral.nbd_psk=<identity>:<hex key>`, the slot's key for NBD over TLS (empty when the slot has no
    /// disk or `[nbd] tls = "off"`). A secret: rendered only for the node's own address.
    pub nbd_psk: &'a str,
}

/// What a `sanboot` script needs: the slot's iSCSI disk and how to log in to it.
pub struct SanVars<'a> {
    /// iPXE's root path, `iscsi:<server>::<port>:<lun>:<target iqn>`.
    pub root_path: &'a str,
    pub initiator_iqn: &'a str,
    /// The slot's CHAP secrets, when the credentials file has them.
    pub chap: Option<&'a crate::iscsi::login::Chap>,
}

/// Renders the script that `sanboot`s a node from its slot's iSCSI disk. iPXE logs in with the
/// initiator name and CHAP settings given here and leaves them in the iBFT, so the booted OS logs in to the
/// same target with the same identity.
pub fn sanboot_script(t: &Templates, image: &Image, v: &NodeVars<'_>, san: &SanVars<'_>) -> String {
    let mut auth = Vec::new();
    if let Some(chap) = san.chap {
        // `:string` keeps iPXE from reading the value as another type; ipxe_safe keeps it one line.
        auth.push(format!("set username:string {}", ipxe_safe(&chap.user)));
        auth.push(format!("set password:string {}", ipxe_safe(&chap.secret)));
        if let Some((user, secret)) = &chap.mutual {
            auth.push(format!("set reverse-username:string {}", ipxe_safe(user)));
            auth.push(format!("set reverse-password:string {}", ipxe_safe(secret)));
        }
    }
    t.sanboot.render(&[
        ("base_url", v.base_url),
        ("mac", v.mac),
        ("image", &image.name),
        ("hostname", v.hostname),
        ("root_path", &ipxe_safe(san.root_path)),
        ("initiator_iqn", &ipxe_safe(san.initiator_iqn)),
        ("auth_commands", &auth.join("\n")),
    ])
}

/// Renders the script that boots `image` on a node.
pub fn node_script(t: &Templates, image: &Image, v: &NodeVars<'_>) -> String {
    let cmd_vars = [
        ("mac", v.mac),
        ("image", image.name.as_str()),
        ("hostname", v.hostname),
        ("base_url", v.base_url),
        ("server", v.server),
        ("cluster", v.cluster),
        ("slot", v.slot),
        ("address", v.address),
        ("disk", v.disk),
        ("disk_export", v.disk_export),
        ("agent", v.agent),
        ("nbd_psk", v.nbd_psk),
    ];
    let mut cmdline = image.cmdline.render(&cmd_vars);
    // iPXE on EFI hands initrds to the kernel's EFI stub only when the command line names them.
    for i in &image.spec.initrds {
        cmdline.push_str(&format!(" initrd={}", file_name(i)));
    }
    let url = |f: &str| format!("{}/images/{}/{}", v.base_url, image.name, f);
    let initrds: Vec<String> = image
        .spec
        .initrds
        .iter()
        .map(|i| {
            format!(
                "initrd --name {} {} || goto corral-retry",
                file_name(i),
                url(i)
            )
        })
        .collect();
    t.node.render(&[
        ("base_url", v.base_url),
        ("mac", v.mac),
        ("image", &image.name),
        ("hostname", v.hostname),
        ("kernel_url", &url(&image.spec.kernel)),
        ("cmdline", &ipxe_safe(cmdline.trim())),
        ("initrd_commands", &initrds.join("\n")),
    ])
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

#[cfg(test)]
mod tests;
