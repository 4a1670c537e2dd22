//! The `axl` binary: parses the command line, runs the command, and turns errors into one
//! clear message and a non-zero exit.

use clap::Parser;

fn main() -> std::process::ExitCode {
    axl::allocator::tune_for_tensors();
    let cli = axl::cli::Cli::parse();
    match axl::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
