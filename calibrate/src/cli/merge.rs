//! `attnplan merge A B [...] -o C`: join profiles of other samples or other layers by addition.

use std::path::PathBuf;

use profiler::profile::Profile;

use super::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Profiles to merge (at least two).
    #[arg(required = true, num_args = 2..)]
    pub profiles: Vec<PathBuf>,
    /// Output profile.
    #[arg(short, long)]
    pub out: PathBuf,
}

pub fn run(args: &Args) -> Outcome {
    let mut paths = args.profiles.iter();
    let first = paths
        .next()
        .ok_or_else(|| anyhow::anyhow!("no profiles given"))?;
    let mut merged = Profile::read(first)?;
    for path in paths {
        let other = Profile::read(path)?;
        if let Err(e) = merged.merge(&other, path) {
            eprintln!("{e}");
            return Err(super::Failure::Check);
        }
    }
    merged.write(&args.out)?;
    eprintln!(
        "wrote {}: {} samples, layers {:?}",
        args.out.display(),
        merged.meta.samples,
        merged.meta.layers
    );
    Ok(())
}
