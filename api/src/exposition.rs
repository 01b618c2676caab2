//! Reading Prometheus' text exposition format back: the samples of one metric, for
//! tools (`weftctl`) and tests that look at what the agents and the controller export.

use std::collections::BTreeMap;

/// Every sample of metric `name` in Prometheus text: its labels and value.
pub fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (key, value) = pair.split_once("=\"")?;
                    Some((key.to_owned(), value.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_of_one_metric_with_their_labels() {
        let text = "# TYPE a counter\na{x=\"1\",y=\"two\"} 3\na 4.5\nab{x=\"1\"} 9\nb 1\n";
        let found = samples(text, "a");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0["y"], "two");
        assert_eq!(found[0].1, 3.0);
        assert!(found[1].0.is_empty());
        assert_eq!(found[1].1, 4.5);
    }
}
