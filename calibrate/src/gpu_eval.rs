//! The plan's attention on the GPU inside the host forward (`attnplan eval --device cuda`), and how it
//! compares with the CPU prefill on the same layer inputs.
//!
//! [`GpuAttention::forward`] runs a layer through [`PlanPrefill::forward_host`] (Q, K, V rounded to
//! bf16, the index built and the attention computed on the device, the output brought back). The
//! threshold is the plan's own `defaults.dense_below`, not the GPU executor's floor
//! ([`runtime::exec::cuda::gpu_dense_below`]), and a layer whose index would be slower than dense
//! attention still computes its index (`PlanPrefill::set_dense_when_faster(false)`), so that the GPU
//! computes the layers the CPU prefill computes sparse and the two evaluations compare. On the forwards chosen for comparison,
//! [`GpuAttention::compare`] also runs the CPU prefill on the same f32 inputs (the output the
//! calibrator's recall describes) and the CPU's index on the bf16-rounded inputs the GPU saw (the
//! selection the GPU builders are meant to reproduce), and counts the (head, query block) lists where
//! the GPU's differ. [`GpuAttention::measure_recall`] measures the recall of the GPU's own indexes.

use profiler::stats::recall_of_index;
use runtime::exec::cuda::{bf16_bits, bf16_to_f32, FlatIndex, PlanPrefill, SparsePrefill as Gpu};
use runtime::pattern::{causal_cells, PatternContext};
use runtime::{AttentionInput, PrefillOptions, SparsePrefill};
use schemas::{ModelInfo, Pattern, Plan};

use crate::eval::add_squared_error;

/// The plan on the GPU, with the figures gathered over the forwards (see the module docs).
pub struct GpuAttention {
    gpu: Gpu,
    plan: PlanPrefill,
    /// The device, in words.
    pub device: String,
    /// The last forward's index (`None` when it ran dense).
    last: Option<FlatIndex>,
    /// Device milliseconds (CUDA events) of index building and of attention, over every forward.
    pub index_ms: f64,
    pub attention_ms: f64,
    /// Computed and dense causal cells over every forward.
    pub cells: u64,
    pub dense_cells: u64,
    /// Heads that ran dense over every forward: whole layers below the threshold, and heads the
    /// plan makes dense.
    pub dense_heads: u64,
    /// Per layer, on compared forwards: squared norms of (GPU − CPU) and of the CPU's output.
    pub err_vs_cpu: Vec<(f64, f64)>,
    /// On compared forwards: (head, query block) lists compared with the CPU's index on the same
    /// bf16-rounded inputs, and those that differ.
    pub lists_compared: u64,
    pub lists_differing: u64,
    /// `[layer][head]` recall of the GPU's index on the forward that measured it (NaN before).
    pub recall: Vec<Vec<f64>>,
    /// Q and K rounded to bf16, as the GPU saw them (indexes read no V).
    rounded: [Vec<f32>; 2],
}

impl GpuAttention {
    /// Opens CUDA device 0 and checks `plan` against `model` there.
    pub fn new(plan: &Plan, model: &ModelInfo) -> runtime::Result<Self> {
        let gpu = Gpu::new(0)?;
        let options = PrefillOptions {
            dense_below: Some(plan.defaults.dense_below),
            ..PrefillOptions::default()
        };
        let mut runner = PlanPrefill::new(&gpu, plan, model, options)?;
        runner.set_timing(true);
        // every sparse layer computes its index's cells, as the CPU prefill does
        runner.set_dense_when_faster(false);
        let device = gpu.device().describe()?;
        let (layers, heads) = (model.layers as usize, model.query_heads as usize);
        Ok(Self {
            gpu,
            plan: runner,
            device,
            last: None,
            index_ms: 0.0,
            attention_ms: 0.0,
            cells: 0,
            dense_cells: 0,
            dense_heads: 0,
            err_vs_cpu: vec![(0.0, 0.0); layers],
            lists_compared: 0,
            lists_differing: 0,
            recall: vec![vec![f64::NAN; heads]; layers],
            rounded: Default::default(),
        })
    }

    /// The length below which every layer runs dense: the plan's.
    pub fn dense_below(&self) -> u64 {
        self.plan.dense_below()
    }

    /// Layer `layer` on the GPU into `out` (f32 of the bf16 output).
    pub fn forward(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
    ) -> runtime::Result<()> {
        let stats = self.plan.forward_host(&self.gpu, layer, input, out)?;
        self.index_ms += f64::from(stats.index_ms.unwrap_or(0.0));
        self.attention_ms += f64::from(stats.attention_ms.unwrap_or(0.0));
        let shape = input.shape;
        let n = shape.seq_len;
        let dense = causal_cells(&(0..n), &(0..n)) * shape.q_heads as u64;
        self.dense_cells += dense;
        self.last = match (stats.dense, self.plan.last_index()) {
            (None, Some(ix)) => Some(self.gpu.download_index(ix)?),
            _ => None,
        };
        match &self.last {
            Some(f) => {
                self.cells += (0..shape.q_heads).map(|h| f.cells(h)).sum::<u64>();
                self.dense_heads += (0..shape.q_heads)
                    .filter(|&h| {
                        let p = self.plan.plan().head(layer, h).map(|hp| &hp.pattern);
                        matches!(p, Some(Pattern::Dense(_)))
                    })
                    .count() as u64;
            }
            None => {
                self.cells += dense;
                self.dense_heads += shape.q_heads as u64;
            }
        }
        Ok(())
    }

    /// After [`GpuAttention::forward`] of `layer` on `input` gave `gpu_out`: the CPU prefill `cpu` on
    /// the same inputs into `cpu_out`, the output difference, and the last forward's lists against
    /// the CPU's on the bf16-rounded inputs. Returns the CPU prefill's attention seconds.
    pub fn compare(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
        gpu_out: &[f32],
        cpu: &mut SparsePrefill,
        cpu_out: &mut Vec<f32>,
    ) -> runtime::Result<f64> {
        cpu_out.resize(gpu_out.len(), 0.0);
        let start = std::time::Instant::now();
        cpu.forward(layer, input, cpu_out)?;
        let seconds = start.elapsed().as_secs_f64();
        add_squared_error(&mut self.err_vs_cpu, layer, gpu_out, cpu_out);
        let Some(gpu_ix) = &self.last else {
            return Ok(seconds);
        };
        for (dst, src) in self.rounded.iter_mut().zip([input.q, input.k]) {
            dst.clear();
            dst.extend(src.iter().map(|&x| bf16_to_f32(bf16_bits(x))));
        }
        let [q, k] = &self.rounded;
        let rounded = AttentionInput::new(input.shape, q, k, input.v)?;
        if let Some(cpu_ix) = cpu.layer_index(layer, &rounded)? {
            for (h, ix) in cpu_ix.iter().enumerate() {
                for qb in 0..ix.q_blocks() {
                    self.lists_compared += 1;
                    let same = gpu_ix.key_blocks(h, qb) == ix.key_blocks(qb)
                        && gpu_ix.columns(h, qb) == ix.columns(qb);
                    self.lists_differing += u64::from(!same);
                }
            }
        }
        Ok(seconds)
    }

    /// Every head's recall (exact, f64) of the index the last forward of `layer` built on `input`
    /// (1 for a layer that ran dense).
    pub fn measure_recall(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> profiler::Result<()> {
        let ctx = PatternContext::new(input.shape.seq_len, &self.plan.plan().defaults);
        for h in 0..input.shape.q_heads {
            let r = match &self.last {
                Some(f) => recall_of_index(input, h, &f.head(h, &ctx)?)?.mean,
                None => 1.0,
            };
            if let Some(slot) = self.recall.get_mut(layer).and_then(|l| l.get_mut(h)) {
                *slot = r;
            }
        }
        Ok(())
    }
}
