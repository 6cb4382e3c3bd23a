//! `lora-train`: a thin command-line front end over the `lora_train` library.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, LaunchArgs};
use indicatif::{ProgressBar, ProgressStyle};
use lora_core::options::DeviceSpec;
use lora_train::distributed::launcher::{launch, LaunchOn};
use lora_train::{Preparation, ProcessGroup, Stopped, TrainArgs, Trainer};

mod cli;
mod data_commands;

fn main() -> Result<()> {
    // Whether the user chose the thread count, read before `configure` sets it.
    let user_threads = std::env::var_os("RAYON_NUM_THREADS").is_some();
    // SAFETY: first thing in `main` after reading the environment, before any other thread.
    unsafe { lora_core::process_setup::configure() };
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Data(command)) => std::process::exit(data_commands::run(*command)),
        Some(Command::Launch(args)) => std::process::exit(run_launch(args, user_threads)?),
        None => {}
    }
    let group = Arc::new(ProcessGroup::from_launcher()?);
    group.abort_all_on_panic();
    let result = train(cli, Arc::clone(&group));
    let code = match result {
        Ok(()) => 0,
        Err(e) if e.is::<Stopped>() => {
            if group.is_main() {
                eprintln!("{e}");
            }
            // The shell's convention for a run ended by a signal (128 + SIGINT).
            130
        }
        Err(e) if group.size() == 1 => return Err(e),
        Err(e) => {
            // The others may be waiting for this process: stop them all, saying which failed.
            eprintln!(
                "Error (process {} of {}): {e:?}",
                group.rank(),
                group.size()
            );
            group.abort(1)
        }
    };
    // The last reference: under MPI its drop is MPI_Finalize, which waits for every process, so
    // none exits while process 0 still writes its files.
    drop(group);
    match code {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}

/// `lora-train launch`: starts the processes (through `mpirun` on the CPU, as children on GPUs)
/// and returns the run's exit status. The processes get an equal share of the cores, unless the
/// user set `RAYON_NUM_THREADS` (then each gets that many).
fn run_launch(launch_args: LaunchArgs, user_threads: bool) -> Result<i32> {
    let program = std::env::current_exe().context("cannot find this program's path")?;
    // The training options as the processes will read them, for the device they train on.
    let training = Cli::try_parse_from(
        std::iter::once(program.clone().into_os_string()).chain(launch_args.args.iter().cloned()),
    )
    .context("the training options after `launch`")?;
    let on = match training_args(training)?
        .device
        .unwrap_or_default()
        .resolve()
    {
        DeviceSpec::Cuda(_) => LaunchOn::Gpus,
        _ => LaunchOn::Cpu,
    };
    // The user's RAYON_NUM_THREADS, or (set by `configure`) the physical cores.
    let cores = candle_core::utils::get_num_threads();
    let threads = match user_threads {
        true => cores,
        false => (cores / launch_args.nproc.max(1)).max(1),
    };
    // A SIGINT or SIGTERM is for the training processes: they stop after a step with a
    // checkpoint, and this process waits for them (on GPUs it passes the request on, so a
    // signal to it alone, from `timeout` or a container's stop, reaches them too).
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the SIGINT/SIGTERM handler")?;
    launch(
        launch_args.nproc,
        threads,
        program,
        &launch_args.args,
        on,
        &stop,
    )
}

/// The training options: the command line's over the `--config` file's.
fn training_args(cli: Cli) -> Result<TrainArgs> {
    match &cli.config {
        Some(path) => Ok(TrainArgs::from_toml_file(path)?.overlay(cli.args)),
        None => Ok(cli.args),
    }
}

fn train(cli: Cli, group: Arc<ProcessGroup>) -> Result<()> {
    // Only the main process of a data-parallel run reports; the others work silently.
    let main = group.is_main();
    let mut args = training_args(cli)?;
    // Under NCCL the launch chose the GPU: `auto` is not probed (which would open another).
    args.device = Some(group.device_spec(args.device.unwrap_or_default())?);
    let device_note = args.device.unwrap_or_default().auto_note();
    let config = args.resolve()?;
    if let Some(note) = device_note.filter(|_| main) {
        eprintln!("{note}");
    }
    if main && group.size() > 1 {
        eprintln!(
            "data-parallel: {} processes × --batch-size {} = {} samples per micro-batch",
            group.size(),
            config.batch_size,
            group.size() * config.batch_size
        );
    }

    let encoding = ProgressBar::hidden();
    // In a data-parallel run each process encodes its share of the images (the bar shows
    // process 0's).
    let encoding_template = match group.size() {
        1 => "encoding {pos}/{len} images {bar:30}",
        _ => "encoding {pos}/{len} images (this process's share) {bar:30}",
    };
    let mut trainer = Trainer::in_group(config, group, &mut |event| match event {
        _ if !main => {}
        Preparation::Dataset(d) => {
            for w in &d.warnings {
                eprintln!("warning: {w}");
            }
            for bad in &d.skipped {
                eprintln!("skipped: {bad}");
            }
            eprintln!(
                "dataset: {} images, {} samples per epoch{}",
                d.items.len(),
                d.samples_per_epoch(),
                if d.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", {} bad files skipped", d.skipped.len())
                }
            );
        }
        Preparation::ClassImages(d) => {
            for w in &d.warnings {
                eprintln!("warning (class images): {w}");
            }
            eprintln!(
                "class images (prior preservation): {} images, {} samples per pass",
                d.items.len(),
                d.samples_per_epoch()
            );
        }
        Preparation::Encoding { done, total } => {
            if done == 1 {
                encoding.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                encoding.set_length(total as u64);
                encoding.set_style(
                    ProgressStyle::with_template(encoding_template).expect("valid template"),
                );
            }
            encoding.set_position(done as u64);
            if done == total {
                encoding.finish_and_clear();
            }
        }
        Preparation::Resumed { step, path } => {
            eprintln!("resuming at step {step} from {}", path.display());
        }
        Preparation::Base(model) => eprintln!("base: {}", model.describe()),
        Preparation::PickleCopy(copy) => {
            eprintln!(
                "reading the pickle --base through its safetensors copy {}",
                copy.display()
            );
        }
    })?;
    // SIGINT / SIGTERM: finish the step in progress, write a checkpoint, say how to resume. In a
    // data-parallel run a stop asked of any process stops all at the same step (the request
    // travels with the gradients).
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the SIGINT/SIGTERM handler")?;
    trainer.stop_on(stop);
    if !main {
        trainer.run(&mut |_| {})?;
        return Ok(());
    }
    let adapter = trainer.adapter();
    let values: usize = trainer.params().iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "adapter: {} UNet modules{}, {values} trained values; optimizer state {:.1} MiB",
        adapter.unet.len(),
        match (adapter.text_encoder.len(), adapter.text_encoder_2.len()) {
            (0, _) => String::new(),
            (n, 0) => format!(" and {n} text-encoder modules (captions encoded every step)"),
            (n, m) => format!(
                " and {n} + {m} modules in the two text encoders (captions encoded every step)"
            ),
        },
        trainer.optimizer_state_bytes() as f64 / (1 << 20) as f64
    );

    let bar = ProgressBar::new(trainer.total_steps() as u64);
    bar.set_position(trainer.current_step() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  loss {msg}  {per_sec}  ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let result = trainer.run(&mut |report| {
        bar.set_message(format!("{:.4}", report.loss));
        bar.set_position(report.step as u64);
    });
    bar.finish_and_clear();
    let summary = result?;
    eprintln!(
        "trained {} steps (to step {}): mean step {:.3} s, {:.2} images/s, loss {} → {}{}",
        summary.steps_run,
        summary.final_step,
        summary.mean_step_seconds,
        summary.images_per_second,
        summary
            .first_loss
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        summary
            .last_loss
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        summary.peak_rss_bytes.map_or(String::new(), |b| format!(
            ", peak memory (RSS) {:.0} MiB",
            b as f64 / (1 << 20) as f64
        )),
    );
    if let (Some(first), Some(last)) = (summary.first_val_loss, summary.last_val_loss) {
        eprintln!("validation loss {first:.4} → {last:.4} (metrics file: val_loss rows)");
    }
    eprintln!("adapter written to {}", summary.output.display());
    if let Some(ema) = &summary.ema_output {
        eprintln!(
            "its moving average (--ema-decay) written to {}",
            ema.display()
        );
    }
    Ok(())
}
