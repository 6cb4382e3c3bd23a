//! The NCCL collective (the `nccl` feature): one process per GPU, the step's buffer summed on the
//! GPUs through NCCL's all-reduce, on the stream candle queues the step's kernels on, so it is
//! ordered after the backward pass by the stream itself and the gradients never leave the GPU.
//! All calls come from the thread that joined (candle's stream is that thread's), which
//! [`OwnComm::get`] enforces.

use std::thread::ThreadId;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};

use super::launch_env::{Rendezvous, TorchrunLaunch};

/// This process's NCCL communicator and the GPU it works on.
pub struct NcclGroup {
    comm: OwnComm,
    device: Device,
    cuda: CudaDevice,
}

/// NCCL's communicator, used on the thread that made it only: calls on one communicator must not
/// run at once, and the trainer makes them all from the main thread.
struct OwnComm {
    comm: Comm,
    thread: ThreadId,
}

// SAFETY: `get` hands the communicator out on the thread that made it and nowhere else, so no two
// threads ever call it; what another thread may do is drop it, and `ncclCommAbort` (the drop) is
// the call NCCL makes for use from any thread.
unsafe impl Send for OwnComm {}
unsafe impl Sync for OwnComm {}

impl OwnComm {
    /// The communicator, with its GPU's context current on this thread: NCCL launches on the
    /// current context, and opening another device (`--device auto`'s probe) changes it.
    fn get(&self) -> Result<&Comm> {
        ensure!(
            std::thread::current().id() == self.thread,
            "NCCL's communicator is used on the thread that joined the run only"
        );
        self.comm.context().bind_to_thread()?;
        Ok(&self.comm)
    }
}

/// An NCCL failure with its result code (cudarc's own message is only "NcclError") and where to
/// look next.
fn nccl_error(what: String) -> impl FnOnce(NcclError) -> anyhow::Error {
    move |e| {
        anyhow!(
            "{what}: NCCL returned {:?} (NCCL_DEBUG=WARN says more)",
            e.0
        )
    }
}

impl NcclGroup {
    /// Opens the launch's GPU (`LOCAL_RANK`) and joins the run's communicator: every process of
    /// the launch must call it; it returns once all have. NCCL makes the run's id from
    /// `NCCL_COMM_ID`, which the caller has put in the environment (a launch of one process
    /// without it: an id of NCCL's own).
    pub fn join(launch: &TorchrunLaunch) -> Result<Self> {
        let device = Device::new_cuda(launch.local_rank).with_context(|| {
            format!(
                "process {} of {} trains on CUDA device {} (its LOCAL_RANK), which cannot be opened",
                launch.rank, launch.size, launch.local_rank
            )
        })?;
        let Device::Cuda(cuda) = &device else {
            bail!("CUDA device {} opened as another kind", launch.local_rank)
        };
        let cuda = cuda.clone();
        // NCCL takes the communicator's GPU from the thread's current context.
        cuda.cuda_stream().context().bind_to_thread()?;
        let at = match &launch.rendezvous {
            Rendezvous::User(id) | Rendezvous::Master(id) => format!("NCCL_COMM_ID={id}"),
            Rendezvous::Own => "its own id (one process)".to_string(),
        };
        let id = Id::new().map_err(nccl_error(format!(
            "NCCL could not make the run's id from {at}"
        )))?;
        let comm = Comm::from_rank(cuda.cuda_stream(), launch.rank, launch.size, id).map_err(
            nccl_error(format!(
                "process {} of {} could not join the others through NCCL at {at}",
                launch.rank, launch.size
            )),
        )?;
        let comm = OwnComm {
            comm,
            thread: std::thread::current().id(),
        };
        Ok(Self { comm, device, cuda })
    }

    /// The GPU this process trains on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The element-wise sum over the processes of `flat`, a one-dimensional f32 tensor on this
    /// group's GPU, as a new tensor there.
    pub fn sum(&self, flat: &Tensor) -> Result<Tensor> {
        ensure!(
            flat.dtype() == DType::F32 && flat.rank() == 1,
            "the step's buffer must be one-dimensional f32, not {:?} {:?}",
            flat.dtype(),
            flat.shape()
        );
        let flat = flat.contiguous()?;
        let n = flat.elem_count();
        let (storage, layout) = flat.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            bail!(
                "the step's buffer is on {:?}, not on NCCL's GPU",
                flat.device().location()
            )
        };
        let start = layout.start_offset();
        let mine = storage.as_cuda_slice::<f32>()?.slice(start..start + n);
        let stream = self.cuda.cuda_stream();
        let mut summed: CudaSlice<f32> = stream.alloc_zeros(n)?;
        self.comm
            .get()?
            .all_reduce(&mine, &mut summed, &ReduceOp::Sum)
            .map_err(nccl_error(format!("the sum of the step's {n} values")))?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(summed, self.cuda.clone()));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }

    /// `value` reduced over the processes with `op`.
    fn reduce_one(&self, value: u64, op: ReduceOp) -> Result<u64> {
        let stream = self.cuda.cuda_stream();
        let mut buffer = stream.clone_htod(&[value])?;
        self.comm
            .get()?
            .all_reduce_in_place(&mut buffer, &op)
            .map_err(nccl_error("a reduction of one value".to_string()))?;
        Ok(stream.clone_dtoh(&buffer)?[0])
    }

    /// Whether `value` is the same on every process: its smallest and largest agree.
    pub fn same_everywhere(&self, value: u64) -> Result<bool> {
        Ok(self.reduce_one(value, ReduceOp::Min)? == self.reduce_one(value, ReduceOp::Max)?)
    }

    /// Returns once every process has called it (NCCL has no barrier: a reduction every process
    /// must join, waited for).
    pub fn barrier(&self) -> Result<()> {
        self.reduce_one(0, ReduceOp::Sum).map(drop)
    }
}
