//! `tribunal`: the engine binary. Everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    tribunal::cli::main()
}
