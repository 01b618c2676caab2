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
//!
//! A crash hands nothing over, so the proxy's sockets are also kept by a holder
//! ([`hold`], `weft-agent hold`, a process of its own that never accepts): an agent
//! deposits them once it serves ([`deposit`]), and an agent that finds no running
//! one to take them from takes them from the holder ([`take_held`]). After a
//! `kill -9`, new connections wait in the kernel's accept queues until the next agent
//! serves them, rather than being refused. An agent that stops for good tells the
//! holder to let go ([`Standing::withdraw`]), so that a stopped node refuses.

use std::{
    io::{self, BufRead as _, BufReader, IoSlice, IoSliceMut, Read as _, Write as _},
    net::TcpListener,
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::files;

/// The socket's name in the state directory.
pub const SOCKET: &str = "handover.sock";
/// The holder's socket in the state directory.
pub const HOLDER_SOCKET: &str = "holder.sock";
/// The holder's requests, one byte each: keep these sockets (they follow, as a
/// predecessor sends them), send the sockets kept, let them go.
const DEPOSIT: u8 = b'D';
const TAKE: u8 = b'T';
const LET_GO: u8 = b'L';
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
        "what answered on {path} handed over a descriptor that is not a listening TCP socket: {source}"
    )]
    NotAListener { path: PathBuf, source: io::Error },
    #[error(
        "cannot offer the listening sockets on {path}: {source}; is the state directory writable?"
    )]
    Offer { path: PathBuf, source: io::Error },
    #[error(
        "the socket holder at {path} did not hand its listening sockets over: {source}; is it the same weft version?"
    )]
    Held { path: PathBuf, source: io::Error },
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
    let predecessor = match connect(&path) {
        Ok(Some(stream)) => stream,
        // No agent runs (or one that predates handovers).
        Ok(None) => return Ok(None),
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
    let listeners =
        listening(received).map_err(|source| HandoverError::NotAListener { path, source })?;
    Ok(Some(Inherited {
        listeners,
        predecessor,
    }))
}

/// Connects to the Unix socket at `path`; `None` when nothing listens there (no
/// socket, or a stale one).
fn connect(path: &Path) -> io::Result<Option<UnixStream>> {
    match UnixStream::connect(path) {
        Ok(stream) => Ok(Some(stream)),
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Received descriptors as TCP listeners; an error for one that is not a socket.
fn listening(fds: Vec<OwnedFd>) -> io::Result<Vec<TcpListener>> {
    fds.into_iter()
        .map(|fd| {
            let listener = TcpListener::from(fd);
            listener.local_addr().map(|_| listener)
        })
        .collect()
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
    state_dir: PathBuf,
}

impl Standing {
    /// Withdraws the offer, for an agent that stops without a successor: the
    /// duplicates close, and the holder lets its own go, so the sockets close with the
    /// process's own (and new connections are refused rather than left waiting in a
    /// queue nobody serves).
    pub fn withdraw(&self) {
        let _ = std::fs::remove_file(self.state_dir.join(SOCKET));
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Err(err) = ask_holder(&self.state_dir, LET_GO) {
            log::warn!("cannot tell the socket holder to let go: {err}");
        }
    }
}

/// Offers `listeners` (the process's own duplicates of every listening socket) on
/// `<state_dir>/handover.sock`, replacing whatever is there, and with them what `more`
/// gives when a successor asks: sockets that come and go while the agent runs (those
/// in pods). A successor that leaves before serving is logged and the offer stands.
pub fn offer(
    state_dir: &Path,
    listeners: Vec<OwnedFd>,
    more: impl Fn() -> Vec<OwnedFd> + Send + 'static,
) -> Result<Offer, HandoverError> {
    let path = state_dir.join(SOCKET);
    let offer_error = |source| HandoverError::Offer {
        path: path.clone(),
        source,
    };
    let socket = files::bind_private(&path).map_err(offer_error)?;
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
                let duplicates = duplicates.map(|mut fds| {
                    fds.extend(more());
                    fds
                });
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
        standing: Standing {
            listeners,
            state_dir: state_dir.to_owned(),
        },
    })
}

/// Connects to the node's socket holder and makes `request`; `None` when no holder
/// runs.
fn ask_holder(state_dir: &Path, request: u8) -> io::Result<Option<UnixStream>> {
    let Some(mut holder) = connect(&state_dir.join(HOLDER_SOCKET))? else {
        return Ok(None);
    };
    holder.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
    holder.write_all(&[request])?;
    Ok(Some(holder))
}

/// The proxy's listening sockets the node's holder keeps (none when no holder runs,
/// or it keeps none): for an agent that finds no running agent to take them from.
pub fn take_held(state_dir: &Path) -> Result<Vec<TcpListener>, HandoverError> {
    let path = state_dir.join(HOLDER_SOCKET);
    let held = |source| HandoverError::Held {
        path: path.clone(),
        source,
    };
    let Some(holder) = ask_holder(state_dir, TAKE).map_err(held)? else {
        return Ok(Vec::new());
    };
    let fds = receive(&holder).map_err(held)?;
    listening(fds).map_err(|source| HandoverError::NotAListener { path, source })
}

/// Leaves duplicates of the proxy's listening sockets with the node's holder, if one
/// runs (in place of what it kept); whether one did.
pub fn deposit(state_dir: &Path, listeners: &[OwnedFd]) -> io::Result<bool> {
    match ask_holder(state_dir, DEPOSIT)? {
        Some(holder) => send(&holder, listeners).map(|()| true),
        None => Ok(false),
    }
}

/// `weft-agent hold`: keeps the listening sockets agents deposit on
/// `<state_dir>/holder.sock`, never accepting on them, and hands them to an agent that
/// asks, until an agent says to let go. Runs until killed.
pub fn hold(state_dir: &Path) -> Result<(), HandoverError> {
    let path = state_dir.join(HOLDER_SOCKET);
    let socket = files::bind_private(&path).map_err(|source| HandoverError::Offer {
        path: path.clone(),
        source,
    })?;
    log::info!(
        "holding the node's listening sockets for its agents on {}",
        path.display()
    );
    let mut held: Vec<OwnedFd> = Vec::new();
    for agent in socket.incoming() {
        let served = agent.and_then(|mut agent| {
            agent.set_read_timeout(Some(RECEIVE_TIMEOUT))?;
            let mut request = [0u8; 1];
            agent.read_exact(&mut request)?;
            match request[0] {
                DEPOSIT => {
                    held = receive(&agent)?;
                    log::info!("holding {} listening socket(s)", held.len());
                }
                TAKE => {
                    send(&agent, &held)?;
                    log::info!(
                        "handed {} listening socket(s) to a starting agent",
                        held.len()
                    );
                }
                LET_GO => {
                    log::info!(
                        "letting {} listening socket(s) go: the agent stopped",
                        held.len()
                    );
                    held.clear();
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unknown request {other:#04x}"),
                    ));
                }
            }
            Ok(())
        });
        if let Err(err) = served {
            log::warn!("a request to the socket holder failed: {err}");
        }
    }
    Ok(())
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
    use std::{
        net::{Ipv4Addr, TcpStream},
        os::unix::net::UnixListener,
    };

    use super::*;

    fn listener() -> TcpListener {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap()
    }

    fn state_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn addresses_of(listeners: &[TcpListener]) -> Vec<std::net::SocketAddr> {
        listeners.iter().map(|l| l.local_addr().unwrap()).collect()
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
        let addresses = addresses_of(&listeners);
        let queued = TcpStream::connect(addresses[0]).unwrap();
        let fds = listeners.into_iter().map(OwnedFd::from).collect();
        let mut served = offer(dir.path(), fds, Vec::new).unwrap().served;

        let inherited = take(dir.path()).unwrap().expect("an offer");
        assert_eq!(addresses_of(&inherited.listeners), addresses);
        let (accepted, _) = inherited.listeners[0].accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap());
        assert!(served.try_recv().is_err(), "not released yet");

        inherited.release().unwrap();
        served.blocking_recv().expect("released");
    }

    /// Sockets that came after the offer go with it, as they are when a successor asks.
    #[test]
    fn sockets_opened_after_the_offer_are_handed_over_too() {
        let dir = state_dir();
        let later: Arc<Mutex<Vec<TcpListener>>> = Arc::default();
        let more = {
            let later = Arc::clone(&later);
            move || {
                let later = later.lock().unwrap();
                later
                    .iter()
                    .map(|listener| OwnedFd::from(listener.try_clone().unwrap()))
                    .collect()
            }
        };
        let (first, pod) = (listener(), listener());
        let addresses = addresses_of(&[first.try_clone().unwrap(), pod.try_clone().unwrap()]);
        let _offer = offer(dir.path(), vec![OwnedFd::from(first)], more).unwrap();
        later.lock().unwrap().push(pod);
        let inherited = take(dir.path()).unwrap().expect("an offer");
        assert_eq!(addresses_of(&inherited.listeners), addresses);
    }

    /// A successor that leaves without serving leaves the offer standing for the next.
    #[test]
    fn a_successor_that_leaves_before_serving_changes_nothing() {
        let dir = state_dir();
        let served = offer(dir.path(), vec![OwnedFd::from(listener())], Vec::new)
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
        let offer = offer(
            dir.path(),
            vec![OwnedFd::from(socket.try_clone().unwrap())],
            Vec::new,
        )
        .unwrap();
        offer.standing.withdraw();
        drop(socket);
        assert_eq!(
            TcpStream::connect(address).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        assert!(take(dir.path()).unwrap().is_none());
    }

    /// The holder keeps what an agent deposited for the next one, also after the
    /// depositing agent's own copies are gone (a crash), until told to let go.
    #[test]
    fn the_holder_keeps_the_sockets_across_a_crash_until_told_to_let_go() {
        let dir = state_dir();
        assert!(take_held(dir.path()).unwrap().is_empty(), "no holder yet");
        let holder_dir = dir.path().to_owned();
        std::thread::spawn(move || hold(&holder_dir));
        let socket = listener();
        let address = socket.local_addr().unwrap();
        let deposited = [OwnedFd::from(socket)];
        // Until the holder listens (its socket file appears a moment before).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !deposit(dir.path(), &deposited).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the holder never listened"
            );
            std::thread::yield_now();
        }
        drop(deposited);
        // The agent's own copy is gone: a connection waits in the queue.
        let waiting = TcpStream::connect(address).unwrap();

        let taken = take_held(dir.path()).unwrap();
        assert_eq!(taken.len(), 1);
        let (accepted, _) = taken[0].accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
        drop(taken);
        // Still held after a take, for the next crash.
        assert_eq!(take_held(dir.path()).unwrap().len(), 1);

        ask_holder(dir.path(), LET_GO).unwrap().expect("a holder");
        // The holder answers one request at a time: this one comes after the last.
        assert!(
            take_held(dir.path()).unwrap().is_empty(),
            "the holder never let go"
        );
        assert_eq!(
            TcpStream::connect(address).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }
}
