//! The agent's side of the CNI plugin: the Unix socket it talks to (protocol:
//! `weft_api::enroll`; one request line in, one reply line out, per connection), and,
//! on a node weft is installed on, keeping the plugin chained into the node's CNI
//! configuration ([`Chaining`]).

use std::{io, path::Path, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use weft_api::enroll::{Reply, Request};
use weft_cni::install::Installer;

use crate::node::NodeHandle;

/// Longest request accepted; a pod description is a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket at `path`, replacing a stale one, readable by root only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let listener = crate::files::bind_private(path)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// How often the chaining is checked: the primary CNI may rewrite its configuration
/// (when it restarts or upgrades) without weft's entry, and pods started meanwhile
/// would not be enrolled.
const CHAIN_INTERVAL: Duration = Duration::from_secs(5);

pub fn describe() {
    metrics::describe_counter!(
        "weft_cni_configuration_writes_total",
        "Times the agent chained weft-cni into the node's CNI configuration: once at install, then each time it found its entry gone (the primary CNI rewrote the file)"
    );
}

/// Keeps weft-cni placed and chained into the node's CNI configuration. A
/// configuration that is missing or malformed is reported (once per problem) and
/// checked again; nothing else is touched.
#[derive(Debug)]
pub struct Chaining {
    installer: Installer,
    reported: Option<String>,
}

impl Chaining {
    pub fn new(installer: Installer) -> Self {
        Self {
            installer,
            reported: None,
        }
    }

    /// Chains weft-cni in if it is not (the agent does this before it is ready, so a
    /// pod the runtime starts once the agent is ready is enrolled).
    pub async fn check(&mut self) {
        let installer = self.installer.clone();
        let Ok(installed) = tokio::task::spawn_blocking(move || installer.install()).await else {
            return;
        };
        match installed {
            Ok(changed) => {
                if let Some(path) = &changed.configuration {
                    log::info!("chained weft-cni into {}", path.display());
                    metrics::counter!("weft_cni_configuration_writes_total").increment(1);
                }
                if changed.binary {
                    log::info!("placed weft-cni in {}", self.installer.bin_dir.display());
                }
                self.reported = None;
            }
            Err(err) => {
                let message = err.to_string();
                if self.reported.as_ref() != Some(&message) {
                    log::warn!("{message}; pods started meanwhile are not enrolled");
                    self.reported = Some(message);
                }
            }
        }
    }

    /// Checks every [`CHAIN_INTERVAL`], for as long as the agent runs.
    pub async fn keep(mut self) {
        loop {
            tokio::time::sleep(CHAIN_INTERVAL).await;
            self.check().await;
        }
    }
}

/// Serves enrollment requests until the task is dropped.
pub async fn serve(listener: UnixListener, node: NodeHandle) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(err) = answer(stream, &node).await {
                        log::warn!("enrollment connection failed: {err}");
                    }
                });
            }
            Err(err) => {
                log::warn!("accepting on the CNI socket failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, node: &NodeHandle) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let reply = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => refuse(format!("no request within {READ_TIMEOUT:?}")),
        Ok(Err(err)) => refuse(format!("unreadable request: {err}")),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                log::debug!("enrollment request: {request:?}");
                let reply = node.handle(request).await;
                if let Reply::Error { message, .. } = &reply {
                    log::warn!("enrollment refused: {message}");
                }
                reply
            }
            Err(err) => refuse(format!(
                "malformed enrollment request (is the CNI plugin the same weft version?): {err}"
            )),
        },
    };
    let mut json = serde_json::to_vec(&reply).expect("replies serialise");
    json.push(b'\n');
    write.write_all(&json).await?;
    write.shutdown().await
}

fn refuse(message: String) -> Reply {
    Reply::Error {
        message,
        retry: false,
    }
}
