//! Where the next I/O goes: sequential, uniformly random or Zipf-distributed offsets inside an
//! LBA range, always aligned to the I/O size, and whether it reads or writes.
//!
//! Everything here is pure and cheap: one xoshiro step and a multiply per random offset, no
//! allocation, no system call.

use rand_distr::Distribution;
use rand_xoshiro::rand_core::{Rng as _, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// The workers' random numbers: xoshiro256++ (Blackman and Vigna), seeded through splitmix64
/// so that nearby seeds give unrelated streams; one per thread, never shared.
#[derive(Clone, Debug)]
pub struct Rng(Xoshiro256PlusPlus);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        Rng(Xoshiro256PlusPlus::seed_from_u64(seed))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
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

/// Zipf distribution over ranks `1..=n` with exponent `theta > 0`: P(k) ∝ k^-theta
/// (`rand_distr::Zipf`: O(1) per sample for any `n`, no table and no zeta sum, so a terabyte
/// namespace costs what a megabyte one does).
#[derive(Clone, Debug)]
pub struct Zipf {
    d: rand_distr::Zipf<f64>,
    last: u64,
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
        Zipf {
            d: rand_distr::Zipf::new(n as f64, theta).expect("n >= 1 and theta > 0"),
            last: n,
        }
    }

    /// A rank in `1..=n`; rank 1 is the most frequent.
    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        // n as f64 may round above n.
        (self.d.sample(&mut rng.0) as u64).clamp(1, self.last)
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
