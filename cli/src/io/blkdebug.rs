//! QEMU's blkdebug filter in qemu-io: the `blkdebug:CONFIG:FILE` file name, `file.driver=blkdebug`
//! and `data-file.driver=blkdebug` with their `inject-error.N.*` / `set-state.N.*` rules and
//! config file, and the commands that drive breakpoints (`break`, `wait_break`, `resume`,
//! `remove_break`) with qemu-io's messages.

use super::output::{print_buffered, stdout_is_tty, strerror};
use super::qopts::{parse_bool, parse_number, Opts};
use qcow2kit::chain::{FileRole, Interpose};
use qcow2kit::io::blkdebug::{Blkdebug, BlkdebugConfig, DebugEvent, InjectError, IoType, SetState};
use qcow2kit::io::Storage;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

const ENOENT: i32 = 2;
const ENOTSUP: i32 = 95;

/// The blkdebug filters of the open image (its file's first, then its data file's).
#[derive(Clone, Default)]
pub(super) struct Filters(Arc<Mutex<Vec<Arc<Blkdebug>>>>);

impl Filters {
    fn first(&self) -> Option<Arc<Blkdebug>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .cloned()
    }

    /// Requests suspended at breakpoints now.
    pub(super) fn suspended(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| f.suspended_count())
            .sum()
    }
}

/// The filters an image is to be opened with.
#[derive(Default)]
pub(super) struct Setup {
    file: Option<BlkdebugConfig>,
    data_file: Option<BlkdebugConfig>,
}

impl Setup {
    /// The hook that puts the filters between the image and its files, and the handle on them.
    pub(super) fn interpose(self) -> Option<(Interpose, Filters)> {
        if self.file.is_none() && self.data_file.is_none() {
            return None;
        }
        let filters = Filters::default();
        let list = filters.0.clone();
        let tty = stdout_is_tty();
        let hook = move |role: FileRole, storage: Arc<dyn Storage>| -> Arc<dyn Storage> {
            let config = match role {
                FileRole::DataFile => self.data_file.clone(),
                _ => self.file.clone(),
            };
            let Some(config) = config else {
                return storage;
            };
            let report = Arc::new(move |line: &str| print_buffered(&format!("{line}\n"), tty));
            let f = Arc::new(Blkdebug::new(storage, config, Some(report)));
            list.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(f.clone());
            f
        };
        Some((Interpose(Arc::new(hook)), filters))
    }
}

/// Takes the blkdebug options out of `name` and `opts`: afterwards `name` (or
/// `data-file.filename`) names the file under the filter.
pub(super) fn take_blkdebug(name: &mut Option<String>, opts: &mut Opts) -> Result<Setup, String> {
    let mut setup = Setup::default();
    if let Some(rest) = name.as_deref().and_then(|n| n.strip_prefix("blkdebug:")) {
        let (config, image) = rest
            .split_once(':')
            .ok_or("blkdebug requires both config file and image path")?;
        let mut cfg = BlkdebugConfig::default();
        if !config.is_empty() {
            read_config_file(config, &mut cfg)?;
        }
        *name = Some(image.to_string());
        setup.file = Some(cfg);
    }
    if opts.get("file.driver") == Some("blkdebug") {
        opts.take("file.driver");
        if let Some(image) = opts
            .take("file.image.filename")
            .or_else(|| opts.take("file.x-image"))
        {
            *name = Some(image);
        }
        take_image_driver(opts, "file.image.driver")?;
        setup.file = Some(take_rules(opts, "file.")?);
    }
    if opts.get("data-file.driver") == Some("blkdebug") {
        opts.take("data-file.driver");
        if let Some(image) = opts.take("data-file.image.filename") {
            opts.set("data-file.filename", image);
        }
        take_image_driver(opts, "data-file.image.driver")?;
        setup.data_file = Some(take_rules(opts, "data-file.")?);
    }
    Ok(setup)
}

fn take_image_driver(opts: &mut Opts, key: &str) -> Result<(), String> {
    match opts.take(key).as_deref() {
        None | Some("file") => Ok(()),
        Some(d) => Err(format!("Driver '{d}' is not supported by qcow2kit")),
    }
}

/// The rules given as `PREFIXconfig`, `PREFIXinject-error.N.*` and `PREFIXset-state.N.*`.
fn take_rules(opts: &mut Opts, prefix: &str) -> Result<BlkdebugConfig, String> {
    let mut cfg = BlkdebugConfig::default();
    if let Some(file) = opts.take(&format!("{prefix}config")) {
        read_config_file(&file, &mut cfg)?;
    }
    opts.take(&format!("{prefix}align"));
    for group in ["inject-error", "set-state"] {
        let head = format!("{prefix}{group}.");
        let keys: Vec<String> = opts
            .keys()
            .filter(|k| k.starts_with(&head))
            .map(str::to_string)
            .collect();
        let mut rules: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
        for k in keys {
            let value = opts.take(&k).unwrap_or_default();
            let rest = &k[head.len()..];
            let (index, key) = rest
                .split_once('.')
                .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
            let index: u64 = index
                .parse()
                .map_err(|_| format!("Invalid parameter '{k}'"))?;
            rules
                .entry(index)
                .or_default()
                .push((key.to_string(), value));
        }
        for pairs in rules.into_values() {
            add_rule(&mut cfg, group, &pairs)?;
        }
    }
    Ok(cfg)
}

/// Adds the rule of `group` described by `pairs` (QEMU's keys) to `cfg`.
fn add_rule(
    cfg: &mut BlkdebugConfig,
    group: &str,
    pairs: &[(String, String)],
) -> Result<(), String> {
    let get = |k: &str| pairs.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
    if let Some((k, _)) = pairs.iter().find(|(k, _)| {
        let known: &[&str] = if group == "set-state" {
            &["event", "state", "new_state"]
        } else {
            &[
                "event",
                "state",
                "errno",
                "sector",
                "once",
                "immediately",
                "iotype",
            ]
        };
        !known.contains(&k.as_str())
    }) {
        return Err(format!("Invalid parameter '{k}'"));
    }
    let event = get("event").ok_or("Missing event name for rule")?;
    let event = DebugEvent::from_name(event)
        .ok_or_else(|| format!("Parameter 'event' does not accept value '{event}'"))?;
    let state = get("state")
        .map(|v| parse_number("state", v))
        .transpose()?
        .unwrap_or(0);
    if group == "set-state" {
        let new_state = get("new_state")
            .map(|v| parse_number("new_state", v))
            .transpose()?
            .unwrap_or(0);
        cfg.set_state.push(SetState {
            event,
            state,
            new_state,
        });
        return Ok(());
    }
    let mut rule = InjectError::new(event);
    rule.state = state;
    if let Some(v) = get("errno") {
        rule.errno = i32::try_from(parse_number("errno", v)?)
            .map_err(|_| "Parameter 'errno' expects a number".to_string())?;
    }
    if let Some(v) = get("sector") {
        let sector = parse_number("sector", v)?;
        rule.offset = Some(
            sector
                .checked_mul(512)
                .ok_or("Parameter 'sector' expects a number")?,
        );
    }
    if let Some(v) = get("once") {
        rule.once = parse_bool("once", v)?;
    }
    if let Some(v) = get("immediately") {
        parse_bool("immediately", v)?;
    }
    if let Some(v) = get("iotype") {
        rule.iotype = Some(
            IoType::from_name(v)
                .ok_or_else(|| format!("Parameter 'iotype' does not accept value '{v}'"))?,
        );
    }
    cfg.inject_error.push(rule);
    Ok(())
}

/// Reads a blkdebug config file (QEMU's config syntax: `[inject-error]` / `[set-state]` groups
/// of `key = "value"` lines, `#` comments).
fn read_config_file(path: &str, cfg: &mut BlkdebugConfig) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "Could not read blkdebug config file: {}",
            qcow2kit::error::strerror(&e)
        )
    })?;
    let bad = || "Could not parse blkdebug config file".to_string();
    let mut group: Option<(String, Vec<(String, String)>)> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(g) = line.strip_prefix('[') {
            let g = g.strip_suffix(']').ok_or_else(bad)?;
            let g = g.split_whitespace().next().unwrap_or("");
            if let Some((name, pairs)) = group.take() {
                add_rule(cfg, &name, &pairs)?;
            }
            if g != "inject-error" && g != "set-state" {
                return Err(bad());
            }
            group = Some((g.to_string(), Vec::new()));
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        let (_, pairs) = group.as_mut().ok_or_else(bad)?;
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    if let Some((name, pairs)) = group {
        add_rule(cfg, &name, &pairs)?;
    }
    Ok(())
}

/// qemu-io's `break EVENT TAG`: the message it prints, if any.
pub(super) fn break_cmd(filters: &Filters, event: &str, tag: &str) -> Option<String> {
    let Some(f) = filters.first() else {
        return Some(format!("Could not set breakpoint: {}\n", strerror(ENOTSUP)));
    };
    match DebugEvent::from_name(event) {
        Some(e) => {
            f.set_breakpoint(e, tag);
            None
        }
        None => Some(format!("Could not set breakpoint: {}\n", strerror(ENOENT))),
    }
}

/// qemu-io's `remove_break TAG`.
pub(super) fn remove_break_cmd(filters: &Filters, tag: &str) -> Option<String> {
    let errno = match filters.first() {
        None => ENOTSUP,
        Some(f) if f.remove_breakpoint(tag) => return None,
        Some(_) => ENOENT,
    };
    Some(format!(
        "Could not remove breakpoint {tag}: {}\n",
        strerror(errno)
    ))
}

/// qemu-io's `resume TAG`.
pub(super) fn resume_cmd(filters: &Filters, tag: &str) -> Option<String> {
    let errno = match filters.first() {
        None => ENOTSUP,
        Some(f) if f.resume(tag) => return None,
        Some(_) => ENOENT,
    };
    Some(format!("Could not resume request: {}\n", strerror(errno)))
}

/// qemu-io's `wait_break TAG`: waits until a request is suspended there (as qemu-io, forever
/// if none ever is; without a filter it returns at once).
pub(super) fn wait_break_cmd(filters: &Filters, tag: &str) {
    if let Some(f) = filters.first() {
        f.wait_suspended(tag);
    }
}
