//! A set of u64 kept as disjoint ranges: acknowledged sequence numbers are mostly contiguous.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct RangeSet {
    /// start → end, inclusive, disjoint and not adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, value: u64) {
        self.insert_range(value, value);
    }

    pub fn insert_range(&mut self, mut start: u64, mut end: u64) {
        // Merge with a range that starts before and touches or overlaps.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e.saturating_add(1) >= start {
                if e >= end {
                    return;
                }
                start = s;
                self.ranges.remove(&s);
            }
        }
        // Swallow ranges that start inside or right after the new one.
        loop {
            let next = self.ranges.range(start..).next().map(|(&s, &e)| (s, e));
            match next {
                Some((s, e)) if s <= end.saturating_add(1) => {
                    end = end.max(e);
                    self.ranges.remove(&s);
                }
                _ => break,
            }
        }
        self.ranges.insert(start, end);
    }

    pub fn contains(&self, value: u64) -> bool {
        self.ranges
            .range(..=value)
            .next_back()
            .is_some_and(|(_, &e)| value <= e)
    }

    #[cfg(test)]
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_and_overlapping() {
        let mut r = RangeSet::default();
        for v in [1, 2, 3, 10, 5, 4, 11] {
            r.insert(v);
        }
        assert_eq!(r.range_count(), 2);
        assert!(r.contains(1) && r.contains(5) && r.contains(10) && r.contains(11));
        assert!(!r.contains(0) && !r.contains(6) && !r.contains(12));
        r.insert_range(0, 20);
        assert_eq!(r.range_count(), 1);
        assert!(r.contains(15));
        r.insert_range(3, 4);
        assert_eq!(r.range_count(), 1);
    }
}
