//! NBD URIs as QEMU spells them: `nbd://HOST[:PORT]/NAME`, `nbd+tcp://…`, and
//! `nbd+unix:///NAME?socket=PATH`.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// The port NBD servers listen on by default.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD export lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A TCP server.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
        /// Export name.
        name: String,
    },
    /// A server on a Unix socket.
    Unix {
        /// Socket path.
        socket: PathBuf,
        /// Export name.
        name: String,
    },
}

impl NbdAddress {
    /// Whether `s` is an NBD URI (it may still be malformed).
    pub fn is_uri(s: &[u8]) -> bool {
        s.starts_with(b"nbd://") || s.starts_with(b"nbd+tcp://") || s.starts_with(b"nbd+unix://")
    }

    /// Parses an NBD URI.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("invalid NBD URI '{uri}': {why}"));
        let (unix, rest) = if let Some(r) = uri.strip_prefix("nbd+unix://") {
            (true, r)
        } else if let Some(r) = uri
            .strip_prefix("nbd://")
            .or_else(|| uri.strip_prefix("nbd+tcp://"))
        {
            (false, r)
        } else {
            return Err(bad("not an nbd URI"));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let name = percent_decode(path).ok_or_else(|| bad("bad percent escape"))?;
        if unix {
            if !authority.is_empty() {
                return Err(bad("a Unix socket URI takes no host"));
            }
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing socket= parameter"))?;
            let socket = percent_decode(socket).ok_or_else(|| bad("bad percent escape"))?;
            return Ok(NbdAddress::Unix {
                socket: PathBuf::from(socket),
                name,
            });
        }
        if query.is_some() {
            return Err(bad("a TCP URI takes no query"));
        }
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => DEFAULT_PORT,
        };
        Ok(NbdAddress::Tcp {
            host: host.to_string(),
            port,
            name,
        })
    }

    /// The name qemu gives an image behind this address (its `nbd_refresh_filename`): the port
    /// always shown, the path left out for the empty export name, nothing percent-encoded.
    pub fn qemu_filename(&self) -> String {
        match self {
            NbdAddress::Tcp { host, port, name } if name.is_empty() => {
                format!("nbd://{host}:{port}")
            }
            NbdAddress::Tcp { host, port, name } => format!("nbd://{host}:{port}/{name}"),
            NbdAddress::Unix { socket, name } if name.is_empty() => {
                format!("nbd+unix://?socket={}", socket.display())
            }
            NbdAddress::Unix { socket, name } => {
                format!("nbd+unix:///{name}?socket={}", socket.display())
            }
        }
    }

    /// The export name.
    pub fn name(&self) -> &str {
        match self {
            NbdAddress::Tcp { name, .. } | NbdAddress::Unix { name, .. } => name,
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            NbdAddress::parse("nbd://127.0.0.1:1234/disk").ok(),
            Some(NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 1234,
                name: "disk".into()
            })
        );
        assert_eq!(
            NbdAddress::parse("nbd://[::1]/a%20b").ok(),
            Some(NbdAddress::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT,
                name: "a b".into()
            })
        );
        assert_eq!(
            NbdAddress::parse("nbd+unix:///x?socket=/tmp/s").ok(),
            Some(NbdAddress::Unix {
                socket: "/tmp/s".into(),
                name: "x".into()
            })
        );
        let named = |u: &str| NbdAddress::parse(u).map(|a| a.qemu_filename()).ok();
        assert_eq!(named("nbd://h/x").as_deref(), Some("nbd://h:10809/x"));
        assert_eq!(named("nbd+tcp://h:7/").as_deref(), Some("nbd://h:7"));
        assert_eq!(
            named("nbd+unix:///?socket=/s").as_deref(),
            Some("nbd+unix://?socket=/s")
        );
        assert_eq!(
            named("nbd+unix:///e?socket=/s").as_deref(),
            Some("nbd+unix:///e?socket=/s")
        );
        assert!(NbdAddress::parse("nbd+unix:///x").is_err());
        assert!(NbdAddress::parse("nbd://h:99999/x").is_err());
        assert!(NbdAddress::parse("nbd://h/%zz").is_err());
        assert!(NbdAddress::parse("nbd:///x").is_err());
    }
}
