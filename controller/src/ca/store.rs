//! Where the CA's [`Material`] is kept: a directory (with the file source) or a
//! Kubernetes Secret of type `kubernetes.io/tls` (with the Kubernetes source). Either
//! holds one entry per name: `tls.crt`, `tls.key`, `ca.crt`, `previous-<secs>.crt|key`.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, api::PostParams};

use super::{Material, ROOTS, SIGNING_CERT, SIGNING_KEY};

/// Where the CA lives.
#[derive(Clone)]
pub enum Store {
    Dir(PathBuf),
    Secret {
        client: kube::Client,
        namespace: String,
        name: String,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Dir(dir) => write!(f, "directory {}", dir.display()),
            Store::Secret {
                namespace, name, ..
            } => write!(f, "Secret {namespace}/{name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the CA Secret {namespace}/{name} exists already or changed since it was read (another controller, a rotation or an edit); read it and try again"
    )]
    Conflict { namespace: String, name: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot {action} the CA Secret {namespace}/{name}: {source}; check that the controller may get, create and update Secrets in {namespace}"
    )]
    Kube {
        action: &'static str,
        namespace: String,
        name: String,
        // Boxed to keep the error (and every `Result` of this module) small.
        #[source]
        source: Box<kube::Error>,
    },
}

/// What was read, for replacing it only if nobody changed it since: the Secret as read
/// (whose resourceVersion is the precondition, and whose type, labels and annotations
/// a replacement keeps); nothing for a directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Revision(Option<Box<Secret>>);

impl Revision {
    /// The Secret's resourceVersion.
    pub fn resource_version(&self) -> Option<&str> {
        self.0.as_ref()?.metadata.resource_version.as_deref()
    }
}

impl Store {
    /// How often a running controller looks for a rotation.
    pub fn poll_interval(&self) -> Duration {
        match self {
            Store::Dir(_) => Duration::from_secs(1),
            Store::Secret { .. } => Duration::from_secs(10),
        }
    }

    /// The material, or `None` when there is none yet. A Secret without data (one a
    /// chart created empty, say) is empty material.
    pub async fn read(&self) -> Result<Option<(Material, Revision)>, StoreError> {
        match self {
            Store::Dir(dir) => {
                read_dir(dir).map(|found| found.map(|material| (material, Revision::default())))
            }
            Store::Secret {
                client,
                namespace,
                name,
            } => {
                let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                    .get_opt(name)
                    .await
                    .map_err(|source| self.kube_error("read", source))?;
                Ok(secret.map(|secret| {
                    let material = secret
                        .data
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(key, ByteString(value))| (key, value))
                        .collect();
                    (material, Revision(Some(Box::new(secret))))
                }))
            }
        }
    }

    /// Stores `material` as the first version. Returns false, storing nothing, when
    /// someone else stored one first.
    pub async fn create(&self, material: &Material) -> Result<bool, StoreError> {
        match self {
            Store::Dir(dir) => {
                if read_dir(dir)?.is_some() {
                    return Ok(false);
                }
                write_dir(dir, material).map(|()| true)
            }
            Store::Secret { .. } => match self.put(material, Revision::default()).await {
                Ok(()) => Ok(true),
                Err(StoreError::Conflict { .. }) => Ok(false),
                Err(err) => Err(err),
            },
        }
    }

    /// Replaces the material read at `revision`; a Secret someone changed since is a
    /// [`StoreError::Conflict`].
    pub async fn replace(&self, material: &Material, revision: Revision) -> Result<(), StoreError> {
        match self {
            Store::Dir(dir) => write_dir(dir, material),
            Store::Secret { .. } => self.put(material, revision).await,
        }
    }

    /// Creates the Secret (no revision) or replaces the one read.
    async fn put(&self, material: &Material, revision: Revision) -> Result<(), StoreError> {
        let Store::Secret {
            client,
            namespace,
            name,
        } = self
        else {
            unreachable!("only Secrets are put");
        };
        let api = Api::<Secret>::namespaced(client.clone(), namespace);
        let data = material
            .iter()
            .map(|(key, value)| (key.clone(), ByteString(value.clone())))
            .collect();
        let result = match revision.0 {
            None => {
                let mut secret = Secret {
                    type_: Some("kubernetes.io/tls".to_owned()),
                    data: Some(data),
                    ..Secret::default()
                };
                secret.metadata.name = Some(name.clone());
                secret.metadata.namespace = Some(namespace.clone());
                secret.metadata.labels = Some(
                    [("app.kubernetes.io/part-of".to_owned(), "weft".to_owned())]
                        .into_iter()
                        .collect(),
                );
                api.create(&PostParams::default(), &secret).await
            }
            Some(mut secret) => {
                secret.data = Some(data);
                secret.string_data = None;
                api.replace(name, &PostParams::default(), &secret).await
            }
        };
        result.map(drop).map_err(|source| match source {
            kube::Error::Api(response) if response.code == 409 => StoreError::Conflict {
                namespace: namespace.clone(),
                name: name.clone(),
            },
            source => self.kube_error("write", source),
        })
    }

    fn kube_error(&self, action: &'static str, source: kube::Error) -> StoreError {
        let (namespace, name) = match self {
            Store::Secret {
                namespace, name, ..
            } => (namespace.clone(), name.clone()),
            Store::Dir(_) => Default::default(),
        };
        StoreError::Kube {
            action,
            namespace,
            name,
            source: Box::new(source),
        }
    }
}

fn is_material_name(name: &str) -> bool {
    [SIGNING_CERT, SIGNING_KEY, ROOTS].contains(&name)
        || (name.starts_with(super::PREVIOUS_PREFIX)
            && (name.ends_with(".crt") || name.ends_with(".key")))
}

/// The material in `dir`; `None` when the directory is missing or holds none of it.
fn read_dir(dir: &Path) -> Result<Option<Material>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                action: "list",
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut material = Material::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_material_name(&name) {
            continue;
        }
        let path = entry.path();
        let value = fs::read(&path).map_err(|source| StoreError::Io {
            action: "read",
            path,
            source,
        })?;
        material.insert(name, value);
    }
    Ok((!material.is_empty()).then_some(material))
}

/// Writes every entry (keys mode 0600) through a hidden temporary file, previous roots
/// first and the signing certificate last, then removes entries `material` no longer has.
fn write_dir(dir: &Path, material: &Material) -> Result<(), StoreError> {
    let io_error = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    };
    fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    let order = |name: &str| match name {
        SIGNING_CERT => 3,
        SIGNING_KEY => 2,
        ROOTS => 1,
        _ => 0,
    };
    let mut names: Vec<&String> = material.keys().collect();
    names.sort_by_key(|name| order(name));
    for name in names {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.write_all(&material[name])
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_error("write", &path))?;
    }
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_material_name(&name) && !material.contains_key(&name) {
            fs::remove_file(entry.path()).map_err(io_error("remove", &entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_directory_is_created_once_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Dir(dir.path().join("ca"));
        assert!(store.read().await.unwrap().is_none());
        let first = Material::from([
            ("tls.crt".to_owned(), b"cert".to_vec()),
            ("tls.key".to_owned(), b"key".to_vec()),
            ("ca.crt".to_owned(), b"cert".to_vec()),
            ("previous-1.crt".to_owned(), b"old".to_vec()),
            ("previous-1.key".to_owned(), b"old key".to_vec()),
        ]);
        assert!(store.create(&first).await.unwrap());
        assert!(!store.create(&Material::new()).await.unwrap());
        fs::write(dir.path().join("ca").join("unrelated"), "x").unwrap();
        let (read, _) = store.read().await.unwrap().unwrap();
        assert_eq!(read, first);
        let mode = fs::metadata(dir.path().join("ca").join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut second = first.clone();
        second.retain(|name, _| !name.starts_with("previous-"));
        second.insert("tls.crt".to_owned(), b"new".to_vec());
        store.replace(&second, Revision::default()).await.unwrap();
        assert_eq!(store.read().await.unwrap().unwrap().0, second);
        assert!(dir.path().join("ca").join("unrelated").exists());
    }
}
