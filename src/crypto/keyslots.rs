//! Key-slot management of a LUKS header, as `qemu-img amend -o encrypt.state=…` does it
//! (QEMU's `qcrypto_block_luks_amend_options`): every check in QEMU's order with its message,
//! decided before anything is written.

use super::luks::{timed_iterations, LuksHeader, LuksLimits, NUM_KEY_SLOTS};
use super::{CryptoError, MasterKey, Passphrase};
use std::time::Duration;

/// QEMU's default PBKDF2 time for a new key slot.
pub const DEFAULT_ITER_TIME: Duration = Duration::from_millis(2000);

/// A change of key slots (`encrypt.state`, `encrypt.keyslot`, `encrypt.new-secret`,
/// `encrypt.old-secret`, `encrypt.iter-time`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlotChange {
    /// `true` to activate a slot (`state=active`), `false` to erase (`state=inactive`).
    pub activate: bool,
    /// The slot, when given (QEMU takes any integer and checks its range).
    pub keyslot: Option<i64>,
    /// The passphrase a new slot opens with.
    pub new_secret: Option<Passphrase>,
    /// Erase the slots this passphrase opens.
    pub old_secret: Option<Passphrase>,
    /// PBKDF2 time of a new slot ([`DEFAULT_ITER_TIME`] when not given).
    pub iter_time: Option<Duration>,
    /// Overwrite an active slot, erase an inactive one or the last one (`--force`).
    pub force: bool,
}

/// What a [`KeySlotChange`] comes to, every check passed.
#[derive(Debug)]
pub enum KeySlotPlan {
    /// Store the master key in `slot` under the new passphrase with `iterations`.
    Store {
        /// The slot.
        slot: usize,
        /// PBKDF2 iterations.
        iterations: u32,
        /// The master key, unlocked with the image's passphrase.
        master_key: MasterKey,
        /// The new passphrase.
        passphrase: Passphrase,
    },
    /// Erase these slots.
    Erase(Vec<usize>),
}

fn invalid(msg: String) -> CryptoError {
    CryptoError::InvalidArgument(msg)
}

fn slot_index(keyslot: i64) -> Result<usize, CryptoError> {
    usize::try_from(keyslot)
        .ok()
        .filter(|&k| k < NUM_KEY_SLOTS)
        .ok_or_else(|| {
            invalid(format!(
                "Invalid keyslot {keyslot} specified, must be between 0 and {}",
                NUM_KEY_SLOTS - 1
            ))
        })
}

impl LuksHeader {
    /// Decides `change` against this header (its key material in `area`); `current` is the
    /// passphrase the image was opened with (it unlocks the master key a new slot stores).
    pub(crate) fn plan_key_slots(
        &self,
        area: &[u8],
        change: &KeySlotChange,
        current: &[u8],
        limits: &LuksLimits,
    ) -> Result<KeySlotPlan, CryptoError> {
        let active = |i: usize| self.slots[i].active;
        let n_active = (0..NUM_KEY_SLOTS).filter(|&i| active(i)).count();
        if change.activate {
            let Some(new) = &change.new_secret else {
                return Err(invalid(
                    "'new-secret' is required to activate a keyslot".into(),
                ));
            };
            if change.old_secret.is_some() {
                return Err(invalid(
                    "'old-secret' must not be given when activating keyslots".into(),
                ));
            }
            let slot = match change.keyslot {
                Some(k) => slot_index(k)?,
                None => (0..NUM_KEY_SLOTS).find(|&i| !active(i)).ok_or_else(|| {
                    invalid("Can't add a keyslot - all keyslots are in use".into())
                })?,
            };
            if !change.force && active(slot) {
                return Err(invalid(format!(
                    "Refusing to overwrite active keyslot {slot} - please erase it first"
                )));
            }
            let master_key = self.unlock(area, current, limits)?;
            let ms = change.iter_time.unwrap_or(DEFAULT_ITER_TIME).as_millis();
            let iterations = timed_iterations(
                self.hash,
                new.as_bytes().len(),
                self.master_key_len as usize,
                ms,
                1,
            )?;
            return Ok(KeySlotPlan::Store {
                slot,
                iterations,
                master_key,
                passphrase: new.clone(),
            });
        }
        if change.new_secret.is_some() {
            return Err(invalid(
                "'new-secret' must not be given when erasing keyslots".into(),
            ));
        }
        if change.iter_time.is_some() {
            return Err(invalid(
                "'iter-time' must not be given when erasing keyslots".into(),
            ));
        }
        if let Some(k) = change.keyslot {
            let slot = slot_index(k)?;
            if let Some(old) = &change.old_secret {
                if self
                    .unlock_slot(area, slot, old.as_bytes(), limits)?
                    .is_none()
                {
                    return Err(invalid(format!(
                        "Given keyslot {slot} doesn't contain the given old password for erase \
                         operation"
                    )));
                }
            }
            if !change.force && !active(slot) {
                return Err(invalid(format!(
                    "Given keyslot {slot} is already erased (inactive) "
                )));
            }
            if !change.force && n_active == 1 {
                return Err(invalid(format!(
                    "Attempt to erase the only active keyslot {slot} which will erase all the \
                     data in the image irreversibly - refusing operation"
                )));
            }
            return Ok(KeySlotPlan::Erase(vec![slot]));
        }
        let Some(old) = &change.old_secret else {
            return Err(invalid(
                "To erase keyslot(s), either explicit keyslot index or the password currently \
                 contained in them must be given"
                    .into(),
            ));
        };
        let mut slots = Vec::new();
        for i in 0..NUM_KEY_SLOTS {
            if self.unlock_slot(area, i, old.as_bytes(), limits)?.is_some() {
                slots.push(i);
            }
        }
        if slots.is_empty() {
            return Err(invalid(
                "No keyslots match given (old) password for erase operation".into(),
            ));
        }
        if !change.force && slots.len() == n_active {
            return Err(invalid(
                "All the active keyslots match the (old) password that was given and erasing \
                 them will erase all the data in the image irreversibly - refusing operation"
                    .into(),
            ));
        }
        Ok(KeySlotPlan::Erase(slots))
    }
}
