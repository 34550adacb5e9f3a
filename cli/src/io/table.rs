//! qemu-io's command table: every command qemu-io 10 has, in its (sorted) order, with its
//! alias, argument counts, usage and one-line summary, as `help` lists them.

/// A command of the table.
pub(super) struct CmdInfo {
    pub(super) name: &'static str,
    pub(super) alt: Option<&'static str>,
    pub(super) argmin: usize,
    /// `None`: any number of arguments.
    pub(super) argmax: Option<usize>,
    /// The usage after the name (`None`: the command has none, not even an empty one).
    pub(super) args: Option<&'static str>,
    pub(super) oneline: &'static str,
    /// Needs write permission on the image (qemu-io's `BLK_PERM_WRITE`).
    pub(super) writes: bool,
    /// Runs without an open image (qemu-io's `CMD_NOFILE_OK` and global commands).
    pub(super) nofile: bool,
    /// qcow2kit has no such command (they drive QEMU-internal drivers: zoned devices).
    pub(super) unsupported: bool,
}

const ANY: Option<usize> = None;

/// A command; `flags` holds `w` (writes), `n` (no file needed) and `u` (unsupported).
const fn cmd(
    name: &'static str,
    alt: Option<&'static str>,
    (argmin, argmax): (usize, Option<usize>),
    args: Option<&'static str>,
    oneline: &'static str,
    flags: &str,
) -> CmdInfo {
    CmdInfo {
        name,
        alt,
        argmin,
        argmax,
        args,
        oneline,
        writes: has(flags, b'w'),
        nofile: has(flags, b'n'),
        unsupported: has(flags, b'u'),
    }
}

/// Whether `flags` holds `c`.
const fn has(flags: &str, c: u8) -> bool {
    let f = flags.as_bytes();
    let mut i = 0;
    while i < f.len() {
        if f[i] == c {
            return true;
        }
        i += 1;
    }
    false
}

const RW_DOC: &str = "reads a number of bytes at a specified offset";
const WR_DOC: &str = "writes a number of bytes at a specified offset";

pub(super) const COMMANDS: &[CmdInfo] = &[
    cmd(
        "abort",
        None,
        (0, Some(0)),
        None,
        "simulate a program crash using abort(3)",
        "n",
    ),
    cmd(
        "aio_flush",
        None,
        (0, Some(0)),
        None,
        "completes all outstanding aio requests",
        "",
    ),
    cmd(
        "aio_read",
        None,
        (2, ANY),
        Some("[-Ciqrv] [-P pattern] off len [len..]"),
        "asynchronously reads a number of bytes",
        "",
    ),
    cmd(
        "aio_write",
        None,
        (2, ANY),
        Some("[-Cfiqruz] [-P pattern] off len [len..]"),
        "asynchronously writes a number of bytes",
        "w",
    ),
    cmd(
        "alloc",
        Some("a"),
        (1, Some(2)),
        Some("offset [count]"),
        "checks if offset is allocated in the file",
        "",
    ),
    cmd(
        "break",
        None,
        (2, Some(2)),
        Some("event tag"),
        "sets a breakpoint on event and tags the stopped request as tag",
        "",
    ),
    cmd(
        "close",
        Some("c"),
        (0, Some(0)),
        None,
        "close the current open file",
        "",
    ),
    cmd(
        "discard",
        Some("d"),
        (2, ANY),
        Some("[-Cq] off len"),
        "discards a number of bytes at a specified offset",
        "w",
    ),
    cmd(
        "flush",
        Some("f"),
        (0, Some(0)),
        None,
        "flush all in-core file state to disk",
        "",
    ),
    cmd(
        "help",
        Some("?"),
        (0, Some(1)),
        Some("[command]"),
        "help for one or all commands",
        "n",
    ),
    cmd(
        "info",
        Some("i"),
        (0, Some(0)),
        None,
        "prints information about the current file",
        "",
    ),
    cmd(
        "length",
        Some("l"),
        (0, Some(0)),
        None,
        "gets the length of the current file",
        "",
    ),
    cmd(
        "map",
        None,
        (0, Some(0)),
        Some(""),
        "prints the allocated areas of a file",
        "",
    ),
    cmd(
        "open",
        Some("o"),
        (1, ANY),
        Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
        "open the file specified by path",
        "n",
    ),
    cmd(
        "quit",
        Some("q"),
        (0, Some(0)),
        None,
        "exit the program",
        "n",
    ),
    cmd(
        "read",
        Some("r"),
        (2, ANY),
        Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        RW_DOC,
        "",
    ),
    cmd(
        "readv",
        None,
        (2, ANY),
        Some("[-Cqrv] [-P pattern] off len [len..]"),
        RW_DOC,
        "",
    ),
    cmd(
        "remove_break",
        None,
        (1, Some(1)),
        Some("tag"),
        "remove a breakpoint by tag",
        "",
    ),
    cmd(
        "reopen",
        None,
        (0, ANY),
        Some("[(-r|-w)] [-c cache] [-o options]"),
        "reopens an image with new options",
        "",
    ),
    cmd(
        "resume",
        None,
        (1, Some(1)),
        Some("tag"),
        "resumes the request tagged as tag",
        "",
    ),
    cmd(
        "sigraise",
        None,
        (1, Some(1)),
        Some("signal"),
        "raises a signal",
        "n",
    ),
    cmd(
        "sleep",
        None,
        (1, Some(1)),
        None,
        "waits for the given value in milliseconds",
        "n",
    ),
    cmd(
        "truncate",
        Some("t"),
        (1, Some(3)),
        Some("[-m prealloc_mode] off"),
        "truncates the current file at the given offset",
        "w",
    ),
    cmd(
        "wait_break",
        None,
        (1, Some(1)),
        Some("tag"),
        "waits for the suspension of a request",
        "",
    ),
    cmd(
        "write",
        Some("w"),
        (2, ANY),
        Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
        WR_DOC,
        "w",
    ),
    cmd(
        "writev",
        None,
        (2, ANY),
        Some("[-Cfqr] [-P pattern] off len [len..]"),
        WR_DOC,
        "w",
    ),
    cmd(
        "zone_append",
        Some("zap"),
        (3, Some(4)),
        Some("offset len [len..]"),
        "append write a number of bytes at a specified offset",
        "wu",
    ),
    cmd(
        "zone_close",
        Some("zc"),
        (2, Some(2)),
        Some("offset len"),
        "close a range of zones in zone block device",
        "wu",
    ),
    cmd(
        "zone_finish",
        Some("zf"),
        (2, Some(2)),
        Some("offset len"),
        "finish a range of zones in zone block device",
        "wu",
    ),
    cmd(
        "zone_open",
        Some("zo"),
        (2, Some(2)),
        Some("offset len"),
        "explicit open a range of zones in zone block device",
        "wu",
    ),
    cmd(
        "zone_report",
        Some("zrp"),
        (2, Some(2)),
        Some("offset number"),
        "report zone information",
        "u",
    ),
    cmd(
        "zone_reset",
        Some("zrs"),
        (2, Some(2)),
        Some("offset len"),
        "reset a zone write pointer in zone block device",
        "wu",
    ),
];

/// The command `name` names (by its name or its alias).
pub(super) fn find(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.alt == Some(name))
}

/// qemu-io's one-line summary of `ci` under the name `shown`.
pub(super) fn oneline(ci: &CmdInfo, shown: &str) -> String {
    match ci.args {
        Some(a) => format!("{shown} {a} -- {}\n", ci.oneline),
        None => format!("{shown} -- {}\n", ci.oneline),
    }
}
