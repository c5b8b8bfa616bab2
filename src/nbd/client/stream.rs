//! The client's byte stream: a TCP or unix socket, plain or inside TLS after
//! `NBD_OPT_STARTTLS` (rustls `StreamOwned` over the same socket).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The socket under the (optional) TLS layer.
pub(super) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub(super) fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(Some(t)),
            Sock::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(Some(t)),
            Sock::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.flush(),
            Sock::Unix(s) => s.flush(),
        }
    }
}

/// What the client talks through: the plain socket, or TLS over it after STARTTLS.
/// Reads of payload go straight into the caller's buffer either way (TLS decrypts into
/// rustls's record buffer and copies out once).
pub(super) enum Stream {
    Plain(Sock),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Sock>>),
    /// Only while the plain socket is being wrapped in TLS.
    Swapping,
}

fn swapping() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "TLS setup failed")
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Swapping => Err(swapping()),
        }
    }
}

impl Stream {
    pub(super) fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock.set_read_timeout(t),
            Stream::Swapping => Err(swapping()),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.sock.set_write_timeout(t),
            Stream::Swapping => Err(swapping()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Swapping => Err(swapping()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Swapping => Err(swapping()),
        }
    }
}
