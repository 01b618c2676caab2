//! Upgrading or restarting the agent without refusing a connection.
//!
//! A running agent offers its listening sockets on a Unix socket in its state
//! directory ([`offer`]). A new agent on the node asks for them before it binds
//! anything ([`take`]), so the kernel's accept queues stay open across the change: it
//! serves them alongside the old agent until it is ready, then says so
//! ([`Inherited::release`]), and the old agent stops accepting and drains what it
//! carries. The sockets pass as file descriptors (`SCM_RIGHTS`): both processes hold
//! the same listening socket, and it closes only when the last of them lets go.
//!
//! The line: the successor connects; the predecessor sends every listener, in
//! messages of at most [`FDS_PER_MESSAGE`] descriptors whose one-byte payload says
//! whether more follow ([`MORE`]) or not ([`LAST`]); the successor writes
//! [`SERVING`] once it accepts on them. A successor that goes away before that leaves
//! the predecessor serving as before.

use std::{
    io::{self, BufRead as _, BufReader, IoSlice, IoSliceMut, Read as _, Write as _},
    net::TcpListener,
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The socket's name in the state directory.
pub const SOCKET: &str = "handover.sock";
/// Descriptors per message: the kernel takes at most 253 (`SCM_MAX_FD`).
const FDS_PER_MESSAGE: usize = 200;
/// Payload of a message after which more follow.
const MORE: u8 = b'+';
/// Payload of the last message.
const LAST: u8 = b'.';
/// How long a successor waits for the sockets once connected.
const RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// What the successor writes once it serves the sockets.
const SERVING: &[u8] = b"serving\n";

/// Why the sockets could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "the running agent at {path} did not hand its listening sockets over: {source}; is it the same weft version?"
    )]
    Receive { path: PathBuf, source: io::Error },
    #[error(
        "the running agent at {path} handed over a descriptor that is not a listening TCP socket: {source}"
    )]
    NotAListener { path: PathBuf, source: io::Error },
    #[error(
        "cannot offer the listening sockets on {path}: {source}; is the state directory writable?"
    )]
    Offer { path: PathBuf, source: io::Error },
}

/// The listening sockets taken over from the agent that ran before, and the line to
/// it.
#[derive(Debug)]
pub struct Inherited {
    pub listeners: Vec<TcpListener>,
    predecessor: UnixStream,
}

impl Inherited {
    /// Tells the predecessor that this agent accepts on the sockets now: it stops
    /// accepting and drains what it carries.
    pub fn release(mut self) -> io::Result<()> {
        self.predecessor.write_all(SERVING)
    }
}

/// Takes the listening sockets of the agent running on the node, if one offers them
/// on `<state_dir>/handover.sock`; `None` when none does.
pub fn take(state_dir: &Path) -> Result<Option<Inherited>, HandoverError> {
    let path = state_dir.join(SOCKET);
    let predecessor = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        // No socket, or a stale one: no agent runs (or one that predates handovers).
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => return Err(HandoverError::Receive { path, source }),
    };
    // An agent that offers answers at once; one that hangs must not hold this one up.
    let received = predecessor
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .and_then(|()| receive(&predecessor))
        .map_err(|source| HandoverError::Receive {
            path: path.clone(),
            source,
        })?;
    let listeners = received
        .into_iter()
        .map(|fd| {
            let listener = TcpListener::from(fd);
            listener.local_addr().map(|_| listener)
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| HandoverError::NotAListener { path, source })?;
    Ok(Some(Inherited {
        listeners,
        predecessor,
    }))
}

/// Every descriptor the predecessor sends, until its last message.
fn receive(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    loop {
        let mut payload = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let (bytes, truncated, batch) = {
            let mut iov = [IoSliceMut::new(&mut payload)];
            let message = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let mut batch = Vec::new();
            for cmsg in message.cmsgs()? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: the kernel installed each received descriptor in this
                    // process just now; nothing else owns it.
                    batch.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let truncated = message.flags.contains(MsgFlags::MSG_CTRUNC);
            (message.bytes, truncated, batch)
        };
        fds.extend(batch);
        if truncated {
            return Err(io::Error::other("descriptors were cut off in transit"));
        }
        match (bytes, payload[0]) {
            (0, _) => return Err(io::ErrorKind::UnexpectedEof.into()),
            (_, MORE) => {}
            (_, LAST) => return Ok(fds),
            (_, other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected message {other:#04x}"),
                ));
            }
        }
    }
}

/// Sends `listeners` to a successor that connected.
fn send(stream: &UnixStream, listeners: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    let mut batches = raw.chunks(FDS_PER_MESSAGE).peekable();
    if batches.peek().is_none() {
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&[LAST])],
            &[],
            MsgFlags::empty(),
            None,
        )?;
        return Ok(());
    }
    while let Some(batch) = batches.next() {
        let payload = [if batches.peek().is_some() { MORE } else { LAST }];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&payload)],
            &[ControlMessage::ScmRights(batch)],
            MsgFlags::empty(),
            None,
        )?;
    }
    Ok(())
}

/// The listening sockets on offer to a successor.
#[derive(Debug)]
pub struct Offer {
    /// Resolves once a successor took the sockets and serves them: then this agent
    /// should stop accepting and drain.
    pub served: tokio::sync::oneshot::Receiver<()>,
    pub standing: Standing,
}

/// What keeps an offer standing: the duplicates of the sockets, and the socket file.
#[derive(Debug)]
pub struct Standing {
    listeners: Arc<Mutex<Option<Vec<OwnedFd>>>>,
    path: PathBuf,
}

impl Standing {
    /// Withdraws the offer, for an agent that stops without a successor: the
    /// duplicates close, so the sockets close with the process's own (and new
    /// connections are refused rather than left waiting in a queue nobody serves).
    pub fn withdraw(&self) {
        let _ = std::fs::remove_file(&self.path);
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// Offers `listeners` (the process's own duplicates of every listening socket) on
/// `<state_dir>/handover.sock`, replacing whatever is there. A successor that leaves
/// before serving is logged and the offer stands.
pub fn offer(state_dir: &Path, listeners: Vec<OwnedFd>) -> Result<Offer, HandoverError> {
    let path = state_dir.join(SOCKET);
    let offer_error = |source| HandoverError::Offer {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(offer_error)?;
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(offer_error(err)),
        _ => {}
    }
    let socket = UnixListener::bind(&path).map_err(offer_error)?;
    let listeners = Arc::new(Mutex::new(Some(listeners)));
    let (served, serving) = tokio::sync::oneshot::channel();
    let offered = Arc::clone(&listeners);
    std::thread::Builder::new()
        .name("weft-handover".into())
        .spawn(move || {
            for successor in socket.incoming() {
                // Duplicates of the duplicates, so that a withdrawal never waits for a
                // successor.
                let duplicates = offered
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                    .map(|fds| fds.iter().map(OwnedFd::try_clone).collect::<io::Result<Vec<_>>>());
                let Some(duplicates) = duplicates else {
                    return;
                };
                match successor.and_then(|stream| hand_over(&stream, &duplicates?)) {
                    Ok(()) => {
                        // The successor holds the sockets now.
                        offered
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .take();
                        let _ = served.send(());
                        return;
                    }
                    Err(err) => log::warn!(
                        "a new agent asked for the listening sockets and did not take them over ({err}); serving on"
                    ),
                }
            }
        })
        .map_err(offer_error)?;
    Ok(Offer {
        served: serving,
        standing: Standing { listeners, path },
    })
}

/// One successor: the sockets, then its word that it serves them.
fn hand_over(stream: &UnixStream, listeners: &[OwnedFd]) -> io::Result<()> {
    log::info!("a new agent asks for the listening sockets; handing them over");
    send(stream, listeners)?;
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(64)
        .read_until(b'\n', &mut line)?;
    if line == SERVING {
        log::info!(
            "the new agent serves the listening sockets; this one stops accepting and drains"
        );
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "it went away before serving them",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpStream};

    use super::*;

    fn listener() -> TcpListener {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()
    }

    fn state_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn nothing_to_take_without_a_running_agent() {
        let dir = state_dir();
        assert!(take(dir.path()).unwrap().is_none());
        // A stale socket file, left by an agent that crashed.
        drop(UnixListener::bind(dir.path().join(SOCKET)).unwrap());
        assert!(take(dir.path()).unwrap().is_none());
    }

    /// More listeners than one message carries: all arrive, in order, and still take
    /// connections queued before the handover.
    #[test]
    fn the_successor_takes_every_listener_and_the_queue_with_them() {
        let dir = state_dir();
        let listeners: Vec<TcpListener> = (0..FDS_PER_MESSAGE + 5).map(|_| listener()).collect();
        let addresses: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let queued = TcpStream::connect(addresses[0]).unwrap();
        let fds = listeners.into_iter().map(OwnedFd::from).collect();
        let mut served = offer(dir.path(), fds).unwrap().served;

        let inherited = take(dir.path()).unwrap().expect("an offer");
        let taken: Vec<_> = inherited
            .listeners
            .iter()
            .map(|l| l.local_addr().unwrap())
            .collect();
        assert_eq!(taken, addresses);
        let (accepted, _) = inherited.listeners[0].accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap());
        assert!(served.try_recv().is_err(), "not released yet");

        inherited.release().unwrap();
        served.blocking_recv().expect("released");
    }

    /// A successor that leaves without serving leaves the offer standing for the next.
    #[test]
    fn a_successor_that_leaves_before_serving_changes_nothing() {
        let dir = state_dir();
        let served = offer(dir.path(), vec![OwnedFd::from(listener())])
            .unwrap()
            .served;
        let first = take(dir.path()).unwrap().expect("an offer");
        assert_eq!(first.listeners.len(), 1);
        drop(first);
        let second = take(dir.path()).unwrap().expect("the offer stands");
        second.release().unwrap();
        served.blocking_recv().expect("released by the second");
    }

    /// A withdrawn offer closes the sockets with the process's own: connections are
    /// refused, and a new agent finds nothing to take.
    #[test]
    fn a_withdrawn_offer_lets_the_sockets_close() {
        let dir = state_dir();
        let socket = listener();
        let address = socket.local_addr().unwrap();
        let offer = offer(dir.path(), vec![OwnedFd::from(socket.try_clone().unwrap())]).unwrap();
        offer.standing.withdraw();
        drop(socket);
        assert_eq!(
            TcpStream::connect(address).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        assert!(take(dir.path()).unwrap().is_none());
    }
}
