//! `attnplan validate PLAN [--model MODEL]`.

use std::path::PathBuf;

use super::{report_plan_error, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plan file (YAML).
    pub plan: PathBuf,
    /// Also check the plan belongs to this model: a .gguf file or a Hugging Face directory (read
    /// from metadata only, no weights loaded).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

pub fn run(args: &Args) -> Outcome {
    let plan = schemas::Plan::read(&args.plan).map_err(report_plan_error)?;
    let heads = plan.heads().count();
    if let Some(model) = &args.model {
        let spec = profiler::model::ModelSpec::read(model)?;
        plan.check_model(&args.plan, &spec.model_info())
            .map_err(report_plan_error)?;
    }
    let matched = match &args.model {
        Some(m) => format!(", matches {}", m.display()),
        None => String::new(),
    };
    super::print(&format!(
        "{}: valid plan (format v{}) for {} {}, {} layers x {} heads = {heads} heads{matched}\n",
        args.plan.display(),
        plan.schema_version,
        plan.model.architecture,
        plan.model.name.as_deref().unwrap_or(""),
        plan.model.layers,
        plan.model.query_heads,
    ))?;
    Ok(())
}
