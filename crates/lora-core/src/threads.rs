//! CPU threading set-up, called first thing by every binary.

/// How long candle's pool workers spin before parking, unless the user sets it.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const SPIN_LIMIT: &str = "100";

/// Tunes candle's CPU thread pool for our mix of work. Call at the start of `main`, before any
/// tensor operation and before other threads exist (it sets an environment variable).
///
/// candle runs elementwise ops on its own pool, whose workers spin 25 000 times after every op
/// before parking; our matrix products run on rayon's threads right after, so on few cores a
/// spinning candle worker takes a core from them. A short spin made the SD1.5 LoRA step 10 %
/// faster on the 2-core VM (benches/RESULTS.md). A value the user set is kept.
pub fn configure_cpu_threads() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT);
    }
}
