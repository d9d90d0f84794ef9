//! `vidgen`: one binary for generation, serving, planning, benchmarks and component runs.
//!
//! Exit codes: 0 success, 2 invalid request (the message names the field), 1 runtime failure.

mod bench;
mod generate;
mod plan;
mod probe;
mod run_component;
mod serve;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vidgen", version, about = "Self-hosted Wan video generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between subcommands does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Generate a video from a prompt (and optionally an image).
    Generate(generate::Args),
    /// Serve the OpenAI-compatible API and the browser portal.
    Serve(serve::Args),
    /// Plan memory for a model, size and frame count before running anything.
    Plan(plan::Args),
    /// Benchmarks (JSON lines) on the current device.
    Bench(bench::Args),
    /// Run one engine component on tensors from a safetensors file.
    RunComponent(run_component::Args),
    /// Inspect a video file: streams, frame count, duration, quality verdict.
    Probe(probe::Args),
    /// Internal: run one job for `vidgen serve` in a child process.
    #[command(hide = true)]
    Worker(worker::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Engine warnings (a kernel that fell back, a plan dropped) reach stderr in every command;
    // `serve` logs at info and may log JSON.
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(false, "warn");
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Bench(args) => bench::run(args),
        Command::RunComponent(args) => run_component::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Worker(args) => worker::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

/// Log lines on stderr at `default_level` unless RUST_LOG says otherwise.
fn init_logging(json: bool, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colour codes only for a terminal: in a log file they split `job_id=...` for grep.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests calling run twice in one process) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// One-line cause on stderr; exit 2 for caller errors, 1 for runtime failures.
fn report(err: &anyhow::Error) -> ExitCode {
    let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    eprintln!("error: {}", chain.join(": "));
    if vidgen_engine::error::is_invalid_input(err) {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
