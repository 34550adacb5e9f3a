//! QEMU's blkdebug filter in qemu-io: the `blkdebug:CONFIG:FILE` file name, `file.driver=blkdebug`
//! and `data-file.driver=blkdebug` with their `inject-error.N.*` / `set-state.N.*` rules and
//! config file, and the commands that drive breakpoints (`break`, `wait_break`, `resume`,
//! `remove_break`) with qemu-io's messages.

use super::output::{print_buffered, stdout_is_tty, strerror};
use super::qopts::Opts;
use crate::blkdebug_rules::{read_config_file, split_blkdebug};
use qcow2kit::chain::Interpose;
use qcow2kit::io::blkdebug::{Blkdebug, BlkdebugConfig, DebugEvent, Reporter};
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
        let report: Reporter = Arc::new(move |line: &str| {
            print_buffered(&format!("{line}\n"), tty);
        });
        let hook =
            crate::blkdebug_rules::interpose(self.file, self.data_file, Some(report), move |f| {
                list.lock().unwrap_or_else(|e| e.into_inner()).push(f)
            });
        Some((hook, filters))
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
    let mut pairs: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let file = split_blkdebug(&mut pairs, "file")?;
    let data_file = split_blkdebug(&mut pairs, "data-file")?;
    if file.is_none() && data_file.is_none() {
        return Ok(setup);
    }
    let keys: Vec<String> = opts.keys().map(str::to_string).collect();
    for k in keys {
        opts.take(&k);
    }
    for (k, v) in pairs {
        opts.set(&k, v);
    }
    if file.is_some() {
        if let Some(image) = opts.take("file.filename") {
            *name = Some(image);
        }
    }
    setup.file = file.or(setup.file);
    setup.data_file = data_file;
    Ok(setup)
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
