//! The `axl` binary: parses the command line, runs the command, and turns errors into one
//! clear message and a non-zero exit.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = axl::cli::Cli::parse();
    if cli.command.runs_a_model() {
        axl::allocator::tune_for_tensors();
        axl::threads::no_idle_spinning();
    }
    match axl::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
