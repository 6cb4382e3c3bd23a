//! Process set-up for our mix of CPU work (candle's thread pool, rayon's thread count, the C
//! allocator), which every binary calls first thing in `main`.

/// How long candle's pool workers spin before parking, unless the user sets it.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const SPIN_LIMIT: &str = "100";

/// The thread count rayon reads, and candle with it.
const THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// Tunes the process for our mix of CPU work.
///
/// # Safety
/// It sets environment variables and allocator options, which is sound only while no other
/// thread exists (another thread could be reading the environment): call it first thing in a
/// binary's `main`, before any tensor operation. A library never calls it.
///
/// - candle runs elementwise ops on its own pool, whose workers spin 25 000 times after every op
///   before parking; our matrix products run on rayon's threads right after, so on few cores a
///   spinning candle worker takes a core from them (benches/RESULTS.md has the measurement). A
///   value the user set is kept.
/// - `RAYON_NUM_THREADS` is set to the thread count candle picks (the physical cores), unless
///   the user set it. candle computes that count again for every CPU matrix product, and on
///   x86 Linux that parses `/proc/cpuinfo` each time (a measurable share of a small model's
///   step, benches/RESULTS.md). With the variable set candle reads it instead; rayon's pool, which
///   runs our kernels, then also has one thread per physical core (the same on machines
///   without SMT), where candle's products already ran.
/// - glibc's allocator: see [`keep_freed_memory`].
pub unsafe fn configure() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        // SAFETY: no other thread exists yet (this function's contract).
        unsafe { std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT) };
    }
    if std::env::var_os(THREADS_VAR).is_none() {
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: as above.
        unsafe { std::env::set_var(THREADS_VAR, threads.to_string()) };
    }
    keep_freed_memory();
}

/// Makes glibc's `malloc` serve every block from its heap and keep freed memory for reuse.
///
/// Why: by default glibc maps each block above 32 MiB (less before its threshold has adapted) fresh
/// from the kernel and unmaps it on `free`, and returns the heap's free top to the kernel. A
/// training step at SD1.5's 64² latents allocates and frees such tensors (im2col buffers,
/// feed-forward activations, their gradients) hundreds of times, so each comes back as new pages
/// the kernel zeroes on first touch (benches/RESULTS.md has the page-fault counts). The cost is that
/// memory a step freed stays with the process until it exits, which a training or generation
/// process reuses on its next step anyway; `lora-merge`, which frees tensors on several threads,
/// keeps a larger peak for a faster merge. Settings the user gave through `GLIBC_TUNABLES` or
/// `MALLOC_*` variables are kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    let user_set = std::env::vars_os().any(|(name, _)| {
        let name = name.to_string_lossy();
        name == "GLIBC_TUNABLES" || name.starts_with("MALLOC_")
    });
    if user_set {
        return;
    }
    // The largest value mallopt takes (an `int`); glibc reports 0 for a value it rejects, and
    // then its defaults stay, which is only slower.
    const NEVER: libc::c_int = libc::c_int::MAX;
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, NEVER);
        libc::mallopt(libc::M_TRIM_THRESHOLD, NEVER);
    }
}

/// Other C libraries: their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
