//! `lora-train launch --nproc N …`: starts the N processes of a data-parallel run on this machine.
//! On the CPU through `mpirun` (MPI); on GPUs as N children of its own, one per GPU, with
//! torchrun's variables, watched as torchrun watches them: when one fails, the others (which wait
//! for it inside NCCL and would wait forever) are stopped.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

/// Where the launched processes train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchOn {
    /// CPU shares, summed through MPI.
    Cpu,
    /// One GPU each (CUDA devices 0 to N-1), summed through NCCL.
    Gpus,
}

/// How to get a lora-train that can join an MPI run.
pub(super) const BUILD_WITH_MPI: &str = "build it with `cargo build --release -p lora-train \
     --features mpi` (needs Open MPI and libclang: `apt install libopenmpi-dev openmpi-bin \
     libclang-dev`)";

/// How to get a lora-train that can join an NCCL run.
#[cfg(not(feature = "nccl"))]
pub(super) const BUILD_WITH_NCCL: &str = "build it with `cargo build --release -p lora-train \
     --features nccl` (needs the CUDA toolkit and NCCL: libnccl-dev from NVIDIA's repository, or \
     the nvidia-nccl-cu13 wheel's library folder on LIBRARY_PATH with a libnccl.so link to its \
     libnccl.so.2; docs/DISTRIBUTED.md)";

/// How long the other processes of a run get to end on their own after one failed, before they
/// are stopped: an error every process meets (a bad option) ends them all within it, while a
/// process waiting for the failed one inside a collective would wait for ever.
const GRACE: Duration = Duration::from_secs(10);

/// Starts `nproc` processes of `program` with `args` on this machine, each with `threads`
/// threads (`RAYON_NUM_THREADS`), and waits for them: the exit code of the run (a failed
/// process's; 130 when the run was stopped by a signal; else 0). On GPUs, once `stop` is set (the
/// caller's SIGINT/SIGTERM handler) the processes get a SIGTERM each: they stop after the step in
/// progress, process 0 with a checkpoint. Under `mpirun`, `stop` is not used: a signal for the
/// processes reaches them directly (`pkill -TERM lora-train`), while one for `mpirun` ends them
/// at once.
pub fn launch(
    nproc: usize,
    threads: usize,
    program: PathBuf,
    args: &[OsString],
    on: LaunchOn,
    stop: &AtomicBool,
) -> Result<i32> {
    ensure!(nproc >= 1, "--nproc must be at least 1");
    match on {
        LaunchOn::Cpu => {
            let mut mpirun = mpirun_command(nproc, threads, program, args)?;
            let status = mpirun
                .status()
                .with_context(|| format!("cannot start {:?}", mpirun.get_program()))?;
            Ok(exit_code(status))
        }
        LaunchOn::Gpus => {
            check_gpus(nproc)?;
            // A free port for NCCL's rendezvous (process 0 listens there); as torchrun's
            // standalone mode finds one.
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|listener| listener.local_addr())
                .context("cannot find a free local port for NCCL's rendezvous")?
                .port();
            let commands = (0..nproc)
                .map(|rank| {
                    let mut command = Command::new(&program);
                    command.args(args);
                    command.env("RAYON_NUM_THREADS", threads.to_string());
                    for (name, value) in torchrun_vars(rank, nproc, port) {
                        command.env(name, value);
                    }
                    // An MPI launcher's variables would make the child an MPI process.
                    for name in super::launch_env::MPI_SIZE_VARS {
                        command.env_remove(name);
                    }
                    stop_with_parent(&mut command);
                    command
                })
                .collect();
            run_local_processes(commands, stop)
        }
    }
}

/// The variables torchrun gives process `rank` of `size` on one machine, with NCCL's rendezvous
/// on this machine's `port`.
fn torchrun_vars(rank: usize, size: usize, port: u16) -> [(&'static str, String); 7] {
    [
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("WORLD_SIZE", size.to_string()),
        ("LOCAL_WORLD_SIZE", size.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
        (super::launch_env::NCCL_COMM_ID, format!("127.0.0.1:{port}")),
    ]
}

/// That this build can train on `nproc` GPUs through NCCL and this machine has them.
#[cfg(feature = "nccl")]
fn check_gpus(nproc: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    // Counted without a context: this process keeps none on GPU 0 for the run's length.
    let count = CudaContext::device_count()
        .map_err(|e| anyhow::anyhow!("cannot count the CUDA devices: {e:?}"))?;
    ensure!(
        nproc <= count.max(0) as usize,
        "--nproc {nproc} processes train on one GPU each, and this machine has {count}"
    );
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn check_gpus(_nproc: usize) -> Result<()> {
    anyhow::bail!(
        "the training runs on CUDA, where the processes sum their gradients through NCCL, and \
         this lora-train was built without it: {BUILD_WITH_NCCL}. (On the CPU, --device cpu \
         launches through MPI.)"
    )
}

/// Has the process `command` starts get a SIGTERM when this one dies (killed, say), so that no
/// process of a run trains on without its launcher.
#[cfg(target_os = "linux")]
fn stop_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only `prctl`, which is async-signal-safe, runs.
    unsafe {
        command.pre_exec(|| {
            match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_command: &mut Command) {}

/// How one process of a run ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// Exit code 0.
    Done,
    /// Exit code 130: it stopped after a step on a stop request, as all of the run do.
    Stopped,
    /// Anything else, with the code the launch returns for it.
    Failed(i32),
}

fn ended(status: ExitStatus) -> Ended {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        // Ended by a signal (SIGINT before its handler was installed, too): the others may be
        // waiting for it.
        if let Some(signal) = status.signal() {
            return Ended::Failed(128 + signal);
        }
    }
    match status.code() {
        Some(0) => Ended::Done,
        Some(130) => Ended::Stopped,
        code => Ended::Failed(code.unwrap_or(1)),
    }
}

/// Runs `commands` (the processes of one run, in rank order) and waits for them all. When one
/// fails, the others get [`GRACE`] to end on their own and are then killed (torchrun stops them
/// at once; the grace lets a failure every process meets end each with its own message). Once
/// `stop` is set, each process still running gets a SIGTERM. Returns the first failure's exit
/// code (128 + the signal for a process a signal ended), else 130 if any process stopped on a
/// request (the run's coordinated stop), else 0.
pub fn run_local_processes(commands: Vec<Command>, stop: &AtomicBool) -> Result<i32> {
    let size = commands.len();
    let mut running: Vec<(usize, Child)> = Vec::with_capacity(size);
    for (rank, mut command) in commands.into_iter().enumerate() {
        match command.spawn() {
            Ok(child) => running.push((rank, child)),
            Err(e) => {
                for (_, child) in &mut running {
                    // Already gone is fine: it is being stopped.
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e).with_context(|| {
                    format!("cannot start process {rank} ({:?})", command.get_program())
                });
            }
        }
    }
    let mut failure: Option<(i32, Instant)> = None;
    let mut stopped = false;
    let mut passed_on = false;
    while !running.is_empty() {
        if !passed_on && stop.load(Ordering::SeqCst) {
            passed_on = true;
            for (_, child) in &running {
                terminate(child);
            }
        }
        let mut still = Vec::with_capacity(running.len());
        for (rank, mut child) in running {
            let Some(status) = child
                .try_wait()
                .with_context(|| format!("cannot watch process {rank}"))?
            else {
                still.push((rank, child));
                continue;
            };
            match ended(status) {
                Ended::Done => {}
                Ended::Stopped => stopped = true,
                Ended::Failed(code) => {
                    if failure.is_none() {
                        eprintln!(
                            "process {rank} of {size} ended ({status}); the others are \
                             stopped unless they end within {} s",
                            GRACE.as_secs()
                        );
                        failure = Some((code, Instant::now()));
                    }
                }
            }
        }
        running = still;
        if let Some((_, since)) = failure {
            if since.elapsed() >= GRACE {
                for (rank, child) in &mut running {
                    eprintln!("stopping process {rank} of {size}");
                    // A process that ended meanwhile cannot be killed: nothing to do.
                    let _ = child.kill();
                    let _ = child.wait();
                }
                running.clear();
            }
        }
        if !running.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(match failure {
        Some((code, _)) => code,
        None if stopped => 130,
        None => 0,
    })
}

/// Sends `child` a SIGTERM: a training process stops after its step, with a checkpoint.
#[cfg(unix)]
fn terminate(child: &Child) {
    // SAFETY: `kill` on the pid of a child not yet waited for, which cannot have been reused.
    // A child that ended meanwhile makes it fail harmlessly.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

#[cfg(not(unix))]
fn terminate(_child: &Child) {}

/// A process's exit code, or the shell's 128 + the signal that ended it.
fn exit_code(status: ExitStatus) -> i32 {
    match ended(status) {
        Ended::Done => 0,
        Ended::Stopped => 130,
        Ended::Failed(code) => code,
    }
}

/// The `mpirun` command that starts `nproc` ranks of `program` on this machine with `args`, each
/// with `threads` threads (`RAYON_NUM_THREADS`) and not pinned to one core (Open MPI pins each of
/// up to two ranks to a core by default).
pub fn mpirun_command(
    nproc: usize,
    threads: usize,
    program: PathBuf,
    args: &[OsString],
) -> Result<Command> {
    ensure!(
        cfg!(feature = "mpi"),
        "`lora-train launch` starts CPU processes through MPI, and this lora-train was built \
         without it: {BUILD_WITH_MPI}"
    );
    let mpirun = find_on_path("mpirun").with_context(|| {
        format!(
            "`mpirun` is not on PATH: install Open MPI (`apt install openmpi-bin \
             libopenmpi-dev`) and {BUILD_WITH_MPI}"
        )
    })?;
    let version = Command::new(&mpirun)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", mpirun.display()))?;
    let open_mpi = String::from_utf8_lossy(&version.stdout).contains("Open MPI");
    let mut command = Command::new(&mpirun);
    command.arg("-np").arg(nproc.to_string());
    command.env("RAYON_NUM_THREADS", threads.to_string());
    if open_mpi {
        // More ranks than cores is slow but correct; Open MPI refuses it unless told. `-x` passes
        // the thread count on to ranks Open MPI starts through its daemons.
        command.args([
            "--bind-to",
            "none",
            "--oversubscribe",
            "-x",
            "RAYON_NUM_THREADS",
        ]);
        if running_as_root() {
            // Containers run as root; Open MPI refuses that unless both variables are set.
            for var in ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] {
                if std::env::var_os(var).is_none() {
                    command.env(var, "1");
                }
            }
        }
    }
    command.arg(program).args(args);
    Ok(command)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

#[cfg(unix)]
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(not(unix))]
fn running_as_root() -> bool {
    false
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    static NO_STOP: AtomicBool = AtomicBool::new(false);

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        // The tests send SIGINT and expect its default action; a test run started as a
        // background job without job control inherits SIGINT ignored, and a shell cannot undo
        // that itself (`trap` leaves signals ignored on entry alone).
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only `signal`, which is async-signal-safe, runs.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            })
        };
        command
    }

    #[test]
    fn a_failed_process_stops_the_ones_waiting_for_it() {
        let start = Instant::now();
        // Process 1 fails at once; process 0 would wait "for ever" (as in a collective). Its
        // shell execs `sleep`, so killing it leaves no orphan holding the test's output open.
        let code =
            run_local_processes(vec![shell("exec sleep 600"), shell("exit 3")], &NO_STOP).unwrap();
        assert_eq!(code, 3);
        let took = start.elapsed();
        assert!(
            took >= GRACE && took < GRACE + Duration::from_secs(20),
            "stopped after {took:?}"
        );
    }

    #[test]
    fn processes_that_end_together_are_not_killed() {
        let start = Instant::now();
        // The run's coordinated stop: process 0 writes its checkpoint after the others ended.
        let code = run_local_processes(
            vec![shell("sleep 1; exit 130"), shell("exit 130")],
            &NO_STOP,
        );
        assert_eq!(code.unwrap(), 130);
        assert!(start.elapsed() >= Duration::from_secs(1));
        assert_eq!(
            run_local_processes(vec![shell("exit 0"), shell("sleep 0.2")], &NO_STOP).unwrap(),
            0
        );
        // A failure every process meets ends each on its own, before the grace runs out.
        let start = Instant::now();
        let code = run_local_processes(vec![shell("sleep 0.5; exit 2"), shell("exit 2")], &NO_STOP);
        assert_eq!(code.unwrap(), 2);
        assert!(start.elapsed() < GRACE);
        // Killed by a signal: the shell's code. SIGINT too, which a process meets before its
        // handler is installed: a failure, not the run's stop.
        assert_eq!(
            run_local_processes(vec![shell("kill -9 $$")], &NO_STOP).unwrap(),
            128 + 9
        );
        let start = Instant::now();
        let code = run_local_processes(
            vec![shell("exec sleep 600"), shell("kill -INT $$")],
            &NO_STOP,
        );
        assert_eq!(code.unwrap(), 128 + 2);
        assert!(start.elapsed() >= GRACE);
    }

    #[test]
    fn a_stop_request_reaches_every_process() {
        // Each process stops on SIGTERM as a training process does: exit 130 after "its step".
        let trained = "trap 'sleep 0.3; exit 130' TERM; while :; do sleep 0.05; done";
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let code = std::thread::scope(|scope| {
            let run =
                scope.spawn(|| run_local_processes(vec![shell(trained), shell(trained)], &stop));
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::SeqCst);
            run.join().unwrap()
        });
        assert_eq!(code.unwrap(), 130);
        assert!(start.elapsed() < GRACE, "took {:?}", start.elapsed());
    }

    #[test]
    fn children_get_torchruns_variables() {
        let vars = torchrun_vars(1, 4, 29_400);
        let launch = super::super::launch_env::Launch::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        let t = match launch {
            super::super::launch_env::Launch::Torchrun(t) => t,
            other => panic!("not a torchrun launch: {other:?}"),
        };
        assert_eq!((t.rank, t.size, t.local_rank), (1, 4, 1));
        assert_eq!(
            t.rendezvous,
            super::super::launch_env::Rendezvous::User("127.0.0.1:29400".to_string())
        );
    }
}
