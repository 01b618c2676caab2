//! A workload's labels, held compactly: the agent holds every pod of the cluster, most
//! pods have a handful of labels, and a map's node for a single entry weighs half a
//! kilobyte where a sorted slice weighs the entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Labels sorted by key, each key once; written and read as a map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let found = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[found].1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The last value of a key given twice wins, as in a map.
impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(labels: I) -> Self {
        let mut labels: Vec<(Box<str>, Box<str>)> = labels
            .into_iter()
            .map(|(key, value)| (key.into(), value.into()))
            .collect();
        // Stable: of equal keys, the last given stays last, and is kept.
        labels.sort_by(|(a, _), (b, _)| a.cmp(b));
        let mut unique: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(labels.len());
        for label in labels {
            match unique.last_mut() {
                Some(last) if last.0 == label.0 => *last = label,
                _ => unique.push(label),
            }
        }
        Self(unique.into_boxed_slice())
    }
}

impl<const N: usize> From<[(&str, &str); N]> for Labels {
    fn from(labels: [(&str, &str); N]) -> Self {
        labels.into_iter().collect()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, value)| (&**key, &**value)))
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Self::from_iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_by_key_whatever_the_order_given() {
        let labels = Labels::from([("version", "v2"), ("app", "web"), ("tier", "front")]);
        assert_eq!(labels.get("app"), Some("web"));
        assert_eq!(labels.get("version"), Some("v2"));
        assert_eq!(labels.get("tier"), Some("front"));
        assert_eq!(labels.get("zone"), None);
        assert!(Labels::default().get("app").is_none() && Labels::default().is_empty());
    }

    #[test]
    fn a_key_given_twice_keeps_its_last_value() {
        let labels = Labels::from([("app", "old"), ("b", "1"), ("app", "new")]);
        assert_eq!(labels.get("app"), Some("new"));
        assert_eq!(labels, Labels::from([("b", "1"), ("app", "new")]));
    }

    #[test]
    fn written_and_read_as_a_map() {
        let labels: Labels = serde_yaml::from_str("{ version: v1, app: web }").unwrap();
        assert_eq!(labels, Labels::from([("app", "web"), ("version", "v1")]));
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"app":"web","version":"v1"}"#
        );
    }
}
