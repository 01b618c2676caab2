//! Chaining weft-cni into the node's CNI network configuration, and taking it out again:
//! what the agent does at start, now and then while it runs (the primary CNI may
//! rewrite its file), and on `uninstall`.
//!
//! The container runtime uses the first file of its configuration directory, by name,
//! among `*.conf`, `*.conflist` and `*.json` (libcni's rule). weft appends its plugin to
//! that file's `plugins`, last, since it reads the primary plugin's result; a
//! single-plugin `.conf` becomes a `.conflist` of the same name first (a `.conf` cannot
//! hold a list). Every write goes to a temporary file in the same directory, renamed
//! over the original, so the runtime never reads half a file; a file that already ends
//! with weft's plugin, as configured, is not touched. The binary is copied the same way.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

/// The `type` of weft's entry, and the name of its binary.
pub const PLUGIN_TYPE: &str = "weft-cni";

/// Why the network configuration could not be chained or unchained.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "no CNI network configuration (*.conf, *.conflist, *.json) in {0}: is the cluster's \
         primary CNI installed on this node, and is this its configuration directory?"
    )]
    NoConfiguration(PathBuf),
    #[error(
        "{path} is not a CNI network configuration ({problem}): the container runtime \
         cannot use it either; fix it or let the primary CNI rewrite it"
    )]
    Malformed { path: PathBuf, problem: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path} (is the directory mounted writable?): {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a call changed on the node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changed {
    /// The configuration file written (or removed), if any.
    pub configuration: Option<PathBuf>,
    /// The binary was copied (or removed).
    pub binary: bool,
}

impl Changed {
    pub fn anything(&self) -> bool {
        self.configuration.is_some() || self.binary
    }
}

/// Where the node keeps its CNI configuration and plugins, and what weft puts there.
#[derive(Debug, Clone)]
pub struct Installer {
    /// The runtime's configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The runtime's plugin directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The `weft-cni` binary to place there.
    pub binary: PathBuf,
    /// weft's entry in the plugin list (`type` is set to [`PLUGIN_TYPE`]).
    pub plugin: Map<String, Value>,
}

impl Installer {
    /// Places the binary and chains weft into the primary configuration, changing only
    /// what differs from what should be there.
    pub fn install(&self) -> Result<Changed, InstallError> {
        let binary = self.place_binary()?;
        let primary = primary(&self.conf_dir)?;
        let text = read(&primary)?;
        let list = parse(&primary, &text)?;
        let mut plugin = self.plugin.clone();
        plugin.insert("type".into(), PLUGIN_TYPE.into());
        let chained = chain(list.clone(), plugin);
        let is_conflist = primary.extension().is_some_and(|ext| ext == "conflist");
        if chained == list && is_conflist {
            return Ok(Changed {
                configuration: None,
                binary,
            });
        }
        let target = primary.with_extension("conflist");
        write_atomically(&target, render(&chained).as_bytes())?;
        if target != primary {
            fs::remove_file(&primary).map_err(|source| InstallError::Write {
                path: primary.clone(),
                source,
            })?;
        }
        Ok(Changed {
            configuration: Some(target),
            binary,
        })
    }

    /// Takes weft out of every configuration file that lists it, and removes the
    /// binary. Nothing to do is not an error.
    pub fn uninstall(&self) -> Result<Changed, InstallError> {
        let mut changed = Changed::default();
        for path in configuration_files(&self.conf_dir)? {
            let text = read(&path)?;
            // A file weft cannot read is not weft's to fix.
            let Ok(list) = parse(&path, &text) else {
                continue;
            };
            let unchained = unchain(list.clone());
            if unchained != list {
                write_atomically(&path, render(&unchained).as_bytes())?;
                changed.configuration = Some(path);
            }
        }
        let placed = self.bin_dir.join(PLUGIN_TYPE);
        match fs::remove_file(&placed) {
            Ok(()) => changed.binary = true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(InstallError::Write {
                    path: placed,
                    source,
                });
            }
        }
        Ok(changed)
    }

    /// Copies the binary into the plugin directory unless the same bytes are there.
    fn place_binary(&self) -> Result<bool, InstallError> {
        let placed = self.bin_dir.join(PLUGIN_TYPE);
        let wanted = fs::read(&self.binary).map_err(|source| InstallError::Read {
            path: self.binary.clone(),
            source,
        })?;
        if fs::read(&placed).is_ok_and(|there| there == wanted) {
            return Ok(false);
        }
        write_atomically(&placed, &wanted)?;
        set_executable(&placed)?;
        Ok(true)
    }
}

/// The configuration file the runtime uses: the first by name.
pub fn primary(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    configuration_files(conf_dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfiguration(conf_dir.to_owned()))
}

/// The configuration files of `conf_dir`, by name.
fn configuration_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(InstallError::Read {
                path: conf_dir.to_owned(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .is_some_and(|ext| ext == "conf" || ext == "conflist" || ext == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<String, InstallError> {
    fs::read_to_string(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A configuration as a list (`plugins`), whichever form the file has.
fn parse(path: &Path, text: &str) -> Result<Map<String, Value>, InstallError> {
    let malformed = |problem: String| InstallError::Malformed {
        path: path.to_owned(),
        problem,
    };
    let value: Value = serde_json::from_str(text).map_err(|err| malformed(err.to_string()))?;
    let Value::Object(mut object) = value else {
        return Err(malformed("not a JSON object".into()));
    };
    match object.get("plugins") {
        Some(Value::Array(plugins)) => {
            if plugins.iter().any(|plugin| !plugin.is_object()) {
                return Err(malformed("an entry of `plugins` is not an object".into()));
            }
            Ok(object)
        }
        Some(_) => Err(malformed("`plugins` is not a list".into())),
        None if object.get("type").is_some_and(Value::is_string) => {
            // A single plugin: the list keeps the network's name and version.
            let mut list = Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(value) = object.remove(key) {
                    list.insert(key.into(), value);
                }
            }
            list.insert("plugins".into(), Value::Array(vec![Value::Object(object)]));
            Ok(list)
        }
        None => Err(malformed("neither `plugins` nor `type`".into())),
    }
}

/// `list` with `plugin` last in its plugins, and no other weft entry.
fn chain(list: Map<String, Value>, plugin: Map<String, Value>) -> Map<String, Value> {
    let mut list = unchain(list);
    if let Some(Value::Array(plugins)) = list.get_mut("plugins") {
        plugins.push(Value::Object(plugin));
    }
    list
}

/// `list` without weft's entries.
fn unchain(mut list: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Array(plugins)) = list.get_mut("plugins") {
        plugins.retain(|plugin| plugin.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    }
    list
}

fn render(list: &Map<String, Value>) -> String {
    let mut text = serde_json::to_string_pretty(list).expect("a JSON map renders");
    text.push('\n');
    text
}

/// Writes `bytes` to `path` through a temporary file in its directory, renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let failed = |source| InstallError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // A dot-name without a configuration extension: the runtime never reads it.
    let temporary = path.with_file_name(format!(".{name}.weft-{}", std::process::id()));
    fs::write(&temporary, bytes).map_err(failed)?;
    fs::rename(&temporary, path).map_err(|err| {
        let _ = fs::remove_file(&temporary);
        failed(err)
    })
}

fn set_executable(path: &Path) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|source| {
        InstallError::Write {
            path: path.to_owned(),
            source,
        }
    })
}
