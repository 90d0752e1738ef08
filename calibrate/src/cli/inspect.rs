//! `attnplan inspect PLAN [--json]`: a summary a person can read, or one JSON object for scripts.

use std::fmt::Write as _;
use std::path::PathBuf;

use schemas::{Pattern, Plan, Summary};

use super::{report_plan_error, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plan file (YAML).
    pub plan: PathBuf,
    /// Print one JSON object: schema_version, model, provenance, defaults, summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Outcome {
    let plan = Plan::read(&args.plan).map_err(report_plan_error)?;
    let summary = Summary::of(&plan);
    let text = if args.json {
        let value = serde_json::json!({
            "file": args.plan.display().to_string(),
            "schema_version": plan.schema_version,
            "model": plan.model,
            "provenance": plan.provenance,
            "defaults": plan.defaults,
            "summary": summary,
        });
        serde_json::to_string_pretty(&value).map_err(anyhow::Error::from)? + "\n"
    } else {
        render(&args.plan, &plan, &summary)
    };
    super::print(&text)?;
    Ok(())
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

/// Short column titles for the pattern kinds, in `Pattern::KINDS` order.
const SHORT: [&str; 8] = [
    "dense", "stream", "a_shape", "v_slash", "block", "grid", "q_adapt", "tok_sel",
];

fn render(path: &std::path::Path, plan: &Plan, s: &Summary) -> String {
    let m = &plan.model;
    let p = &plan.provenance;
    let d = &plan.defaults;
    let mut out = String::new();
    let _ = writeln!(out, "{}", path.display());
    let _ = writeln!(
        out,
        "  model        {} ({}), {} layers x {} query heads, {} KV heads, head_dim {}, context {}",
        m.name.as_deref().unwrap_or("unnamed"),
        m.architecture,
        m.layers,
        m.query_heads,
        m.kv_heads,
        m.head_dim,
        m.max_context
    );
    let _ = writeln!(out, "  fingerprint  {}", m.fingerprint);
    let lens: Vec<String> = p.seq_lens.iter().map(u64::to_string).collect();
    let _ = writeln!(
        out,
        "  made by      {} from {}: {} samples + {} held out at {} tokens, target recall {}",
        p.tool,
        p.data,
        p.samples,
        p.heldout_samples,
        lens.join(", "),
        p.target_recall
    );
    let _ = writeln!(
        out,
        "  defaults     tiles {}x{}, last_q {}, dense below {} tokens, KV-group indexes {}",
        d.block_q,
        d.block_k,
        d.last_q,
        d.dense_below,
        if d.share_kv_group_indexes {
            "shared"
        } else {
            "per head"
        }
    );
    let _ = writeln!(out, "  heads        {}: {}", s.heads, s.pattern_mix());
    let _ = writeln!(
        out,
        "  recall       mean {} (held-out mean {}, worst head {})",
        opt(s.mean_recall),
        opt(s.mean_validated_recall),
        opt(s.min_validated_recall)
    );
    let missing = if s.heads_without_flops > 0 {
        format!(" ({} heads record none)", s.heads_without_flops)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  FLOPs        {} of dense causal attention, expected{missing}",
        opt(s.flops_fraction)
    );
    let _ = writeln!(out);
    let _ = write!(out, "  {:>5}", "layer");
    for title in SHORT {
        let _ = write!(out, " {title:>7}");
    }
    let _ = writeln!(out, " {:>7} {:>7}", "recall", "flops");
    for l in &s.layers {
        let _ = write!(out, "  {:>5}", l.layer);
        for kind in Pattern::KINDS {
            let n = l.patterns.get(kind).copied().unwrap_or(0);
            let cell = if n == 0 {
                ".".to_string()
            } else {
                n.to_string()
            };
            let _ = write!(out, " {cell:>7}");
        }
        let _ = writeln!(
            out,
            " {:>7} {:>7}",
            opt(l.mean_recall),
            opt(l.flops_fraction)
        );
    }
    let fields: std::collections::BTreeSet<&String> =
        s.budgets.iter().flat_map(|b| b.mean.keys()).collect();
    if !fields.is_empty() {
        let _ = writeln!(out);
        let _ = write!(out, "  {:<28}", "budget (mean over heads)");
        for b in &s.budgets {
            let _ = write!(out, " {:>8}", b.seq_len);
        }
        let _ = writeln!(out);
        for field in fields {
            let _ = write!(out, "  {field:<28}");
            for b in &s.budgets {
                let v = b.mean.get(field).map_or("-".into(), |x| format!("{x:.0}"));
                let _ = write!(out, " {v:>8}");
            }
            let _ = writeln!(out);
        }
    }
    out
}
