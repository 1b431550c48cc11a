//! `tribunal readmit`: leaves an operator's readmit request in a running instance's data
//! directory and waits for the instance to take it (spec: Clerk.QuarantineLifted).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tribunal_federation::clerk::InstanceId;

use crate::storage::quarantine::{request_path, request_readmit};

#[derive(clap::Args)]
pub struct Args {
    /// The data directory of any running instance of the federation: it lifts the
    /// quarantine and tells its peers.
    #[arg(long)]
    data_dir: PathBuf,
    /// The instance to re-admit (a peer, or the instance itself).
    #[arg(long)]
    instance: InstanceId,
    /// How long to wait for the instance to take the request; it stays queued after.
    #[arg(long, default_value_t = 10_000)]
    wait_ms: u64,
}

/// `tribunal readmit`: leaves the request, then waits for the running instance to take it.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.data_dir.join("meta.json").exists(),
        "{} is not an instance's data directory (no meta.json)",
        args.data_dir.display()
    );
    request_readmit(&args.data_dir, args.instance)?;
    let path = request_path(&args.data_dir, args.instance);
    let dir = path.parent().expect("a request has a directory");
    let deadline = Instant::now() + Duration::from_millis(args.wait_ms);
    while path.exists() {
        if Instant::now() >= deadline {
            println!(
                "readmit of instance {} is queued in {}; no running instance took it within {} ms \
                 (it is taken when the instance starts)",
                args.instance,
                dir.display(),
                args.wait_ms
            );
            return Ok(ExitCode::from(3));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "readmit of instance {} taken by the instance at {}; it tells its peers (see status.json)",
        args.instance,
        args.data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
