//! Where the next I/O goes: sequential, uniformly random or Zipf-distributed offsets inside an
//! LBA range, always aligned to the I/O size, and whether it reads or writes.
//!
//! Everything here is pure and cheap: one xorshift step and a multiply per random offset, no
//! allocation, no system call.

/// xorshift64* (Vigna), seeded through splitmix64 so that nearby seeds give unrelated streams.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed; never zero, which xorshift cannot leave.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng { state: z | 1 }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`), by a 128-bit multiply: the bias is below n / 2^64.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Zipf distribution over ranks `1..=n` with exponent `theta > 0`: P(k) ∝ k^-theta.
///
/// Sampled by rejection-inversion (W. Hörmann and G. Derflinger, "Rejection-inversion to
/// generate variates from monotone discrete distributions", 1996): O(1) per sample for any
/// `n`, with no table and no zeta sum, so a terabyte namespace costs what a megabyte one does.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    last: u64,
    theta: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    s: f64,
}

impl Zipf {
    /// The distribution over `1..=n`.
    ///
    /// # Panics
    /// If `n` is 0 or `theta` is not a positive finite number.
    pub fn new(n: u64, theta: f64) -> Zipf {
        assert!(n > 0, "zipf over an empty set");
        assert!(
            theta.is_finite() && theta > 0.0,
            "zipf exponent {theta} is not positive"
        );
        let h_integral_x1 = h_integral(1.5, theta) - 1.0;
        let h_integral_n = h_integral(n as f64 + 0.5, theta);
        let s = 2.0 - h_integral_inverse(h_integral(2.5, theta) - h(2.0, theta), theta);
        Zipf {
            n: n as f64,
            last: n,
            theta,
            h_integral_x1,
            h_integral_n,
            s,
        }
    }

    /// A rank in `1..=n`; rank 1 is the most frequent.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_n + rng.unit() * (self.h_integral_x1 - self.h_integral_n);
            let x = h_integral_inverse(u, self.theta);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.s || u >= h_integral(k + 0.5, self.theta) - h(k, self.theta) {
                // n as f64 may round above n.
                return (k as u64).clamp(1, self.last);
            }
        }
    }
}

/// h(x) = x^-theta.
fn h(x: f64, theta: f64) -> f64 {
    (-theta * x.ln()).exp()
}

/// H(x) = (x^(1-theta) - 1) / (1 - theta), continuous at theta = 1 (where it is ln x).
fn h_integral(x: f64, theta: f64) -> f64 {
    let log_x = x.ln();
    expm1_over_x((1.0 - theta) * log_x) * log_x
}

/// The inverse of [`h_integral`].
fn h_integral_inverse(x: f64, theta: f64) -> f64 {
    // Rounding can push t just below -1, where log1p is undefined.
    let t = (x * (1.0 - theta)).max(-1.0);
    (log1p_over_x(t) * x).exp()
}

/// ln(1 + x) / x, accurate near 0.
fn log1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// (e^x - 1) / x, accurate near 0.
fn expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// How offsets are chosen.
#[derive(Clone, Debug)]
enum Kind {
    /// Slot after slot, wrapping at the end of the range.
    Sequential { next: u64 },
    /// Every slot equally likely.
    Uniform,
    /// Zipf ranks, scattered over the range by a fixed permutation so that the hot slots are
    /// not all at its start.
    Zipf { zipf: Zipf, mul: u64, add: u64 },
}

/// Offsets of I/Os of `blocks` LBAs inside the range `start .. start + slots * blocks`, aligned
/// to `blocks` relative to `start`.
#[derive(Clone, Debug)]
pub struct OffsetGen {
    start: u64,
    blocks: u64,
    slots: u64,
    kind: Kind,
}

/// What [`OffsetGen::new`] refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenError {
    /// The range cannot hold one I/O.
    #[error("the range of {range} LBAs cannot hold one I/O of {blocks} LBAs")]
    RangeTooSmall { range: u64, blocks: u64 },
    /// An I/O of zero blocks.
    #[error("an I/O of zero LBAs")]
    ZeroBlocks,
    /// A Zipf exponent that is not a positive number.
    #[error("the Zipf exponent {0} is not a positive number")]
    BadTheta(f64),
    /// The range runs past the last LBA a 64-bit number can name.
    #[error("the range {start}+{lbas} overflows")]
    Overflow { start: u64, lbas: u64 },
}

/// The access pattern of an [`OffsetGen`].
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Access {
    /// From `first_slot` on, one slot after the other.
    Sequential {
        /// Slot to begin with (taken modulo the slot count).
        first_slot: u64,
    },
    /// Uniformly random.
    Uniform,
    /// Zipf with this exponent.
    Zipf(f64),
}

impl OffsetGen {
    /// Offsets for I/Os of `blocks` LBAs in the `lbas` LBAs from `start` (a tail shorter than
    /// one I/O is never touched).
    pub fn new(start: u64, lbas: u64, blocks: u64, access: Access) -> Result<OffsetGen, GenError> {
        if blocks == 0 {
            return Err(GenError::ZeroBlocks);
        }
        if start.checked_add(lbas).is_none() {
            return Err(GenError::Overflow { start, lbas });
        }
        let slots = lbas / blocks;
        if slots == 0 {
            return Err(GenError::RangeTooSmall {
                range: lbas,
                blocks,
            });
        }
        let kind = match access {
            Access::Sequential { first_slot } => Kind::Sequential {
                next: first_slot % slots,
            },
            Access::Uniform => Kind::Uniform,
            Access::Zipf(theta) => {
                if !(theta.is_finite() && theta > 0.0) {
                    return Err(GenError::BadTheta(theta));
                }
                // A multiplier coprime with the slot count makes k -> k * mul + add a
                // permutation of 0..slots.
                let mut mul = 0x9e37_79b9_7f4a_7c15 % slots;
                while gcd(mul.max(1), slots) != 1 {
                    mul += 1;
                }
                Kind::Zipf {
                    zipf: Zipf::new(slots, theta),
                    mul: mul.max(1),
                    add: (slots / 3) % slots,
                }
            }
        };
        Ok(OffsetGen {
            start,
            blocks,
            slots,
            kind,
        })
    }

    /// Number of I/O-sized slots in the range.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// The first LBA of the next I/O.
    #[inline]
    pub fn next_lba(&mut self, rng: &mut Rng) -> u64 {
        let slot = match &mut self.kind {
            Kind::Sequential { next } => {
                let s = *next;
                *next = if s + 1 == self.slots { 0 } else { s + 1 };
                s
            }
            Kind::Uniform => rng.below(self.slots),
            Kind::Zipf { zipf, mul, add } => {
                let rank = zipf.sample(rng) - 1;
                ((rank as u128 * *mul as u128 + *add as u128) % self.slots as u128) as u64
            }
        };
        self.start + slot * self.blocks
    }
}

/// Whether the next I/O is a read, for a workload reading `read_percent` % of the time.
#[inline]
pub fn is_read(rng: &mut Rng, read_percent: u8) -> bool {
    match read_percent {
        0 => false,
        100.. => true,
        p => rng.below(100) < p as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rng_streams_differ_and_repeat() {
        let a: Vec<u64> = {
            let mut r = Rng::new(1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(2);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let a2: Vec<u64> = {
            let mut r = Rng::new(1);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_ne!(a, b);
        assert_eq!(a, a2);
        let mut r = Rng::new(0);
        assert_ne!(r.next_u64(), 0);
    }

    #[test]
    fn uniform_covers_every_slot_evenly() {
        let mut g = OffsetGen::new(1000, 80, 8, Access::Uniform).unwrap();
        let mut rng = Rng::new(7);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            let lba = g.next_lba(&mut rng);
            hits[((lba - 1000) / 8) as usize] += 1;
        }
        for h in hits {
            assert!((9_000..11_000).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn sequential_wraps_and_starts_where_told() {
        let mut g = OffsetGen::new(10, 35, 8, Access::Sequential { first_slot: 6 }).unwrap();
        let mut rng = Rng::new(0);
        assert_eq!(g.slots(), 4);
        let got: Vec<u64> = (0..6).map(|_| g.next_lba(&mut rng)).collect();
        // 6 mod 4 = slot 2; the 3-LBA tail (34..45) is never used.
        assert_eq!(got, [26, 34, 10, 18, 26, 34]);
    }

    #[test]
    fn refuses_what_cannot_work() {
        assert_eq!(
            OffsetGen::new(0, 7, 8, Access::Uniform).unwrap_err(),
            GenError::RangeTooSmall {
                range: 7,
                blocks: 8
            }
        );
        assert_eq!(
            OffsetGen::new(0, 7, 0, Access::Uniform).unwrap_err(),
            GenError::ZeroBlocks
        );
        assert!(OffsetGen::new(0, 8, 1, Access::Zipf(0.0)).is_err());
        assert!(OffsetGen::new(0, 8, 1, Access::Zipf(f64::NAN)).is_err());
        assert!(OffsetGen::new(u64::MAX, 8, 1, Access::Uniform).is_err());
    }

    #[test]
    fn zipf_frequencies_follow_the_power_law() {
        for theta in [0.8, 1.0, 1.2] {
            let n = 50u64;
            let z = Zipf::new(n, theta);
            let mut rng = Rng::new(42);
            let mut hits = vec![0u64; n as usize + 1];
            let draws = 400_000;
            for _ in 0..draws {
                hits[z.sample(&mut rng) as usize] += 1;
            }
            assert_eq!(hits[0], 0, "rank 0 does not exist");
            let norm: f64 = (1..=n).map(|k| (k as f64).powf(-theta)).sum();
            for k in [1u64, 2, 5, 20, 50] {
                let want = draws as f64 * (k as f64).powf(-theta) / norm;
                let got = hits[k as usize] as f64;
                let tol = 5.0 * want.sqrt() + 0.01 * want;
                assert!(
                    (got - want).abs() < tol,
                    "theta {theta} rank {k}: got {got}, expected {want:.0}"
                );
            }
        }
    }

    #[test]
    fn zipf_is_skewed_over_a_huge_range() {
        // 2^40 slots: no table, no zeta sum, still quick.
        let mut g = OffsetGen::new(0, 1 << 40, 1, Access::Zipf(1.2)).unwrap();
        let mut rng = Rng::new(3);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..20_000 {
            *counts.entry(g.next_lba(&mut rng)).or_insert(0u32) += 1;
        }
        let top = counts.values().max().copied().unwrap();
        assert!(
            top > 20_000 / 10,
            "the hottest slot gets a large share: {top}"
        );
    }

    #[test]
    fn read_share() {
        let mut rng = Rng::new(11);
        let reads = (0..100_000).filter(|_| is_read(&mut rng, 70)).count();
        assert!((69_000..71_000).contains(&reads), "{reads}");
        assert!((0..100).all(|_| is_read(&mut rng, 100)));
        assert!((0..100).all(|_| !is_read(&mut rng, 0)));
    }

    fn access() -> impl Strategy<Value = Access> {
        prop_oneof![
            any::<u64>().prop_map(|first_slot| Access::Sequential { first_slot }),
            Just(Access::Uniform),
            (0.05f64..3.0).prop_map(Access::Zipf),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Every offset lies in the range, is aligned to the I/O size relative to the range
        /// start, and the whole I/O fits in the range.
        #[test]
        fn offsets_stay_in_range_and_aligned(
            start in 0u64..1 << 50,
            lbas in 1u64..1 << 40,
            blocks in 1u64..4096,
            access in access(),
            seed in any::<u64>(),
        ) {
            prop_assume!(lbas >= blocks);
            let mut g = OffsetGen::new(start, lbas, blocks, access).unwrap();
            let mut rng = Rng::new(seed);
            for _ in 0..64 {
                let lba = g.next_lba(&mut rng);
                prop_assert!(lba >= start);
                prop_assert_eq!((lba - start) % blocks, 0);
                prop_assert!(lba + blocks <= start + lbas);
            }
        }

        #[test]
        fn zipf_ranks_in_range(n in 1u64..u64::MAX >> 1, theta in 0.01f64..5.0, seed in any::<u64>()) {
            let z = Zipf::new(n, theta);
            let mut rng = Rng::new(seed);
            for _ in 0..32 {
                let k = z.sample(&mut rng);
                prop_assert!((1..=n).contains(&k), "{} not in 1..={}", k, n);
            }
        }

        #[test]
        fn below_is_below(n in 1u64.., seed in any::<u64>()) {
            let mut rng = Rng::new(seed);
            for _ in 0..16 {
                prop_assert!(rng.below(n) < n);
            }
        }
    }
}
