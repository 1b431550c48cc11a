//! `tribunal`: the engine binary.
//!
//! What exists today is the deterministic core (issue 2): `evaluate` runs a command
//! log through it on simulated shards and cross-checks the result against the
//! sequential reference interpreter; `sample` writes a workload to feed it. The
//! running engine (`run`, the local log, the Ledger, federation, HTTP) arrives with
//! the later issues; the help text says only what is here.

mod evaluate;
mod local_log;
mod log_cli;
mod sample;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tribunal",
    version,
    about = "Tribunal: deterministic event sourcing for inventory movements",
    long_about = "Tribunal: deterministic event sourcing for inventory movements.\n\n\
        This build contains the deterministic sans-IO core only: `evaluate` runs a log of \
        JSON-lines commands through the Usher, Warden, router and per-shard Arbiters in one \
        process and checks the result against the sequential reference interpreter. \
        There is no durable storage, network or HTTP yet."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a JSON-lines command log through the core on N simulated shards.
    Evaluate(evaluate::Args),
    /// Print a deterministic mixed workload as JSON-lines envelopes.
    Sample(sample::Args),
    /// Append commands to an input log (`--log local:DIR`), or print its records.
    Log(log_cli::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Evaluate(args) => evaluate::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Log(args) => log_cli::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tribunal: error: {error:#}");
            ExitCode::from(2)
        }
    }
}
