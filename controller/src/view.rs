//! What a node is sent: its view of the mesh as a set of encoded resources, the part
//! every node shares plus the part only it gets, named by a digest of the whole; and
//! the delta between two views.

use std::{collections::BTreeMap, sync::Arc};

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceSet {
    resources: BTreeMap<Key, Bytes>,
}

impl ResourceSet {
    /// Adds `message` under `name` (replacing an earlier one of the same kind and name).
    pub fn insert<M: Kind>(&mut self, name: impl Into<String>, message: &M) {
        let key = Key {
            kind: M::KIND,
            name: name.into(),
        };
        self.resources
            .insert(key, Bytes::from(message.encode_to_vec()));
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

    fn digest_into(&self, digest: &mut Digest) {
        for (key, body) in &self.resources {
            digest
                .update(key.kind.as_bytes())
                .update(&[0])
                .update(key.name.as_bytes())
                .update(&[0])
                .update(&(body.len() as u64).to_le_bytes())
                .update(body);
        }
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
        let mut digest = Digest::new();
        shared.digest_into(&mut digest);
        digest.update(b"\xffnode\xff");
        local.digest_into(&mut digest);
        Self {
            shared,
            local,
            version: digest.hex(),
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
    /// is the same allocation is not compared at all.
    pub fn delta_from(&self, before: &NodeView) -> ConfigUpdate {
        let mut update = ConfigUpdate {
            version: self.version.clone(),
            snapshot: false,
            upserts: Vec::new(),
            removals: Vec::new(),
        };
        for (old, new) in [(&before.shared, &self.shared), (&before.local, &self.local)] {
            if !Arc::ptr_eq(old, new) {
                diff(old, new, &mut update);
            }
        }
        update
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

        let delta = after.delta_from(&before);
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

        let again = after.delta_from(&after);
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
}
