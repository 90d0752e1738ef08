//! `attnplan validate PLAN [--model MODEL]`.

use std::path::PathBuf;

use super::{report_plan_error, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plan file (YAML).
    pub plan: PathBuf,
}

pub fn run(args: &Args) -> Outcome {
    let plan = schemas::Plan::read(&args.plan).map_err(report_plan_error)?;
    let heads = plan.heads().count();
    super::print(&format!(
        "{}: valid plan (format v{}) for {} {}, {} layers x {} heads = {heads} heads\n",
        args.plan.display(),
        plan.schema_version,
        plan.model.architecture,
        plan.model.name.as_deref().unwrap_or(""),
        plan.model.layers,
        plan.model.query_heads,
    ))?;
    Ok(())
}
