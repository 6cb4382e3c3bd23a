//! The `lora-train` binary killed with SIGKILL at random moments: restarted each time with the
//! same command (`--resume latest`), it ends with the adapter, last checkpoint and metrics of an
//! uninterrupted run, bit for bit; every `.safetensors` in the folder reads whole at every moment
//! (writes are atomic), and the temporary files a killed run leaves are gone after the next start.
#![cfg(unix)]

mod common;

use common::lora_train_on_fixtures;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use safetensors::SafeTensors;

/// Short, so several seeds fit in seconds, yet long enough for a few kills per run.
const STEPS: usize = 12;
/// Seeds of the kill schedule (not of the training run, which is the same every time).
const KILL_SEEDS: [u64; 5] = [1, 2, 3, 4, 5];
/// Generous: a start plus 12 steps takes a few seconds on one busy core.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// The signal `Child::kill` sends on unix (its number is the same on every unix).
const SIGKILL: i32 = 9;

/// The one command of every start, the first included: a recipe that draws on every random
/// stream (init seed, flips, caption dropout, noise offset, random crops, batches of 2 with
/// gradient accumulation) and a schedule that depends on the step, a checkpoint every step, and
/// pruning of old checkpoints (so files disappear under the watcher too). Rank 64 makes the
/// files about 1 MB, so saving takes long enough for kills to land in it now and then, and for
/// the watcher to catch a writer that is not atomic (checked by making `write_atomic` write in
/// place: the uninterrupted run already fails).
fn lora_train(out: &Path) -> Command {
    let mut command = lora_train_on_fixtures(out);
    command
        .args(["--rank", "64"])
        .args(["--steps", &STEPS.to_string(), "--lr", "1e-2"])
        .args(["--seed", "11", "--flip", "--random-crop"])
        .args(["--caption-dropout", "0.3", "--noise-offset", "0.1"])
        .args(["--batch-size", "2", "--grad-accum", "2"])
        .args(["--min-snr-gamma", "5"])
        .args(["--lr-scheduler", "cosine", "--warmup-steps", "1"])
        .args(["--save-every", "1", "--keep-checkpoints", "2"])
        .args(["--resume", "latest"]);
    command
}

/// xorshift64*: the kill schedule of a seed, with no dependency.
struct KillRng(u64);

impl KillRng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Checks, until stopped, that every `.safetensors` in `folder` parses whole. Temporary files
/// (`.<name>.tmp-<pid>-<n>`) are hidden and may be partial; they are skipped. Returns the number
/// of files checked, or the first broken one.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<usize, String>>,
}

impl Watcher {
    fn start(folder: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut checked = 0;
            // One last pass after the stop, so the final state is checked too.
            let mut last_pass = false;
            while !last_pass {
                last_pass = stopped.load(Ordering::SeqCst);
                let entries = std::fs::read_dir(&folder).map_err(|e| e.to_string())?;
                for entry in entries {
                    let name = entry.map_err(|e| e.to_string())?.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('.') || !name.ends_with(".safetensors") {
                        continue;
                    }
                    let bytes = match std::fs::read(folder.join(&*name)) {
                        Ok(bytes) => bytes,
                        // Pruned by --keep-checkpoints between the listing and the read.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(format!("cannot read {name}: {e}")),
                    };
                    SafeTensors::deserialize(&bytes).map_err(|e| {
                        format!("{name} is not whole ({} bytes): {e:?}", bytes.len())
                    })?;
                    checked += 1;
                }
                // Often enough to see a file being written in place, rarely enough to leave the
                // (maybe single, shared) core mostly to the run.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(checked)
        });
        Self { stop, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join().expect("the watcher panicked") {
            Ok(checked) => checked,
            Err(broken) => panic!("{broken}"),
        }
    }
}

/// Complete lines of the metrics file (a killed run may leave a torn last line).
fn logged_steps(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics).map_or(0, |m| m.matches('\n').count())
}

/// The metrics lines without their wall times, which differ from run to run.
fn metrics_without_times(metrics: &Path) -> Vec<String> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| l.split(",\"seconds\"").next().unwrap().to_string())
        .collect()
}

/// Waits for `child` to end; its stderr, and whether SIGKILL ended it. Any other failure panics
/// with the child's stderr.
fn finish(child: Child, what: &str) -> (String, bool) {
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let killed = output.status.signal() == Some(SIGKILL);
    assert!(
        killed || output.status.success(),
        "{what}: lora-train failed ({}):\n{stderr}",
        output.status
    );
    assert!(!stderr.contains("panicked"), "{what}:\n{stderr}");
    (stderr, killed)
}

/// The files a run leaves that must match the uninterrupted run's.
fn outputs(out: &Path) -> Vec<PathBuf> {
    let (ckpt, adapter) = lora_train::checkpoint_paths(out, STEPS);
    vec![out.to_path_buf(), ckpt, adapter]
}

/// What must be equal bit for bit in two runs' `.safetensors`: every tensor's dtype, shape and
/// bytes, and the header metadata but for `modelspec.date`, the wall time the adapter was written
/// (to the second). The files' bytes are not compared: the `safetensors` crate writes the header's
/// metadata in `HashMap` order, which differs from process to process.
type Contents = (
    BTreeMap<String, String>,
    Vec<(String, String, Vec<usize>, Vec<u8>)>,
);

fn contents(path: &Path) -> Contents {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    metadata.remove("modelspec.date");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .iter()
        .map(|(name, view)| {
            let dtype = format!("{:?}", view.dtype());
            (
                name.to_string(),
                dtype,
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    tensors.sort();
    (metadata, tensors)
}

/// Waits until `step` steps are logged or `child` ended (a resumed run's log starts with the
/// steps before its checkpoint, which `step` is beyond).
fn wait_for_step(metrics: &Path, step: usize, child: &mut Child, what: &str) {
    let waiting = Instant::now();
    while logged_steps(metrics) < step && child.try_wait().unwrap().is_none() {
        assert!(
            waiting.elapsed() < RUN_TIMEOUT,
            "{what}: step {step} never came"
        );
        sleep_ms(1);
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn hidden_files(folder: &Path) -> Vec<String> {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect()
}

#[test]
fn sigkill_at_random_moments_then_resume_latest_ends_bit_identical() {
    let started = Instant::now();
    let reference = tempfile::tempdir().unwrap();
    let ref_out = reference.path().join("adapter.safetensors");
    let ref_metrics = reference.path().join("adapter.safetensors.metrics.jsonl");
    let watcher = Watcher::start(reference.path().to_path_buf());
    let spawned = Instant::now();
    let mut child = lora_train(&ref_out).spawn().unwrap();
    wait_for_step(&ref_metrics, 1, &mut child, "the uninterrupted run");
    // From the start to the first step logged: loading, encoding, one step.
    let first_step_ms = spawned.elapsed().as_millis() as u64;
    let (stderr, killed) = finish(child, "the uninterrupted run");
    assert!(!killed && !stderr.contains("resuming"), "{stderr}");
    assert!(watcher.finish() > 0, "the watcher saw no adapter");
    let expected: Vec<Contents> = outputs(&ref_out).iter().map(|p| contents(p)).collect();
    let expected_log = metrics_without_times(&ref_metrics);
    assert_eq!(expected_log.len(), STEPS);
    let step_ms = std::fs::read_to_string(&ref_metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let value: serde_json::Value = serde_json::from_str(l).unwrap();
            value["seconds"].as_f64().unwrap()
        })
        .sum::<f64>()
        * 1000.0
        / STEPS as f64;
    let step_ms = step_ms.ceil() as u64;

    let mut report = Vec::new();
    for seed in KILL_SEEDS {
        let mut rng = KillRng::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter.safetensors");
        let metrics = dir.path().join("adapter.safetensors.metrics.jsonl");
        let watcher = Watcher::start(dir.path().to_path_buf());
        let (mut starts, mut kills, mut resumes, mut mid_save) = (0, 0, 0, 0);
        loop {
            starts += 1;
            assert!(starts < 100, "seed {seed}: the run never finished");
            let done = logged_steps(&metrics);
            let mut child = lora_train(&out).spawn().unwrap();
            let pid = child.id();
            if starts > 1 && rng.between(0, 2) == 0 {
                // Early, at a random moment up to the end of the first step: while the model
                // loads, stale temporaries are cleaned, the metrics log is cut back to the
                // checkpoint, or the first step after it runs.
                sleep_ms(rng.between(0, first_step_ms + step_ms));
                child.kill().unwrap();
            } else {
                // After a random step still ahead, a random time into the next one (wall times
                // include the saves, which are hit too). The first start of a seed is killed in
                // the first half of the run, so each seed resumes at least once; near the end
                // the run is left to finish.
                let last_target = if starts == 1 { STEPS / 2 } else { STEPS - 1 };
                if done < last_target {
                    let target = rng.between(done as u64 + 1, last_target as u64) as usize;
                    let what = format!("seed {seed}, start {starts}");
                    wait_for_step(&metrics, target, &mut child, &what);
                    sleep_ms(rng.between(0, step_ms));
                    child.kill().unwrap();
                }
            }
            let (stderr, killed) = finish(child, &format!("seed {seed}, start {starts}"));
            resumes += usize::from(stderr.contains("resuming at step"));
            if !killed {
                break;
            }
            kills += 1;
            // A kill during a save leaves that write's temporary file, named after the process.
            let own_temporary = format!(".tmp-{pid}-");
            mid_save += usize::from(
                hidden_files(dir.path())
                    .iter()
                    .any(|name| name.contains(&own_temporary)),
            );
            // Such a leftover every time (kills hit a save only now and then): a partial
            // temporary file named after the dead process, which the next start removes.
            std::fs::write(
                dir.path()
                    .join(format!(".adapter-step000001.safetensors.tmp-{pid}-0")),
                b"partial",
            )
            .unwrap();
        }
        let checked = watcher.finish();
        assert!(
            kills >= 1 && resumes >= 1,
            "seed {seed}: no kill landed after a checkpoint ({kills} kills, {resumes} resumes)"
        );
        assert!(checked > 0, "seed {seed}: the watcher saw no adapter");
        for (path, expected) in outputs(&out).iter().zip(&expected) {
            assert!(
                &contents(path) == expected,
                "seed {seed}: {} differs from the uninterrupted run's after {kills} kills",
                path.display()
            );
        }
        assert_eq!(
            metrics_without_times(&metrics),
            expected_log,
            "seed {seed}: the metrics log differs from the uninterrupted run's"
        );
        let left = hidden_files(dir.path());
        assert!(
            left.is_empty(),
            "seed {seed}: temporary files left: {left:?}"
        );
        report.push(format!(
            "seed {seed}: {kills} kills ({mid_save} mid-save), {resumes} resumes, {checked} files \
             checked whole"
        ));
    }
    eprintln!(
        "{} in {:.1} s (mean step {step_ms} ms)",
        report.join("; "),
        started.elapsed().as_secs_f64()
    );
}
