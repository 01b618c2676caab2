//! The file source: Kubernetes objects from YAML (or JSON) files, for single-machine
//! use, the local cluster and tests.
//!
//! Each path is a file or a directory (read recursively; hidden entries skipped) of
//! `*.yaml`, `*.yml` and `*.json` files (`weft_api::manifests`), each holding one or more documents (`---`),
//! each an object or a `List`. Kinds the controller does not read are skipped. Files
//! are checked for changes every interval; a file that no longer parses is reported
//! (file, line, object, field) and its last good version keeps applying, so a typo
//! never takes anything away.
//!
//! With no API server there is no EndpointSlice controller either: for a Service with
//! a selector and no EndpointSlice in the files, the source derives one from the pods,
//! as Kubernetes would.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};

use super::Publisher;
use crate::objects::{Kind, Object, ObjectKey, Objects};

/// A file that does not hold valid objects: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {problem}")]
pub struct FileError {
    pub path: PathBuf,
    /// 1-based line of the document (or of the error, when the parser knows it).
    pub line: usize,
    pub problem: String,
}

/// What the source made of one file, for the controller's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    pub path: PathBuf,
    /// Digest of the content that applies now (the last good one).
    pub digest: Option<String>,
    pub objects: usize,
    /// Why the file's current content was rejected, if it was, and that content's
    /// digest.
    pub error: Option<String>,
    pub rejected_digest: Option<String>,
}

/// Parses the documents of `text` (the content of `path`).
pub fn parse(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    let mut objects = Vec::new();
    for (first_line, document) in documents(text) {
        let located = |problem: String, line: Option<usize>| FileError {
            path: path.to_owned(),
            line: first_line + line.unwrap_or(1) - 1,
            problem,
        };
        let value: serde_json::Value = match serde_yaml::from_str(document) {
            Ok(value) => value,
            Err(err) => {
                let line = err.location().map(|location| location.line());
                return Err(located(without_location(&err.to_string()), line));
            }
        };
        if value.is_null() {
            continue;
        }
        let items = if value["kind"] == "List" {
            match value.get("items").and_then(|items| items.as_array()) {
                Some(items) => items.clone(),
                None => return Err(located("a List needs `items`".to_owned(), None)),
            }
        } else {
            vec![value]
        };
        for item in items {
            if let Some(object) = parse_object(item).map_err(|problem| located(problem, None))? {
                objects.push(object);
            }
        }
    }
    Ok(objects)
}

/// The documents of a multi-document YAML text, with the line each starts on.
fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end();
        let separator = content == "---"
            || content.starts_with("--- ")
            || content.starts_with("---#")
            || content == "...";
        if separator {
            documents.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
}

/// serde_yaml puts " at line L column C" in its messages; the caller says where instead.
fn without_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(position) => message[..position].to_owned(),
        None => message.to_owned(),
    }
}

/// One object, or `None` for a kind the controller does not read.
fn parse_object(mut value: serde_json::Value) -> Result<Option<Object>, String> {
    let kind_name = value["kind"].as_str().unwrap_or_default().to_owned();
    let api_version = value["apiVersion"].as_str().unwrap_or_default().to_owned();
    if kind_name.is_empty() || api_version.is_empty() {
        return Err("an object needs `apiVersion` and `kind`".to_owned());
    }
    let Some(kind) = Kind::from_name(&kind_name) else {
        log::debug!("skipping {api_version} {kind_name}: not a kind weft reads");
        return Ok(None);
    };
    if api_version != kind.api_version() {
        return Err(format!(
            "{kind_name}: apiVersion {api_version} is not one weft reads (use {})",
            kind.api_version()
        ));
    }
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return Err(format!("{kind_name}: metadata.name is missing"));
    }
    let cluster_scoped = matches!(kind, Kind::Namespace | Kind::Node);
    if !cluster_scoped && value["metadata"]["namespace"].as_str().is_none() {
        // As kubectl does: a namespaced object without a namespace lands in `default`.
        value["metadata"]["namespace"] = "default".into();
    }
    let object_name = match value["metadata"]["namespace"].as_str() {
        Some(namespace) if !cluster_scoped => format!("{namespace}/{name}"),
        _ => name,
    };
    Object::from_value(kind, value)
        .map(Some)
        .map_err(|err| format!("{kind_name} {object_name}: {err}"))
}

/// What tells a file's versions apart without reading it: inode (a rename replaces
/// it), modification time and length.
type Stamp = (u64, Option<SystemTime>, u64);

/// The manifest files under `paths` with their stamps.
fn scan(paths: &[PathBuf]) -> BTreeMap<PathBuf, Stamp> {
    weft_api::manifests::files(paths)
        .into_iter()
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, (meta.ino(), meta.modified().ok(), meta.len())))
        })
        .collect()
}

/// The files of the source and what each holds.
#[derive(Debug)]
pub struct Files {
    paths: Vec<PathBuf>,
    seen: BTreeMap<PathBuf, Stamp>,
    loaded: BTreeMap<PathBuf, Loaded>,
}

#[derive(Debug, Default)]
struct Loaded {
    /// The last good content's digest and objects.
    digest: Option<String>,
    objects: Vec<Object>,
    /// The current content's problem, and its digest.
    error: Option<(FileError, String)>,
}

impl Files {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            seen: BTreeMap::new(),
            loaded: BTreeMap::new(),
        }
    }

    /// Rereads the files that changed since the last call; `true` if what applies
    /// (or an error) changed.
    pub fn refresh(&mut self) -> bool {
        let mut now = scan(&self.paths);
        if now == self.seen {
            return false;
        }
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .loaded
            .keys()
            .filter(|path| !now.contains_key(*path))
            .cloned()
            .collect();
        for path in gone {
            log::info!("{} is gone: its objects no longer apply", path.display());
            self.loaded.remove(&path);
            changed = true;
        }
        let mut unread = Vec::new();
        for (path, stamp) in &now {
            if self.seen.get(path) == Some(stamp) {
                continue;
            }
            let loaded = self.loaded.entry(path.clone()).or_default();
            let text = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(err) => {
                    // Gone or unreadable between the scan and the read: not seen, so
                    // the next scan tries again.
                    log::warn!("cannot read {}: {err}", path.display());
                    unread.push(path.clone());
                    continue;
                }
            };
            let digest = weft_api::digest::of(&text);
            let rejected = loaded.error.as_ref().map(|(_, digest)| digest.as_str());
            if loaded.digest.as_deref() == Some(digest.as_str()) && loaded.error.is_none()
                || rejected == Some(digest.as_str())
            {
                continue;
            }
            changed = true;
            match std::str::from_utf8(&text)
                .map_err(|_| FileError {
                    path: path.clone(),
                    line: 1,
                    problem: "not UTF-8 text".to_owned(),
                })
                .and_then(|text| parse(path, text))
            {
                Ok(objects) => {
                    log::info!("loaded {} object(s) from {}", objects.len(), path.display());
                    *loaded = Loaded {
                        digest: Some(digest),
                        objects,
                        error: None,
                    };
                }
                Err(error) => {
                    log::error!(
                        "{error}; {} keeps applying its last good content",
                        path.display()
                    );
                    loaded.error = Some((error, digest));
                }
            }
        }
        for path in unread {
            now.remove(&path);
        }
        self.seen = now;
        changed
    }

    /// The objects of every file (the first file defining an object wins), with the
    /// EndpointSlices a Kubernetes cluster would derive.
    pub fn objects(&self) -> Objects {
        let mut objects = Objects::default();
        let mut origin: BTreeMap<(Kind, ObjectKey), &Path> = BTreeMap::new();
        for (path, loaded) in &self.loaded {
            for object in &loaded.objects {
                let id = (object.kind(), object.key());
                if let Some(first) = origin.get(&id) {
                    log::warn!(
                        "{} {} in {} is also in {}, which wins",
                        id.0,
                        id.1,
                        path.display(),
                        first.display()
                    );
                    continue;
                }
                origin.insert(id, path);
                objects.upsert(object.clone());
            }
        }
        derive_endpoint_slices(&mut objects);
        objects.sources = self
            .loaded
            .iter()
            .filter_map(|(path, loaded)| Some((path.display().to_string(), loaded.digest.clone()?)))
            .collect();
        objects
    }

    pub fn statuses(&self) -> Vec<FileStatus> {
        self.loaded
            .iter()
            .map(|(path, loaded)| FileStatus {
                path: path.clone(),
                digest: loaded.digest.clone(),
                objects: loaded.objects.len(),
                error: loaded.error.as_ref().map(|(error, _)| error.to_string()),
                rejected_digest: loaded.error.as_ref().map(|(_, digest)| digest.clone()),
            })
            .collect()
    }
}

/// Publishes the files' objects now and whenever they change (checked every
/// `interval`); `statuses` follows what each file holds.
pub async fn run(
    mut files: Files,
    publisher: Publisher,
    statuses: tokio::sync::watch::Sender<Vec<FileStatus>>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        if files.refresh() {
            publisher.send_replace(Arc::new(files.objects()));
            statuses.send_replace(files.statuses());
        }
    }
}

/// Adds, for every Service with a selector and no EndpointSlice, the slice the
/// EndpointSlice controller would make: the ready pods the selector matches.
fn derive_endpoint_slices(objects: &mut Objects) {
    let with_slices: BTreeSet<ObjectKey> = objects
        .endpoint_slices
        .iter()
        .filter_map(|(key, slice)| {
            let labels = slice.metadata.labels.as_ref()?;
            let service = labels.get("kubernetes.io/service-name")?;
            Some(ObjectKey::new(&key.namespace, service))
        })
        .collect();
    let derived: Vec<Object> = objects
        .services
        .iter()
        .filter(|(key, _)| !with_slices.contains(key))
        .filter_map(|(key, service)| {
            let slice = derive_slice(key, service, objects.pods.values().map(Arc::as_ref))?;
            Some(Object::EndpointSlice(Arc::new(slice)))
        })
        .collect();
    for slice in derived {
        objects.upsert(slice);
    }
}

fn derive_slice<'a>(
    key: &ObjectKey,
    service: &Service,
    pods: impl Iterator<Item = &'a Pod>,
) -> Option<EndpointSlice> {
    let spec = service.spec.as_ref()?;
    let selector = spec
        .selector
        .as_ref()
        .filter(|selector| !selector.is_empty())?;
    let pods: Vec<&Pod> = pods
        .filter(|pod| pod.metadata.namespace.as_deref() == Some(key.namespace.as_str()))
        .filter(|pod| {
            let labels = pod.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|labels| labels.get(k)) == Some(v))
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|port| {
            let number = match &port.target_port {
                None => port.port,
                Some(IntOrString::Int(number)) => *number,
                Some(IntOrString::String(name)) => pods.iter().find_map(|pod| {
                    pod.spec
                        .as_ref()?
                        .containers
                        .iter()
                        .flat_map(|container| container.ports.iter().flatten())
                        .find(|container_port| container_port.name.as_deref() == Some(name))
                        .map(|container_port| container_port.container_port)
                })?,
            };
            Some(EndpointPort {
                name: port.name.clone(),
                port: Some(number),
                protocol: port.protocol.clone(),
                app_protocol: port.app_protocol.clone(),
            })
        })
        .collect();
    let endpoints = pods
        .iter()
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let ip = status.pod_ip.clone()?;
            let running = !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            let ready = status
                .conditions
                .iter()
                .flatten()
                .find(|condition| condition.type_ == "Ready")
                .is_none_or(|condition| condition.status == "True");
            running.then(|| Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
                node_name: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
                ..Default::default()
            })
        })
        .collect();
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-derived", key.name)),
            namespace: Some(key.namespace.clone()),
            labels: Some([("kubernetes.io/service-name".to_owned(), key.name.clone())].into()),
            ..Default::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints,
        ports: Some(ports),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_lists_and_unknown_kinds() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/mesh: enabled } }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: ignored }
--- # a comment
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: { name: web }
    spec: { clusterIP: 10.96.0.10, ports: [{ port: 80 }] }
"#;
        let objects = parse(Path::new("x.yaml"), text).unwrap();
        let keys: Vec<String> = objects
            .iter()
            .map(|object| format!("{} {}", object.kind(), object.key()))
            .collect();
        assert_eq!(keys, ["Namespace shop", "Service default/web"]);
    }

    #[test]
    fn errors_name_file_line_object_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: { name: a }\n---\napiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: p, namespace: a }\nspec:\n  mode: LOOSE\n";
        let error = parse(Path::new("dir/policy.yaml"), text).unwrap_err();
        assert_eq!(error.line, 5, "{error}");
        let message = error.to_string();
        assert!(
            message.starts_with("dir/policy.yaml:5: PeerAuthentication a/p: "),
            "{message}"
        );
        assert!(message.contains("LOOSE"), "{message}");

        let syntax = parse(
            Path::new("b.yaml"),
            "---\napiVersion: v1\nkind: Namespace\nmetadata: { name: a }\n---\nmetadata: [\n",
        )
        .unwrap_err();
        assert_eq!(syntax.line, 7, "{syntax}");
        let version = parse(
            Path::new("c.yaml"),
            "apiVersion: v2\nkind: Pod\nmetadata: {name: x}\n",
        )
        .unwrap_err();
        assert!(version.problem.contains("use v1"), "{version}");
        let nameless = parse(Path::new("d.yaml"), "apiVersion: v1\nkind: Pod\n").unwrap_err();
        assert!(nameless.problem.contains("metadata.name"), "{nameless}");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns.yaml");
        let write = |text: &str| {
            std::fs::write(&path, text).unwrap();
            // Make the change visible to the modification-time check.
            let later = SystemTime::now() + Duration::from_secs(1);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(later)
                .unwrap();
        };
        write("apiVersion: v1\nkind: Namespace\nmetadata: { name: a }\n");
        let mut files = Files::new(vec![dir.path().to_owned()]);
        assert!(files.refresh());
        assert_eq!(files.objects().namespaces.len(), 1);
        assert!(!files.refresh(), "nothing changed");

        write("apiVersion: v1\nkind: Namespace\nmetadata: { name: [b }\n");
        assert!(files.refresh());
        assert_eq!(files.objects().namespaces.keys().next().unwrap().name, "a");
        let status = &files.statuses()[0];
        assert!(
            status.error.as_ref().unwrap().contains("ns.yaml:3"),
            "{status:?}"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(files.refresh());
        assert!(files.objects().namespaces.is_empty());
    }

    #[test]
    fn services_with_selectors_get_endpoint_slices() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: http }]
---
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, labels: { app: web } }
spec:
  nodeName: node0
  containers: [{ name: web, image: x, ports: [{ name: http, containerPort: 8080 }] }]
status: { phase: Running, podIP: 10.244.0.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: web-2, namespace: shop, labels: { app: web } }
spec: { nodeName: node1, containers: [{ name: web, image: x }] }
status:
  phase: Running
  podIP: 10.244.1.2
  conditions: [{ type: Ready, status: "False" }]
---
apiVersion: v1
kind: Pod
metadata: { name: other, namespace: shop, labels: { app: other } }
spec: { nodeName: node1, containers: [{ name: other, image: x }] }
status: { phase: Running, podIP: 10.244.1.3 }
"#;
        let mut objects = Objects::default();
        for object in parse(Path::new("x.yaml"), text).unwrap() {
            objects.upsert(object);
        }
        derive_endpoint_slices(&mut objects);
        let slice = &objects.endpoint_slices[&ObjectKey::new("shop", "web-derived")];
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );
        let endpoints: Vec<(&str, Option<bool>)> = slice
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].as_str(),
                    e.conditions.as_ref().unwrap().ready,
                )
            })
            .collect();
        assert_eq!(
            endpoints,
            [("10.244.0.2", Some(true)), ("10.244.1.2", Some(false))]
        );
    }
}
