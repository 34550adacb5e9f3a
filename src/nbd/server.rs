//! Listening for clients: a thread per connection, a cap on how many are served at once
//! (qemu-nbd's `-e`), and whether the server outlives its clients (qemu-nbd's `-t`).

use super::{serve_connection, Export, Stream};
use crate::error::{Error, Result};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// qemu-nbd's default `--handshake-limit`.
pub const DEFAULT_HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How often the accept loop looks at its stop flag and client count.
const POLL: Duration = Duration::from_millis(5);

/// Where a server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket, removed again when the server ends.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `addr` (port 0 picks a free port: see [`Listener::local_port`]).
    pub fn bind_tcp(addr: SocketAddr) -> Result<Self> {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(format!("binding to {addr}"), e))?;
        Ok(Listener::Tcp(l))
    }

    /// Listens on a new Unix socket at `path`.
    pub fn bind_unix(path: &Path) -> Result<Self> {
        let l = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("binding to '{}'", path.display()), e))?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }

    /// The TCP port listened on, if this is a TCP listener.
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    /// A client, or `None` when none is waiting.
    fn accept(&self) -> io::Result<Option<Box<dyn Stream>>> {
        let r: io::Result<Box<dyn Stream>> = match self {
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Box::new(s) as Box<dyn Stream>)
            }),
            Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Box::new(s) as Box<dyn Stream>)
            }),
        };
        match r {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Connections being served, with a handle each to shut them down.
#[derive(Default)]
struct Active {
    next: u64,
    conns: Vec<(u64, Box<dyn Stream>)>,
}

/// Stops a running [`Server`] from another thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    active: Arc<Mutex<Active>>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Stops accepting clients and disconnects those connected; [`Server::run`] then waits for
    /// their requests in flight, flushes the exports and returns.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        for (_, s) in &active.conns {
            s.shutdown_both();
        }
    }
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Arc<Export>>,
    listener: Listener,
    max_clients: usize,
    persistent: bool,
    handshake_limit: Option<Duration>,
    handle: ShutdownHandle,
}

impl Server {
    /// A server of `exports` on `listener` that serves one client at a time and ends once its
    /// first client has gone (qemu-nbd's defaults).
    pub fn new(exports: Vec<Arc<Export>>, listener: Listener) -> Self {
        Server {
            exports,
            listener,
            max_clients: 1,
            persistent: false,
            handshake_limit: Some(DEFAULT_HANDSHAKE_LIMIT),
            handle: ShutdownHandle {
                stop: Arc::new(AtomicBool::new(false)),
                active: Arc::new(Mutex::new(Active::default())),
            },
        }
    }

    /// Serves up to `n` clients at once (0: no limit), as qemu-nbd's `-e N`.
    pub fn max_clients(mut self, n: usize) -> Self {
        self.max_clients = n;
        self
    }

    /// Keeps serving after the last client has gone (qemu-nbd's `-t`).
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// How long a client may take to finish its handshake before it is dropped (`None`: no
    /// limit); 10 seconds by default, as qemu-nbd's `--handshake-limit`. A client that connects
    /// and says nothing would otherwise hold one of the `max_clients` places forever.
    pub fn handshake_limit(mut self, limit: Option<Duration>) -> Self {
        self.handshake_limit = limit;
        self
    }

    /// A handle to stop the server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Accepts and serves clients until stopped, or (unless persistent) until no client remains
    /// after the first one came; then flushes every writable export. A client's protocol error
    /// ends that connection only.
    pub fn run(self) -> Result<()> {
        self.listener
            .set_nonblocking()
            .map_err(|e| Error::io("listening", e))?;
        let exports = Arc::new(self.exports);
        let active = self.handle.active.clone();
        let mut threads = Vec::new();
        let mut served = false;
        let result = loop {
            if self.handle.stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            let count = active.lock().unwrap_or_else(|p| p.into_inner()).conns.len();
            if served && count == 0 && !self.persistent {
                break Ok(());
            }
            if self.max_clients != 0 && count >= self.max_clients {
                std::thread::sleep(POLL);
                continue;
            }
            let stream = match self.listener.accept() {
                Ok(Some(s)) => s,
                Ok(None) => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) => break Err(Error::io("accepting a client", e)),
            };
            served = true;
            let Ok(handle) = stream.try_clone_stream() else {
                continue;
            };
            let id = {
                let mut a = active.lock().unwrap_or_else(|p| p.into_inner());
                a.next += 1;
                let id = a.next;
                a.conns.push((id, handle));
                id
            };
            let exports = exports.clone();
            let active = active.clone();
            let limit = self.handshake_limit;
            threads.push(std::thread::spawn(move || {
                // One client's failure is its own: the server goes on.
                let _ = serve_connection(stream, &exports, limit);
                let mut a = active.lock().unwrap_or_else(|p| p.into_inner());
                a.conns.retain(|(i, _)| *i != id);
            }));
            threads.retain(|t| !t.is_finished());
        };
        for t in threads {
            let _ = t.join();
        }
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
        let mut first = result.err();
        for e in exports.iter().filter(|e| !e.read_only) {
            if let Err(err) = e.device.flush() {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }
}
