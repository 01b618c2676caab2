//! What a node is sent: its view of the mesh as a set of encoded resources, the part
//! every node shares plus the part only it gets, named by a digest of the whole; and
//! the delta between two views. What every node shares is digested and diffed once,
//! not once per node ([`SharedChanges`]).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use bytes::Bytes;
use weft_api::{
    config::v1::{ConfigUpdate, Kind, Resource, ResourceKey},
    digest::Digest,
};

/// `kind` (a protobuf message's full name) and `name` of a resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: &'static str,
    pub name: String,
}

/// Resources by key, each encoded once.
#[derive(Clone, Debug, Default)]
pub struct ResourceSet {
    resources: BTreeMap<Key, Bytes>,
    /// The digest of `resources`, computed when first asked for.
    digest: OnceLock<String>,
}

impl PartialEq for ResourceSet {
    fn eq(&self, other: &Self) -> bool {
        self.resources == other.resources
    }
}

impl Eq for ResourceSet {}

impl ResourceSet {
    /// Adds `message` under `name` (replacing an earlier one of the same kind and name).
    pub fn insert<M: Kind>(&mut self, name: impl Into<String>, message: &M) {
        let key = Key {
            kind: M::KIND,
            name: name.into(),
        };
        self.resources
            .insert(key, Bytes::from(message.encode_to_vec()));
        self.digest.take();
    }

    /// The resource of `M`'s kind named `name`, decoded.
    pub fn get<M: Kind>(&self, name: &str) -> Option<M> {
        let key = Key {
            kind: M::KIND,
            name: name.to_owned(),
        };
        let body = self.resources.get(&key)?;
        Some(M::decode(body.as_ref()).expect("the set holds what it encoded"))
    }

    /// Every resource of `M`'s kind, decoded, by name.
    pub fn all<M: Kind>(&self) -> BTreeMap<String, M> {
        let kind = M::KIND;
        self.resources
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(key, body)| {
                let message = M::decode(body.as_ref()).expect("the set holds what it encoded");
                (key.name.clone(), message)
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Bytes of encoded resources.
    pub fn encoded_size(&self) -> usize {
        self.resources.values().map(Bytes::len).sum()
    }

    /// A digest of every key and body, computed once.
    fn digest(&self) -> &str {
        self.digest.get_or_init(|| {
            let mut digest = Digest::new();
            for (key, body) in &self.resources {
                digest
                    .update(key.kind.as_bytes())
                    .update(&[0])
                    .update(key.name.as_bytes())
                    .update(&[0])
                    .update(&(body.len() as u64).to_le_bytes())
                    .update(body);
            }
            digest.hex()
        })
    }
}

/// One node's view: what all nodes share and what only this node gets.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub shared: Arc<ResourceSet>,
    pub local: Arc<ResourceSet>,
    /// Digest of both parts: equal versions are equal views.
    pub version: String,
}

impl NodeView {
    pub fn new(shared: Arc<ResourceSet>, local: Arc<ResourceSet>) -> Self {
        let version = Digest::new()
            .update(shared.digest().as_bytes())
            .update(b"\xffnode\xff")
            .update(local.digest().as_bytes())
            .hex();
        Self {
            shared,
            local,
            version,
        }
    }

    /// The whole view as a snapshot update.
    pub fn snapshot(&self) -> ConfigUpdate {
        ConfigUpdate {
            version: self.version.clone(),
            snapshot: true,
            upserts: self
                .shared
                .resources
                .iter()
                .chain(self.local.resources.iter())
                .map(|(key, body)| resource(key, body))
                .collect(),
            removals: Vec::new(),
        }
    }

    /// What turns `before` into this view, as a delta update. The two parts are
    /// compared on their own (the compiler never puts a kind in both), and a part that
    /// is the same allocation is not compared at all; the shared part's changes come
    /// from `shared`, which computes them once for every node.
    pub fn delta_from(&self, before: &NodeView, shared: &SharedChanges) -> ConfigUpdate {
        let mut update = ConfigUpdate {
            version: self.version.clone(),
            snapshot: false,
            upserts: Vec::new(),
            removals: Vec::new(),
        };
        if !Arc::ptr_eq(&before.shared, &self.shared) {
            let changes = shared.between(&before.shared, &self.shared);
            update.upserts.extend_from_slice(&changes.upserts);
            update.removals.extend_from_slice(&changes.removals);
        }
        if !Arc::ptr_eq(&before.local, &self.local) {
            diff(&before.local, &self.local, &mut update);
        }
        update
    }
}

/// The changes of a generation's shared part from the one before it, computed by the
/// first node's stream that needs them and reused by the others: every node that was
/// sent the same earlier generation gets the same changes.
#[derive(Debug, Default)]
pub struct SharedChanges {
    /// The earlier shared part (weak, so that it is freed once no stream holds it;
    /// while this is held its address is not reused) and the changes from it.
    last: Mutex<Option<(Weak<ResourceSet>, Arc<ConfigUpdate>)>>,
}

impl Clone for SharedChanges {
    /// A fresh cache: changes belong to the generation that computed them.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl SharedChanges {
    /// The upserts and removals that turn `old` into `new` (the generation's part).
    fn between(&self, old: &Arc<ResourceSet>, new: &ResourceSet) -> Arc<ConfigUpdate> {
        // Held while computing, so that the streams waiting for the same changes wait
        // for this computation rather than repeat it.
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((from, changes)) = &*last
            && std::ptr::eq(from.as_ptr(), Arc::as_ptr(old))
        {
            return Arc::clone(changes);
        }
        let mut changes = ConfigUpdate::default();
        diff(old, new, &mut changes);
        let changes = Arc::new(changes);
        *last = Some((Arc::downgrade(old), Arc::clone(&changes)));
        changes
    }
}

/// Adds to `update` what turns `old` into `new`: one walk over both sorted sets.
fn diff(old: &ResourceSet, new: &ResourceSet, update: &mut ConfigUpdate) {
    let mut old_iter = old.resources.iter().peekable();
    let mut new_iter = new.resources.iter().peekable();
    loop {
        let order = match (old_iter.peek(), new_iter.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((old_key, _)), Some((new_key, _))) => old_key.cmp(new_key),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (key, _) = old_iter.next().expect("peeked");
                update.removals.push(resource_key(key));
            }
            std::cmp::Ordering::Greater => {
                let (key, body) = new_iter.next().expect("peeked");
                update.upserts.push(resource(key, body));
            }
            std::cmp::Ordering::Equal => {
                let (_, old_body) = old_iter.next().expect("peeked");
                let (key, new_body) = new_iter.next().expect("peeked");
                if old_body != new_body {
                    update.upserts.push(resource(key, new_body));
                }
            }
        }
    }
}

fn resource_key(key: &Key) -> ResourceKey {
    ResourceKey {
        kind: key.kind.to_owned(),
        name: key.name.clone(),
    }
}

fn resource(key: &Key, body: &Bytes) -> Resource {
    Resource {
        key: Some(resource_key(key)),
        body: body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use weft_api::config::v1::{Node, Workload};

    use super::*;

    fn node(name: &str, address: &str) -> Node {
        Node {
            name: name.into(),
            address: address.into(),
            ..Default::default()
        }
    }

    #[test]
    fn deltas_carry_exactly_the_changes() {
        let mut shared = ResourceSet::default();
        shared.insert("node0", &node("node0", "10.0.0.1"));
        shared.insert("node1", &node("node1", "10.0.0.2"));
        let mut local = ResourceSet::default();
        local.insert(
            "default/a",
            &Workload {
                name: "a".into(),
                ..Default::default()
            },
        );
        let before = NodeView::new(Arc::new(shared.clone()), Arc::new(local.clone()));

        shared.insert("node1", &node("node1", "10.0.0.9"));
        shared.insert("node2", &node("node2", "10.0.0.3"));
        let after = NodeView::new(Arc::new(shared), Arc::new(ResourceSet::default()));
        assert_ne!(before.version, after.version);

        let delta = after.delta_from(&before, &SharedChanges::default());
        assert!(!delta.snapshot);
        let upserted: Vec<&str> = delta
            .upserts
            .iter()
            .map(|r| r.key.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(upserted, ["node1", "node2"]);
        assert_eq!(delta.removals.len(), 1);
        assert_eq!(delta.removals[0].name, "default/a");
        assert_eq!(delta.removals[0].kind, "weft.config.v1.Workload");

        let again = after.delta_from(&after, &SharedChanges::default());
        assert!(again.upserts.is_empty() && again.removals.is_empty());
        assert_eq!(after.snapshot().upserts.len(), 3);
    }

    #[test]
    fn versions_name_contents() {
        let mut one = ResourceSet::default();
        one.insert("node0", &node("node0", "10.0.0.1"));
        let a = NodeView::new(Arc::new(one.clone()), Arc::default());
        let b = NodeView::new(Arc::new(one.clone()), Arc::default());
        assert_eq!(a.version, b.version);
        // Moving a resource from the shared to the local part changes the view's shape.
        let c = NodeView::new(Arc::default(), Arc::new(one));
        assert_ne!(a.version, c.version);
        assert_eq!(a.version.len(), 16);
    }

    #[test]
    fn the_shared_changes_are_computed_once_for_every_node_that_had_the_same_part() {
        let mut shared = ResourceSet::default();
        shared.insert("node0", &node("node0", "10.0.0.1"));
        let earlier = Arc::new(shared.clone());
        shared.insert("node1", &node("node1", "10.0.0.2"));
        let later = Arc::new(shared.clone());
        let changes = SharedChanges::default();
        let delta = |before: &Arc<ResourceSet>, local: &str| {
            let mut own = ResourceSet::default();
            own.insert(local, &node(local, "10.0.0.9"));
            let own = Arc::new(own);
            let before = NodeView::new(Arc::clone(before), Arc::clone(&own));
            NodeView::new(Arc::clone(&later), own).delta_from(&before, &changes)
        };
        let names = |update: &ConfigUpdate| -> Vec<String> {
            let keys = update.upserts.iter().map(|r| r.key.as_ref().unwrap());
            keys.map(|key| key.name.clone()).collect()
        };
        assert_eq!(names(&delta(&earlier, "a")), ["node1"]);
        let first = changes.between(&earlier, &later);
        // A second node with the same earlier part: the very same changes.
        assert_eq!(names(&delta(&earlier, "b")), ["node1"]);
        assert!(Arc::ptr_eq(&first, &changes.between(&earlier, &later)));
        // A node that had another part (equal content, another generation): computed
        // for it, and right.
        let other = Arc::new(ResourceSet::default());
        let from_nothing = changes.between(&other, &later);
        assert!(!Arc::ptr_eq(&first, &from_nothing));
        assert_eq!(names(&from_nothing), ["node0", "node1"]);
    }
}
