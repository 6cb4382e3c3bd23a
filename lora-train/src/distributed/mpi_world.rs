//! The MPI collective (the `mpi` feature): the system's Open MPI through rsmpi, one process per
//! CPU share, launched with `mpirun -np N lora-train …` or `lora-train launch --nproc N …`.

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::traits::Communicator;

/// This process's MPI world.
pub struct MpiWorld {
    universe: mpi::environment::Universe,
}

impl MpiWorld {
    /// Initialises MPI; `var` and `size` are what the launcher said, checked against MPI's world.
    /// Returns the world and this process's rank.
    pub fn join(var: &str, size: usize) -> Result<(Self, usize)> {
        // Only the main thread calls MPI; rayon's and candle's threads never do.
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .context("MPI was initialised twice in this process")?;
        let world = universe.world();
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        ensure!(
            world_size == size,
            "the launcher says {var}={size} but MPI's world has {world_size} processes"
        );
        Ok((Self { universe }, rank))
    }

    /// The element-wise sum over the processes of `flat` (one-dimensional f32, on the CPU).
    pub fn sum(&self, flat: &Tensor) -> Result<Tensor> {
        let mine = flat.to_vec1::<f32>()?;
        let mut summed = vec![0f32; mine.len()];
        self.universe
            .world()
            .all_reduce_into(&mine[..], &mut summed[..], SystemOperation::sum());
        Ok(Tensor::from_vec(summed, mine.len(), flat.device())?)
    }

    /// Whether `value` is the same on every process: its smallest and largest agree.
    pub fn same_everywhere(&self, value: u64) -> bool {
        let world = self.universe.world();
        let (mut lowest, mut highest) = (0u64, 0u64);
        world.all_reduce_into(&value, &mut lowest, SystemOperation::min());
        world.all_reduce_into(&value, &mut highest, SystemOperation::max());
        lowest == highest
    }

    /// Returns once every process has called it.
    pub fn barrier(&self) {
        self.universe.world().barrier();
    }

    /// Ends every process of the run (`MPI_Abort`): the others may be waiting for this one.
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }

    /// `abort` with a panic's code, for the panic hook (which cannot hold the world).
    pub fn abort_on_panic() -> ! {
        mpi::topology::SimpleCommunicator::world().abort(101)
    }
}
