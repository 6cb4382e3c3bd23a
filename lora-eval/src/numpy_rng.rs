//! numpy's legacy `RandomState` (MT19937 seeded by an integer), only as far as torch-fidelity
//! uses it: `permutation(n)` (Inception Score's shuffle) and `choice(n, k, replace=False)` (KID's
//! subsets). Reproducing the stream exactly is what makes `--is-shuffle SEED` and KID's subsets
//! the same samples torch-fidelity draws with the same seed.

const N: usize = 624;
const M: usize = 397;

/// Mersenne Twister MT19937 with numpy's legacy integer seeding (`init_genrand`).
pub struct LegacyRandomState {
    key: [u32; N],
    pos: usize,
}

impl LegacyRandomState {
    /// `np.random.RandomState(seed)` for an integer seed in `0..2³²`.
    pub fn new(seed: u32) -> Self {
        let mut key = [0u32; N];
        key[0] = seed;
        for i in 1..N {
            let prev = key[i - 1];
            key[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { key, pos: N }
    }

    fn regenerate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..N {
            let y = (self.key[i] & UPPER) | (self.key[(i + 1) % N] & LOWER);
            let mut next = self.key[(i + M) % N] ^ (y >> 1);
            if y & 1 == 1 {
                next ^= MATRIX_A;
            }
            self.key[i] = next;
        }
        self.pos = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.pos == N {
            self.regenerate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn next_u64(&mut self) -> u64 {
        (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())
    }

    /// A uniform integer in `0..=max`, by numpy's masked rejection (`random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> shift;
        }
        loop {
            let value = if max <= u64::from(u32::MAX) {
                u64::from(self.next_u32()) & mask
            } else {
                self.next_u64() & mask
            };
            if value <= max {
                return value;
            }
        }
    }

    /// `permutation(n)`: `arange(n)` shuffled by Fisher–Yates from the last element down.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u64) as usize;
            order.swap(i, j);
        }
        order
    }

    /// `choice(n, k, replace=False)` without weights: the first `k` of a permutation.
    pub fn choice_without_replacement(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut order = self.permutation(n);
        order.truncate(k);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_stream() {
        // The MT19937 reference implementation's first outputs for init_genrand(5489).
        let mut rng = LegacyRandomState::new(5489);
        let first: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    /// Printed by numpy 2.4.6: `np.random.RandomState(2020).permutation(10)`,
    /// `RandomState(2020).choice(50, 7, replace=False)`, and from `RandomState(7)`:
    /// `permutation(5000)[:5]` then, from the same state, `choice(300, 4, replace=False)`.
    #[test]
    fn numpy_permutation_and_choice() {
        assert_eq!(
            LegacyRandomState::new(2020).permutation(10),
            [2, 4, 9, 1, 5, 7, 6, 3, 8, 0]
        );
        assert_eq!(
            LegacyRandomState::new(2020).choice_without_replacement(50, 7),
            [25, 13, 26, 37, 41, 19, 12]
        );
        let mut rng = LegacyRandomState::new(7);
        assert_eq!(rng.permutation(5000)[..5], [3406, 757, 3624, 4544, 3235]);
        assert_eq!(rng.choice_without_replacement(300, 4), [94, 217, 292, 49]);
    }
}
