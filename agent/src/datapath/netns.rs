//! Network-namespace and interface facts the kernel only tells through system calls:
//! a namespace's cookie (how the capture programs recognise a pod) and an interface's
//! index; and work done inside a pod's namespace, such as opening a listener there.

use std::{ffi::CString, fs::File, io, os::fd::AsRawFd, path::Path, thread};

use super::DatapathError;

/// The cookie of the network namespace at `netns` (a `/var/run/netns/...` or
/// `/proc/<pid>/ns/net` path), as `bpf_get_netns_cookie` reports it for its sockets.
pub fn cookie(netns: &Path) -> Result<u64, DatapathError> {
    within(netns, || {
        // Any socket will do; the wildcard address needs no interface up in the pod.
        socket_cookie(&std::net::UdpSocket::bind("0.0.0.0:0")?)
    })
}

/// The cookie of the network namespace `socket` belongs to.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the option value points at a u64 of the length we pass, and the socket
    // stays open for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Runs `work` inside the network namespace at `netns`. Sockets it opens belong to
/// that namespace for good, whichever thread uses them later.
///
/// A short-lived thread enters the namespace and does the work; the agent's other
/// threads never leave its own namespace.
pub fn within<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, DatapathError> {
    let file = File::open(netns).map_err(|source| DatapathError::Io {
        path: netns.to_owned(),
        source,
    })?;
    let path = netns.to_owned();
    thread::spawn(move || {
        // SAFETY: setns only changes this thread's namespace; the thread ends right
        // after the work.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        work()
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))
    .and_then(|result| result)
    .map_err(|source| DatapathError::Io { path, source })
}

/// The index of interface `name` in the agent's network namespace.
pub fn ifindex(name: &str) -> Result<u32, DatapathError> {
    let c_name = CString::new(name).map_err(|_| DatapathError::NoInterface(name.to_owned()))?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(DatapathError::NoInterface(name.to_owned())),
        index => Ok(index),
    }
}
