//! One direction of a relay between two TCP sockets that user space never reads:
//! `splice(2)` moves what the receiving socket holds into a pipe and from the pipe into
//! the sending socket, and the kernel passes page references instead of copying bytes.
//! A pipe is taken from a per-thread pool for one chunk and given back once it is
//! empty again, so an open connection holds no descriptor beyond its two sockets, and
//! a busy worker a pipe per direction in flight.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    fcntl::{self, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::Activity;

/// The most one chunk moves: the size asked of each pipe. Four times the default
/// (64 KiB), so that a fast stream takes a quarter of the calls.
const PIPE_SIZE: usize = 256 << 10;

/// Empty pipes a thread keeps for its next chunks.
const POOLED: usize = 64;

/// A pipe's two ends, both non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static IDLE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = IDLE.with_borrow_mut(Vec::pop) {
            return Ok(pipe);
        }
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Past the user's pipe quota (`fs.pipe-user-pages-soft`) without
        // CAP_SYS_RESOURCE the kernel refuses a larger size; the default still works.
        let _ = fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write })
    }

    /// Returns an empty pipe to the pool. A pipe still holding bytes is dropped
    /// instead, closing it, never handed to another connection.
    fn give_back(self) {
        IDLE.with_borrow_mut(|idle| {
            if idle.len() < POOLED {
                idle.push(self);
            }
        });
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then shuts down `to`'s sending
/// half, as the copy does; or until either side fails. A chunk read marks `activity`,
/// and `delivered` counts what `to` accepted.
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    delivered: &AtomicU64,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let pipe = Pipe::take()?;
        let mut left = match from.try_io(Interest::READABLE, || splice(from, &pipe.write)) {
            Ok(0) => {
                pipe.give_back();
                return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            }
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(err) => return Err(err),
        };
        activity.touch();
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(&pipe.read, to)) {
                Ok(written) => {
                    left -= written;
                    delivered.fetch_add(written as u64, Ordering::Relaxed);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        pipe.give_back();
    }
}

/// One non-blocking `splice(2)` of up to a pipe's worth.
fn splice(from: impl AsFd, to: impl AsFd) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(fcntl::splice(from, None, to, None, PIPE_SIZE, flags)?)
}

/// Pipes the calling thread keeps for its next chunks.
#[cfg(test)]
pub(super) fn pooled() -> usize {
    IDLE.with_borrow(Vec::len)
}
