//! The `vidu-worker` binary: see the library's `cli` module.

fn main() -> std::process::ExitCode {
    vidu_worker::cli::main()
}
