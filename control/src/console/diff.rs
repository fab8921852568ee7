//! A unified diff of two texts by lines (`GET /v1/groups/{group}/diff`): Myers' O(ND)
//! algorithm, which finds a shortest edit script and so the smallest diff a reader can
//! follow, in hunks with three lines of context, as `diff -u` prints them.
//!
//! Configs are small, and two versions usually differ in a few lines, so D is small. A
//! pathological pair (thousands of lines all different) is bounded by [`MAX_EDITS`]: past
//! it, the diff is one hunk replacing everything, still a correct diff.

/// The most edits searched for before giving up on a minimal diff.
const MAX_EDITS: usize = 2000;
const CONTEXT: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Same(usize, usize),
    Del(usize),
    Ins(usize),
}

/// The edit script from `a` to `b`, in order.
fn script(a: &[&str], b: &[&str]) -> Vec<Op> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = (n + m) as usize;
    let offset = max as isize + 1;
    let mut v = vec![0isize; 2 * max + 3];
    // trace[d] = v[k] for k in -d..=d, after step d.
    let mut trace: Vec<Vec<isize>> = Vec::new();
    let mut found = None;
    'search: for d in 0..=max.min(MAX_EDITS) as isize {
        for k in (-d..=d).step_by(2) {
            let down =
                k == -d || (k != d && v[(offset + k - 1) as usize] < v[(offset + k + 1) as usize]);
            let mut x = if down {
                v[(offset + k + 1) as usize]
            } else {
                v[(offset + k - 1) as usize] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[(offset + k) as usize] = x;
            if x >= n && y >= m {
                trace.push(v[(offset - d) as usize..=(offset + d) as usize].to_vec());
                found = Some(d);
                break 'search;
            }
        }
        trace.push(v[(offset - d) as usize..=(offset + d) as usize].to_vec());
    }
    let Some(d_end) = found else {
        // Too different: everything out, everything in.
        let mut ops: Vec<Op> = (0..a.len()).map(Op::Del).collect();
        ops.extend((0..b.len()).map(Op::Ins));
        return ops;
    };
    // Walk back from (n, m) through the trace: each step d ends in a diagonal run (the
    // "snake") after one insertion or deletion.
    let at = |d: isize, k: isize| trace[d as usize][(k + d) as usize];
    let mut ops = Vec::new();
    let (mut x, mut y) = (n, m);
    for d in (1..=d_end).rev() {
        let k = x - y;
        let down = k == -d || (k != d && at(d - 1, k - 1) < at(d - 1, k + 1));
        let prev_k = if down { k + 1 } else { k - 1 };
        let prev_x = at(d - 1, prev_k);
        let prev_y = prev_x - prev_k;
        let (mid_x, mid_y) = if down {
            (prev_x, prev_y + 1)
        } else {
            (prev_x + 1, prev_y)
        };
        while x > mid_x && y > mid_y {
            x -= 1;
            y -= 1;
            ops.push(Op::Same(x as usize, y as usize));
        }
        ops.push(if down {
            Op::Ins(prev_y as usize)
        } else {
            Op::Del(prev_x as usize)
        });
        (x, y) = (prev_x, prev_y);
    }
    while x > 0 && y > 0 {
        x -= 1;
        y -= 1;
        ops.push(Op::Same(x as usize, y as usize));
    }
    ops.reverse();
    ops
}

/// `a` to `b` as a unified diff with these file labels; empty when they are the same.
pub fn unified(a: &str, b: &str, label_a: &str, label_b: &str) -> String {
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    let ops = script(&la, &lb);
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Same(..)))
        .map(|(i, _)| i)
        .collect();
    if changed.is_empty() {
        return String::new();
    }
    let mut out = format!("--- {label_a}\n+++ {label_b}\n");
    // Group changes whose context overlaps into hunks.
    let mut i = 0;
    while i < changed.len() {
        let start = changed[i].saturating_sub(CONTEXT);
        let mut end = changed[i];
        while i + 1 < changed.len() && changed[i + 1] <= end + 2 * CONTEXT + 1 {
            i += 1;
            end = changed[i];
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        hunk(&mut out, &ops[start..end], &la, &lb);
        i += 1;
    }
    out
}

fn hunk(out: &mut String, ops: &[Op], a: &[&str], b: &[&str]) {
    let first_a = ops.iter().find_map(|op| match op {
        Op::Same(x, _) | Op::Del(x) => Some(*x),
        Op::Ins(_) => None,
    });
    let first_b = ops.iter().find_map(|op| match op {
        Op::Same(_, y) | Op::Ins(y) => Some(*y),
        Op::Del(_) => None,
    });
    let count_a = ops.iter().filter(|op| !matches!(op, Op::Ins(_))).count();
    let count_b = ops.iter().filter(|op| !matches!(op, Op::Del(_))).count();
    // `diff -u` numbers an empty side by the line before it.
    let start = |first: Option<usize>, count: usize, before: usize| match first {
        Some(f) if count > 0 => f + 1,
        _ => before,
    };
    let before_a = ops
        .iter()
        .find_map(|op| match op {
            Op::Ins(y) => Some(*y),
            _ => None,
        })
        .map_or(0, |y| y.min(a.len()));
    let before_b = ops
        .iter()
        .find_map(|op| match op {
            Op::Del(x) => Some(*x),
            _ => None,
        })
        .map_or(0, |x| x.min(b.len()));
    out.push_str(&format!(
        "@@ -{},{} +{},{} @@\n",
        start(first_a, count_a, before_a),
        count_a,
        start(first_b, count_b, before_b),
        count_b
    ));
    for op in ops {
        let (sign, text) = match op {
            Op::Same(x, _) => (' ', a[*x]),
            Op::Del(x) => ('-', a[*x]),
            Op::Ins(y) => ('+', b[*y]),
        };
        out.push(sign);
        out.push_str(text);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies a script to `a` and checks it yields `b`, using every line once.
    fn check(a: &str, b: &str) -> Vec<Op> {
        let la: Vec<&str> = a.lines().collect();
        let lb: Vec<&str> = b.lines().collect();
        let ops = script(&la, &lb);
        let mut rebuilt = Vec::new();
        let (mut na, mut nb) = (0, 0);
        for op in &ops {
            match *op {
                Op::Same(x, y) => {
                    assert_eq!((x, y), (na, nb), "{ops:?}");
                    assert_eq!(la[x], lb[y]);
                    rebuilt.push(lb[y]);
                    na += 1;
                    nb += 1;
                }
                Op::Del(x) => {
                    assert_eq!(x, na, "{ops:?}");
                    na += 1;
                }
                Op::Ins(y) => {
                    assert_eq!(y, nb, "{ops:?}");
                    rebuilt.push(lb[y]);
                    nb += 1;
                }
            }
        }
        assert_eq!((na, nb), (la.len(), lb.len()));
        assert_eq!(rebuilt, lb);
        ops
    }

    #[test]
    fn scripts_rebuild_the_new_text_minimally() {
        check("", "");
        check("a", "");
        check("", "a\nb");
        check("a\nb\nc", "a\nb\nc");
        let ops = check("a\nb\nc\nd", "a\nx\nc\nd\ne");
        let edits = ops.iter().filter(|o| !matches!(o, Op::Same(..))).count();
        assert_eq!(edits, 3, "b->x is two edits, e one: {ops:?}");
        check("x\na\nb", "a\nb\ny");
        check("a\nb\na\nb\na", "b\na\nb\na\nb");
        // Many seeds of small random texts.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let t = |rng: &mut fastrand::Rng| {
                (0..rng.usize(0..12))
                    .map(|_| ["a", "b", "c", "d"][rng.usize(0..4)])
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let (a, b) = (t(&mut rng), t(&mut rng));
            check(&a, &b);
        }
    }

    #[test]
    fn unified_diffs_read_like_diff_u() {
        let a = "one\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\nten\n";
        let b = "one\ntwo\nthree\nfour\nFIVE\nsix\nseven\neight\nnine\nten\neleven\n";
        let d = unified(a, b, "version 1", "version 2");
        assert_eq!(
            d,
            "--- version 1\n+++ version 2\n@@ -2,9 +2,10 @@\n two\n three\n four\n-five\n+FIVE\n six\n seven\n eight\n nine\n ten\n+eleven\n"
        );
        assert_eq!(unified(a, a, "x", "y"), "");
        let d = unified("", "new\n", "a", "b");
        assert_eq!(d, "--- a\n+++ b\n@@ -0,0 +1,1 @@\n+new\n");
    }
}
