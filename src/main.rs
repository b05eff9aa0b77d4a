//! The `pollgate` binary: parses the command line and runs a command.
//!
//! ```text
//! pollgate serve -c conf/pollgate.yaml
//! curl 'http://127.0.0.1:8080/sub/news'          # held until...
//! pollgate publish news 'hello'                  # ...this answers it
//! ```

use clap::Parser;
use pollgate::cli::{self, Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match cli::load(&args) {
            Ok((config, _)) => {
                print!(
                    "{}",
                    serde_yaml::to_string(&config.redacted()).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprintln!("{problems}");
                ExitCode::from(2)
            }
        },
        Command::Publish(args) => match cli::publish(&args) {
            Ok(id) => {
                println!("{id}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pollgate publish: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            let (config, routes) = match cli::load(&args.config) {
                Ok(c) => c,
                Err(problems) => {
                    eprintln!("{problems}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = cli::init_logging(args.log_format, &args.log_level) {
                eprintln!("pollgate: {e}");
                return ExitCode::from(2);
            }
            match pollgate::server::run(config, routes, args.upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pollgate: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
