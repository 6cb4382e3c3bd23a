//! Data-parallel training: one process ("rank") per device, the gradients summed across them once
//! per optimizer step, as PyTorch's DDP does for kohya and diffusers.
//!
//! The collective is an existing engine, never sockets of ours: MPI on the CPU (the `mpi`
//! feature: the system's Open MPI through rsmpi, launched with `mpirun -np N lora-train …` or
//! `lora-train launch --nproc N …`), NCCL on CUDA (the `nccl` feature: one process per GPU,
//! launched by torchrun-style launchers or `lora-train launch`). Without a launcher a run is one
//! process and every collective here is the identity.
//!
//! Why N ranks train what one process trains: each optimizer step takes `batch_size × N`
//! samples from the epoch order, rank `r` the `r`-th run of `batch_size` of them; every sample's
//! random draws come from its own generator, seeded by its position in the run (the trainer's
//! module doc), so no rank draws for another; each rank scales its loss by its share of the step's
//! samples, so the sum over ranks of the gradients is the gradient of the mean over them all. The
//! sum, the parameters each gradient reaches, the loss and a stop request travel in one buffer,
//! summed once per step ([`ProcessGroup::sum_step`]); clipping and the update then run on every
//! rank on the same numbers, so the adapters stay equal without being sent.

mod launch_env;
pub mod launcher;
#[cfg(feature = "mpi")]
mod mpi_world;
#[cfg(feature = "nccl")]
mod nccl_comm;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use launch_env::{Launch, TorchrunLaunch};
use lora_core::options::DeviceSpec;

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
    Mpi(mpi_world::MpiWorld),
    #[cfg(feature = "nccl")]
    Nccl(nccl_comm::NcclGroup),
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
    /// `mpirun`, the NCCL communicator of a torchrun-style launch (on the GPU `LOCAL_RANK`). A
    /// launch this build cannot serve is an error, never N runs that each train alone and write
    /// the same files.
    ///
    /// Call it first thing in `main`, before any other thread exists: for NCCL it may set
    /// `NCCL_COMM_ID` in this process's environment.
    pub fn from_launcher() -> Result<Self> {
        match Launch::from_vars(|name| std::env::var(name).ok())? {
            Launch::Alone => Ok(Self::alone()),
            Launch::Mpi { var, size } => Self::mpi(var, size),
            Launch::Torchrun(launch) => Self::nccl(launch),
        }
    }

    #[cfg(feature = "mpi")]
    fn mpi(var: &str, size: usize) -> Result<Self> {
        let (world, rank) = mpi_world::MpiWorld::join(var, size)?;
        Ok(Self {
            rank,
            size,
            collective: Collective::Mpi(world),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(var: &str, size: usize) -> Result<Self> {
        bail!(
            "launched by MPI as one of {size} processes ({var}={size}), but this lora-train was \
             built without MPI: {}",
            launcher::BUILD_WITH_MPI
        )
    }

    #[cfg(feature = "nccl")]
    fn nccl(launch: TorchrunLaunch) -> Result<Self> {
        if let launch_env::Rendezvous::Master(id) = &launch.rendezvous {
            // SAFETY: `from_launcher`'s contract: no other thread exists yet. NCCL reads the
            // variable in this process when it makes the run's id, and process 0 again when it
            // starts listening there.
            #[allow(unused_unsafe)] // `set_var` is unsafe from the 2024 edition on
            unsafe {
                std::env::set_var(launch_env::NCCL_COMM_ID, id)
            };
        }
        let group = nccl_comm::NcclGroup::join(&launch)?;
        Ok(Self {
            rank: launch.rank,
            size: launch.size,
            collective: Collective::Nccl(group),
        })
    }

    #[cfg(not(feature = "nccl"))]
    fn nccl(launch: TorchrunLaunch) -> Result<Self> {
        if launch.size == 1 {
            // Nothing to sum with: the run is this process's, on the device it asks for.
            return Ok(Self::alone());
        }
        bail!(
            "launched torchrun-style as process {} of {} (RANK, WORLD_SIZE), which trains on \
             GPUs through NCCL, and this lora-train was built without it: {}. On the CPU, start \
             the processes with MPI (`lora-train launch --nproc {} … --device cpu`)",
            launch.rank,
            launch.size,
            launcher::BUILD_WITH_NCCL,
            launch.size
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

    /// Whether the steps go through a collective: a launch of several processes, or NCCL's
    /// group of one (as DDP keeps a process group of one).
    pub fn is_collective(&self) -> bool {
        !matches!(self.collective, Collective::Alone)
    }

    /// The device this process trains on, given the one asked for (`--device`): that one, but
    /// under NCCL the GPU of this process's `LOCAL_RANK`, which `auto`, `cuda` and
    /// `cuda:LOCAL_RANK` name (another is refused).
    pub fn device_spec(&self, asked: DeviceSpec) -> Result<DeviceSpec> {
        #[cfg(feature = "nccl")]
        if let Collective::Nccl(group) = &self.collective {
            let own = DeviceSpec::of(group.device());
            ensure!(
                matches!(asked, DeviceSpec::Auto | DeviceSpec::Cuda(0)) || asked == own,
                "process {} of {} trains on {own} (its LOCAL_RANK's GPU), and --device {asked} \
                 names another: leave --device at auto or cuda",
                self.rank,
                self.size
            );
            return Ok(own);
        }
        Ok(asked)
    }

    /// The device of [`Self::device_spec`], opened: under MPI it must be the CPU (MPI's
    /// processes sum on the host); under NCCL it is the group's own.
    pub fn open_device(&self, asked: DeviceSpec) -> Result<Device> {
        match &self.collective {
            Collective::Alone => asked.open(),
            #[cfg(feature = "mpi")]
            Collective::Mpi(_) => {
                let device = asked.open()?;
                ensure!(
                    device.is_cpu(),
                    "MPI processes train on the CPU (--device cpu), not on {asked}: for GPUs, \
                     start one process per GPU through NCCL (`lora-train launch` or torchrun; \
                     docs/DISTRIBUTED.md)"
                );
                Ok(device)
            }
            #[cfg(feature = "nccl")]
            Collective::Nccl(group) => {
                self.device_spec(asked)?;
                Ok(group.device().clone())
            }
        }
    }

    /// The positions this rank takes of a step's `batch` samples when each rank takes
    /// `per_rank`: the `rank`-th run of `per_rank`, cut at the batch's end (a bucket's last batch
    /// is smaller, so a rank may get fewer or none).
    pub fn shard(&self, batch: usize, per_rank: usize) -> std::ops::Range<usize> {
        let start = (self.rank * per_rank).min(batch);
        start..(start + per_rank).min(batch)
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.collective {
            Collective::Alone => {}
            #[cfg(feature = "mpi")]
            Collective::Mpi(world) => world.barrier(),
            #[cfg(feature = "nccl")]
            Collective::Nccl(group) => group.barrier()?,
        }
        Ok(())
    }

    /// Makes a panic on any thread of this rank end this process (under MPI, the whole run) after
    /// the usual message: the other ranks may be waiting for this one in a collective, and a panic
    /// that unwound a thread other than the main one would leave them there. Under NCCL the
    /// launcher (torchrun, `lora-train launch`) then stops the others.
    pub fn abort_all_on_panic(&self) {
        match &self.collective {
            Collective::Alone => {}
            #[cfg(feature = "mpi")]
            Collective::Mpi(_) => end_process_on_panic(mpi_world::MpiWorld::abort_on_panic),
            #[cfg(feature = "nccl")]
            Collective::Nccl(_) => end_process_on_panic(|| std::process::exit(101)),
        }
    }

    /// Whether `value` (a digest of the adapter, options and data) is the same on every rank.
    #[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(unused_variables))]
    pub fn same_everywhere(&self, value: u64) -> Result<bool> {
        match &self.collective {
            Collective::Alone => Ok(true),
            #[cfg(feature = "mpi")]
            Collective::Mpi(world) => Ok(world.same_everywhere(value)),
            #[cfg(feature = "nccl")]
            Collective::Nccl(group) => group.same_everywhere(value),
        }
    }

    /// The element-wise sum over the ranks of `flat` (one-dimensional f32, on this rank's
    /// training device). Every rank must call it, with as many values.
    pub fn sum(&self, flat: Tensor) -> Result<Tensor> {
        match &self.collective {
            Collective::Alone => Ok(flat),
            #[cfg(feature = "mpi")]
            Collective::Mpi(world) => world.sum(&flat),
            #[cfg(feature = "nccl")]
            Collective::Nccl(group) => group.sum(&flat),
        }
    }

    /// Sums every rank's contribution to a step, in one buffer on the training device: the
    /// gradients (zeros where a rank has none; a parameter any rank's loss reached has a
    /// gradient), the loss and the stop requests. `params` are the trained variables the
    /// gradients belong to.
    pub fn sum_step(
        &self,
        mine: StepContribution,
        params: &[(String, Var)],
    ) -> Result<StepContribution> {
        if !self.is_collective() {
            return Ok(mine);
        }
        ensure!(
            mine.grads.len() == params.len(),
            "{} gradients for {} parameters",
            mine.grads.len(),
            params.len()
        );
        let Some((_, first)) = params.first() else {
            bail!("a step with no trained parameters")
        };
        let device = first.device();
        // The gradients, then one "reached" flag per parameter, the loss and the stop request.
        let mut parts = Vec::with_capacity(params.len() + 1);
        for ((name, var), grad) in params.iter().zip(&mine.grads) {
            parts.push(match grad {
                Some(g) => g
                    .to_dtype(DType::F32)?
                    .flatten_all()
                    .with_context(|| format!("the gradient of `{name}`"))?,
                None => Tensor::zeros(var.elem_count(), DType::F32, device)?,
            });
        }
        let mut tail: Vec<f32> = mine
            .grads
            .iter()
            .map(|g| f32::from(u8::from(g.is_some())))
            .collect();
        tail.push(mine.loss as f32);
        tail.push(f32::from(u8::from(mine.stop)));
        let tail_len = tail.len();
        parts.push(Tensor::from_vec(tail, tail_len, device)?);
        let summed = self.sum(Tensor::cat(&parts, 0)?)?;

        let values = summed.elem_count() - tail_len;
        // Each part copied out of the sum: from a GPU, `to_vec1` of a view copies the view's
        // whole storage, and a gradient left a view would be that storage again for the
        // optimizers that read gradients back to the host (adamw8bit).
        let tail = summed
            .narrow(0, values, tail_len)?
            .force_contiguous()?
            .to_vec1::<f32>()?;
        let (reached, totals) = tail.split_at(params.len());
        let mut offset = 0;
        let mut grads = Vec::with_capacity(params.len());
        for ((_, var), &reached) in params.iter().zip(reached) {
            let n = var.elem_count();
            let grad = (reached > 0.0)
                .then(|| {
                    summed
                        .narrow(0, offset, n)?
                        .force_contiguous()?
                        .reshape(var.shape())?
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
    /// others may be waiting for this one in a collective); alone or under NCCL this process
    /// exits, and NCCL's launcher stops the others.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Collective::Mpi(world) = &self.collective {
            world.abort(code)
        }
        std::process::exit(code)
    }
}

/// Replaces the panic hook with one that reports as before, then calls `end` (which does not
/// return), so that a panic on any thread ends this process.
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn end_process_on_panic(end: fn() -> !) {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        end()
    }));
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
