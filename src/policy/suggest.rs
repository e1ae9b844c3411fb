//! "Did you mean …?": the closest known name to an unknown one.

/// Edit distance between two short strings: insertions, deletions,
/// substitutions and transpositions of neighbours each count one (optimal
/// string alignment), so `egde` is one edit from `edge`.
pub fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a likely
/// typo: at most a third of the name's length in edits (at least one).
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    if name.chars().count() > 64 {
        return None;
    }
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| c.chars().count() <= 64)
        .map(|c| (distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_typos_only() {
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("egde", "edge"), 1);
        assert_eq!(
            closest("vnet-bizz", ["vnet-biz", "vnet-web", "onprem"]),
            Some("vnet-biz")
        );
        assert_eq!(closest("rul", ["rule", "net"]), Some("rule"));
        assert_eq!(closest("zzz", ["rule", "net"]), None);
    }
}
