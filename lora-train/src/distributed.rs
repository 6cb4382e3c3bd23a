//! Data-parallel training: one process ("rank") per device, the gradients summed across them once
//! per optimizer step, as PyTorch's DDP does for kohya and diffusers.
//!
//! The collective is an existing engine, never sockets of ours: MPI on the CPU (the `mpi`
//! feature: the system's Open MPI through rsmpi, launched with `mpirun -np N lora-train …` or
//! `lora-train launch --nproc N …`). Without a launcher a run is one process and every collective
//! here is the identity.
//!
//! Why N ranks train what one process trains: each optimizer step takes `batch_size × N`
//! samples from the epoch order, rank `r` the `r`-th run of `batch_size` of them; every sample's
//! random draws come from its own generator, seeded by its position in the run (the trainer's
//! module doc), so no rank draws for another; each rank scales its loss by its share of the step's
//! samples, so the sum over ranks of the gradients is the gradient of the mean over them all. The
//! sum, the parameters each gradient reaches, the loss and a stop request travel in one buffer,
//! summed once per step ([`ProcessGroup::sum_step`]); clipping and the update then run on every
//! rank on the same numbers, so the adapters stay equal without being sent.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};

/// The processes of one run and their collective.
pub struct ProcessGroup {
    rank: usize,
    size: usize,
    collective: Collective,
}

enum Collective {
    /// One process: sums are the values themselves.
    Alone,
    #[cfg(feature = "mpi")]
    Mpi(mpi::environment::Universe),
}

/// What one rank brings to an optimizer step; after [`ProcessGroup::sum_step`], the sum over the
/// ranks.
pub struct StepContribution {
    /// Per trained parameter, in the optimizer's order; `None` where the loss reached nothing.
    pub grads: Vec<Option<Tensor>>,
    /// This rank's share of the step's loss (summed, the step's loss).
    pub loss: f64,
    /// Whether a stop (SIGINT/SIGTERM) was requested here; summed, whether any rank got one.
    pub stop: bool,
}

/// The environment variables launchers set, the size read from each: Open MPI's `mpirun`,
/// MPICH's and Intel MPI's Hydra (also Slurm's `srun --mpi=pmi2`).
const MPI_SIZE_VARS: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];
/// torchrun's (and accelerate's) world size and rank: a launch for the NCCL collective. Both,
/// as `WORLD_SIZE` alone is a common name.
const TORCHRUN_VARS: [&str; 2] = ["WORLD_SIZE", "RANK"];

impl ProcessGroup {
    /// A run of one process.
    pub fn alone() -> Self {
        Self {
            rank: 0,
            size: 1,
            collective: Collective::Alone,
        }
    }

    /// The group this process was launched into: alone without a launcher, the MPI world under
    /// `mpirun`. A launch this build cannot serve is an error, never N runs that each train alone
    /// and write the same files.
    pub fn from_launcher() -> Result<Self> {
        let size_of = |var: &str| -> Result<Option<usize>> {
            std::env::var(var)
                .ok()
                .map(|value| {
                    value.trim().parse::<usize>().with_context(|| {
                        format!("the launcher's {var}={value:?} is not a process count")
                    })
                })
                .transpose()
        };
        let mut mpi_size = None;
        for var in MPI_SIZE_VARS {
            if let Some(size) = size_of(var)? {
                mpi_size = Some((var, size));
                break;
            }
        }
        match mpi_size {
            Some((var, size)) if size > 1 => Self::mpi(var, size),
            Some(_) => Ok(Self::alone()),
            None => match size_of(TORCHRUN_VARS[0])? {
                Some(size) if size > 1 && std::env::var_os(TORCHRUN_VARS[1]).is_some() => bail!(
                    "WORLD_SIZE={size} and RANK: a torchrun-style launch is for NCCL on CUDA, which \
                     lora-train does not have yet; on the CPU start the processes with MPI \
                     (`mpirun -np {size} lora-train …` or `lora-train launch --nproc {size} …`)"
                ),
                _ => Ok(Self::alone()),
            },
        }
    }

    #[cfg(feature = "mpi")]
    fn mpi(var: &str, size: usize) -> Result<Self> {
        use mpi::traits::Communicator;
        // Only the main thread calls MPI; rayon's and candle's threads never do.
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .context("MPI was initialised twice in this process")?;
        let world = universe.world();
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        ensure!(
            world_size == size,
            "the launcher says {var}={size} but MPI's world has {world_size} processes"
        );
        Ok(Self {
            rank,
            size,
            collective: Collective::Mpi(universe),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(var: &str, size: usize) -> Result<Self> {
        bail!(
            "launched by MPI as one of {size} processes ({var}={size}), but this lora-train was \
             built without MPI: {}",
            BUILD_WITH_MPI
        )
    }

    /// This process's index, 0 to `size - 1`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes adapters, checkpoints, samples and metrics, and reports.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The positions this rank takes of a step's `batch` samples when each rank takes
    /// `per_rank`: the `rank`-th run of `per_rank`, cut at the batch's end (a bucket's last batch
    /// is smaller, so a rank may get fewer or none).
    pub fn shard(&self, batch: usize, per_rank: usize) -> std::ops::Range<usize> {
        let start = (self.rank * per_rank).min(batch);
        start..(start + per_rank).min(batch)
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) {
        match &self.collective {
            Collective::Alone => {}
            #[cfg(feature = "mpi")]
            Collective::Mpi(universe) => {
                use mpi::collective::CommunicatorCollectives;
                universe.world().barrier();
            }
        }
    }

    /// Under MPI, makes a panic on any thread of this rank end the whole run (after the usual
    /// message): the other ranks may be waiting for this one in a collective, and an unwinding
    /// panic would leave them there.
    pub fn abort_all_on_panic(&self) {
        #[cfg(feature = "mpi")]
        if matches!(self.collective, Collective::Mpi(_)) {
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                use mpi::traits::Communicator;
                mpi::topology::SimpleCommunicator::world().abort(101)
            }));
        }
    }

    /// Whether `value` (a digest of the adapter, options and data) is the same on every rank.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))] // alone, it is
    pub fn same_everywhere(&self, value: u64) -> Result<bool> {
        match &self.collective {
            Collective::Alone => Ok(true),
            #[cfg(feature = "mpi")]
            Collective::Mpi(universe) => {
                use mpi::collective::{CommunicatorCollectives, SystemOperation};
                let world = universe.world();
                let (mut lowest, mut highest) = (0u64, 0u64);
                world.all_reduce_into(&value, &mut lowest, SystemOperation::min());
                world.all_reduce_into(&value, &mut highest, SystemOperation::max());
                Ok(lowest == highest)
            }
        }
    }

    /// Sums `values` element by element over the ranks, in place.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))] // alone, the sum is `values`
    fn sum_in_place(&self, values: &mut [f32]) {
        match &self.collective {
            Collective::Alone => {}
            #[cfg(feature = "mpi")]
            Collective::Mpi(universe) => {
                use mpi::collective::{CommunicatorCollectives, SystemOperation};
                let mine = values.to_vec();
                universe
                    .world()
                    .all_reduce_into(&mine[..], values, SystemOperation::sum());
            }
        }
    }

    /// Sums every rank's contribution to a step, in one buffer: the gradients (zeros where a rank
    /// has none; a parameter any rank's loss reached has a gradient), the loss and the stop
    /// requests. `params` are the trained variables the gradients belong to.
    pub fn sum_step(
        &self,
        mine: StepContribution,
        params: &[(String, Var)],
    ) -> Result<StepContribution> {
        if self.size == 1 {
            return Ok(mine);
        }
        ensure!(
            mine.grads.len() == params.len(),
            "{} gradients for {} parameters",
            mine.grads.len(),
            params.len()
        );
        let values: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        // The gradients, then one "reached" flag per parameter, the loss and the stop request.
        let mut buffer = Vec::with_capacity(values + params.len() + 2);
        for ((name, var), grad) in params.iter().zip(&mine.grads) {
            match grad {
                Some(g) => buffer.extend(
                    g.to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()
                        .with_context(|| format!("the gradient of `{name}`"))?,
                ),
                None => buffer.resize(buffer.len() + var.elem_count(), 0.0),
            }
        }
        buffer.extend(mine.grads.iter().map(|g| f32::from(u8::from(g.is_some()))));
        buffer.push(mine.loss as f32);
        buffer.push(f32::from(u8::from(mine.stop)));
        self.sum_in_place(&mut buffer);

        let (flat, tail) = buffer.split_at(values);
        let (reached, totals) = tail.split_at(params.len());
        let mut offset = 0;
        let mut grads = Vec::with_capacity(params.len());
        for ((_, var), &reached) in params.iter().zip(reached) {
            let n = var.elem_count();
            let grad = (reached > 0.0)
                .then(|| {
                    Tensor::from_slice(&flat[offset..offset + n], var.shape(), var.device())?
                        .to_dtype(var.dtype())
                })
                .transpose()?;
            grads.push(grad);
            offset += n;
        }
        Ok(StepContribution {
            grads,
            loss: f64::from(totals[0]),
            stop: totals[1] > 0.0,
        })
    }

    /// Ends the whole run after an error on this rank: under MPI every rank is stopped (the
    /// others may be waiting for this one in a collective); alone, this process exits.
    pub fn abort(&self, code: i32) -> ! {
        match &self.collective {
            Collective::Alone => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Collective::Mpi(universe) => {
                use mpi::traits::Communicator;
                universe.world().abort(code)
            }
        }
    }
}

/// How to get a lora-train that can join an MPI run.
const BUILD_WITH_MPI: &str = "build it with `cargo build --release -p lora-train --features mpi` \
     (needs Open MPI and libclang: `apt install libopenmpi-dev openmpi-bin libclang-dev`)";

/// `lora-train launch --nproc N ARGS…`: the `mpirun` command that starts `N` ranks of this program
/// on this machine with `ARGS`, each with `threads` threads (`RAYON_NUM_THREADS`) and not pinned to
/// one core (Open MPI pins each of up to two ranks to a core by default).
pub fn launch_command(
    nproc: usize,
    threads: usize,
    program: PathBuf,
    args: &[OsString],
) -> Result<Command> {
    ensure!(nproc >= 1, "--nproc must be at least 1");
    ensure!(
        cfg!(feature = "mpi"),
        "`lora-train launch` starts ranks through MPI, and this lora-train was built without it: \
         {BUILD_WITH_MPI}"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_a_batch_once_in_order() {
        let group = |rank| ProcessGroup {
            rank,
            size: 3,
            collective: Collective::Alone,
        };
        let shards: Vec<_> = (0..3).map(|r| group(r).shard(6, 2)).collect();
        assert_eq!(shards, [0..2, 2..4, 4..6]);
        // A bucket's smaller last batch: the later ranks get fewer samples, or none.
        let shards: Vec<_> = (0..3).map(|r| group(r).shard(3, 2)).collect();
        assert_eq!(shards, [0..2, 2..3, 3..3]);
    }
}
