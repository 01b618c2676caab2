//! Which candidates a choice is made among: with `prefer_close` (Kubernetes'
//! `trafficDistribution: PreferClose`), the closest tier that has a healthy candidate of
//! some weight — the client's node, then its zone, then everywhere — so that a close
//! tier whose endpoints are all unhealthy or weighted out fails over to the next one.

use super::{Candidate, Locality};

/// The candidates a choice may take.
#[derive(Clone, Copy, Debug)]
pub struct Eligible<H> {
    /// The farthest locality taken.
    tier: Locality,
    healthy: H,
}

impl<H: Fn(&Candidate) -> bool> Eligible<H> {
    /// The eligible among `candidates`, or None when none may be chosen.
    pub fn among(candidates: &[Candidate], prefer_close: bool, healthy: H) -> Option<Self> {
        let mut usable = candidates
            .iter()
            .filter(|candidate| candidate.weight > 0 && healthy(candidate));
        let tier = if prefer_close {
            usable.map(|candidate| candidate.locality).min()?
        } else {
            usable.next().map(|_| Locality::Elsewhere)?
        };
        Some(Self { tier, healthy })
    }

    pub fn admits(&self, candidate: &Candidate) -> bool {
        candidate.weight > 0 && candidate.locality <= self.tier && (self.healthy)(candidate)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use Locality::{Elsewhere, SameNode, SameZone};

    fn candidate(port: u16, weight: u32, locality: Locality) -> Candidate {
        Candidate {
            address: SocketAddr::from(([10, 0, 0, 1], port)),
            weight,
            locality,
        }
    }

    type Health = fn(&Candidate) -> bool;
    type Case<'a> = (
        &'a str,
        &'a [Candidate],
        bool,
        Health,
        Option<&'a [Candidate]>,
    );

    #[test]
    fn the_closest_healthy_tier_with_weight_is_taken() {
        let node = candidate(1, 1, SameNode);
        let zone = candidate(2, 1, SameZone);
        let zone_too = candidate(3, 2, SameZone);
        let far = candidate(4, 1, Elsewhere);
        let node_weighted_out = candidate(5, 0, SameNode);
        let everyone = [node, zone, zone_too, far];
        let healthy: Health = |_| true;
        let not_on_the_node: Health = |candidate| candidate.locality != SameNode;
        let only_far: Health = |candidate| candidate.locality == Elsewhere;
        let nobody: Health = |_| false;
        // (what, candidates, prefer_close, health, the candidates chosen among)
        let cases: [Case; 10] = [
            ("same node", &everyone, true, healthy, Some(&[node])),
            (
                "same zone",
                &[zone, far, zone_too],
                true,
                healthy,
                Some(&[zone, zone_too]),
            ),
            ("elsewhere", &[far], true, healthy, Some(&[far])),
            (
                "without prefer_close, everyone",
                &everyone,
                false,
                healthy,
                Some(&everyone),
            ),
            (
                "node unhealthy: zone",
                &everyone,
                true,
                not_on_the_node,
                Some(&[zone, zone_too]),
            ),
            (
                "node and zone unhealthy: far",
                &everyone,
                true,
                only_far,
                Some(&[far]),
            ),
            (
                "unhealthy ones are left out",
                &everyone,
                false,
                only_far,
                Some(&[far]),
            ),
            (
                "node weighted out: zone",
                &[node_weighted_out, zone, far],
                true,
                healthy,
                Some(&[zone]),
            ),
            ("nobody healthy", &everyone, true, nobody, None),
            (
                "nobody with weight",
                &[node_weighted_out],
                false,
                healthy,
                None,
            ),
        ];
        for (name, candidates, prefer_close, healthy, expected) in cases {
            let chosen_among = Eligible::among(candidates, prefer_close, healthy).map(|eligible| {
                candidates
                    .iter()
                    .copied()
                    .filter(|candidate| eligible.admits(candidate))
                    .collect::<Vec<_>>()
            });
            assert_eq!(chosen_among.as_deref(), expected, "{name}");
        }
        assert!(Eligible::among(&[], true, healthy).is_none());
    }
}
