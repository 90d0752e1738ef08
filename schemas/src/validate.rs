//! The rules a parsed plan must follow beyond its types (docs/plan-format.md, "Validation"), and the
//! check of a plan against a model.
//!
//! Every rule reports an [`Issue`] with the field path, the value found and what was expected; all
//! issues are collected, not just the first.

use crate::error::Issue;
use crate::fingerprint::ModelFingerprint;
use crate::plan::{Budget, Defaults, HeadPlan, ModelInfo, Pattern, Plan, SCHEMA_VERSION};

/// Smallest and largest kernel tile edge accepted.
pub const MIN_BLOCK: u32 = 16;
pub const MAX_BLOCK: u32 = 256;
/// Largest `token_select.spread` (powers of two): at 8, every block but the median ones is already
/// at 1 token or at the whole block.
pub const MAX_SPREAD: f64 = 8.0;

/// Collects every rule violation of `plan`.
pub fn validate(plan: &Plan) -> Vec<Issue> {
    let mut v = Validator {
        issues: Vec::new(),
        max_context: plan.model.max_context,
    };
    if plan.schema_version != SCHEMA_VERSION {
        v.push(
            "schema_version",
            format!("{}, expected {SCHEMA_VERSION}", plan.schema_version),
        );
    }
    v.model(&plan.model);
    let max_context = plan.model.max_context;
    v.provenance(plan, max_context);
    v.defaults(&plan.defaults, max_context);
    v.layers(plan);
    v.issues
}

/// Compares the plan's model section with the model at hand (`actual`): every field but `name`.
pub fn check_model(plan: &ModelInfo, actual: &ModelInfo) -> Vec<Issue> {
    let mut issues = Vec::new();
    let mut cmp = |field: &str, found: String, expected: String| {
        if found != expected {
            issues.push(Issue::new(
                format!("model.{field}"),
                format!("plan says {found}, the model has {expected}"),
            ));
        }
    };
    cmp(
        "architecture",
        plan.architecture.clone(),
        actual.architecture.clone(),
    );
    cmp("layers", plan.layers.to_string(), actual.layers.to_string());
    cmp(
        "query_heads",
        plan.query_heads.to_string(),
        actual.query_heads.to_string(),
    );
    cmp(
        "kv_heads",
        plan.kv_heads.to_string(),
        actual.kv_heads.to_string(),
    );
    cmp(
        "head_dim",
        plan.head_dim.to_string(),
        actual.head_dim.to_string(),
    );
    cmp(
        "rope_theta",
        plan.rope_theta.to_string(),
        actual.rope_theta.to_string(),
    );
    cmp(
        "max_context",
        plan.max_context.to_string(),
        actual.max_context.to_string(),
    );
    cmp(
        "fingerprint",
        plan.fingerprint.clone(),
        actual.fingerprint.clone(),
    );
    issues
}

struct Validator {
    issues: Vec<Issue>,
    max_context: u64,
}

impl Validator {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue::new(field, message));
    }

    fn positive<T: PartialOrd + Default + std::fmt::Display>(&mut self, field: &str, x: T) {
        if x <= T::default() {
            self.push(field, format!("{x}, expected a value > 0"));
        }
    }

    fn unit_interval(&mut self, field: &str, x: f64, open_at_zero: bool) {
        let ok = x.is_finite() && x <= 1.0 && if open_at_zero { x > 0.0 } else { x >= 0.0 };
        if !ok {
            let range = if open_at_zero { "(0, 1]" } else { "[0, 1]" };
            self.push(field, format!("{x}, expected a number in {range}"));
        }
    }

    fn model(&mut self, m: &ModelInfo) {
        if m.architecture.trim().is_empty() {
            self.push("model.architecture", "empty, expected e.g. `llama`");
        }
        self.positive("model.layers", m.layers);
        self.positive("model.query_heads", m.query_heads);
        self.positive("model.kv_heads", m.kv_heads);
        self.positive("model.head_dim", m.head_dim);
        self.positive("model.max_context", m.max_context);
        if m.kv_heads > 0 && m.query_heads % m.kv_heads != 0 {
            self.push(
                "model.query_heads",
                format!(
                    "{} is not a multiple of kv_heads {}",
                    m.query_heads, m.kv_heads
                ),
            );
        }
        if !(m.rope_theta.is_finite() && m.rope_theta > 0.0) {
            self.push(
                "model.rope_theta",
                format!("{}, expected a finite number > 0", m.rope_theta),
            );
        }
        if !ModelFingerprint::is_well_formed(&m.fingerprint) {
            self.push(
                "model.fingerprint",
                format!(
                    "{:?}, expected `sha256:` followed by 64 lowercase hex digits",
                    m.fingerprint
                ),
            );
        }
    }

    fn provenance(&mut self, plan: &Plan, max_context: u64) {
        let p = &plan.provenance;
        if p.tool.trim().is_empty() {
            self.push("provenance.tool", "empty, expected e.g. `attnplan 0.1.0`");
        }
        self.unit_interval("provenance.target_recall", p.target_recall, true);
        for (i, &n) in p.seq_lens.iter().enumerate() {
            if n == 0 || n > max_context {
                self.push(
                    format!("provenance.seq_lens[{i}]"),
                    format!("{n}, expected a length in [1, model.max_context = {max_context}]"),
                );
            }
        }
    }

    fn defaults(&mut self, d: &Defaults, max_context: u64) {
        for (field, b) in [
            ("defaults.block_q", d.block_q),
            ("defaults.block_k", d.block_k),
        ] {
            if !(b.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&b)) {
                self.push(
                    field,
                    format!("{b}, expected a power of two in [{MIN_BLOCK}, {MAX_BLOCK}]"),
                );
            }
        }
        if d.last_q == 0 || u64::from(d.last_q) > max_context {
            self.push(
                "defaults.last_q",
                format!(
                    "{}, expected a count in [1, model.max_context = {max_context}]",
                    d.last_q
                ),
            );
        }
        if d.dense_below > max_context {
            self.push(
                "defaults.dense_below",
                format!(
                    "{}, larger than model.max_context = {max_context}",
                    d.dense_below
                ),
            );
        }
    }

    fn layers(&mut self, plan: &Plan) {
        let n_layers = plan.model.layers as usize;
        let n_heads = plan.model.query_heads;
        if plan.layers.len() != n_layers {
            self.push(
                "layers",
                format!(
                    "{} entries, model.layers says {n_layers}",
                    plan.layers.len()
                ),
            );
        }
        let mut seen_layers = vec![false; n_layers];
        for (i, layer) in plan.layers.iter().enumerate() {
            let lf = format!("layers[{i}]");
            match seen_layers.get_mut(layer.layer as usize) {
                None => self.push(
                    format!("{lf}.layer"),
                    format!(
                        "{} out of range, expected an index in [0, {})",
                        layer.layer, n_layers
                    ),
                ),
                Some(seen) if *seen => self.push(
                    format!("{lf}.layer"),
                    format!("layer {} appears more than once", layer.layer),
                ),
                Some(seen) => {
                    *seen = true;
                    if layer.layer as usize != i {
                        self.push(
                            format!("{lf}.layer"),
                            format!("{}, expected {i}: layers are listed in order", layer.layer),
                        );
                    }
                }
            }
            if layer.heads.len() != n_heads as usize {
                self.push(
                    format!("{lf}.heads"),
                    format!(
                        "{} entries, model.query_heads says {n_heads}",
                        layer.heads.len()
                    ),
                );
            }
            let mut seen_heads = vec![false; n_heads as usize];
            for (j, head) in layer.heads.iter().enumerate() {
                let hf = format!("{lf}.heads[{j}]");
                match seen_heads.get_mut(head.head as usize) {
                    None => self.push(
                        format!("{hf}.head"),
                        format!(
                            "{} out of range, expected an index in [0, {n_heads})",
                            head.head
                        ),
                    ),
                    Some(seen) if *seen => self.push(
                        format!("{hf}.head"),
                        format!("head {} appears more than once in this layer", head.head),
                    ),
                    Some(seen) => {
                        *seen = true;
                        if head.head as usize != j {
                            self.push(
                                format!("{hf}.head"),
                                format!("{}, expected {j}: heads are listed in order", head.head),
                            );
                        }
                    }
                }
                self.head(&hf, head, plan);
            }
            for (h, seen) in seen_heads.iter().enumerate() {
                if !seen && layer.heads.len() >= n_heads as usize {
                    self.push(format!("{lf}.heads"), format!("head {h} is missing"));
                }
            }
        }
        for (l, seen) in seen_layers.iter().enumerate() {
            if !seen && plan.layers.len() >= n_layers {
                self.push("layers", format!("layer {l} is missing"));
            }
        }
    }

    fn head(&mut self, hf: &str, head: &HeadPlan, plan: &Plan) {
        for (name, value) in [
            ("recall", head.recall),
            ("validated_recall", head.validated_recall),
            ("flops_fraction", head.flops_fraction),
            ("gate", head.gate),
            ("retrieval_score", head.retrieval_score),
        ] {
            if let Some(x) = value {
                self.unit_interval(&format!("{hf}.{name}"), x, false);
            }
        }
        self.pattern(&format!("{hf}.pattern"), &head.pattern, plan);
        for (i, m) in head.modalities.iter().enumerate() {
            self.pattern(&format!("{hf}.modalities[{i}].pattern"), &m.pattern, plan);
        }
    }

    /// `limit` is the largest count allowed and how to name it in a message.
    fn budget(&mut self, field: &str, b: &Budget, limit: (u64, &str)) {
        let (ctx, limit_name) = limit;
        let too_big = |x: u64| x > ctx;
        match b {
            Budget::Fixed(x) => {
                if *x == 0 {
                    self.push(field, "0, expected a count >= 1");
                } else if too_big(*x) {
                    self.push(field, format!("{x}, larger than {limit_name} = {ctx}"));
                }
            }
            Budget::Fraction(f) => {
                self.unit_interval(&format!("{field}.fraction"), f.fraction, true);
                self.min_max(field, f.min, f.max, limit);
            }
            Budget::Power(p) => {
                if !(p.scale.is_finite() && p.scale > 0.0) {
                    self.push(
                        format!("{field}.scale"),
                        format!("{}, expected a finite number > 0", p.scale),
                    );
                }
                if !(p.exponent.is_finite() && (0.0..=2.0).contains(&p.exponent)) {
                    self.push(
                        format!("{field}.exponent"),
                        format!("{}, expected a number in [0, 2]", p.exponent),
                    );
                }
                self.min_max(field, p.min, p.max, limit);
            }
            Budget::Buckets(b) => {
                let buckets = &b.buckets;
                if buckets.is_empty() {
                    self.push(
                        format!("{field}.buckets"),
                        "empty, expected at least one bucket",
                    );
                }
                let mut prev = 0u64;
                for (i, bucket) in buckets.iter().enumerate() {
                    let bf = format!("{field}.buckets[{i}]");
                    if bucket.up_to <= prev {
                        self.push(
                            format!("{bf}.up_to"),
                            format!(
                                "{}, expected lengths that increase from bucket to bucket (previous {prev})",
                                bucket.up_to
                            ),
                        );
                    }
                    if bucket.up_to > self.max_context {
                        self.push(
                            format!("{bf}.up_to"),
                            format!(
                                "{}, larger than model.max_context = {}",
                                bucket.up_to, self.max_context
                            ),
                        );
                    }
                    if bucket.value == 0 {
                        self.push(format!("{bf}.value"), "0, expected a count >= 1");
                    } else if too_big(bucket.value) {
                        self.push(
                            format!("{bf}.value"),
                            format!("{}, larger than {limit_name} = {ctx}", bucket.value),
                        );
                    } else if bucket.value > bucket.up_to {
                        self.push(
                            format!("{bf}.value"),
                            format!(
                                "{}, larger than the bucket's length up_to = {}",
                                bucket.value, bucket.up_to
                            ),
                        );
                    }
                    prev = bucket.up_to;
                }
            }
        }
    }

    fn min_max(&mut self, field: &str, min: u64, max: Option<u64>, limit: (u64, &str)) {
        let (ctx, limit_name) = limit;
        if min == 0 {
            self.push(format!("{field}.min"), "0, expected a count >= 1");
        } else if min > ctx {
            self.push(
                format!("{field}.min"),
                format!("{min}, larger than {limit_name} = {ctx}"),
            );
        }
        if let Some(max) = max {
            if max < min {
                self.push(
                    format!("{field}.max"),
                    format!("{max}, smaller than min = {min}"),
                );
            }
        }
    }

    fn pattern(&mut self, pf: &str, pattern: &Pattern, plan: &Plan) {
        let ctx = plan.model.max_context;
        let tokens = (ctx, "model.max_context");
        let blocks = (
            ctx.div_ceil(u64::from(plan.defaults.block_k.max(1))),
            "the key blocks in model.max_context",
        );
        let f = |name: &str| format!("{pf}.{name}");
        match pattern {
            Pattern::Dense(_) => {}
            Pattern::Streaming(p) => {
                self.budget(&f("sink"), &p.sink, tokens);
                self.budget(&f("recent"), &p.recent, tokens);
            }
            Pattern::AShape(p) => {
                self.budget(&f("sink"), &p.sink, tokens);
                self.budget(&f("local"), &p.local, tokens);
            }
            Pattern::VerticalSlash(p) => {
                self.budget(&f("vertical"), &p.vertical, tokens);
                self.budget(&f("slash"), &p.slash, tokens);
            }
            Pattern::BlockSparse(p) => match (&p.top_k, p.coverage) {
                (Some(k), None) => self.budget(&f("top_k"), k, blocks),
                (None, Some(c)) => self.unit_interval(&f("coverage"), c, true),
                _ => self.push(
                    pf,
                    "expected exactly one of `top_k` (blocks) and `coverage` (fraction)",
                ),
            },
            Pattern::Grid(p) => {
                if p.stride == 0 || u64::from(p.stride) > ctx {
                    self.push(
                        f("stride"),
                        format!("{}, expected a period in [1, {ctx}]", p.stride),
                    );
                }
                if p.phase >= p.stride.max(1) {
                    self.push(
                        f("phase"),
                        format!("{}, expected a value < stride = {}", p.phase, p.stride),
                    );
                }
                if p.width == 0 || p.width > p.stride {
                    self.push(
                        f("width"),
                        format!(
                            "{}, expected a value in [1, stride = {}]",
                            p.width, p.stride
                        ),
                    );
                }
                self.budget(&f("sink"), &p.sink, tokens);
                self.budget(&f("local"), &p.local, tokens);
            }
            Pattern::QueryAdaptive(p) => {
                self.unit_interval(&f("gamma"), p.gamma, true);
                if !(p.tau.is_finite() && p.tau >= 0.0) {
                    self.push(
                        f("tau"),
                        format!("{}, expected a finite number >= 0", p.tau),
                    );
                }
                self.budget(&f("min_budget"), &p.min_budget, blocks);
            }
            Pattern::TokenSelect(p) => {
                if p.block == 0 || u64::from(p.block) > ctx {
                    self.push(
                        f("block"),
                        format!("{}, expected a size in [1, {ctx}]", p.block),
                    );
                }
                self.budget(&f("keep"), &p.keep, (u64::from(p.block.max(1)), "block"));
                if !(p.spread.is_finite() && (0.0..=MAX_SPREAD).contains(&p.spread)) {
                    self.push(
                        f("spread"),
                        format!("{}, expected a number in [0, {MAX_SPREAD}]", p.spread),
                    );
                }
                self.budget(&f("sink"), &p.sink, tokens);
                self.budget(&f("local"), &p.local, tokens);
            }
        }
    }
}
