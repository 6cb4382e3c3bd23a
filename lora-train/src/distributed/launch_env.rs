//! Which launcher started this process, read from the variables launchers set: MPI's (`mpirun`,
//! Hydra, `srun --mpi=pmi2`) or torchrun's (`torchrun`, `accelerate launch`, `lora-train launch`
//! on GPUs, or a Slurm script that sets them).

use anyhow::{bail, ensure, Context, Result};

/// The environment variables MPI launchers set, the size read from each: Open MPI's `mpirun`,
/// MPICH's and Intel MPI's Hydra (also Slurm's `srun --mpi=pmi2`).
pub const MPI_SIZE_VARS: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];

/// NCCL's own variable: the `host:port` where process 0's NCCL listens for the others (NCCL reads
/// it when the run's id is made, so no id has to travel between the processes).
pub const NCCL_COMM_ID: &str = "NCCL_COMM_ID";

/// How this process was started.
#[derive(Debug, PartialEq)]
pub enum Launch {
    /// No launcher, or a launcher of one process.
    Alone,
    /// One of `size` MPI processes; `var` is the launcher's variable that said so.
    Mpi { var: &'static str, size: usize },
    /// One of the processes of a torchrun-style launch, for NCCL on CUDA.
    Torchrun(TorchrunLaunch),
}

/// torchrun's variables, as this process read them.
#[derive(Debug, PartialEq)]
pub struct TorchrunLaunch {
    /// `RANK`: this process's index in the run.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub size: usize,
    /// `LOCAL_RANK`: this process's index on its machine, and so its GPU (0 when a launch of one
    /// process leaves it out).
    pub local_rank: usize,
    /// Where NCCL's rendezvous listens.
    pub rendezvous: Rendezvous,
}

/// Where process 0's NCCL listens for the others, in `NCCL_COMM_ID`'s form (`host:port`).
#[derive(Debug, PartialEq)]
pub enum Rendezvous {
    /// The user's `NCCL_COMM_ID`, which NCCL reads itself.
    User(String),
    /// Made from `MASTER_ADDR` and `MASTER_PORT`: this process puts it in `NCCL_COMM_ID` for
    /// NCCL to read.
    Master(String),
    /// A launch of one process without either: NCCL's own id, which need not travel.
    Own,
}

impl Launch {
    /// The launch that variables `var` describe (the process environment in use, a table in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|value| {
                    value.trim().parse::<usize>().with_context(|| {
                        format!("the launcher's {name}={value:?} is not a whole number")
                    })
                })
                .transpose()
        };
        for name in MPI_SIZE_VARS {
            if let Some(size) = number(name)? {
                return Ok(match size {
                    0 | 1 => Self::Alone,
                    size => Self::Mpi { var: name, size },
                });
            }
        }
        // Both, as `WORLD_SIZE` alone is a common name for other things.
        let (Some(size), Some(rank)) = (number("WORLD_SIZE")?, number("RANK")?) else {
            return Ok(Self::Alone);
        };
        ensure!(
            size >= 1 && rank < size,
            "the launcher's RANK={rank} is not one of WORLD_SIZE={size} processes"
        );
        // One process needs neither: its GPU is the first, and nobody joins it (some launchers,
        // Kubeflow's PyTorchJob for one, set WORLD_SIZE=1 and RANK=0 alone).
        let alone = size == 1;
        let local_rank = match number("LOCAL_RANK")? {
            Some(local_rank) => local_rank,
            None if alone => 0,
            None => bail!(
                "RANK={rank} and WORLD_SIZE={size} are set but LOCAL_RANK is not: it picks this \
                 process's GPU (torchrun sets it; under Slurm, LOCAL_RANK=$SLURM_LOCALID)"
            ),
        };
        let rendezvous = match var(NCCL_COMM_ID).filter(|v| !v.trim().is_empty()) {
            Some(id) => Rendezvous::User(id.trim().to_string()),
            None => match rendezvous_from_master(&var)? {
                Some(id) => Rendezvous::Master(id),
                None if alone => Rendezvous::Own,
                None => bail!(
                    "a torchrun-style launch (RANK, WORLD_SIZE) needs where process 0 listens: \
                     MASTER_ADDR and MASTER_PORT, or NCCL_COMM_ID=host:port"
                ),
            },
        };
        Ok(Self::Torchrun(TorchrunLaunch {
            rank,
            size,
            local_rank,
            rendezvous,
        }))
    }
}

/// NCCL's rendezvous address from torchrun's `MASTER_ADDR` and `MASTER_PORT` (the machine of
/// process 0, and a port for the run). Under torchrun's agent (`TORCHELASTIC_USE_AGENT_STORE`)
/// the agent's own store already listens on `MASTER_PORT`, so NCCL takes the port after it.
/// `None` when either is unset.
fn rendezvous_from_master(var: &impl Fn(&str) -> Option<String>) -> Result<Option<String>> {
    let (Some(addr), Some(port)) = (var("MASTER_ADDR"), var("MASTER_PORT")) else {
        return Ok(None);
    };
    let addr = addr.trim();
    ensure!(!addr.is_empty(), "the launcher's MASTER_ADDR is empty");
    let port: u16 = port
        .trim()
        .parse()
        .with_context(|| format!("the launcher's MASTER_PORT={port:?} is not a port number"))?;
    let agent_store = var("TORCHELASTIC_USE_AGENT_STORE")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1");
    let port = match agent_store {
        true => port.checked_add(1).with_context(|| {
            format!("MASTER_PORT={port} is torchrun's, and NCCL's would be the next: none is left")
        })?,
        false => port,
    };
    // An IPv6 address is written in brackets before its port.
    Ok(Some(match addr.contains(':') && !addr.starts_with('[') {
        true => format!("[{addr}]:{port}"),
        false => format!("{addr}:{port}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        Launch::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    fn torchrun(vars: &[(&str, &str)]) -> TorchrunLaunch {
        match launch(vars).unwrap() {
            Launch::Torchrun(t) => t,
            other => panic!("expected a torchrun launch, got {other:?}"),
        }
    }

    const TORCHRUN: [(&str, &str); 5] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.7"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn no_launcher_and_launches_of_one_are_alone() {
        assert_eq!(launch(&[]).unwrap(), Launch::Alone);
        assert_eq!(launch(&[("PMI_SIZE", "1")]).unwrap(), Launch::Alone);
        // WORLD_SIZE alone is some other tool's.
        assert_eq!(launch(&[("WORLD_SIZE", "4")]).unwrap(), Launch::Alone);
    }

    #[test]
    fn mpi_variables_come_first() {
        let mut vars = TORCHRUN.to_vec();
        vars.push(("OMPI_COMM_WORLD_SIZE", "2"));
        assert_eq!(
            launch(&vars).unwrap(),
            Launch::Mpi {
                var: "OMPI_COMM_WORLD_SIZE",
                size: 2
            }
        );
    }

    #[test]
    fn torchrun_variables_give_rank_gpu_and_rendezvous() {
        let master = |id: &str| Rendezvous::Master(id.to_string());
        let t = torchrun(&TORCHRUN);
        assert_eq!((t.rank, t.size, t.local_rank), (3, 8, 1));
        assert_eq!(t.rendezvous, master("10.0.0.7:29500"));
        // Under torchrun's agent, its store holds MASTER_PORT.
        let mut vars = TORCHRUN.to_vec();
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        assert_eq!(torchrun(&vars).rendezvous, master("10.0.0.7:29501"));
        // The user's NCCL_COMM_ID wins and is left as it is.
        vars.push(("NCCL_COMM_ID", "node1:4000"));
        let user = Rendezvous::User("node1:4000".to_string());
        assert_eq!(torchrun(&vars).rendezvous, user);
        // IPv6.
        let mut vars = TORCHRUN.to_vec();
        vars[3] = ("MASTER_ADDR", "fd00::7");
        assert_eq!(torchrun(&vars).rendezvous, master("[fd00::7]:29500"));
        // A launch of one process is still NCCL's (DDP's process group of one), and needs
        // neither LOCAL_RANK nor a rendezvous.
        let t = torchrun(&[("RANK", "0"), ("WORLD_SIZE", "1")]);
        assert_eq!((t.rank, t.size, t.local_rank), (0, 1, 0));
        assert_eq!(t.rendezvous, Rendezvous::Own);
    }

    #[test]
    fn incomplete_or_wrong_torchrun_variables_are_named() {
        let error = |vars: &[(&str, &str)]| format!("{:#}", launch(vars).unwrap_err());
        let without = |name: &str| -> Vec<(&str, &str)> {
            TORCHRUN
                .iter()
                .copied()
                .filter(|(n, _)| *n != name)
                .collect()
        };
        assert!(error(&without("LOCAL_RANK")).contains("LOCAL_RANK is not"));
        assert!(error(&without("MASTER_PORT")).contains("MASTER_ADDR and MASTER_PORT"));
        let mut vars = TORCHRUN.to_vec();
        vars[0] = ("RANK", "8");
        assert!(error(&vars).contains("RANK=8 is not one of WORLD_SIZE=8"));
        vars[0] = ("RANK", "x");
        assert!(error(&vars).contains("RANK=\"x\" is not a whole number"));
        let mut vars = TORCHRUN.to_vec();
        vars[4] = ("MASTER_PORT", "70000");
        assert!(error(&vars).contains("MASTER_PORT=\"70000\" is not a port number"));
        vars[4] = ("MASTER_PORT", "65535");
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        assert!(error(&vars).contains("none is left"));
    }
}
