//! The rules of QEMU's blkdebug filter as its options give them: a node's `driver=blkdebug`
//! with its `image.*` child, `config` file, `inject-error.N.*` and `set-state.N.*` rules, taken
//! out of a flattened option list (`--image-opts`, `json:` names, qemu-io's `-o`).

use qcow2kit::chain::{FileRole, Interpose};
use qcow2kit::io::blkdebug::{
    Blkdebug, BlkdebugConfig, DebugEvent, InjectError, IoType, Reporter, SetState,
};
use qcow2kit::io::Storage;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The hook that puts a blkdebug filter with the rules `file` over the image's file and one
/// with `data_file` over its data file (neither where `None`); each filter made is handed to
/// `made`, and reports suspended requests to `report`.
pub fn interpose(
    file: Option<BlkdebugConfig>,
    data_file: Option<BlkdebugConfig>,
    report: Option<Reporter>,
    made: impl Fn(Arc<Blkdebug>) + Send + Sync + 'static,
) -> Interpose {
    Interpose(Arc::new(
        move |role: FileRole, storage: Arc<dyn Storage>| -> Arc<dyn Storage> {
            let config = match role {
                FileRole::DataFile => data_file.clone(),
                _ => file.clone(),
            };
            let Some(config) = config else {
                return storage;
            };
            let f = Arc::new(Blkdebug::new(storage, config, report.clone()));
            made(f.clone());
            f
        },
    ))
}

/// Takes the options of the node `node` (`file`, `data-file`) out of `options` when its driver
/// is blkdebug: the filter's rules are returned, and the file under it is left as
/// `NODE.filename`. `None` (and `options` untouched) when the node is not blkdebug.
pub fn split_blkdebug(
    options: &mut Vec<(String, String)>,
    node: &str,
) -> Result<Option<BlkdebugConfig>, String> {
    let driver = format!("{node}.driver");
    if !options.iter().any(|(k, v)| *k == driver && v == "blkdebug") {
        return Ok(None);
    }
    let prefix = format!("{node}.");
    let mut mine = Vec::new();
    options.retain(|(k, v)| {
        let take = k.starts_with(&prefix) && k != &format!("{node}.filename");
        if take {
            mine.push((k[prefix.len()..].to_string(), v.clone()));
        }
        !take
    });
    let mut cfg = BlkdebugConfig::default();
    let mut groups: [BTreeMap<u64, Vec<(String, String)>>; 2] = Default::default();
    for (k, v) in mine {
        match k.as_str() {
            "driver" | "align" => {}
            "image.filename" | "x-image" => options.push((format!("{node}.filename"), v)),
            "image.driver" if v == "file" => {}
            "image.driver" => return Err(format!("Driver '{v}' is not supported by qcow2kit")),
            "config" => read_config_file(&v, &mut cfg)?,
            _ => {
                let (g, rest) = if let Some(r) = k.strip_prefix("inject-error.") {
                    (0, r)
                } else if let Some(r) = k.strip_prefix("set-state.") {
                    (1, r)
                } else {
                    return Err(format!("Invalid parameter '{k}'"));
                };
                let (index, key) = rest
                    .split_once('.')
                    .ok_or_else(|| format!("Invalid parameter '{k}'"))?;
                let index: u64 = index
                    .parse()
                    .map_err(|_| format!("Invalid parameter '{k}'"))?;
                groups[g]
                    .entry(index)
                    .or_default()
                    .push((key.to_string(), v));
            }
        }
    }
    let [inject, set] = groups;
    for pairs in inject.into_values() {
        add_rule(&mut cfg, "inject-error", &pairs)?;
    }
    for pairs in set.into_values() {
        add_rule(&mut cfg, "set-state", &pairs)?;
    }
    Ok(Some(cfg))
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
        .map(|v| crate::io::parse_number("state", v))
        .transpose()?
        .unwrap_or(0);
    if group == "set-state" {
        let new_state = get("new_state")
            .map(|v| crate::io::parse_number("new_state", v))
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
        rule.errno = i32::try_from(crate::io::parse_number("errno", v)?)
            .map_err(|_| "Parameter 'errno' expects a number".to_string())?;
    }
    if let Some(v) = get("sector") {
        let sector = crate::io::parse_number("sector", v)?;
        rule.offset = Some(
            sector
                .checked_mul(512)
                .ok_or("Parameter 'sector' expects a number")?,
        );
    }
    if let Some(v) = get("once") {
        rule.once = crate::io::parse_bool("once", v)?;
    }
    if let Some(v) = get("immediately") {
        crate::io::parse_bool("immediately", v)?;
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
pub fn read_config_file(path: &str, cfg: &mut BlkdebugConfig) -> Result<(), String> {
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
