//! The `attnplan` command: argument parsing is in `calibrate::cli`; this file maps outcomes to exit
//! codes: 0 success, 1 a check failed (invalid plan, model mismatch), 2 usage or I/O error.

use std::process::ExitCode;

fn main() -> ExitCode {
    calibrate::cli::main()
}
