//! Managing the persistent dirty bitmaps of a qcow2 image, as `qemu-img bitmap` does: a list
//! of actions on one bitmap, run in order on an image opened writable, stopping at the first
//! that fails. What the actions change is stored when the image is closed (removal at once),
//! as in QEMU.

use crate::engine::{DirtyBitmap, Qcow2Image};
use crate::error::{Error, Result};

/// One action of `qemu-img bitmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapAction {
    /// Create the bitmap, clean; it tracks writes unless `disabled`. Without a granularity,
    /// QEMU's default: the cluster size, within 4 KiB..64 KiB.
    Add {
        /// Bytes each bit covers (a power of two, 512 B..2 GiB).
        granularity: Option<u64>,
        /// Create it disabled.
        disabled: bool,
    },
    /// Delete the bitmap (an inconsistent one too) and free its clusters.
    Remove,
    /// Clear every bit.
    Clear,
    /// Start tracking writes.
    Enable,
    /// Stop tracking writes.
    Disable,
    /// Mark dirty what the source bitmap has dirty.
    Merge {
        /// The source bitmap's name (in the image itself, or in `source` given to [`run`]).
        source: String,
    },
}

impl BitmapAction {
    /// The action's name as qemu-img prints it ("Operation NAME on bitmap …").
    pub fn name(&self) -> &'static str {
        match self {
            BitmapAction::Add { .. } => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge { .. } => "merge",
        }
    }
}

/// The action that failed and why.
#[derive(Debug)]
pub struct ActionError {
    /// Index of the failed action in the list.
    pub index: usize,
    /// The action's name ([`BitmapAction::name`]).
    pub action: &'static str,
    /// What went wrong.
    pub error: Error,
}

/// QEMU's default granularity for a new bitmap of an image with clusters of `cluster_size`.
pub(crate) fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// Runs `actions` on the bitmap `name` of `image` (opened writable), in order; a merge reads
/// its source bitmap from `source` when given, else from `image`. Stops at the first failure.
pub fn run(
    image: &Qcow2Image,
    name: &str,
    actions: &[BitmapAction],
    source: Option<&Qcow2Image>,
) -> std::result::Result<(), ActionError> {
    for (index, a) in actions.iter().enumerate() {
        run_one(image, name, a, source).map_err(|error| ActionError {
            index,
            action: a.name(),
            error,
        })?;
    }
    Ok(())
}

fn run_one(
    image: &Qcow2Image,
    name: &str,
    action: &BitmapAction,
    source: Option<&Qcow2Image>,
) -> Result<()> {
    match action {
        BitmapAction::Add {
            granularity,
            disabled,
        } => {
            let g = granularity.unwrap_or_else(|| default_granularity(image.cluster_size()));
            image.add_bitmap(name, g, !disabled)
        }
        BitmapAction::Remove => image.remove_bitmap(name),
        BitmapAction::Clear => image.clear_bitmap(name),
        BitmapAction::Enable => image.set_bitmap_enabled(name, true),
        BitmapAction::Disable => image.set_bitmap_enabled(name, false),
        BitmapAction::Merge { source: src } => {
            // The target is looked up first, as QEMU does.
            image.bitmap(name)?;
            let bits: DirtyBitmap = source.unwrap_or(image).bitmap(src)?;
            image.merge_into_bitmap(name, &bits)
        }
    }
}
