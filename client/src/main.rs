use std::process::ExitCode;

use clap::FromArgMatches as _;

mod cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match cli::Cli::from_arg_matches(&cli::command().get_matches()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The reader of stdout went away mid-write (`| head`): it has what it
            // wanted, so end quietly, as Unix tools do.
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
