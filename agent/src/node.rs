//! The agent's view of its node: the pods the CNI plugin enrolled, the mesh
//! configuration, and the datapath, kept consistent with each other. Each enrolled pod
//! is persisted (one JSON file per pod) so that a restarted agent re-attaches what it
//! attached before and forgets pods deleted while it was away.
//!
//! Keeping them consistent takes blocking work (entering a pod's network namespace,
//! walking kernel maps, syncing files), so the [`Node`] lives on a thread of its own
//! and is driven through a [`NodeHandle`]: the control runtime, which also answers
//! scrapes and admin requests, never waits for it, and no lock is held across that
//! work.

use std::{
    collections::BTreeMap,
    fs, io,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use weft_api::enroll::{Pod, Reply, Request};

use crate::{
    datapath::{Datapath, DatapathError, Inbound, netns},
    files::{self, write_atomically},
    mesh::{MeshConfig, PeerMode, PlaintextPolicy},
    proxy::{self, HBONE_PORT, in_pod::InPod},
    reload::Current,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(
        "invalid container id {0:?}: CNI allows only letters, digits, '_', '.' and '-' (not leading)"
    )]
    ContainerId(String),
    #[error("the pod's network namespace {0} does not exist")]
    NoNetns(PathBuf),
    #[error("unknown container {0}: the agent has no record of it")]
    UnknownContainer(String),
    #[error("{path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a pod record the agent wrote: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A pod the CNI plugin told us about, and how it is attached while meshed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub pod: Pod,
    pub attachment: Option<Attachment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub mode: PeerMode,
    /// Ports whose mode differs from the pod's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_modes: BTreeMap<u16, PeerMode>,
    /// What the pod's authorization policies say of plaintext.
    #[serde(default)]
    pub plaintext: PlaintextPolicy,
    /// The agent takes HBONE on the pod's own address ([`InPod`]).
    #[serde(default)]
    pub hbone_in_pod: bool,
}

#[derive(Debug)]
pub struct Node {
    datapath: Datapath,
    /// Shared with the proxy, which routes by the same configuration.
    mesh: Arc<Current<MeshConfig>>,
    /// The HBONE listeners opened in meshed pods, which the proxy serves.
    in_pod: Arc<InPod>,
    pods: BTreeMap<String, Enrolled>,
    store: PathBuf,
}

impl Node {
    /// Takes over the pods recorded in `state_dir`: re-attaches those still alive and
    /// detaches and forgets those whose network namespace is gone.
    pub fn start(
        datapath: Datapath,
        mesh: Arc<Current<MeshConfig>>,
        state_dir: &Path,
        in_pod: Arc<InPod>,
    ) -> Result<Self, NodeError> {
        let store = state_dir.join("pods");
        fs::create_dir_all(&store).map_err(store_error(&store))?;
        files::remove_leftovers(&store).map_err(store_error(&store))?;
        let mut node = Self {
            datapath,
            mesh,
            in_pod,
            pods: BTreeMap::new(),
            store,
        };
        for entry in fs::read_dir(&node.store).map_err(store_error(&node.store))? {
            let path = entry.map_err(store_error(&node.store))?.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                let text = fs::read(&path).map_err(store_error(&path))?;
                let record: Enrolled = serde_json::from_slice(&text)
                    .map_err(|source| NodeError::Record { path, source })?;
                node.pods.insert(record.pod.container_id.clone(), record);
            }
        }
        let ids: Vec<String> = node.pods.keys().cloned().collect();
        for id in ids {
            if node.pods[&id].pod.netns.exists() {
                // Attach this agent's programs in place of the previous agent's.
                node.sync(&id, true)?;
            } else {
                log::info!("pod {id} went away while the agent was down; forgetting it");
                node.forget(&id)?;
            }
        }
        node.in_pod.drop_inherited();
        node.sync_destinations()?;
        Ok(node)
    }

    /// Answers one enrollment request from the CNI plugin.
    pub fn handle(&mut self, request: Request) -> Reply {
        let result = match request {
            Request::Add(pod) => self.add(pod),
            Request::Del { container_id } => self.del(&container_id).map(|()| false),
            Request::Check { container_id } => self.check(&container_id),
        };
        match result {
            Ok(meshed) => Reply::Ok { meshed },
            Err(err) => Reply::Error {
                message: err.to_string(),
                retry: false,
            },
        }
    }

    /// Applies a new mesh configuration to every enrolled pod and to capture.
    pub fn set_mesh(&mut self, mesh: MeshConfig) -> Result<(), NodeError> {
        self.mesh.replace(mesh);
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        for id in ids {
            self.sync(&id, false)?;
        }
        self.sync_destinations()
    }

    /// Moves the node onto a thread of its own and returns the handle that drives it;
    /// the enrolled pods are published in `pods` after every command.
    pub fn spawn(mut self, pods: Arc<Current<Vec<Enrolled>>>) -> io::Result<NodeHandle> {
        let (commands, mut received) = mpsc::channel::<Command>(64);
        pods.replace(self.enrolled());
        let published = Arc::clone(&pods);
        std::thread::Builder::new()
            .name("weft-node".into())
            .spawn(move || {
                while let Some(command) = received.blocking_recv() {
                    // A panic is a bug: its reply is dropped (the caller reports that),
                    // the thread carries on, and the next configuration applied syncs
                    // every pod's datapath with the records again.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.run(command)));
                    published.replace(self.enrolled());
                }
            })?;
        Ok(NodeHandle { commands, pods })
    }

    fn run(&mut self, command: Command) {
        match command {
            Command::Enroll(request, reply) => {
                let _ = reply.send(self.handle(request));
            }
            Command::SetMesh(mesh, reply) => {
                let result = if *self.mesh.get() == *mesh {
                    Ok(())
                } else {
                    self.set_mesh(*mesh).map_err(|err| err.to_string())
                };
                let _ = reply.send(result);
            }
        }
    }

    fn enrolled(&self) -> Vec<Enrolled> {
        self.pods.values().cloned().collect()
    }

    fn add(&mut self, pod: Pod) -> Result<bool, NodeError> {
        validate_container_id(&pod.container_id)?;
        if !pod.netns.exists() {
            return Err(NodeError::NoNetns(pod.netns));
        }
        let id = pod.container_id.clone();
        let attachment = self
            .pods
            .get(&id)
            .and_then(|known| known.attachment.clone());
        self.pods.insert(id.clone(), Enrolled { pod, attachment });
        if let Err(err) = self.sync(&id, true).and_then(|()| self.sync_destinations()) {
            // Nothing half-done: undo what this request attached.
            let _ = self.forget(&id);
            let _ = self.sync_destinations();
            return Err(err);
        }
        Ok(self.pods[&id].attachment.is_some())
    }

    fn del(&mut self, id: &str) -> Result<(), NodeError> {
        validate_container_id(id)?;
        if self.pods.contains_key(id) {
            self.forget(id)?;
            self.sync_destinations()?;
        }
        Ok(())
    }

    fn check(&self, id: &str) -> Result<bool, NodeError> {
        let record = self
            .pods
            .get(id)
            .ok_or_else(|| NodeError::UnknownContainer(id.to_owned()))?;
        if !record.pod.netns.exists() {
            return Err(NodeError::NoNetns(record.pod.netns.clone()));
        }
        Ok(record.attachment.is_some())
    }

    /// Makes the datapath match what the mesh wants for pod `id`, and records it. An
    /// attached pod keeps its attachment unless `reattach` asks for this agent's.
    fn sync(&mut self, id: &str, reattach: bool) -> Result<(), NodeError> {
        let record = self.pods[id].clone();
        let mesh = self.mesh.get();
        let wanted = mesh.pod_modes(&record.pod.namespace, &record.pod.name);
        let plaintext = mesh.plaintext_policy(&record.pod.namespace, &record.pod.name);
        drop(mesh);
        let attachment = match wanted {
            None => {
                self.in_pod.remove(id);
                if let Some(old) = &record.attachment {
                    self.datapath.unenroll(old.netns_cookie, old.ifindex)?;
                    log::info!(
                        "pod {}/{} left the mesh",
                        record.pod.namespace,
                        record.pod.name
                    );
                }
                None
            }
            Some((mode, port_modes)) => {
                let netns_cookie = netns::cookie(&record.pod.netns)?;
                let current = (netns_cookie, netns::ifindex(&record.pod.host_interface)?);
                // A replaced namespace or interface: the old entries go before the new
                // ones are written, which may reuse the same keys.
                if let Some(old) = &record.attachment
                    && (old.netns_cookie, old.ifindex) != current
                {
                    self.datapath.unenroll(old.netns_cookie, old.ifindex)?;
                    // Its listeners are in the namespace that went.
                    self.in_pod.remove(id);
                }
                let hbone_in_pod = self.listen_in_pod(id, &record.pod, netns_cookie);
                let inbound = |mode| Inbound {
                    mode,
                    probe_source: record.pod.gateways.first().copied(),
                    hbone_in_pod,
                };
                let kept = record
                    .attachment
                    .as_ref()
                    .filter(|old| !reattach && (old.netns_cookie, old.ifindex) == current);
                let ifindex = match kept {
                    Some(old) => {
                        let inbound = inbound(plaintext.kernel_mode(mode, None));
                        self.datapath.set_inbound(old.ifindex, inbound)?;
                        old.ifindex
                    }
                    None => {
                        let inbound = inbound(plaintext.kernel_mode(mode, None));
                        self.datapath
                            .enroll(netns_cookie, &record.pod.host_interface, inbound)?
                    }
                };
                // The map is walked to replace a pod's entries: only when they change.
                if kept.is_none_or(|old| {
                    (&old.port_modes, &old.plaintext) != (&port_modes, &plaintext)
                }) {
                    let kernel_modes = port_modes
                        .keys()
                        .chain(plaintext.ports.keys())
                        .map(|&port| {
                            let mode = port_modes.get(&port).copied().unwrap_or(mode);
                            (port, plaintext.kernel_mode(mode, Some(port)))
                        })
                        .collect();
                    self.datapath.set_port_modes(ifindex, &kernel_modes)?;
                }
                if record.attachment.is_none() {
                    log::info!(
                        "pod {}/{} joined the mesh ({mode:?}, netns cookie {netns_cookie}, {} #{ifindex})",
                        record.pod.namespace,
                        record.pod.name,
                        record.pod.host_interface
                    );
                }
                Some(Attachment {
                    netns_cookie,
                    ifindex,
                    mode,
                    port_modes,
                    plaintext,
                    hbone_in_pod,
                })
            }
        };
        let record = Enrolled {
            attachment,
            ..record
        };
        self.save(&record)?;
        self.pods.insert(id.to_owned(), record);
        Ok(())
    }

    /// Makes sure pod `id` has its HBONE listeners, on each of its addresses, in its
    /// namespace (cookie `netns`): those the agent before handed over, or new ones;
    /// says whether it has. A pod that cannot have them (its own process holds the
    /// port) still gets tunnels on the node's address.
    fn listen_in_pod(&self, id: &str, pod: &Pod, netns: u64) -> bool {
        if self.in_pod.contains(id) {
            return true;
        }
        let addresses: Vec<SocketAddr> = pod
            .ips
            .iter()
            .map(|&ip| SocketAddr::new(ip, HBONE_PORT))
            .collect();
        if addresses.is_empty() {
            return false;
        }
        if let Some(inherited) = self.in_pod.take_inherited(&addresses, netns) {
            self.in_pod.insert(id, inherited);
            return true;
        }
        // Free bind: an IPv6 address may still be tentative when the pod joins.
        let opened = netns::within(&pod.netns, move || {
            addresses
                .into_iter()
                .map(|address| proxy::listener(address, true))
                .collect()
        });
        match opened {
            Ok(listeners) => {
                self.in_pod.insert(id, listeners);
                true
            }
            Err(err) => {
                log::warn!(
                    "pod {}/{} gets no HBONE on its own address (peers that dial pod addresses, such as Istio's, cannot reach it): {err}",
                    pod.namespace,
                    pod.name
                );
                false
            }
        }
    }

    /// Detaches pod `id` (if attached) and drops its record.
    fn forget(&mut self, id: &str) -> Result<(), NodeError> {
        self.in_pod.remove(id);
        if let Some(record) = self.pods.remove(id) {
            if let Some(old) = &record.attachment {
                self.datapath.unenroll(old.netns_cookie, old.ifindex)?;
            }
            let path = self.record_path(id);
            match fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(store_error(&path)(err));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn sync_destinations(&mut self) -> Result<(), NodeError> {
        let local = self
            .pods
            .values()
            .filter(|record| record.attachment.is_some())
            .flat_map(|record| record.pod.ips.iter().copied());
        let mesh = self.mesh.get();
        self.datapath.set_destinations(mesh.destinations(local))?;
        self.datapath.set_excluded_ports(&mesh.exclude_ports)?;
        Ok(())
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.store.join(format!("{id}.json"))
    }

    fn save(&self, record: &Enrolled) -> Result<(), NodeError> {
        let path = self.record_path(&record.pod.container_id);
        let json = serde_json::to_vec_pretty(record).expect("records serialise");
        write_atomically(&path, &json, 0o644).map_err(store_error(&path))
    }
}

/// What the node's thread is asked to do.
enum Command {
    Enroll(Request, oneshot::Sender<Reply>),
    /// Apply a mesh configuration (nothing to do if it is the one applied).
    SetMesh(Box<MeshConfig>, oneshot::Sender<Result<(), String>>),
}

/// Drives the [`Node`] on its thread.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    pods: Arc<Current<Vec<Enrolled>>>,
}

impl NodeHandle {
    /// Answers one enrollment request from the CNI plugin.
    pub async fn handle(&self, request: Request) -> Reply {
        let (reply, answer) = oneshot::channel();
        match self.ask(Command::Enroll(request, reply), answer).await {
            Ok(reply) => reply,
            Err(message) => Reply::Error {
                message,
                retry: true,
            },
        }
    }

    /// Applies a new mesh configuration to every enrolled pod and to capture.
    pub async fn set_mesh(&self, mesh: MeshConfig) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.ask(Command::SetMesh(Box::new(mesh), reply), answer)
            .await?
    }

    /// The enrolled pods, as of the last command the node finished.
    pub fn pods(&self) -> Arc<Vec<Enrolled>> {
        self.pods.get()
    }

    async fn ask<T>(&self, command: Command, answer: oneshot::Receiver<T>) -> Result<T, String> {
        const GONE: &str =
            "the agent's node thread failed on this request (a bug: see the agent's log)";
        self.commands
            .send(command)
            .await
            .map_err(|_| GONE.to_owned())?;
        answer.await.map_err(|_| GONE.to_owned())
    }
}

fn store_error(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |source| NodeError::Store {
        path: path.to_owned(),
        source,
    }
}

/// CNI container ids become file names here, so they are held to the spec's alphabet.
fn validate_container_id(id: &str) -> Result<(), NodeError> {
    let valid = !id.is_empty()
        && id.len() <= 256
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(NodeError::ContainerId(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_cannot_escape_the_store() {
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(validate_container_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["abc123", "k8s_POD-1.2", &"f".repeat(64)] {
            validate_container_id(good).unwrap();
        }
    }
}
