//! attnplan calibrator and the `attnplan` command-line tool.
//!
//! - [`cli`]: the subcommands (`validate`, `inspect`, ...), one file each.

pub mod cli;
