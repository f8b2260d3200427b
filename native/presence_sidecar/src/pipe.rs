//! stdin and stdout as non-blocking pipes polled by the runtime.
//!
//! tokio's own `stdin()`/`stdout()` hand every read and write to a
//! blocking thread: two thread hops per request, most of a port round
//! trip. The BEAM gives a port pipes, which epoll can watch, so here they
//! are registered with the reactor like sockets. Anything that is not a
//! pipe or socket (a terminal, a file) falls back to tokio's types.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A borrowed standard descriptor (0 or 1), set non-blocking.
pub struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A non-blocking pipe end on the reactor.
pub struct Pipe(AsyncFd<Fd>);

impl Pipe {
    /// Registers `fd` with the reactor; fails for descriptors epoll cannot
    /// watch (regular files).
    pub fn new(fd: RawFd) -> io::Result<Pipe> {
        // SAFETY: fcntl on a descriptor we were started with; it only reads
        // and sets its status flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: descriptors 0 and 1 stay open for the life of the
        // process, longer than the reactor that watches them.
        let registered = unsafe { AsyncFd::register(Fd(fd)) };
        registered.map(Pipe).map_err(|e| e.into_parts().1)
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: reads into the initialised, unfilled part of `buf`.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let result = guard.try_io(|fd| {
                // SAFETY: writes from `data`, which outlives the call.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Either a reactor pipe or tokio's blocking-thread fallback.
pub enum Stdio<T> {
    Pipe(Pipe),
    Fallback(T),
}

impl<T: AsyncRead + Unpin> AsyncRead for Stdio<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stdio::Pipe(p) => Pin::new(p).poll_read(cx, buf),
            Stdio::Fallback(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stdio<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stdio::Pipe(p) => Pin::new(p).poll_write(cx, data),
            Stdio::Fallback(t) => Pin::new(t).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stdio::Pipe(p) => Pin::new(p).poll_flush(cx),
            Stdio::Fallback(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stdio::Pipe(p) => Pin::new(p).poll_shutdown(cx),
            Stdio::Fallback(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

/// The process's stdin: a reactor pipe when it can be one.
pub fn stdin() -> Stdio<tokio::io::Stdin> {
    match Pipe::new(0) {
        Ok(pipe) => Stdio::Pipe(pipe),
        Err(_) => Stdio::Fallback(tokio::io::stdin()),
    }
}

/// The process's stdout: a reactor pipe when it can be one.
pub fn stdout() -> Stdio<tokio::io::Stdout> {
    match Pipe::new(1) {
        Ok(pipe) => Stdio::Pipe(pipe),
        Err(_) => Stdio::Fallback(tokio::io::stdout()),
    }
}
