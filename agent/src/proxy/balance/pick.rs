//! The choices themselves, as pure functions over the candidates an [`Eligible`]
//! admits, with the randomness and the state passed in: weighted random, the power of
//! two choices on a cost, plain rotation and smooth weighted round robin.
//!
//! [`Eligible`]: super::locality::Eligible

use fastrand::Rng;

use super::Candidate;

/// One eligible candidate drawn with a chance proportional to its weight.
pub fn weighted(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
    rng: &mut Rng,
) -> Option<usize> {
    let total = total_weight(candidates, &eligible, None);
    draw(candidates, &eligible, None, total, rng)
}

/// The cheaper of two distinct eligible candidates drawn by weight (the "power of two
/// choices": nearly as good as the cheapest of all, without the herd every client
/// would send to that one). With a single eligible candidate, that one.
///
/// On a tie the first drawn is kept: the order of the draws is random already.
pub fn two_choices(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
    cost: impl Fn(&Candidate) -> f64,
    rng: &mut Rng,
) -> Option<usize> {
    let total = total_weight(candidates, &eligible, None);
    let first = draw(candidates, &eligible, None, total, rng)?;
    let rest = total - u64::from(candidates[first].weight);
    let Some(second) = draw(candidates, &eligible, Some(first), rest, rng) else {
        return Some(first);
    };
    if cost(&candidates[second]) < cost(&candidates[first]) {
        Some(second)
    } else {
        Some(first)
    }
}

/// The eligible candidate at `position` in a rotation through them all.
pub fn rotation(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
    position: usize,
) -> Option<usize> {
    let count = candidates.iter().filter(|c| eligible(c)).count();
    if count == 0 {
        return None;
    }
    candidates
        .iter()
        .enumerate()
        .filter(|(_, candidate)| eligible(candidate))
        .nth(position % count)
        .map(|(index, _)| index)
}

/// The next candidate of a smooth weighted round robin (nginx's): each eligible
/// candidate earns its weight into `credit` (one entry per candidate), the richest is
/// chosen and pays the total. Over any run of picks as long as the total weight each
/// candidate gets its share, and a heavy one's turns are spread between the others'.
pub fn smooth(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
    credit: &mut [i64],
) -> Option<usize> {
    debug_assert_eq!(candidates.len(), credit.len());
    let mut total = 0;
    let mut richest: Option<usize> = None;
    for (index, candidate) in candidates.iter().enumerate() {
        if !eligible(candidate) {
            continue;
        }
        let weight = i64::from(candidate.weight);
        total += weight;
        credit[index] += weight;
        if richest.is_none_or(|richest| credit[index] > credit[richest]) {
            richest = Some(index);
        }
    }
    let chosen = richest?;
    credit[chosen] -= total;
    Some(chosen)
}

/// Whether every eligible candidate has the same weight.
pub fn even(candidates: &[Candidate], eligible: impl Fn(&Candidate) -> bool) -> bool {
    let mut weights = candidates.iter().filter(|c| eligible(c)).map(|c| c.weight);
    let first = weights.next();
    weights.all(|weight| Some(weight) == first)
}

fn total_weight(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
    except: Option<usize>,
) -> u64 {
    candidates
        .iter()
        .enumerate()
        .filter(|&(index, candidate)| Some(index) != except && eligible(candidate))
        .map(|(_, candidate)| u64::from(candidate.weight))
        .sum()
}

/// A draw by weight among the eligible but `except`, whose weights add up to `total`.
fn draw(
    candidates: &[Candidate],
    eligible: impl Fn(&Candidate) -> bool,
    except: Option<usize>,
    total: u64,
    rng: &mut Rng,
) -> Option<usize> {
    if total == 0 {
        return None;
    }
    let mut point = rng.u64(..total);
    for (index, candidate) in candidates.iter().enumerate() {
        if Some(index) == except || !eligible(candidate) {
            continue;
        }
        let weight = u64::from(candidate.weight);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::proxy::balance::Locality;

    fn weighted_candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .zip(1..)
            .map(|(&weight, port)| Candidate {
                address: SocketAddr::from(([10, 0, 0, 1], port)),
                weight,
                locality: Locality::Elsewhere,
            })
            .collect()
    }

    fn any(_: &Candidate) -> bool {
        true
    }

    fn with_weight(candidate: &Candidate) -> bool {
        candidate.weight > 0
    }

    /// How many of `picks` went to each candidate.
    fn counts(candidates: usize, picks: impl IntoIterator<Item = Option<usize>>) -> Vec<usize> {
        let mut counts = vec![0; candidates];
        for pick in picks {
            counts[pick.expect("a pick")] += 1;
        }
        counts
    }

    #[test]
    fn weighted_draws_follow_the_weights() {
        let cases: [(&[u32], &[usize]); 4] = [
            (&[1, 1, 1], &[10_000, 10_000, 10_000]),
            (&[1, 3], &[7_500, 22_500]),
            (&[0, 1, 0, 2], &[0, 10_000, 0, 20_000]),
            (&[5], &[30_000]),
        ];
        let mut rng = Rng::with_seed(1);
        for (weights, expected) in cases {
            let candidates = weighted_candidates(weights);
            let counts = counts(
                candidates.len(),
                (0..30_000).map(|_| weighted(&candidates, with_weight, &mut rng)),
            );
            for (count, expected) in counts.iter().zip(expected) {
                // 5 % of the expectation, many standard deviations at these counts.
                assert!(
                    count.abs_diff(*expected) <= expected / 20,
                    "{weights:?}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_drawn_without_an_eligible_candidate_of_some_weight() {
        let mut rng = Rng::with_seed(2);
        for weights in [&[][..], &[0], &[0, 0]] {
            let candidates = weighted_candidates(weights);
            assert_eq!(weighted(&candidates, with_weight, &mut rng), None);
            assert_eq!(
                two_choices(&candidates, with_weight, |_| 0.0, &mut rng),
                None
            );
            assert_eq!(rotation(&candidates, with_weight, 7), None);
            assert_eq!(
                smooth(&candidates, with_weight, &mut vec![0; weights.len()]),
                None
            );
        }
        let candidates = weighted_candidates(&[1, 1]);
        assert_eq!(weighted(&candidates, |_| false, &mut rng), None);
    }

    #[test]
    fn two_choices_take_the_cheaper_of_two_distinct_candidates() {
        let candidates = weighted_candidates(&[1, 1, 1]);
        let cost = |candidate: &Candidate| f64::from(candidate.address.port());
        let mut rng = Rng::with_seed(3);
        let counts = counts(
            3,
            (0..30_000).map(|_| two_choices(&candidates, any, cost, &mut rng)),
        );
        // The cheapest is in two of the three pairs, the dearest in none.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0].abs_diff(20_000) <= 1_000, "{counts:?}");
        assert!(counts[1].abs_diff(10_000) <= 1_000, "{counts:?}");
    }

    #[test]
    fn two_choices_between_equals_spread_evenly() {
        let candidates = weighted_candidates(&[1, 1, 1, 1]);
        let mut rng = Rng::with_seed(4);
        let counts = counts(
            4,
            (0..40_000).map(|_| two_choices(&candidates, any, |_| 1.0, &mut rng)),
        );
        for count in &counts {
            assert!(count.abs_diff(10_000) <= 500, "{counts:?}");
        }
    }

    #[test]
    fn one_eligible_candidate_is_the_only_choice() {
        let candidates = weighted_candidates(&[0, 4, 0]);
        let mut rng = Rng::with_seed(5);
        for _ in 0..100 {
            assert_eq!(
                two_choices(&candidates, with_weight, |_| 1.0, &mut rng),
                Some(1)
            );
        }
    }

    #[test]
    fn rotation_goes_through_the_eligible_in_turn() {
        let candidates = weighted_candidates(&[1, 0, 1, 1]);
        let picks: Vec<_> = (0..6)
            .map(|position| rotation(&candidates, with_weight, position))
            .collect();
        assert_eq!(picks, [0, 2, 3, 0, 2, 3].map(Some));
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        let cases: [(&[u32], &[usize]); 4] = [
            (&[1, 1, 1], &[0, 1, 2, 0, 1, 2]),
            (&[1, 3], &[1, 0, 1, 1, 1, 0, 1, 1]),
            (&[5, 1, 1], &[0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]),
            (&[2, 0, 1], &[0, 2, 0, 0, 2, 0]),
        ];
        for (weights, expected) in cases {
            let candidates = weighted_candidates(weights);
            let mut credit = vec![0; candidates.len()];
            let picks: Vec<_> = expected
                .iter()
                .map(|_| smooth(&candidates, with_weight, &mut credit).unwrap())
                .collect();
            assert_eq!(picks, expected, "{weights:?}");
        }
    }

    #[test]
    fn evenness_looks_at_the_eligible_only() {
        let cases: [(&[u32], bool); 5] = [
            (&[], true),
            (&[3], true),
            (&[2, 2, 2], true),
            (&[2, 0, 2], true),
            (&[1, 3], false),
        ];
        for (weights, expected) in cases {
            assert_eq!(
                even(&weighted_candidates(weights), with_weight),
                expected,
                "{weights:?}"
            );
        }
    }
}
