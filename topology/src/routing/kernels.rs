//! The three `O(n)` loops that route computation runs `O(n^2)` times:
//! Dijkstra's relaxation, its minimum scan, and the two-hop backup scan.
//!
//! Each is written once as plain, branch-free Rust that the compiler
//! vectorises, and instantiated twice: for the baseline target (SSE2 on
//! x86-64) and, where the CPU has it, for AVX2, chosen at run time. The AVX2
//! variants write into a second buffer instead of updating in place: in
//! place, LLVM turns the selects into masked stores, which are slow on AMD
//! cores. Callers swap the buffers.
//!
//! All values are non-negative costs or `INFINITY`; settled relays carry
//! their distance negated (see [`argmin`]).
#![allow(unsafe_code)] // only to call the AVX2 instantiations after detecting AVX2

/// All ones when `b`, else zero: a lane mask for branch-free selects.
#[inline(always)]
fn mask(b: bool) -> u32 {
    (b as u32).wrapping_neg()
}

/// Relaxation of one expanded relay: for every `v`,
/// `dist[v] = min(dist[v], du + row[v])`, and `parent[v] = u` where that
/// improved. `spare_*` are scratch buffers of the same length; on return
/// the results are in `dist`/`parent` either way.
pub(super) fn relax(
    dist: &mut Vec<f32>,
    parent: &mut Vec<u32>,
    spare_dist: &mut Vec<f32>,
    spare_parent: &mut Vec<u32>,
    row: &[f32],
    du: f32,
    u: u32,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { relax_into_avx2(dist, parent, spare_dist, spare_parent, row, du, u) };
        std::mem::swap(dist, spare_dist);
        std::mem::swap(parent, spare_parent);
        return;
    }
    let _ = (spare_dist, spare_parent);
    relax_in_place(dist, parent, row, du, u);
}

#[inline(always)]
fn relax_in_place(dist: &mut [f32], parent: &mut [u32], row: &[f32], du: f32, u: u32) {
    for ((d, p), &w) in dist.iter_mut().zip(parent.iter_mut()).zip(row) {
        let (candidate, old) = (du + w, *d);
        let closer = mask(candidate < old);
        *d = if candidate < old { candidate } else { old };
        *p = (u & closer) | (*p & !closer);
    }
}

#[inline(always)]
fn relax_into(
    dist: &[f32],
    parent: &[u32],
    out_dist: &mut [f32],
    out_parent: &mut [u32],
    row: &[f32],
    du: f32,
    u: u32,
) {
    let out = out_dist.iter_mut().zip(out_parent.iter_mut());
    for (((&d, &p), (od, op)), &w) in dist.iter().zip(parent).zip(out).zip(row) {
        let candidate = du + w;
        let closer = mask(candidate < d);
        *od = if candidate < d { candidate } else { d };
        *op = (u & closer) | (p & !closer);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn relax_into_avx2(
    dist: &[f32],
    parent: &[u32],
    out_dist: &mut [f32],
    out_parent: &mut [u32],
    row: &[f32],
    du: f32,
    u: u32,
) {
    relax_into(dist, parent, out_dist, out_parent, row, du, u)
}

/// Two-hop scan step for one intermediate `m`: for every destination `d`,
/// keep the cheaper of the current best and `first + row[d]`, remembering
/// `m` where it won. Same buffer protocol as [`relax`].
pub(super) fn two_hop_step(
    cost: &mut Vec<f32>,
    via: &mut Vec<u32>,
    spare_cost: &mut Vec<f32>,
    spare_via: &mut Vec<u32>,
    row: &[f32],
    first: f32,
    m: u32,
) {
    // The same computation as relaxation, with `first` as the distance.
    relax(cost, via, spare_cost, spare_via, row, first, m)
}

/// Index of the smallest value that is not negative and below infinity,
/// lowest index on ties; `None` if there is none.
///
/// For non-negative floats the IEEE bit patterns sort like the values, and
/// negative floats (settled relays) sort above infinity, so this is an
/// integer minimum, which vectorises (a float minimum does not without
/// fast-math). The minimum is taken per chunk so that only the winning
/// chunk is searched for its index.
pub(super) fn argmin(values: &[f32]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { argmin_avx2(values) };
    }
    argmin_portable(values)
}

#[inline(always)]
fn argmin_portable(values: &[f32]) -> Option<usize> {
    const CHUNK: usize = 64;
    let mut best = f32::INFINITY.to_bits();
    let mut best_chunk = usize::MAX;
    for (i, chunk) in values.chunks(CHUNK).enumerate() {
        let min = chunk.iter().map(|v| v.to_bits()).fold(u32::MAX, u32::min);
        if min < best {
            best = min;
            best_chunk = i;
        }
    }
    if best_chunk == usize::MAX {
        return None;
    }
    let start = best_chunk * CHUNK;
    values[start..]
        .iter()
        .position(|v| v.to_bits() == best)
        .map(|p| start + p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn argmin_avx2(values: &[f32]) -> Option<usize> {
    argmin_portable(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_argmin(values: &[f32]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, &v) in values.iter().enumerate() {
            if v >= 0.0
                && v.is_finite()
                && !v.is_sign_negative()
                && best.is_none_or(|b| v < values[b])
            {
                best = Some(i);
            }
        }
        best
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            (0.0f32..1000.0),
            Just(f32::INFINITY),
            (0.0f32..1000.0).prop_map(|v| -v),
            Just(-0.0f32),
            (0u32..4).prop_map(|v| v as f32),
        ]
    }

    proptest! {
        #[test]
        fn argmin_matches_reference(values in prop::collection::vec(value(), 0..300)) {
            prop_assert_eq!(argmin(&values), reference_argmin(&values));
            prop_assert_eq!(argmin_portable(&values), reference_argmin(&values));
        }

        #[test]
        fn relax_matches_reference(
            rows in prop::collection::vec((value(), 0.0f32..500.0), 1..200),
            du in 0.0f32..500.0,
        ) {
            let mut dist: Vec<f32> = rows.iter().map(|r| r.0).collect();
            let row: Vec<f32> = rows.iter().map(|r| r.1).collect();
            let mut parent: Vec<u32> = (0..rows.len() as u32).collect();
            let (expected_d, expected_p): (Vec<f32>, Vec<u32>) = dist
                .iter()
                .zip(&row)
                .zip(&parent)
                .map(|((&d, &w), &p)| if du + w < d { (du + w, 7) } else { (d, p) })
                .unzip();
            let (mut sd, mut sp) = (vec![0.0; rows.len()], vec![0; rows.len()]);
            relax(&mut dist, &mut parent, &mut sd, &mut sp, &row, du, 7);
            prop_assert_eq!(dist.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected_d.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            prop_assert_eq!(parent, expected_p);
        }
    }
}
