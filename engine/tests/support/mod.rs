//! Helpers shared by the engine's integration tests (each test file is its own crate, so
//! not every one uses every helper).
#![allow(dead_code)]

pub mod federation;

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The `tribunal` binary this test run built.
pub fn tribunal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tribunal"))
}

/// Runs `command` to completion; a failure fails the test with its stderr.
pub fn ok(command: &mut Command) -> Vec<u8> {
    let out = command.output().expect("tribunal runs");
    assert!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The child gets SIGKILL when the test process dies, so that no broker or instance
/// outlives a crashed or aborted test run.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// Status and JSON body of a Gateway answer, whatever its status (a non-JSON body comes
/// back as a JSON string).
pub fn http_answer(result: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("the request did not get an answer: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}
