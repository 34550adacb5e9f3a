//! QEMU's `blkdebug` driver as a storage filter, for fault-injection tests of everything above
//! a [`Storage`].
//!
//! The engine raises [`DebugEvent`]s on the storage it is about to use ([`Storage::debug_event`])
//! at the points QEMU's qcow2 driver raises its `BLKDBG_*` events. A [`Blkdebug`] storage
//! reacts to them as QEMU's blkdebug does:
//!
//! - an `inject-error` rule of the event (in the current state) becomes *active*; requests of
//!   its I/O types (at its offset, if it has one) then fail with its errno until another event
//!   replaces the active rules, or at once if the rule is `once`. Rules of the event
//!   [`DebugEvent::None`] are active from the start;
//! - a `set-state` rule moves the filter to a new state, which selects the rules that apply;
//! - a breakpoint ([`Blkdebug::set_breakpoint`]) suspends the request that raises its event,
//!   on the thread that raised it, until [`Blkdebug::resume`]; the engine raises events with no
//!   engine lock held but the guest range of the request, so that other requests go on.
//!
//! Invariants: rules of one event are tried newest first (QEMU's order); a breakpoint fires
//! once; a resumed request has reported its resumption before [`Blkdebug::resume`] returns.

use super::Storage;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

macro_rules! events {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// An event the engine raises just before the storage work QEMU names after it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum DebugEvent {
            $($(#[$doc])* $variant,)*
        }

        impl DebugEvent {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$variant,)*];

            /// QEMU's name of the event (as `inject-error.event` and qemu-io's `break` take it).
            pub fn name(self) -> &'static str {
                match self {
                    $(DebugEvent::$variant => $name,)*
                }
            }
        }
    };
}

events! {
    /// An L1 table entry is written.
    L1Update = "l1_update",
    /// A larger L1 table is allocated.
    L1GrowAllocTable = "l1_grow_alloc_table",
    /// A larger L1 table is written.
    L1GrowWriteTable = "l1_grow_write_table",
    /// The header is switched to a larger L1 table.
    L1GrowActivateTable = "l1_grow_activate_table",
    /// An L2 table is read.
    L2Load = "l2_load",
    /// L2 entries are written.
    L2Update = "l2_update",
    /// An L2 entry of a compressed cluster is written.
    L2UpdateCompressed = "l2_update_compressed",
    /// A new L2 table's content is read from the old one.
    L2AllocCowRead = "l2_alloc_cow_read",
    /// A new L2 table is written.
    L2AllocWrite = "l2_alloc_write",
    /// Guest data is read.
    ReadAio = "read_aio",
    /// Guest data is read from the backing file.
    ReadBackingAio = "read_backing_aio",
    /// A compressed cluster is read.
    ReadCompressed = "read_compressed",
    /// Guest data is written.
    WriteAio = "write_aio",
    /// A compressed cluster is written.
    WriteCompressed = "write_compressed",
    /// VM state is read.
    VmstateLoad = "vmstate_load",
    /// VM state is written.
    VmstateSave = "vmstate_save",
    /// The parts of a cluster a write does not cover are read (copy-on-write).
    CowRead = "cow_read",
    /// A cluster is written with the parts copied on write.
    CowWrite = "cow_write",
    /// The refcount table is read.
    ReftableLoad = "reftable_load",
    /// The refcount table grows.
    ReftableGrow = "reftable_grow",
    /// A refcount table entry is written.
    ReftableUpdate = "reftable_update",
    /// A refcount block is read.
    RefblockLoad = "refblock_load",
    /// A refcount block is written.
    RefblockUpdate = "refblock_update",
    /// Part of a refcount block is written.
    RefblockUpdatePart = "refblock_update_part",
    /// A refcount block is allocated.
    RefblockAlloc = "refblock_alloc",
    /// A new refcount block is hooked into the table.
    RefblockAllocHookup = "refblock_alloc_hookup",
    /// A new refcount block is written.
    RefblockAllocWrite = "refblock_alloc_write",
    /// New refcount blocks are written.
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    /// A new refcount table is written.
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    /// The header is switched to a new refcount table.
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    /// Clusters are allocated.
    ClusterAlloc = "cluster_alloc",
    /// Bytes for a compressed cluster are allocated.
    ClusterAllocBytes = "cluster_alloc_bytes",
    /// Clusters are freed.
    ClusterFree = "cluster_free",
    /// Data is handed to the operating system.
    FlushToOs = "flush_to_os",
    /// The storage is flushed to the disk.
    FlushToDisk = "flush_to_disk",
    /// Read-modify-write: the head is read.
    PwritevRmwHead = "pwritev_rmw_head",
    /// Read-modify-write: the head was read.
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    /// Read-modify-write: the tail is read.
    PwritevRmwTail = "pwritev_rmw_tail",
    /// Read-modify-write: the tail was read.
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    /// A write is issued.
    Pwritev = "pwritev",
    /// A zero write is issued.
    PwritevZero = "pwritev_zero",
    /// A write is done.
    PwritevDone = "pwritev_done",
    /// An empty image is prepared.
    EmptyImagePrepare = "empty_image_prepare",
    /// A smaller L1 table is written.
    L1ShrinkWriteTable = "l1_shrink_write_table",
    /// The L2 tables a shrink drops are freed.
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    /// Copy-on-read writes data.
    CorWrite = "cor_write",
    /// Space for clusters is allocated.
    ClusterAllocSpace = "cluster_alloc_space",
    /// No event: rules of this event are active from the start.
    None = "none",
}

impl DebugEvent {
    /// The event QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        DebugEvent::ALL.iter().copied().find(|e| e.name() == name)
    }
}

/// The kinds of request an `inject-error` rule fails (QEMU's `iotype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Zero writes.
    WriteZeroes,
    /// Discards (hole punching).
    Discard,
    /// Flushes.
    Flush,
    /// Allocation queries.
    BlockStatus,
}

impl IoType {
    /// The type QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<IoType> {
        Some(match name {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// An `inject-error` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError {
    /// The event that arms the rule.
    pub event: DebugEvent,
    /// The state the rule applies in (0: any).
    pub state: u64,
    /// The errno the failed requests return (QEMU's default: `EIO`).
    pub errno: i32,
    /// Fail one request only.
    pub once: bool,
    /// Fail only requests covering this byte (QEMU's `sector` times 512).
    pub offset: Option<u64>,
    /// The request types failed; `None`: reads, writes, zero writes, discards and flushes.
    pub iotype: Option<IoType>,
}

impl InjectError {
    /// A rule failing every request with `EIO` once `event` is raised.
    pub fn new(event: DebugEvent) -> Self {
        InjectError {
            event,
            state: 0,
            errno: 5,
            once: false,
            offset: None,
            iotype: None,
        }
    }

    fn mask(&self) -> u8 {
        match self.iotype {
            Some(t) => t.bit(),
            None => {
                IoType::Read.bit()
                    | IoType::Write.bit()
                    | IoType::WriteZeroes.bit()
                    | IoType::Discard.bit()
                    | IoType::Flush.bit()
            }
        }
    }
}

/// A `set-state` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetState {
    /// The event that fires the rule.
    pub event: DebugEvent,
    /// The state the rule applies in (0: any).
    pub state: u64,
    /// The state the filter moves to.
    pub new_state: u64,
}

/// The rules a filter starts with (QEMU's `inject-error` and `set-state` groups).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkdebugConfig {
    /// Error injection rules.
    pub inject_error: Vec<InjectError>,
    /// State change rules.
    pub set_state: Vec<SetState>,
}

#[derive(Debug)]
enum Action {
    Inject(InjectError),
    SetState(u64),
    Suspend(String),
}

#[derive(Debug)]
struct Rule {
    id: u64,
    event: DebugEvent,
    state: u64,
    action: Action,
}

#[derive(Debug)]
struct Suspended {
    id: u64,
    tag: String,
    resumed: bool,
}

#[derive(Debug, Default)]
struct Rules {
    /// Newest first.
    rules: Vec<Rule>,
    /// Ids of the active `inject-error` rules, first tried first.
    active: Vec<u64>,
    state: u64,
    next_id: u64,
    /// Newest first.
    suspended: Vec<Suspended>,
}

impl Rules {
    fn add(&mut self, event: DebugEvent, state: u64, action: Action) {
        self.next_id += 1;
        self.rules.insert(
            0,
            Rule {
                id: self.next_id,
                event,
                state,
                action,
            },
        );
    }
}

/// Where a filter reports suspended and resumed requests (qemu-io prints the lines).
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

/// A storage filter injecting errors and suspending requests as QEMU's blkdebug driver does.
pub struct Blkdebug {
    inner: Arc<dyn Storage>,
    rules: Mutex<Rules>,
    changed: Condvar,
    report: Option<Reporter>,
}

impl std::fmt::Debug for Blkdebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blkdebug")
            .field("inner", &self.inner)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Blkdebug {
    /// A filter over `inner` with the rules of `config`, in state 1; rules of
    /// [`DebugEvent::None`] are active at once. `report` receives QEMU's
    /// "blkdebug: Suspended request 'TAG'" and "blkdebug: Resuming request 'TAG'" lines.
    pub fn new(inner: Arc<dyn Storage>, config: BlkdebugConfig, report: Option<Reporter>) -> Self {
        let mut rules = Rules {
            state: 1,
            ..Rules::default()
        };
        for r in config.inject_error {
            rules.add(r.event, r.state, Action::Inject(r));
        }
        for r in config.set_state {
            rules.add(r.event, r.state, Action::SetState(r.new_state));
        }
        let f = Blkdebug {
            inner,
            rules: Mutex::new(rules),
            changed: Condvar::new(),
            report,
        };
        f.event(DebugEvent::None);
        f
    }

    fn lock(&self) -> MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn say(&self, line: &str) {
        if let Some(r) = &self.report {
            r(line);
        }
    }

    /// Suspends the next request that raises `event` until [`Blkdebug::resume`] of `tag`
    /// (qemu-io's `break`).
    pub fn set_breakpoint(&self, event: DebugEvent, tag: &str) {
        self.lock().add(event, 0, Action::Suspend(tag.to_string()));
    }

    /// Removes the breakpoints of `tag` and resumes the requests suspended at them (qemu-io's
    /// `remove_break`); `false` if there were none.
    pub fn remove_breakpoint(&self, tag: &str) -> bool {
        let mut r = self.lock();
        let before = r.rules.len();
        r.rules
            .retain(|x| !matches!(&x.action, Action::Suspend(t) if t == tag));
        let mut found = r.rules.len() != before;
        let ids: Vec<u64> = r
            .suspended
            .iter()
            .filter(|s| s.tag == tag)
            .map(|s| s.id)
            .collect();
        drop(r);
        for id in ids {
            self.resume_id(id);
            found = true;
        }
        found
    }

    /// Whether a request is suspended at a breakpoint of `tag`.
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.lock().suspended.iter().any(|s| s.tag == tag)
    }

    /// How many requests are suspended at breakpoints now.
    pub fn suspended_count(&self) -> usize {
        self.lock().suspended.len()
    }

    /// Waits until a request is suspended at a breakpoint of `tag` (qemu-io's `wait_break`).
    pub fn wait_suspended(&self, tag: &str) {
        let mut r = self.lock();
        while !r.suspended.iter().any(|s| s.tag == tag) {
            r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Resumes the newest request suspended at a breakpoint of `tag` (qemu-io's `resume`) and
    /// returns once it has reported its resumption; `false` if none is suspended there.
    pub fn resume(&self, tag: &str) -> bool {
        let id = self
            .lock()
            .suspended
            .iter()
            .find(|s| s.tag == tag)
            .map(|s| s.id);
        match id {
            Some(id) => {
                self.resume_id(id);
                true
            }
            None => false,
        }
    }

    fn resume_id(&self, id: u64) {
        let mut r = self.lock();
        if let Some(s) = r.suspended.iter_mut().find(|s| s.id == id) {
            s.resumed = true;
        }
        self.changed.notify_all();
        while r.suspended.iter().any(|s| s.id == id) {
            r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Processes `event` as QEMU's blkdebug does (see the module docs).
    fn event(&self, event: DebugEvent) {
        let mut r = self.lock();
        let state = r.state;
        let mut new_state = state;
        let mut injected = false;
        let ids: Vec<u64> = r
            .rules
            .iter()
            .filter(|x| x.event == event && (x.state == 0 || x.state == state))
            .map(|x| x.id)
            .collect();
        for id in ids {
            let Some(i) = r.rules.iter().position(|x| x.id == id) else {
                continue;
            };
            match &r.rules[i].action {
                Action::Inject(_) => {
                    if !injected {
                        r.active.clear();
                        injected = true;
                    }
                    r.active.insert(0, id);
                }
                Action::SetState(s) => new_state = *s,
                Action::Suspend(tag) => {
                    let tag = tag.clone();
                    r.rules.remove(i);
                    r.suspended.insert(
                        0,
                        Suspended {
                            id,
                            tag: tag.clone(),
                            resumed: false,
                        },
                    );
                    self.say(&format!("blkdebug: Suspended request '{tag}'"));
                    self.changed.notify_all();
                    while !r.suspended.iter().any(|s| s.id == id && s.resumed) {
                        r = self.changed.wait(r).unwrap_or_else(|e| e.into_inner());
                    }
                    self.say(&format!("blkdebug: Resuming request '{tag}'"));
                    r.suspended.retain(|s| s.id != id);
                    self.changed.notify_all();
                }
            }
        }
        r.state = new_state;
    }

    /// The error of the first active rule that fails a request of `kind` over
    /// `offset..offset + len` (`len` 0: any offset only), removing a `once` rule.
    fn check(&self, kind: IoType, offset: u64, len: u64) -> io::Result<()> {
        let mut r = self.lock();
        let hit = r.active.iter().copied().find(|id| {
            r.rules.iter().any(|x| {
                x.id == *id
                    && matches!(&x.action, Action::Inject(i) if i.mask() & kind.bit() != 0
                    && match i.offset {
                        None => true,
                        Some(o) => len > 0 && o >= offset && o - offset < len,
                    })
            })
        });
        let Some(id) = hit else {
            return Ok(());
        };
        let Some(i) = r.rules.iter().position(|x| x.id == id) else {
            return Ok(());
        };
        let Action::Inject(rule) = &r.rules[i].action else {
            return Ok(());
        };
        let errno = rule.errno;
        if rule.once {
            r.active.retain(|&a| a != id);
            r.rules.remove(i);
        }
        Err(io::Error::from_raw_os_error(errno))
    }
}

impl Storage for Blkdebug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(IoType::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        self.check(IoType::Flush, 0, 0)?;
        self.inner.flush()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(IoType::Discard, offset, len)?;
        self.inner.punch_hole(offset, len)
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        self.check(IoType::BlockStatus, offset, 1)?;
        self.inner.data_run(offset)
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }

    fn debug_event(&self, event: DebugEvent) {
        self.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemoryStorage;
    use std::time::Duration;

    fn filter(config: BlkdebugConfig) -> Arc<Blkdebug> {
        Arc::new(Blkdebug::new(Arc::new(MemoryStorage::new()), config, None))
    }

    #[test]
    fn every_event_name_round_trips() {
        for &e in DebugEvent::ALL {
            assert_eq!(DebugEvent::from_name(e.name()), Some(e));
        }
        assert_eq!(DebugEvent::from_name("no_such_event"), None);
    }

    #[test]
    fn a_rule_fails_requests_only_after_its_event() {
        let mut rule = InjectError::new(DebugEvent::L2Update);
        rule.errno = 28;
        rule.iotype = Some(IoType::Write);
        let f = filter(BlkdebugConfig {
            inject_error: vec![rule],
            ..Default::default()
        });
        f.write_at(b"x", 0).unwrap();
        f.debug_event(DebugEvent::WriteAio);
        f.write_at(b"x", 0).unwrap();
        f.debug_event(DebugEvent::L2Update);
        let e = f.write_at(b"x", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        // Other request types pass.
        f.read_at(&mut [0u8; 1], 0).unwrap();
        f.flush().unwrap();
    }

    #[test]
    fn none_rules_are_active_from_the_start_and_once_fails_once() {
        let mut rule = InjectError::new(DebugEvent::None);
        rule.iotype = Some(IoType::Flush);
        rule.once = true;
        let f = filter(BlkdebugConfig {
            inject_error: vec![rule],
            ..Default::default()
        });
        assert_eq!(f.flush().unwrap_err().raw_os_error(), Some(5));
        f.flush().unwrap();
    }

    #[test]
    fn an_offset_rule_fails_only_requests_covering_it() {
        let mut rule = InjectError::new(DebugEvent::None);
        rule.offset = Some(1024);
        let f = filter(BlkdebugConfig {
            inject_error: vec![rule],
            ..Default::default()
        });
        f.write_at(&[0; 512], 0).unwrap();
        f.write_at(&[0; 512], 512).unwrap();
        assert!(f.write_at(&[0; 512], 1024).is_err());
        assert!(f.write_at(&[0; 2048], 0).is_err());
    }

    #[test]
    fn set_state_selects_the_rules_that_apply() {
        let mut rule = InjectError::new(DebugEvent::WriteAio);
        rule.state = 2;
        let f = filter(BlkdebugConfig {
            inject_error: vec![rule],
            set_state: vec![SetState {
                event: DebugEvent::L2Update,
                state: 1,
                new_state: 2,
            }],
        });
        f.debug_event(DebugEvent::WriteAio);
        f.write_at(b"x", 0).unwrap();
        f.debug_event(DebugEvent::L2Update);
        f.debug_event(DebugEvent::WriteAio);
        assert!(f.write_at(b"x", 0).is_err());
    }

    #[test]
    fn a_breakpoint_suspends_the_raising_thread_until_resumed() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let f = Arc::new(Blkdebug::new(
            Arc::new(MemoryStorage::new()),
            BlkdebugConfig::default(),
            Some(Arc::new(move |s: &str| {
                l2.lock().unwrap().push(s.to_string())
            })),
        ));
        f.set_breakpoint(DebugEvent::WriteAio, "A");
        let g = f.clone();
        let t = std::thread::spawn(move || {
            g.debug_event(DebugEvent::WriteAio);
            g.write_at(b"done", 0).unwrap();
        });
        f.wait_suspended("A");
        std::thread::sleep(Duration::from_millis(20));
        let mut b = [0u8; 4];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, &[0; 4], "the suspended request went on");
        assert!(f.resume("A"));
        t.join().unwrap();
        assert!(!f.is_suspended("A"));
        assert!(!f.resume("A"));
        // The breakpoint fired once.
        f.debug_event(DebugEvent::WriteAio);
        assert_eq!(
            *lines.lock().unwrap(),
            vec![
                "blkdebug: Suspended request 'A'".to_string(),
                "blkdebug: Resuming request 'A'".to_string()
            ]
        );
    }

    #[test]
    fn remove_breakpoint_drops_unfired_breakpoints() {
        let f = filter(BlkdebugConfig::default());
        assert!(!f.remove_breakpoint("B"));
        f.set_breakpoint(DebugEvent::CowRead, "B");
        assert!(f.remove_breakpoint("B"));
        f.debug_event(DebugEvent::CowRead);
        assert!(!f.is_suspended("B"));
    }
}
