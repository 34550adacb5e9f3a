//! The byte streams a connection runs over (TCP and Unix sockets).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A connected, bidirectional byte stream that can be cloned into a second handle (one thread
/// reads requests while others write replies) and shut down from any handle.
pub trait Stream: Read + Write + Send + 'static {
    /// A second handle on the same connection.
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// Shuts both directions down: blocked reads and writes on every handle return.
    fn shutdown_both(&self);
    /// Bounds how long a read may block (`None`: forever).
    fn set_read_limit(&self, limit: Option<Duration>) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn set_read_limit(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        // Already closed by the peer is fine.
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Stream for UnixStream {
    fn set_read_limit(&self, limit: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}
