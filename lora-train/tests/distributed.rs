//! Data-parallel training (`lora-train launch`, `mpirun -np N lora-train`) on the tiny fixtures.
//!
//! Without the `mpi` feature: every launch this build cannot serve is refused before any work.
//! With it (`cargo test -p lora-train --features mpi --test distributed`, Open MPI installed, as
//! `.ci/run` does): two processes at batch 1 train what one process at batch 2 trains, a
//! checkpoint of theirs continues on one process, and a killed process stops the run.
#![cfg(unix)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::fixtures;

/// `lora-train` with `args` on the tiny fixtures at resolution 32.
fn fixture_args(out: &Path) -> Vec<String> {
    let f = fixtures();
    [
        "--base",
        &f.join("sd1-tiny").display().to_string(),
        "--data",
        &f.join("train-data").display().to_string(),
        "--output",
        &out.display().to_string(),
        "--resolution",
        "32",
        "--skip-bad",
    ]
    .map(String::from)
    .to_vec()
}

fn run(command: &mut Command) -> Output {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Each launch this build cannot serve is refused with the reason, and nothing is written.
#[test]
fn launches_this_build_cannot_serve_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter.safetensors");
    // `lora-train [launch --nproc 2] FIXTURE-ARGS` with `env` added.
    let command = |launch: bool, env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lora-train"));
        if launch {
            command.args(["launch", "--nproc", "2"]);
        }
        command.args(fixture_args(&out)).envs(env.iter().copied());
        command
    };
    let mut cases = vec![
        (
            command(false, &[("WORLD_SIZE", "2"), ("RANK", "0")]),
            "LOCAL_RANK is not",
        ),
        (
            command(false, &[("OMPI_COMM_WORLD_SIZE", "two")]),
            "OMPI_COMM_WORLD_SIZE=\"two\" is not a whole number",
        ),
    ];
    if !cfg!(feature = "nccl") {
        let torchrun = [
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        cases.push((command(false, &torchrun), "--features nccl"));
        // `launch` on GPUs.
        let mut on_gpus = command(true, &[]);
        on_gpus.args(["--device", "cuda"]);
        cases.push((on_gpus, "--features nccl"));
    }
    if cfg!(feature = "mpi") {
        // No mpirun on PATH.
        let path = dir.path().to_str().unwrap();
        cases.push((command(true, &[("PATH", path)]), "`mpirun` is not on PATH"));
    } else {
        cases.push((
            command(
                false,
                &[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")],
            ),
            "built without MPI",
        ));
        cases.push((command(true, &[]), "built without it"));
    }
    for (mut command, expected) in cases {
        let output = run(&mut command);
        let message = stderr(&output);
        assert!(!output.status.success(), "{command:?} succeeded");
        assert!(message.contains(expected), "{command:?}: {message}");
        assert!(!message.contains("panicked"), "{message}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    /// The recipe every run here shares: every random draw a sample has (flip, caption dropout,
    /// noise offset, timestep, noise), 10 steps at kohya's usual LoRA learning rate, a checkpoint
    /// at step 5.
    ///
    /// The learning rate sets how far float rounding shows: AdamW's step is about lr·g/(|g| + ε),
    /// and where a gradient value is near ε = 1e-8 (a few are, from cancellation), summing in
    /// another order moves it by ~1e-10, which changes that step by a few thousandths of lr
    /// (3e-6 at lr 1e-3 here, from the first step on; 3e-7 at 1e-4).
    fn recipe(out: &Path, batch: usize) -> Vec<String> {
        let mut args = fixture_args(out);
        args.extend(
            [
                "--steps",
                "10",
                "--lr",
                "1e-4",
                "--seed",
                "5",
                "--flip",
                "--caption-dropout",
                "0.3",
                "--noise-offset",
                "0.1",
                "--save-every",
                "5",
                "--batch-size",
                &batch.to_string(),
            ]
            .map(String::from),
        );
        args
    }

    /// `lora-train launch --nproc n ARGS`, one thread per process.
    fn launch(n: usize, args: &[String]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lora-train"));
        command
            .args(["launch", "--nproc", &n.to_string()])
            .args(args)
            .env("RAYON_NUM_THREADS", "1");
        command
    }

    /// `lora-train ARGS` in one process.
    fn alone(args: &[String]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lora-train"));
        command.args(args).env("RAYON_NUM_THREADS", "1");
        command
    }

    fn succeed(mut command: Command) -> String {
        let output = run(&mut command);
        assert!(output.status.success(), "{command:?}: {}", stderr(&output));
        stderr(&output)
    }

    /// The adapter's tensors as f32 values.
    fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensors()
            .into_iter()
            .map(|(name, view)| {
                assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                (name, values)
            })
            .collect()
    }

    /// The largest difference between two adapters' values, over the same tensor names.
    fn largest_difference(a: &Path, b: &Path) -> f32 {
        let (a, b) = (tensors(a), tensors(b));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        assert!(!a.is_empty());
        let mut worst = 0f32;
        for (name, x) in &a {
            let y = &b[name];
            assert_eq!(x.len(), y.len(), "{name}");
            assert!(!x.is_empty(), "{name}");
            for (p, q) in x.iter().zip(y) {
                let d = (p - q).abs();
                assert!(d.is_finite(), "{name}: {p} vs {q}");
                worst = worst.max(d);
            }
        }
        worst
    }

    /// The two runs writing adapters `a` and `b` logged `steps` losses each, equal to 1e-5.
    fn assert_same_losses(a: &Path, b: &Path, steps: usize) {
        let losses = |out: &Path| -> Vec<f64> {
            let metrics = out.with_file_name("a.safetensors.metrics.jsonl");
            std::fs::read_to_string(metrics)
                .unwrap()
                .lines()
                .map(|line| {
                    let row: serde_json::Value = serde_json::from_str(line).unwrap();
                    row["loss"].as_f64().unwrap()
                })
                .collect()
        };
        let (la, lb) = (losses(a), losses(b));
        assert_eq!(la.len(), steps);
        assert_eq!(lb.len(), steps);
        for (x, y) in la.iter().zip(&lb) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "logged losses {la:?} vs {lb:?}"
            );
        }
    }

    /// Two processes at batch 1 take the samples one process at batch 2 takes, with the same
    /// draws, and average their gradients: the adapters agree within 1e-5 per value after 10
    /// steps, a tenth of one step's largest move at `--lr 1e-4` (float sums over the batch in
    /// another order are all that differs, attention gives each sample the same bits at batch 1
    /// and 2, and AdamW's normalised steps amplify the rounding where a gradient is near zero),
    /// while one process at batch 1, which sees half the samples, ends far from both (~8e-4).
    /// The checkpoint the two wrote at step 5 continues on one process at batch 2 to the same
    /// adapter. Only process 0 writes.
    #[test]
    fn two_processes_at_batch_one_train_what_one_at_batch_two_does() {
        let dir = tempfile::tempdir().unwrap();
        let [two, one, half, resumed] = ["two", "one", "half", "resumed"]
            .map(|name| dir.path().join(name).join("a.safetensors"));
        let log = succeed(launch(2, &recipe(&two, 1)));
        assert!(
            log.contains("2 processes × --batch-size 1 = 2 samples per micro-batch"),
            "{log}"
        );
        succeed(alone(&recipe(&one, 2)));
        succeed(alone(&recipe(&half, 1)));

        let same = largest_difference(&two, &one);
        let apart = largest_difference(&two, &half);
        eprintln!("2 × batch 1 vs 1 × batch 2: {same:e}; vs 1 × batch 1: {apart:e}");
        assert!(same <= 1e-5, "two processes differ from one by {same}");
        assert!(
            apart > 1e-4,
            "a run on half the samples differs by only {apart}"
        );

        assert_same_losses(&two, &one, 10);
        // Process 0 wrote each file once; nothing else is there.
        let mut written: Vec<String> = std::fs::read_dir(two.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        written.sort();
        assert_eq!(
            written,
            [
                "a-step000005.ckpt.safetensors",
                "a-step000005.safetensors",
                "a-step000010.ckpt.safetensors",
                "a-step000010.safetensors",
                "a.safetensors",
                "a.safetensors.metrics.jsonl",
            ]
        );

        // kohya's batch metadata: per process, and of the whole step.
        for (out, per_device) in [(&two, "1"), (&one, "2")] {
            let bytes = std::fs::read(out).unwrap();
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let meta = header.metadata().clone().unwrap();
            assert_eq!(meta["ss_batch_size_per_device"], per_device);
            assert_eq!(meta["ss_total_batch_size"], "2");
        }

        // Their checkpoint continues on one process that takes the same samples per step …
        let checkpoint = two.with_file_name("a-step000005.ckpt.safetensors");
        let mut args = recipe(&resumed, 2);
        args.extend(["--resume".to_string(), checkpoint.display().to_string()]);
        succeed(alone(&args));
        let continued = largest_difference(&two, &resumed);
        eprintln!("resumed on one process vs two throughout: {continued:e}");
        assert!(continued <= 1e-6, "the resumed run differs by {continued}");
        // … and not on one that takes fewer, which is told why.
        let mut args = recipe(&dir.path().join("refused/a.safetensors"), 1);
        args.extend(["--resume".to_string(), checkpoint.display().to_string()]);
        let output = run(&mut alone(&args));
        assert!(!output.status.success());
        assert!(
            stderr(&output)
                .contains("batch-size (per step, times the processes): checkpoint 2, now 1"),
            "{}",
            stderr(&output)
        );
    }

    /// With gradient accumulation and buckets: the fixture's 9 samples per epoch make bucket
    /// batches of 4, 4 and 1 at a global batch of 4, so in every third micro-batch process 0 takes
    /// the one sample and process 1 none (it adds zeros). Two processes at batch 2 still train
    /// what one at batch 4 does, over 4 epochs.
    #[test]
    fn accumulation_and_uneven_bucket_batches_sum_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let [two, one] = ["two", "one"].map(|name| dir.path().join(name).join("a.safetensors"));
        let with = |out: &Path, batch: usize| {
            let mut args = recipe(out, batch);
            let steps = args.iter().position(|a| a == "--steps").unwrap() + 1;
            args[steps] = "6".to_string();
            args.extend(["--grad-accum", "2", "--buckets"].map(String::from));
            args
        };
        succeed(launch(2, &with(&two, 2)));
        succeed(alone(&with(&one, 4)));
        let same = largest_difference(&two, &one);
        eprintln!("2 × batch 2 vs 1 × batch 4, accumulation 2, buckets: {same:e}");
        assert!(same <= 1e-5, "two processes differ from one by {same}");
        assert_same_losses(&two, &one, 6);
    }

    /// Two processes given different seeds (mpirun's `A : B` form starts each with its own
    /// arguments) would train different adapters and mix their gradients: the run is refused
    /// before the first step, and nothing is written.
    #[test]
    fn processes_that_disagree_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.safetensors");
        let lora_train = env!("CARGO_BIN_EXE_lora-train");
        let mut command = Command::new("mpirun");
        command
            .args(["--oversubscribe", "--bind-to", "none"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("RAYON_NUM_THREADS", "1");
        for (i, seed) in ["1", "2"].iter().enumerate() {
            if i > 0 {
                command.arg(":");
            }
            command
                .args(["-np", "1", lora_train])
                .args(fixture_args(&out))
                .args(["--steps", "2", "--seed", seed]);
        }
        let output = run(&mut command);
        let message = stderr(&output);
        assert!(!output.status.success(), "{message}");
        assert!(
            message.contains("differ between the processes of this run"),
            "{message}"
        );
        assert!(!message.contains("panicked"), "{message}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// SIGTERM to process 1 alone: the request travels with the gradients, so both processes stop
    /// after the same step, process 0 writes a checkpoint and says how to resume, and the run
    /// ends with 130; `--resume latest` then finishes it.
    #[test]
    fn a_stop_asked_of_one_process_stops_all_with_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.safetensors");
        let metrics = dir.path().join("a.safetensors.metrics.jsonl");
        let mut args = fixture_args(&out);
        args.extend(["--steps", "100000", "--lr", "1e-3"].map(String::from));
        let mut child = launch(2, &args).stderr(Stdio::piped()).spawn().unwrap();
        common::wait_while_running(&mut child, "two logged steps", || {
            std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 2)
        });
        signal_process_1(&descendants(child.id()), "-TERM");
        let output = child.wait_with_output().unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(130), "{message}");
        assert!(
            message.contains("stopped at step") && message.contains("--resume latest"),
            "{message}"
        );
        let done = std::fs::read_to_string(&metrics).unwrap().lines().count();
        let checkpoint = dir.path().join(format!("a-step{done:06}.ckpt.safetensors"));
        assert!(
            checkpoint.exists(),
            "no checkpoint at step {done}: {message}"
        );

        let steps = args.iter().position(|a| a == "--steps").unwrap() + 1;
        args[steps] = (done + 1).to_string();
        args.extend(["--resume", "latest"].map(String::from));
        let log = succeed(launch(2, &args));
        assert!(log.contains(&format!("resuming at step {done}")), "{log}");
        assert_eq!(
            std::fs::read_to_string(&metrics).unwrap().lines().count(),
            done + 1
        );
    }

    /// Every process below `root` (children, grandchildren …) with its environment.
    fn descendants(root: u32) -> Vec<(u32, String)> {
        let mut parents = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The parent is the second field after the command name in parentheses.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
            parents.insert(pid, ppid);
        }
        let below = |mut pid: u32| {
            while let Some(&parent) = parents.get(&pid) {
                if parent == root {
                    return true;
                }
                if parent <= 1 {
                    return false;
                }
                pid = parent;
            }
            false
        };
        parents
            .keys()
            .filter(|&&pid| below(pid))
            .map(|&pid| {
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                (pid, String::from_utf8_lossy(&environ).replace('\0', "\n"))
            })
            .collect()
    }

    /// Sends `signal` (`kill`'s spelling) to MPI process 1 among `processes` (pid, environment).
    fn signal_process_1(processes: &[(u32, String)], signal: &str) {
        let victim = processes
            .iter()
            .find(|(_, env)| env.lines().any(|l| l == "OMPI_COMM_WORLD_RANK=1"))
            .unwrap_or_else(|| {
                panic!(
                    "no process 1 among {:?}",
                    processes.iter().map(|r| r.0).collect::<Vec<_>>()
                )
            })
            .0;
        let sent = Command::new("kill")
            .args([signal, &victim.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// SIGKILL to process 1 in the middle of a run: every process stops within a minute with an
    /// error that names it, every file in the output folder reads whole (writes are atomic),
    /// and `--resume latest` continues from the last checkpoint.
    #[test]
    fn a_killed_process_stops_the_run_and_leaves_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.safetensors");
        let metrics = dir.path().join("a.safetensors.metrics.jsonl");
        let mut args = fixture_args(&out);
        args.extend(
            [
                "--steps",
                "100000",
                "--lr",
                "1e-3",
                "--rank",
                "64",
                "--save-every",
                "1",
                "--keep-checkpoints",
                "2",
            ]
            .map(String::from),
        );
        // Launched with the thread count left to `launch`: each process gets half the cores.
        let mut command = launch(2, &args);
        command.env_remove("RAYON_NUM_THREADS");
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        common::wait_while_running(&mut child, "three logged steps", || {
            std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 3)
        });
        let ranks: Vec<(u32, String)> = descendants(child.id())
            .into_iter()
            .filter(|(_, env)| env.lines().any(|l| l.starts_with("OMPI_COMM_WORLD_RANK=")))
            .collect();
        assert_eq!(ranks.len(), 2, "{ranks:?}");
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let share = format!(
                "RAYON_NUM_THREADS={}",
                (candle_core::utils::get_num_threads() / 2).max(1)
            );
            for (pid, env) in &ranks {
                assert!(
                    env.lines().any(|l| l == share),
                    "process {pid} lacks {share}"
                );
            }
        }
        signal_process_1(&ranks, "-KILL");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the run went on for a minute after process 1 was killed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let message = stderr(&output);
        assert!(!output.status.success(), "{message}");
        assert!(
            message.contains("rank 1") && message.contains("signal 9"),
            "the error does not name the killed process: {message}"
        );
        // No process of the run is left.
        std::thread::sleep(Duration::from_millis(200));
        let left: Vec<u32> = ranks
            .iter()
            .map(|r| r.0)
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .filter(|pid| {
                // A zombie awaiting its parent's wait is gone for our purpose.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| !s[s.rfind(')').unwrap()..].starts_with(") Z"))
            })
            .collect();
        assert!(left.is_empty(), "processes {left:?} still run");

        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // a temporary, removed by the next start
            }
            let bytes = std::fs::read(&path).unwrap();
            if name.ends_with(".safetensors") {
                safetensors::SafeTensors::deserialize(&bytes)
                    .unwrap_or_else(|e| panic!("{name} is not whole: {e}"));
            } else {
                assert!(name.ends_with(".metrics.jsonl"), "unexpected file {name}");
            }
        }

        // The same command, --resume latest, continues from the newest checkpoint.
        let done = std::fs::read_to_string(&metrics).unwrap().lines().count();
        args.extend(["--resume", "latest"].map(String::from));
        let steps = args.iter().position(|a| a == "--steps").unwrap() + 1;
        args[steps] = (done + 2).to_string();
        let log = succeed(launch(2, &args));
        assert!(log.contains("resuming at step"), "{log}");
        assert!(out.exists());
        let hidden: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "temporaries left: {hidden:?}");
    }
}
